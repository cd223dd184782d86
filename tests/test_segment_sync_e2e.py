"""Segment files through the local host into the fake Braze server, end to end."""

from __future__ import annotations

import csv
import gzip
import io
import json
import uuid
from typing import Any

import pytest
import requests

from core.containers import REJECTS, SEGMENTS
from core.storage.blobs import BlobRef
from core.suppression import Channel, Reason, SuppressionList
from core.sync import state_codec
from core.sync.state import StateStore
from tests.scenarios import people, to_csv

pytestmark = pytest.mark.integration


def test_first_file_sends_everything_and_an_identical_file_sends_nothing(scenario) -> None:  # type: ignore[no-untyped-def]
    s = scenario("identical")
    rows = people("ID", 120)
    s.known(rows)
    first = s.land(to_csv(rows))
    assert first["status"] == "succeeded"
    assert first["counts"]["sent"] == 120 and first["counts"]["rows"] == 120
    assert first["detail"]["batches_sent"] == 2  # 75 + 45
    assert first["detail"]["buckets_in_c"] > 0  # the C path (tests/test_sync_speedups.py)
    stored = s.profiles(rows)["ID-00001"]
    assert stored == {
        "email": "id.1@example.com", "first_name": "Name1", "dob": "1951-02-11",
        "country": "NL", "loyalty_points": 10, "tier": "gold", "audience_vip": True,
    }  # fmt: skip
    before = len(s.received_for(rows))
    second = s.land(to_csv(rows))
    assert second["counts"]["unchanged"] == 120 and second["counts"]["sent"] == 0
    assert len(s.received_for(rows)) == before


def test_one_percent_changed_sends_exactly_the_changed_attributes(scenario) -> None:  # type: ignore[no-untyped-def]
    s = scenario("changes")
    rows = people("CH", 300)
    s.known(rows)
    s.land(to_csv(rows))
    already = len(s.received_for(rows))
    changed = [dict(r) for r in rows]
    changed[7]["firstName"] = "Renamed"
    changed[150]["points"] = "99999"
    changed[299]["country"] = "BE"
    run = s.land(to_csv(changed))
    assert run["counts"]["sent"] == 3 and run["counts"]["unchanged"] == 297
    sent = sorted(s.received_for(rows)[already:], key=lambda o: o["external_id"])
    assert sent == [
        {"external_id": "CH-00007", "_update_existing_only": True, "first_name": "Renamed"},
        {"external_id": "CH-00150", "_update_existing_only": True, "loyalty_points": 99999},
        {"external_id": "CH-00299", "_update_existing_only": True, "country": "BE"},
    ]


def test_exited_removes_membership_we_added_only(scenario) -> None:  # type: ignore[no-untyped-def]
    s = scenario("exited")
    rows = people("EX", 4)
    s.known(rows)
    s.land(to_csv(rows))
    assert s.profiles(rows)["EX-00001"]["audience_vip"] is True
    exits = [dict(r) for r in rows]
    for row in exits:
        row["segmentMembership.ups.seg-vip.status"] = "exited"
        row["segmentMembership.ups.seg-lapsed.status"] = "exited"
    run = s.land(to_csv(exits))
    assert run["counts"]["sent"] == 2  # EX-1 and EX-3 had vip from us
    assert s.profiles(rows)["EX-00001"]["audience_vip"] is False
    assert "audience_vip" not in s.profiles(rows)["EX-00000"]
    assert not any("audience_lapsed" in o for o in s.received_for(rows))


def test_suppressed_addresses_are_never_sent(scenario, storage) -> None:  # type: ignore[no-untyped-def]
    s = scenario("suppressed")
    rows = people("SU", 10)
    s.known(rows)
    suppressions = SuppressionList(storage)
    suppressions.add(Channel.EMAIL, "su.3@example.com", Reason.HARD_BOUNCE, source="test")
    suppressions.add(Channel.EMAIL, "su.4@example.com", Reason.UNSUBSCRIBE, source="test")
    run = s.land(to_csv(rows))
    assert run["counts"]["suppressed"] == 2 and run["counts"]["sent"] == 8
    assert run["counts"]["suppressed.hard_bounce"] == 1
    assert run["counts"]["suppressed.unsubscribe"] == 1
    sent_ids = {o["external_id"] for o in s.received_for(rows)}
    assert "SU-00003" not in sent_ids and "SU-00004" not in sent_ids
    assert s.profiles(rows)["SU-00003"] == {}


def test_bad_rows_go_to_rejects_with_lines_while_valid_rows_go_out(scenario, storage) -> None:  # type: ignore[no-untyped-def]
    s = scenario("rejects")
    rows = people("RJ", 6)
    s.known(rows)
    rows[1]["crmId"] = "=1+2"  # a spreadsheet would run this
    rows[1]["email"] = "not-an-email"
    rows[2]["birthDate"] = "31/12/1990"
    rows[4]["crmId"] = rows[3]["crmId"]  # duplicate identity: the first row wins
    data = to_csv(rows) + b"RJ-99999,short,row\n"
    run = s.land(data)
    counts = run["counts"]
    assert counts["rejected"] == 4 and counts["sent"] == 3
    assert counts["rejected.invalid_email"] == 1 and counts["rejected.not_date"] == 1
    assert counts["rejected.duplicate_identity"] == 1 and counts["rejected.malformed_row"] == 1
    path = run["detail"]["rejects"]
    assert path == f"{REJECTS}/{s.sync}/{run['run_id']}.csv"
    name = path.split("/", 1)[1]
    ref = storage.blobs.ref(REJECTS, name)
    text = b"".join(storage.blobs.iter_chunks(ref)).decode()
    table = list(csv.reader(io.StringIO(text)))
    assert table[0] == ["line", "reason_code", "message", "raw_row"]
    table[1:] = sorted(table[1:], key=lambda r: int(r[0]))  # grouped by bucket in the file
    assert [(r[0], r[1]) for r in table[1:]] == [
        ("3", "invalid_email"), ("4", "not_date"), ("6", "duplicate_identity"),
        ("8", "malformed_row"),
    ]  # fmt: skip
    assert table[1][3].startswith("'=1+2,")  # neutralised for spreadsheets
    assert "not-an-email" in table[1][3]
    assert table[2][3].startswith("RJ-00002,rj.2@example.com,Name2,31/12/1990,")


def test_a_file_that_is_not_utf8_is_rejected_whole(scenario) -> None:  # type: ignore[no-untyped-def]
    s = scenario("not-utf8")
    rows = people("NU", 5)
    s.known(rows)
    rows[2]["firstName"] = "Chloé"
    run = s.land(to_csv(rows).decode().encode("latin-1"))
    assert run["status"] == "failed" and run["error"].startswith("not_utf8:")
    assert s.received_for(rows) == []


def test_gzip_and_unknown_profiles(scenario) -> None:  # type: ignore[no-untyped-def]
    s = scenario("gzip")
    rows = people("GZ", 20)
    s.known(rows[:15])
    run = s.land(gzip.compress(to_csv(rows)), suffix=".csv.gz")
    assert run["counts"]["sent"] == 15 and run["counts"]["unmatched"] == 5
    assert all(s.profiles(rows)[r["crmId"]] is None for r in rows[15:])  # never created


def test_upsert_mode_creates_profiles(scenario) -> None:  # type: ignore[no-untyped-def]
    s = scenario("upsert")
    rows = people("UP", 5)
    run = s.land(to_csv(rows))
    assert run["counts"]["sent"] == 5
    assert all(o.get("_update_existing_only") is None for o in s.received_for(rows))
    assert all(p is not None for p in s.profiles(rows).values())


def test_storms_end_in_the_same_state_as_a_clean_run(scenario, fake_braze) -> None:  # type: ignore[no-untyped-def]
    rows = people("ST", 400)
    data = to_csv(rows)
    final_states = {}
    for name, config in (
        ("clean", {}),
        ("storm-429", {"limit_every": 2}),
        ("storm-5xx", {"fail_every": 3}),
    ):
        s = scenario(name)
        fake_braze.reset([r["crmId"] for r in rows])
        fake_braze.configure(**config)
        try:
            run = s.land(data)
        finally:
            fake_braze.configure(limit_every=0, fail_every=0)
        assert run["status"] == "succeeded" and run["counts"]["sent"] == 400, run
        final_states[name] = s.profiles(rows)
        if name == "storm-429":
            assert run["detail"]["rate_limited_waits"] > 0, run
        if name == "storm-5xx":
            assert run["detail"]["retries"] > 0, run
    assert final_states["storm-429"] == final_states["clean"]
    assert final_states["storm-5xx"] == final_states["clean"]


def test_terminal_error_stops_the_run_and_marks_nothing_sent(scenario, fake_braze) -> None:  # type: ignore[no-untyped-def]
    s = scenario("terminal")
    rows = people("TE", 10)
    s.known(rows)
    real_key = fake_braze.state.api_key
    fake_braze.configure(api_key="rotated-key")
    try:
        run = s.land(to_csv(rows))
    finally:
        fake_braze.configure(api_key=real_key)
    assert run["status"] == "failed" and "401" in run["error"]
    again = s.land(to_csv(rows))  # nothing was marked as sent, so all of it goes now
    assert again["counts"]["sent"] == 10


def json_line(record: dict[str, Any]) -> bytes:
    return json.dumps(record).encode() + b"\n"


def test_blob_ref_is_what_the_trigger_sees(storage) -> None:  # type: ignore[no-untyped-def]
    storage.blobs.create(SEGMENTS, "vip-clean/ref-check.csv", b"x", overwrite=True)
    ref = storage.blobs.ref(SEGMENTS, "vip-clean/ref-check.csv")
    assert isinstance(ref, BlobRef) and ref.etag.startswith('"')


def test_large_files_fan_out_through_the_queue_and_add_up(scenario, storage) -> None:  # type: ignore[no-untyped-def]
    s = scenario("fanout")
    rows = people("FO", 3500)
    s.known(rows)
    rows[10]["email"] = "broken"
    run = s.land(to_csv(rows))
    assert run["status"] == "succeeded", run
    assert run["detail"]["chunks"] == 4  # 3,500 rows at 1,000 per worker
    assert run["counts"]["rows"] == 3500
    assert run["counts"]["sent"] == 3499 and run["counts"]["rejected"] == 1
    assert len({o["external_id"] for o in s.received_for(rows)}) == 3499
    assert run["detail"]["rejects"].endswith(f"{run['run_id']}.csv")
    assert list(storage.blobs.list("sync-work", f"{run['run_id']}/")) == []  # cleaned up
    again = s.land(to_csv(rows))
    assert again["counts"]["unchanged"] == 3499 and again["counts"]["rejected"] == 1
    # The split settled the unchanged rows: one rejected row left is no work to fan out.
    assert "chunks" not in again["detail"]
    rows[20]["firstName"] = "Changed"
    rows[2000]["firstName"] = "Changed"
    third = s.land(to_csv(rows))
    assert third["counts"]["sent"] == 2 and third["counts"]["unchanged"] == 3497


def test_profiles_past_the_lookup_budget_are_settled_in_their_buckets_alike(scenario) -> None:  # type: ignore[no-untyped-def]
    s = scenario("lookup-budget")
    rows = people("LB", 3000)
    s.known(rows)
    first = s.land(to_csv(rows))
    assert first["counts"]["sent"] == 3000
    changed = [dict(r) for r in rows]
    for i in (3, 1500, 2999):
        changed[i]["points"] = "7"
    second = s.land(to_csv(changed))
    assert second["counts"]["sent"] == 3 and second["counts"]["unchanged"] == 2997
    # The split's tables took some of the buckets only; their buckets settled the rest.
    settled = second["detail"]["rows_settled_in_split"]
    assert 800 < settled < 2200, second["detail"]
    assert second["detail"]["rows_settled_by_line"] == settled
    assert [o["loyalty_points"] for o in s.received_for(rows)[3000:]] == [7, 7, 7]
    again = s.land(to_csv(changed))
    assert again["counts"]["unchanged"] == 3000 and again["counts"]["sent"] == 0


def test_preview_reports_the_diff_and_changes_nothing(scenario, storage) -> None:  # type: ignore[no-untyped-def]
    s = scenario("dryrun")
    rows = people("DR", 50)
    s.known(rows)
    s.land(to_csv(rows))
    sent_before = len(s.received_for(rows))
    changed = [dict(r) for r in rows]
    changed[1]["firstName"] = "Changed"
    changed[2]["segmentMembership.ups.seg-vip.status"] = "realized"
    changed[3]["segmentMembership.ups.seg-vip.status"] = "exited"
    preview = s.land(to_csv(changed), folder="preview/")
    assert preview["status"] == "succeeded"
    assert preview["counts"]["would_send"] == 3 and preview["counts"]["sent"] == 0
    assert preview["counts"]["unchanged"] == 47
    assert preview["detail"]["preview"]["diff"] == {
        "attribute.first_name": 1, "memberships_added": 1, "memberships_removed": 1,
        "profiles_updated": 3,
    }  # fmt: skip
    container, _, name = preview["detail"]["preview"]["objects"].partition("/")
    lines = b"".join(storage.blobs.iter_chunks(storage.blobs.ref(container, name))).splitlines()
    objects = sorted((json.loads(line)["object"] for line in lines), key=lambda o: o["external_id"])
    assert objects[0] == {
        "external_id": "DR-00001", "_update_existing_only": True, "first_name": "Changed",
    }  # fmt: skip
    assert len(s.received_for(rows)) == sent_before  # nothing sent
    real = s.land(to_csv(changed))  # the state was not touched by the preview
    assert real["counts"]["sent"] == 3


def test_mirror_takes_back_memberships_of_profiles_absent_from_a_full_export(scenario) -> None:  # type: ignore[no-untyped-def]
    s = scenario("mirror")
    rows = people("MI", 10)  # odd rows realize "vip"
    s.known(rows)
    s.land(to_csv(rows))
    full = s.land(to_csv(rows[:5]))  # the next full export lacks MI-5 ... MI-9
    assert full["counts"]["rows"] == 5 and full["counts"]["unchanged"] == 5
    assert full["counts"]["mirror.removed"] == 3  # MI-5, MI-7, MI-9 had vip from us
    profiles = s.profiles(rows)
    assert [profiles[f"MI-{i:05d}"]["audience_vip"] for i in (5, 7, 9)] == [False] * 3
    assert profiles["MI-00003"]["audience_vip"] is True  # still exported, untouched
    assert "audience_vip" not in profiles["MI-00006"]  # never ours: never sent
    again = s.land(to_csv(rows[:5]))
    assert "mirror.removed" not in again["counts"]  # taken back once
    # Back in the export exactly as they were: their memberships are given back.
    back = s.land(to_csv(rows))
    assert back["counts"]["sent"] == 3 and back["counts"]["unchanged"] == 7
    assert [s.profiles(rows)[f"MI-{i:05d}"]["audience_vip"] for i in (5, 7, 9)] == [True] * 3


def test_split_export_runs_once_when_its_manifest_lands(scenario, storage, running_app) -> None:  # type: ignore[no-untyped-def]
    s = scenario("manifest")
    rows = people("MF", 30)
    s.known(rows)
    rows[22]["birthDate"] = "not a date"
    first, second = to_csv(rows[:15]), to_csv(rows[15:])
    folder = f"{s.sync}/20261124_010718"
    storage.blobs.create(SEGMENTS, f"{folder}/aep_seg_20261124_010718.csv", first)
    storage.blobs.create(SEGMENTS, f"{folder}/aep_seg_20261124_010718_2.csv", second)
    manifest = {
        "flowRunId": "0ac8f3c0", "scheduledTime": "2026-11-24T01:00:00Z",
        "exportResults": [
            {"sinkPath": "/x", "name": "aep_seg_20261124_010718.csv", "size": len(first)},
            {"sinkPath": "/x", "name": "aep_seg_20261124_010718_2.csv", "size": len(second)},
        ],
    }  # fmt: skip
    run = s.land(json.dumps(manifest).encode(), suffix=".json", folder="20261124_010718/manifest-")
    assert run["counts"]["rows"] == 30 and run["counts"]["sent"] == 29
    container, _, name = run["detail"]["rejects"].partition("/")
    rejects = b"".join(storage.blobs.iter_chunks(storage.blobs.ref(container, name))).decode()
    assert "\naep_seg_20261124_010718_2.csv:9,not_date," in rejects  # part and line
    runs = requests.get(
        f"{running_app.base_url}/api/runs", params={"sync_id": s.sync}, timeout=5
    ).json()["runs"]
    assert len(runs) == 1  # the parts were not runs of their own


def test_a_file_for_an_undeclared_sync_is_a_failed_run_with_the_reason(scenario) -> None:  # type: ignore[no-untyped-def]
    s = scenario("x")
    s.sync = "not-declared"
    run = s.land(b"crmId\nC1\n")
    assert run["status"] == "failed"
    assert run["error"] == "no sync is declared with id 'not-declared'"


def test_rows_without_consent_stay_held_back_until_consent_is_given(scenario, storage) -> None:  # type: ignore[no-untyped-def]
    s = scenario("consent")
    s.sync = "consented"  # tests/data/syncs.yaml: TSV, consent column emailConsent
    token = uuid.uuid4().hex[:8]
    rows = [
        {"crmId": f"C{token}-{i}", "email": f"c{token}.{i}@example.com",
         "emailConsent": "y" if i % 2 == 0 else "n"}
        for i in range(6)
    ]  # fmt: skip
    s.known(rows)

    def tsv(rows: list[dict[str, str]]) -> bytes:
        lines = ["crmId\temail\temailConsent"]
        lines += [f"{r['crmId']}\t{r['email']}\t{r['emailConsent']}" for r in rows]
        return ("\n".join(lines) + "\n").encode()

    first = s.land(tsv(rows), suffix=".tsv")
    assert first["counts"]["sent"] == 3 and first["counts"]["suppressed"] == 3
    assert first["counts"]["suppressed.no_consent"] == 3
    # The same rows again: held back again (remembered by their raw digest, not re-typed).
    second = s.land(tsv(rows), suffix=".tsv")
    assert second["counts"]["unchanged"] == 3 and second["counts"]["suppressed.no_consent"] == 3
    held = set()
    states = StateStore(storage, "consented", "braze", "")
    stored = states.stored_buckets()
    reader = states.reader(stored, sorted(stored))
    for bucket in sorted(stored):
        text = state_codec.decompress(reader.take(bucket)[0])  # type: ignore[index]
        last_header = text[text.rfind(b"\n{") + 1 :].split(b"\n", 1)[0]
        held |= set(json.loads(last_header)["withheld"])
    assert {r["crmId"] for r in rows[1::2]} <= held
    # Consent given by one, another's row changes but still grants none.
    changed = [dict(r) for r in rows]
    changed[1]["emailConsent"] = "yes"
    changed[3]["email"] = f"other.{token}@example.com"
    third = s.land(tsv(changed), suffix=".tsv")
    assert third["counts"]["sent"] == 1 and third["counts"]["suppressed.no_consent"] == 2
    assert s.profiles(rows)[rows[1]["crmId"]] == {"email": rows[1]["email"]}
    never_sent = [s.profiles(rows)[rows[n]["crmId"]] for n in (3, 5)]
    assert never_sent == [{}, {}]  # known to Braze, nothing of theirs ever sent
