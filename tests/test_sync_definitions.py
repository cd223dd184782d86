from __future__ import annotations

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
