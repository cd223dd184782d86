"""Governance at activation through the local host: labelled fields under the policies of
tests/data/syncs.yaml, and AEP consent values, into the fake Braze server."""

from __future__ import annotations

import csv
import io
import uuid

import pytest

from tests.scenarios import COLUMNS, people, to_csv

pytestmark = pytest.mark.integration
CONSENT = "consents.marketing.email.val"


def test_a_forbidden_field_blocks_the_run_before_any_request(scenario, fake_braze) -> None:  # type: ignore[no-untyped-def]
    s = scenario("gov-blocked")  # loyalty_points labelled C2; Braze exports to a third party
    rows = people(f"GB{uuid.uuid4().hex[:4]}", 12)
    s.known(rows)
    before = fake_braze.state.requests
    run = s.land(to_csv(rows))
    assert fake_braze.state.requests == before and s.received_for(rows) == []
    assert run["status"] == "failed" and run["error_code"] == "blocked_by_policy"
    assert "third-party-export" in run["error"] and "loyalty_points" in run["error"]
    assert run["counts"]["blocked_by_policy"] == 12 and run["counts"]["sent"] == 0
    assert run["counts"]["blocked_by_policy.third-party-export"] == 12
    (violation,) = run["detail"]["governance"]["blocked"]
    assert violation == {
        "policy": "third-party-export",
        "enforcement": "block",
        "field": "loyalty_points",
        "labels": ["C2"],
        "marketing_actions": ["export_to_third_party"],
        "lineage": {
            "sync": s.sync, "source_column": "points", "target": "loyalty_points",
            "destination": "braze",
        },
    }  # fmt: skip
    # Blocked runs keep no state: the same file is still all to send once unblocked.
    again = s.land(to_csv(rows))
    assert again["counts"]["blocked_by_policy"] == 12 and again["counts"]["unchanged"] == 0


def test_labels_on_the_whole_export_block_its_identity_too(scenario, fake_braze) -> None:  # type: ignore[no-untyped-def]
    s = scenario("gov-dataset")
    rows = people(f"GD{uuid.uuid4().hex[:4]}", 3)
    s.known(rows)
    before = fake_braze.state.requests
    run = s.land(to_csv(rows))
    assert fake_braze.state.requests == before
    blocked = run["detail"]["governance"]["blocked"]
    named = {v.get("identity") or v.get("field") or v.get("audience") for v in blocked}
    assert {"external_id", "email", "loyalty_points", "audience_vip"} - named == {"audience_vip"}
    assert {"vip", "lapsed"} <= named  # audiences by their names
    assert run["counts"]["blocked_by_policy"] == 3


def test_a_drop_policy_sends_every_other_field(scenario) -> None:  # type: ignore[no-untyped-def]
    s = scenario("gov-drop")  # country labelled S2: dropped for Email Targeting
    rows = people(f"GP{uuid.uuid4().hex[:4]}", 8)
    s.known(rows)
    run = s.land(to_csv(rows))
    assert run["status"] == "succeeded" and run["counts"]["sent"] == 8
    assert not any("country" in sent for sent in s.received_for(rows))
    first = s.profiles(rows)[rows[1]["crmId"]]
    assert first == {
        "email": rows[1]["email"], "first_name": "Name1", "dob": "1951-02-11",
        "loyalty_points": 10, "tier": "gold", "audience_vip": True,
    }  # fmt: skip
    (dropped,) = run["detail"]["governance"]["dropped"]
    assert dropped["policy"] == "no-location-for-targeting" and dropped["field"] == "country"
    assert dropped["lineage"]["source_column"] == "country"
    assert "country" not in run["detail"]["unmapped_columns"]  # read, then kept back


def _consent_csv(rows: list[dict[str, str]], consent: list[str]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, [*COLUMNS, CONSENT], lineterminator="\n")
    writer.writeheader()
    writer.writerows({**row, CONSENT: value} for row, value in zip(rows, consent, strict=True))
    return out.getvalue().encode()


# Each AEP consent value (consents.marketing.<channel>.val) and what it does by default.
AEP_VALUES = {
    "y": "sent", "dy": "sent", "Y": "sent",
    "n": "no_consent", "dn": "no_consent", "p": "no_consent", "u": "no_consent",
    "LI": "no_consent", "CT": "no_consent", "CP": "no_consent", "VI": "no_consent",
    "PI": "no_consent", "": "no_consent", "maybe": "no_consent",
}  # fmt: skip


def test_each_consent_value_ends_as_documented(scenario) -> None:  # type: ignore[no-untyped-def]
    s = scenario("consent-aep")
    values = list(AEP_VALUES)
    rows = people(f"CA{uuid.uuid4().hex[:4]}", len(values))
    s.known(rows)
    run = s.land(_consent_csv(rows, values))
    sent = {o["external_id"] for o in s.received_for(rows)}
    for row, value in zip(rows, values, strict=True):
        assert (row["crmId"] in sent) == (AEP_VALUES[value] == "sent"), value
    expected_held = sum(1 for v in AEP_VALUES.values() if v == "no_consent")
    assert run["counts"]["suppressed.no_consent"] == expected_held
    assert run["counts"]["sent"] == len(values) - expected_held


def test_a_consent_withdrawal_takes_back_the_audiences_we_added(scenario) -> None:  # type: ignore[no-untyped-def]
    s = scenario("consent-withdrawn")
    rows = people(f"CW{uuid.uuid4().hex[:4]}", 6)  # odd rows are in the vip audience
    s.known(rows)
    first = s.land(_consent_csv(rows, ["y"] * 6))
    assert first["counts"]["sent"] == 6
    assert s.profiles(rows)[rows[1]["crmId"]]["audience_vip"] is True
    before = len(s.received_for(rows))
    # Rows 1 and 2 withdraw consent (1 is in vip, 2 in no audience); nothing else changes.
    second = s.land(_consent_csv(rows, ["y", "n", "n", "y", "y", "y"]))
    assert second["counts"]["suppressed.no_consent"] == 2 and second["counts"]["unchanged"] == 4
    assert second["counts"]["sent"] == 0
    assert second["counts"]["consent.audiences_removed"] == 1
    removal = s.received_for(rows)[before:]
    assert removal == [
        {"external_id": rows[1]["crmId"], "_update_existing_only": True, "audience_vip": False}
    ]
    # The same withdrawn rows again: nothing more goes.
    third = s.land(_consent_csv(rows, ["y", "n", "n", "y", "y", "y"]))
    assert third["counts"]["suppressed.no_consent"] == 2 and len(s.received_for(rows)) == before + 1
    # Consent given again: the audience comes back with the row.
    fourth = s.land(_consent_csv(rows, ["y"] * 6))
    assert fourth["counts"]["sent"] == 1 and fourth["counts"]["unchanged"] == 5
    assert s.profiles(rows)[rows[1]["crmId"]]["audience_vip"] is True
