"""Bad input through the local host: every file ends in a verdict, nothing crashes the host."""

from __future__ import annotations

import csv
import io
import json
import uuid
import zlib
from pathlib import Path
from typing import Any

import pytest

from core.containers import SEGMENTS
from core.suppression import Channel, Reason, SuppressionList
from tests.helpers import eventually
from tests.scenarios import people, to_csv

pytestmark = pytest.mark.integration


def test_a_long_non_ascii_address_keyed_sync_lands_twice(scenario, storage, fake_braze) -> None:  # type: ignore[no-untyped-def]
    """An e-mail identity the reference typed (254 characters can be about 1,000 bytes),
    unchanged on the second landing, with a suppression list to look it up in: C once
    copied it into a 256-byte stack buffer (and the host died with SIGSEGV)."""
    s = scenario("x")
    s.sync = "by-email"
    token = uuid.uuid4().hex[:8]
    long_address = "\u00fc" * 200 + f"{token}@example.com"
    SuppressionList(storage).add(
        Channel.EMAIL, f"someone.{token}@example.com", Reason.HARD_BOUNCE, source="test"
    )
    fake_braze.configure(known_profiles=[f"email:{long_address}", f"email:b.{token}@example.com"])
    data = f"email,firstName\n{long_address},Ana\nb.{token}@example.com,Bo\n".encode()
    first = s.land(data)
    assert first["status"] == "succeeded", first
    assert first["counts"]["sent"] == 2
    second = s.land(data)
    assert second["status"] == "succeeded", second
    assert second["counts"]["unchanged"] == 2
    assert fake_braze.profiles()[f"email:{long_address}"] == {
        "email": long_address,
        "first_name": "Ana",
    }


def test_a_header_only_file_and_a_file_of_malformed_rows_end_succeeded(scenario) -> None:  # type: ignore[no-untyped-def]
    s = scenario("header-only")
    header = to_csv([])
    empty = s.land(header)
    assert empty["status"] == "succeeded", (empty["error_code"], empty["error"])
    assert empty["counts"]["rows"] == 0
    malformed = s.land(header + b"x,y\n" + b"only,three,fields\n")
    assert malformed["status"] == "succeeded", malformed
    assert malformed["counts"]["rejected.malformed_row"] == 2 and malformed["counts"]["rows"] == 2


def _manifest(parts: dict[str, bytes], sink: str) -> bytes:
    results = [
        {"sinkPath": sink.format(name=name), "name": name, "size": len(data)}
        for name, data in parts.items()
    ]
    return json.dumps({"flowRunId": "f", "scheduledTime": "2026-12-01T00:00:00Z",
                       "exportResults": results}).encode()  # fmt: skip


def test_a_manifest_that_lands_before_its_parts_waits_for_them(scenario, storage) -> None:  # type: ignore[no-untyped-def]
    s = scenario("early-manifest")
    rows = people(f"EM{uuid.uuid4().hex[:4]}", 20)
    s.known(rows)
    parts = {"seg_1.csv": to_csv(rows[:12]), "seg_1_2.csv": to_csv(rows[12:])}
    folder = f"{s.sync}/{uuid.uuid4().hex[:8]}"
    # sinkPath as AEP writes it in full (the part's own path), under the container's name
    manifest = _manifest(parts, f"/segments/{folder}/{{name}}")
    name = f"{folder}/manifest-d-{uuid.uuid4().hex[:6]}.json"
    storage.blobs.create(SEGMENTS, name, manifest)

    def waiting() -> dict[str, Any] | None:
        found = [r for r in s.runs() if r["source"].endswith(name)]
        return found[0] if found and found[0]["detail"].get("waiting_for_parts") else None

    parked = eventually(waiting, timeout=30)
    assert parked["status"] == "running"
    assert sorted(parked["detail"]["waiting_for_parts"]) == sorted(parts)
    for part, data in parts.items():
        storage.blobs.create(SEGMENTS, f"{folder}/{part}", data)
    run = s.wait_for(name)
    assert run["status"] == "succeeded", run
    assert run["counts"]["sent"] == 20 and "waiting_for_parts" not in run["detail"]


def test_a_manifest_whose_parts_never_land_ends_at_its_deadline(scenario, storage) -> None:  # type: ignore[no-untyped-def]
    s = scenario("manifest-deadline")
    folder = f"{s.sync}/{uuid.uuid4().hex[:8]}"
    parts = {"here.csv": to_csv(people("MD", 2)), "never.csv": b"crmId\n"}
    storage.blobs.create(SEGMENTS, f"{folder}/here.csv", parts["here.csv"])
    # sinkPath as a folder
    name = f"{folder}/manifest-d-{uuid.uuid4().hex[:6]}.json"
    storage.blobs.create(SEGMENTS, name, _manifest(parts, f"/{folder}"))
    run = s.wait_for(name)
    assert run["status"] == "failed" and run["error_code"] == "parts_missing", run
    assert "never.csv" in run["error"] and "here.csv" not in run["error"]


def test_a_manifest_never_takes_a_file_of_another_sync(scenario, storage) -> None:  # type: ignore[no-untyped-def]
    s = scenario("manifest-deadline")
    other = f"vip-clean/{uuid.uuid4().hex[:8]}.csv"
    storage.blobs.create(SEGMENTS, other, to_csv(people("OS", 1)))
    name = f"{s.sync}/x/manifest-d-{uuid.uuid4().hex[:6]}.json"
    listed = {other.split("/")[1]: to_csv(people("OS", 1))}
    storage.blobs.create(SEGMENTS, name, _manifest(listed, "/vip-clean/{name}"))
    run = s.wait_for(name)
    assert run["status"] == "failed" and run["error_code"] == "parts_missing", run


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def test_a_200_mb_line_is_rejected_whole_with_memory_flat(scenario, running_app) -> None:  # type: ignore[no-untyped-def]
    """Gzip makes it 200 KB: the line is read no further than the limit (4 MiB)."""
    s = scenario("long-line")
    packer = zlib.compressobj(6, zlib.DEFLATED, 31)
    parts = [packer.compress(to_csv([]) + b"LL-1,")]
    piece = b"a" * (1 << 20)
    parts += [packer.compress(piece) for _ in range(200)]
    parts.append(packer.compress(b",x@example.com\n") + packer.flush())
    pid = running_app.process.pid
    before = _kib(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak (VmHWM) starts over
    run = s.land(b"".join(parts), suffix=".csv.gz")
    assert run["status"] == "failed" and run["error_code"] == "line_too_long", run
    assert "line 2" in run["error"]
    assert _kib(pid, "VmHWM") - before < 100 * 1024, (before, _kib(pid, "VmHWM"))


def test_json_values_of_the_wrong_type_are_rejected_never_sent_as_python_text(
    scenario, fake_braze, storage
) -> None:  # type: ignore[no-untyped-def]
    s = scenario("x")
    s.sync = "typed-json"
    token = uuid.uuid4().hex[:6]
    rows = {
        "ok": {"name": " Ana ", "points": 7, "vip": True, "score": 1.5, "nick": "  ana  "},
        "digits": {"name": 42, "points": "8", "vip": "yes", "score": "1e3"},
        "list": {"name": ["x", "y"]},
        "bool": {"name": True},
        "object": {"name": {"a": 1}},
        "float": {"name": 1.0},
        "fraction": {"points": 3.5},
        "underscore": {"points": "1_000"},
        "other-digits": {"points": "\u0663"},
        "bool-points": {"points": True},
        "number-vip": {"vip": 1},
        "vip-list": {"vip": ["y"]},
    }
    data = b"".join(
        json.dumps({"id": f"TJ-{token}-{key}", **values}).encode() + b"\n"
        for key, values in rows.items()
    )
    run = s.land(data, suffix=".jsonl")
    assert run["status"] == "succeeded", run
    assert run["counts"]["sent"] == 2 and run["counts"]["rejected"] == 10, run["counts"]
    assert run["counts"]["rejected.wrong_type"] == 8
    assert run["counts"]["rejected.not_integer"] == 2
    profiles = fake_braze.profiles()
    assert profiles[f"TJ-{token}-ok"] == {
        "first_name": " Ana ", "points": 7, "vip": True, "score": 1.5, "nick": "ana"
    }  # fmt: skip
    assert profiles[f"TJ-{token}-digits"] == {
        "first_name": "42", "points": 8, "vip": True, "score": 1000.0
    }  # fmt: skip
    sent = [o for o in fake_braze.state.received if o.get("external_id", "").startswith("TJ-")]
    assert not any(isinstance(v, str) and v.startswith(("[", "{", "True")) for o in sent
                   for v in o.values())  # fmt: skip


def test_the_report_lists_columns_the_sync_does_not_read_and_audiences_the_file_lacks(
    scenario,
) -> None:  # type: ignore[no-untyped-def]
    s = scenario("clean")
    rows = people(f"UC{uuid.uuid4().hex[:4]}", 3)
    s.known(rows)
    header = "crmId,email,firstName,birthDate,country,points,tier,loyaltyTier,note,"
    header += "segmentMembership.ups.seg-vip.status\n"
    lines = [
        f"{r['crmId']},{r['email']},{r['firstName']},{r['birthDate']},{r['country']},"
        f"{r['points']},{r['tier']},gold,x,realized\n"
        for r in rows
    ]
    run = s.land((header + "".join(lines)).encode())
    assert run["status"] == "succeeded" and run["counts"]["sent"] == 3, run
    assert run["detail"]["unmapped_columns"] == ["loyaltyTier", "note"]
    assert run["detail"]["missing_optional_columns"] == ["segmentMembership.ups.seg-lapsed.status"]


def _rejects(storage: Any, run: dict[str, Any]) -> dict[str, list[str]]:
    container, _, name = run["detail"]["rejects"].partition("/")
    text = b"".join(storage.blobs.iter_chunks(storage.blobs.ref(container, name))).decode()
    table = list(csv.reader(io.StringIO(text)))
    assert table[0] == ["line", "reason_code", "message", "raw_row"]
    return {row[0]: row for row in table[1:]}


def test_the_rejects_file_keeps_each_rejected_record_as_it_was_in_the_file(
    scenario, storage
) -> None:  # type: ignore[no-untyped-def]
    s = scenario("rejects")
    token = uuid.uuid4().hex[:4]
    header = to_csv([]).decode()
    body = (
        f'"RR{token}-1", "not an e-mail",Ana,1990-01-01,PT,1,gold,realized,\n'  # quoted
        f"RR{token}-2,rr2@example.com,Bo,31/12/1990,PT,2,,,\n"  # unquoted: values joined
        f'RR{token}-3,too,"few\n fields"\n'  # malformed, with a quoted line break
    )
    run = s.land((header + body).encode())
    rejects = _rejects(storage, run)
    assert rejects["2"][3] == f'"RR{token}-1", "not an e-mail",Ana,1990-01-01,PT,1,gold,realized,'
    assert rejects["3"][3] == f"RR{token}-2,rr2@example.com,Bo,31/12/1990,PT,2,,,"
    assert rejects["4"][1] == "malformed_row"
    assert rejects["4"][3] == f'RR{token}-3,too,"few\n fields"'
    t = scenario("x")
    t.sync = "typed-json"
    line = json.dumps({"id": f"RJ-{token}", "name": ["x"], "unmapped": {"kept": True}})
    jsonl = t.land((line + "\n{broken\n").encode(), suffix=".jsonl")
    kept = _rejects(storage, jsonl)
    assert kept["1"][3] == line and kept["2"][3] == "{broken"
