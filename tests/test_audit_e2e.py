"""The exclusion audit trail through the local host: every way a person is kept out of a
send is recorded, and the lookup route answers by address or profile id without echoing
either."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
import requests

from core.audit import AuditLog, Exclusion, ExclusionRecord, subject_hash, table_for
from core.suppression import Channel, Reason, SuppressionList
from tests.scenarios import people, to_csv
from tests.test_governance_e2e import _consent_csv

pytestmark = pytest.mark.integration


def lookup(app: Any, **subject: str) -> dict[str, Any]:
    answer = requests.post(f"{app.base_url}/api/audit/lookup", json=subject, timeout=10)
    assert answer.status_code == 200, answer.text
    for value in subject.values():
        assert value not in answer.text and value.lower() not in answer.text  # never echoed
    return dict(answer.json())


def rules(answer: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(e["run_id"], e["outcome"], e["rule"]) for e in answer["exclusions"]]


def test_each_exclusion_is_recorded_and_found_by_address_or_profile_id(
    scenario, storage, running_app
) -> None:  # type: ignore[no-untyped-def]
    s = scenario("consent-aep")  # consent from consents.marketing.email.val
    rows = people(f"AU{uuid.uuid4().hex[:4]}", 6)
    s.known(rows[:5])  # row 5 is not in Braze: unmatched (update_only)
    SuppressionList(storage).add(Channel.EMAIL, rows[1]["email"], Reason.HARD_BOUNCE, source="test")
    run = s.land(_consent_csv(rows, ["y", "y", "n", "y", "y", "y"]))
    assert run["counts"]["suppressed"] == 2 and run["counts"]["unmatched"] == 1
    first = run["run_id"]
    assert rules(lookup(running_app, email=rows[1]["email"])) == [
        (first, "suppressed", "hard_bounce")
    ]
    assert rules(lookup(running_app, profile_id=rows[2]["crmId"])) == [
        (first, "suppressed", "no_consent")
    ]
    assert rules(lookup(running_app, email=rows[5]["email"].upper())) == [
        (first, "unmatched", "not_in_destination")
    ]
    answer = lookup(running_app, profile_id=rows[0]["crmId"])  # sent: nothing recorded
    assert answer["exclusions"] == [] and answer["subject"]["kind"] == "profile"

    # The same file again: the row still held back is not recorded again (its first time
    # stands); the suppressed one is settled in the split, and recorded again.
    again = s.land(_consent_csv(rows, ["y", "y", "n", "y", "y", "y"]))
    assert again["detail"]["rows_settled_in_split"] > 0
    second = again["run_id"]
    assert rules(lookup(running_app, profile_id=rows[2]["crmId"])) == [
        (first, "suppressed", "no_consent")
    ]
    assert [r[0] for r in rules(lookup(running_app, email=rows[1]["email"]))] == [second, first]
    # Suppressed after it was sent: the unchanged row is settled in the split and recorded.
    SuppressionList(storage).add(Channel.EMAIL, rows[3]["email"], Reason.UNSUBSCRIBE, source="test")
    third = s.land(_consent_csv(rows, ["y", "y", "n", "y", "y", "y"]))
    assert third["counts"]["suppressed.unsubscribe"] == 1
    assert rules(lookup(running_app, profile_id=rows[3]["crmId"])) == [
        (third["run_id"], "suppressed", "unsubscribe")
    ]


def test_a_blocked_run_records_whom_it_kept_back(scenario, running_app) -> None:  # type: ignore[no-untyped-def]
    s = scenario("gov-blocked")
    rows = people(f"AB{uuid.uuid4().hex[:4]}", 3)
    s.known(rows)
    run = s.land(to_csv(rows))
    for row in rows:
        assert rules(lookup(running_app, email=row["email"])) == [
            (run["run_id"], "blocked_by_policy", "third-party-export")
        ]


def test_lookups_need_exactly_one_valid_subject(running_app) -> None:  # type: ignore[no-untyped-def]
    url = f"{running_app.base_url}/api/audit/lookup"
    for body in ({}, {"email": "a@example.com", "profile_id": "x"}, {"email": "not-an-address"}):
        answer = requests.post(url, json=body, timeout=10)
        assert answer.status_code == 400 and answer.json()["error"]["code"] in (
            "bad_request", "bad_subject"
        ), answer.text  # fmt: skip
        assert "not-an-address" not in answer.text


def test_months_past_the_retention_are_dropped_whole(storage) -> None:  # type: ignore[no-untyped-def]
    prefix = "t" + uuid.uuid4().hex[:10]  # tables of its own: a purge drops whole months
    audit = AuditLog(storage, prefix)
    person = f"RT-{uuid.uuid4().hex[:8]}"
    old, recent = datetime(2001, 1, 25, tzinfo=UTC), datetime(2001, 3, 2, tzinfo=UTC)
    for at in (old, recent):
        audit.record(
            "sync:t", f"run-{at.month}", [Exclusion(person, None, None, "suppressed", "x")], at=at
        )
    now = datetime(2001, 3, 20, tzinfo=UTC)
    assert [r.run_id for r in audit.lookup("profile", person, now=now, retention_days=60)] == [
        "run-3", "run-1"
    ]  # fmt: skip
    assert audit.purge(retention_days=60, now=now) == []  # January ended under 60 days ago
    now = datetime(2001, 4, 5, tzinfo=UTC)  # now it ended over 60 days ago; March did not
    assert audit.purge(retention_days=60, now=now) == [table_for(old, prefix)]
    assert storage.tables.names(prefix) == [table_for(recent, prefix)]
    found = audit.lookup("profile", person, now=now, retention_days=60)
    assert [r.run_id for r in found] == ["run-3"]
    storage.tables.drop(table_for(recent, prefix))


def test_packs_and_rows_from_before_packs_are_both_found_and_both_forgotten(storage) -> None:  # type: ignore[no-untyped-def]
    prefix = "t" + uuid.uuid4().hex[:10]
    audit = AuditLog(storage, prefix)
    at = datetime(2002, 5, 3, tzinfo=UTC)
    person, other = f"PK-{uuid.uuid4().hex[:8]}", f"PK-{uuid.uuid4().hex[:8]}"
    excluded = [
        Exclusion(person, "pk.person@example.com", None, "suppressed", "no_consent"),
        Exclusion(other, None, None, "unmatched", "not_in_destination"),
    ]
    audit.record("sync:t", "run-new", excluded, at=at)
    audit.record("sync:t", "run-new", excluded[:1], at=at)  # a retried bucket writes again
    # A month written before packs: one row per record.
    digest = subject_hash("profile", person)
    storage.tables.get(ExclusionRecord, table_for(at, prefix)).upsert(ExclusionRecord(
        partition_key=digest[:2], row_key=f"{digest}:run-old", kind="profile", source="sync:t",
        run_id="run-old", at=at, outcome="suppressed", rule="hard_bounce",
    ))  # fmt: skip
    now = datetime(2002, 5, 20, tzinfo=UTC)
    found = audit.lookup("profile", person, now=now, retention_days=60)
    assert sorted((r.run_id, r.rule) for r in found) == [
        ("run-new", "no_consent"), ("run-old", "hard_bounce")
    ]  # fmt: skip
    by_address = audit.lookup("email", "pk.person@example.com", now=now, retention_days=60)
    assert [r.run_id for r in by_address] == ["run-new"]
    assert audit.forget("profile", person) == 3  # the old row and both packs' records
    assert audit.lookup("profile", person, now=now, retention_days=60) == []
    assert [r.rule for r in audit.lookup("profile", other, now=now, retention_days=60)] == [
        "not_in_destination"
    ]  # the others in the same packs are kept
    storage.tables.drop(table_for(at, prefix))
