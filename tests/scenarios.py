"""Segment-sync scenarios through the local host: sample rows, CSV, and a `Scenario` that
lands files for one sync and waits for their runs to end."""

from __future__ import annotations

import csv
import io
import uuid
from typing import Any

import requests

from core.containers import SEGMENTS
from tests.helpers import eventually

ENDED = ("succeeded", "partially_failed", "failed")

COLUMNS = [
    "crmId", "email", "firstName", "birthDate", "country", "points", "tier",
    "segmentMembership.ups.seg-vip.status", "segmentMembership.ups.seg-lapsed.status",
]  # fmt: skip


def people(prefix: str, count: int) -> list[dict[str, str]]:
    return [
        {
            "crmId": f"{prefix}-{i:05d}",
            "email": f"{prefix}.{i}@example.com".lower(),
            "firstName": f"Name{i}",
            "birthDate": f"19{50 + i % 50}-0{1 + i % 9}-1{i % 9}",
            "country": ["PT", "NL", "FR", "DE"][i % 4],
            "points": str(i * 10),
            "tier": ["", "gold", "silver"][i % 3],
            "segmentMembership.ups.seg-vip.status": "realized" if i % 2 else "",
            "segmentMembership.ups.seg-lapsed.status": "",
        }
        for i in range(count)
    ]


def to_csv(rows: list[dict[str, str]]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


class Scenario:
    def __init__(self, app: Any, storage: Any, fake: Any, name: str) -> None:
        self.app, self.storage, self.fake = app, storage, fake
        self.sync = f"vip-{name}"
        self.files = 0

    def land(self, data: bytes, suffix: str = ".csv", folder: str = "") -> dict[str, Any]:
        """Upload a file for this scenario's sync and wait for its run to finish."""
        self.files += 1
        name = f"{self.sync}/{folder}export-{self.files:03d}-{uuid.uuid4().hex[:6]}{suffix}"
        self.storage.blobs.create(SEGMENTS, name, data, overwrite=True)
        return self.wait_for(name)

    def runs(self) -> list[dict[str, Any]]:
        answer = requests.get(
            f"{self.app.base_url}/api/runs", params={"sync_id": self.sync}, timeout=5
        )
        return list(answer.json()["runs"])

    def wait_for(self, name: str, timeout: float = 60) -> dict[str, Any]:
        """The run of blob `name` once it has ended."""

        def finished() -> dict[str, Any] | None:
            for run in self.runs():
                if run["source"].endswith(name) and run["status"] in ENDED:
                    return dict(run)
            return None

        return eventually(finished, timeout=timeout)

    def known(self, rows: list[dict[str, str]]) -> None:
        self.fake.configure(known_profiles=[r["crmId"] for r in rows])

    def received_for(self, rows: list[dict[str, str]]) -> list[dict[str, Any]]:
        ids = {r["crmId"] for r in rows}
        return [o for o in self.fake.state.received if o.get("external_id") in ids]

    def profiles(self, rows: list[dict[str, str]]) -> dict[str, Any]:
        everything = self.fake.profiles()
        return {r["crmId"]: everything.get(r["crmId"]) for r in rows}
