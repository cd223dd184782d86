from __future__ import annotations

import re
from pathlib import Path

import pytest

from core.errors import ConfigError
from core.sync.definitions import SyncMode, load_document, parse_document

ROOT = Path(__file__).resolve().parent.parent


def minimal(**overrides: object) -> dict:
    sync = {"id": "vip", "identity": {"column": "crmId", "namespace": "crmId"}, **overrides}
    return {"version": 1, "syncs": [sync]}


def test_sample_and_test_documents_load() -> None:
    sample = load_document(ROOT / "config/syncs.yaml")
    demo = sample.get("demo-vip-audience")
    assert demo is not None and demo.mode == SyncMode.UPDATE_ONLY
    assert [f.target for f in demo.fields][:4] == ["email", "first_name", "last_name", "dob"]
    assert load_document(ROOT / "tests/data/syncs.yaml").get("arrays") is not None


def test_defaults_are_safe() -> None:
    sync = parse_document(minimal()).syncs[0]
    assert sync.mode == SyncMode.UPDATE_ONLY  # never creates profiles unless asked
    assert sync.destination.batch_size == 75
    assert sync.duplicates == "first_wins"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"fields": [{"source": "bd", "target": "birthday", "type": "date"}]},
            "sync 'vip': fields[0].target: 'birthday' would create a custom attribute shadowing",
        ),
        ({"fields": [{"source": "x", "target": "external_id"}]}, "is an identifier"),
        (
            {"fields": [{"source": "a", "target": "t"}, {"source": "b", "target": "t"}]},
            "target 't' is mapped twice",
        ),
        ({"mode": "replace"}, "sync 'vip': mode: Input should be"),
        ({"destination": {"type": "braze", "batch_size": 500}}, "destination.braze.batch_size"),
        ({"fields": [{"source": "d", "target": "dob", "type": "string"}]}, "must have type date"),
        ({"fields": [{"source": "x", "target": "a b"}]}, "cannot contain spaces"),
        ({"unknown_key": 1}, "sync 'vip': unknown_key: Extra inputs are not permitted"),
        (
            {
                "identity": {"column": "p", "namespace": "phone", "destination_key": "phone"},
                "fields": [{"source": "e", "target": "email"}],
            },
            "sync 'vip': document: fields[0].target 'email' with identity.destination_key 'phone'",
        ),
    ],
)
def test_errors_name_sync_field_and_problem(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_document(minimal(**overrides))
    assert message in str(caught.value)


def test_document_level_errors() -> None:
    with pytest.raises(ConfigError, match="unsupported version 2"):
        parse_document({"version": 2, "syncs": []})
    twice = {"version": 1, "syncs": [minimal()["syncs"][0], minimal()["syncs"][0]]}
    with pytest.raises(ConfigError, match="sync ids must be unique"):
        parse_document(twice)
    with pytest.raises(ConfigError, match=r"sync 'Bad Id!': id: .*blob prefix"):
        parse_document({"version": 1, "syncs": [{"id": "Bad Id!", "identity": {}}]})


def test_unreadable_document(tmp_path: Path) -> None:
    broken = tmp_path / "syncs.yaml"
    broken.write_text("version: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML/JSON"):
        load_document(broken)
    with pytest.raises(ConfigError, match="cannot read"):
        load_document(tmp_path / "missing.yaml")


def governed(policies: list[dict], sync: dict, **governance: object) -> dict:
    document = minimal(**sync)
    document["governance"] = {"policies": policies, **governance}
    return document


THIRD_PARTY = {"id": "no-3p", "labels": ["C2"], "actions": ["Export to Third Party"]}


def test_policies_start_disabled_and_apply_once_enabled() -> None:
    sync = {"fields": [{"source": "pts", "target": "points", "labels": ["c2"]}]}
    assert not parse_document(governed([THIRD_PARTY], sync)).blocked()
    enabled = parse_document(governed([{**THIRD_PARTY, "enabled": True}], sync))
    (blocked,) = enabled.blocked()
    (violation,) = blocked.verdict.blocked
    assert violation.sentence() == (
        "policy 'no-3p' forbids field 'points' (column 'pts', labels C2) going to braze "
        "(export_to_third_party)"
    )


@pytest.mark.parametrize(
    ("match", "labels", "violated"),
    [("any", ["S1"], True), ("all", ["S1"], False), ("all", ["S1", "S2"], True)],
)
def test_label_matching_follows_adobe_and_or(match: str, labels: list[str], violated: bool) -> None:
    policy = {"id": "geo", "labels": ["S1", "S2"], "match": match, "enabled": True,
              "actions": ["emailTargeting"], "enforcement": "drop"}  # fmt: skip
    sync = {"fields": [{"source": "g", "target": "geo", "labels": labels}]}
    document = parse_document(governed([policy], sync))
    kept = [f.target for f in document.get("vip").fields]  # type: ignore[union-attr]
    assert kept == ([] if violated else ["geo"])
    assert [f.target for f in document.syncs[0].fields] == ["geo"]  # as declared


def test_an_action_a_policy_names_must_be_one_the_destination_performs() -> None:
    policy = {"id": "ds", "labels": ["C9"], "actions": ["Data Science"], "enabled": True}
    sync = {"fields": [{"source": "s", "target": "score", "labels": ["C9"]}]}
    assert not parse_document(governed([policy], sync)).blocked()
    added = {**sync, "destination": {"type": "braze", "marketing_actions": ["dataScience"]}}
    assert parse_document(governed([policy], added)).blocked()


def test_dropping_the_identity_blocks_the_sync() -> None:
    policy = {"id": "i1", "labels": ["I1"], "actions": ["email_targeting"], "enabled": True,
              "enforcement": "drop"}  # fmt: skip
    sync = {"identity": {"column": "mail", "namespace": "email", "destination_key": "email",
                         "labels": ["I1"]}}  # fmt: skip
    (blocked,) = parse_document(governed([policy], sync)).blocked()
    assert blocked.verdict.blocked[0].sent.kind == "identity"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (governed([], {"fields": [{"source": "x", "target": "x", "labels": ["C99"]}]}),
         "sync 'vip': unknown label 'C99' (declare custom labels in governance.labels)"),
        (governed([{**THIRD_PARTY, "labels": ["confidential"]}], {}),
         "policies[0] (no-3p): unknown label 'confidential'"),
        (governed([{**THIRD_PARTY, "actions": ["Carrier Pigeon"]}], {}),
         "unknown marketing action 'carrier_pigeon'"),
        (governed([THIRD_PARTY, THIRD_PARTY], {}), "policy id 'no-3p' is used twice"),
    ],
)  # fmt: skip
def test_unknown_labels_and_actions_are_refused(document: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_document(document)


def test_custom_labels_and_actions_are_declared() -> None:
    policy = {"id": "vip-only", "labels": ["crm-vip"], "actions": ["Loyalty Mailing"],
              "enabled": True}  # fmt: skip
    sync = {"labels": ["crm-vip"],
            "destination": {"type": "braze", "marketing_actions": ["loyaltyMailing"]}}  # fmt: skip
    document = governed([policy], sync, labels=["crm-vip"], marketing_actions=["Loyalty Mailing"])
    assert parse_document(document).blocked()


@pytest.mark.parametrize(
    ("sync", "message"),
    [
        ({"consent": [{"channel": "email", "column": "a"}, {"channel": "sms", "column": "b"}]},
         "a sync carries exactly one marketing permission"),
        ({"consent": {"channel": "email", "column": "consents.marketing.sms.val"}},
         "column 'consents.marketing.sms.val' is the sms permission but channel is 'email'"),
        ({"consent": {"channel": "push", "column": "c"},
          "fields": [{"source": "e", "target": "email_subscribe"}]},
         "mixes marketing permissions: push (consent.channel), email (fields[0])"),
        ({"fields": [{"source": "e", "target": "email_subscribe"},
                     {"source": "p", "target": "push_subscribe"}]},
         "mixes marketing permissions"),
        ({"consent": {"channel": "email", "column": "consents.marketing.email.val"},
          "fields": [{"source": "consents.marketing.sms.val", "target": "sms_ok"}]},
         "mixes marketing permissions: email (consent.channel), sms (fields[0])"),
        ({"consent": {"channel": "email", "column": "c", "granted_values": ["y", "dn"]}},
         "'dn' cannot grant consent: in AEP it means 'default of no'"),
    ],
)  # fmt: skip
def test_a_sync_carries_exactly_one_marketing_permission(sync: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_document(minimal(**sync))


def test_a_blocked_sync_is_an_error_when_the_document_loads(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    import json

    path = tmp_path / "syncs.json"
    sync = {"fields": [{"source": "pts", "target": "points", "labels": ["C2"]}]}
    path.write_text(json.dumps(governed([{**THIRD_PARTY, "enabled": True}], sync)))
    with caplog.at_level("ERROR"):
        document = load_document(path)
    assert document.get("vip") is not None  # other syncs run; this one's runs end blocked
    (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "sync 'vip' is blocked by policy: policy 'no-3p' forbids field 'points'" in (
        record.getMessage()
    )
