"""The fuzz targets (fuzz/targets.py) on their committed corpus, with the regular build:
every seed, each finding fixed so far among them, still holds. `make fuzz` and the short
run in `make test` fuzz them under the sanitizers (fuzz/__main__.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import CorruptState
from core.sync.state import StateStore
from fuzz.targets import TARGETS, each_seed

CORPUS = Path(__file__).resolve().parent.parent / "fuzz" / "corpus"


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_seed_of_the_corpus_holds(target: str) -> None:
    seeds = list(each_seed(CORPUS / target))
    assert seeds, f"no seeds for {target}"
    for _name, data in seeds:
        TARGETS[target](data)


@pytest.mark.parametrize(
    "text", [b"7", b'{"version": 4, "": {}}\n"*," \n1', b"\x00\x01garbage"]
)  # fmt: skip
def test_damaged_state_is_refused_as_corrupt_state_on_both_paths(text: bytes) -> None:
    states = StateStore(None, "s", "braze", "")  # type: ignore[arg-type]
    for native in (True, False):
        with pytest.raises(CorruptState) as refused:
            state = states.decode_text((text, "etag", None), native=native)
            for profile in state.profiles.values():  # read as a bucket would
                profile.names()
        assert refused.value.code == "corrupt_state"
