"""Adobe Campaign import files end to end, through the local host: a profile export fills
the known-profiles registry, segment exports become a full file, then delta files, and the
fake collector takes them as Campaign's file collector and import workflow would."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from core.destinations.known_profiles import CONTAINER, KnownProfiles
from core.events.model import EventType
from core.export.quarantine import AddressEvent, QuarantineBook, TouchedAddress
from core.suppression import Channel, Reason, SuppressionList
from devhost.fakes.campaign import FakeCampaignCollector
from tests.helpers import eventually
from tests.scenarios import people, to_csv

pytestmark = pytest.mark.integration

REGISTRY = "campaign-e2e"


def lines_of(collected: list, key: str) -> dict[str, dict[str, str]]:
    return {
        cells[0]: dict(zip(file.columns[1:], cells[1:], strict=True))
        for file in collected
        for cells in file.lines
    }


def test_audience_becomes_full_then_delta_files(scenario, storage) -> None:  # type: ignore[no-untyped-def]
    run = scenario("campaign")
    collector = FakeCampaignCollector(storage)
    collector.collect()  # whatever an earlier session left
    rows = people("cmp", 40)
    rows[5]["firstName"] = "Ana\tMaria"  # a tab would break the line: the row fails instead
    known = rows[:30]
    # Campaign's profile export: the registry learns which profiles Campaign has.
    export = "crmId;email\n" + "".join(f"{r['crmId']};{r['email']}\n" for r in known)
    storage.blobs.create(
        CONTAINER, f"{REGISTRY}/profiles-full-{uuid.uuid4().hex[:6]}.txt", export.encode(),
    )  # fmt: skip
    registry = KnownProfiles(storage, REGISTRY)
    eventually(lambda: registry.count() == 30, timeout=60)
    # One address suppressed, one quarantined by Campaign's rules (a hard bounce).
    SuppressionList(storage).add(Channel.EMAIL, rows[1]["email"], Reason.UNSUBSCRIBE, source="test")
    book = QuarantineBook(storage, threshold=5)
    bounce = AddressEvent(datetime.now(UTC), uuid.uuid4().hex, EventType.BOUNCED_HARD, "550", None)
    list(
        book.apply_window(datetime.now(UTC), [TouchedAddress("email", rows[2]["email"], [bounce])])
    )

    first = run.land(to_csv(rows))
    assert first["counts"]["unmatched"] == 10  # rows[30:] are not in Campaign
    assert first["counts"]["suppressed"] == 2
    assert first["counts"]["failed"] == 1  # the tab
    taken = collector.collect()
    assert collector.refused == [] and len(taken) == 1
    written = lines_of(taken, "crmId")
    expected = {r["crmId"] for r in known} - {rows[i]["crmId"] for i in (1, 2, 5)}
    assert set(written) == expected
    header = taken[0].columns
    assert header[:3] == ["external_id", "email", "first_name"]
    sample = written[rows[3]["crmId"]]
    assert sample["dob"] == rows[3]["birthDate"].replace("-", "/")
    assert sample["audience_vip"] == "1" and sample["loyalty_points"] == "30"

    # Second export: one name, one membership changed; only those cells are written.
    rows[4]["firstName"] = "Renamed"
    rows[6]["segmentMembership.ups.seg-vip.status"] = "realized"
    second = run.land(to_csv(rows))
    assert second["counts"]["sent"] == 2
    taken = collector.collect()
    delta = lines_of(taken, "crmId")
    assert set(delta) == {rows[4]["crmId"], rows[6]["crmId"]}
    assert {k: v for k, v in delta[rows[4]["crmId"]].items() if v} == {"first_name": "Renamed"}
    assert {k: v for k, v in delta[rows[6]["crmId"]].items() if v} == {"audience_vip": "1"}
    assert collector.profiles[rows[4]["crmId"]]["first_name"] == "Renamed"
    assert collector.profiles[rows[4]["crmId"]]["email"] == rows[4]["email"]

    # The same export again: nothing changed, no file.
    third = run.land(to_csv(rows))
    assert third["counts"].get("sent", 0) == 0
    assert collector.collect() == [] and collector.pending() == []
