"""The C speedups as built: hardened the way a distribution builds packages (native/setup.py)."""

from __future__ import annotations

import importlib
import shutil
import subprocess

import pytest

MODULES = ("switchboard_sync", "switchboard_speedups")


def _readelf(*args: str) -> str:
    tool = shutil.which("readelf")
    assert tool, "readelf (binutils) comes with the compiler that builds the speedups"
    return subprocess.run([tool, *args], check=True, capture_output=True, text=True).stdout


@pytest.mark.parametrize("name", MODULES)
def test_the_module_is_built_with_a_stack_protector_fortify_and_full_relro(name: str) -> None:
    path = importlib.import_module(name).__file__
    assert path is not None and path.endswith(".so")
    symbols = _readelf("--dyn-syms", "-W", path)
    assert "__stack_chk_fail" in symbols  # -fstack-protector-strong
    assert "_chk@" in symbols.replace("__stack_chk_fail@", "")  # _FORTIFY_SOURCE's checked calls
    assert "BIND_NOW" in _readelf("-d", path)  # -z now
    assert "GNU_RELRO" in _readelf("-l", "-W", path)  # -z relro
