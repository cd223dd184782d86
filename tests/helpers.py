"""Small test utilities."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def eventually(probe: Callable[[], T], *, timeout: float = 15.0, interval: float = 0.1) -> T:
    """Poll `probe` until it returns something truthy; fail with its last value, or the
    last exception it raised (a busy host may time a request out now and then: a probe's
    error is retried like a falsy answer until the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = probe()
            failure: BaseException | None = None
        except Exception as exc:
            value, failure = None, exc  # type: ignore[assignment]
        if value:
            return value
        if time.monotonic() > deadline:
            if failure is not None:
                raise AssertionError(
                    f"condition not met within {timeout}s (last error: {failure!r})"
                ) from failure
            raise AssertionError(f"condition not met within {timeout}s (last value: {value!r})")
        time.sleep(interval)


_PERSONAL = {
    "email": re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+"),
    "phone": re.compile(r"\+\d{9,15}\b"),
    "apns token": re.compile(r"\b[0-9a-f]{64}\b"),
    "fcm token": re.compile(r"\b[A-Za-z0-9_-]{100,}(:APA91b)?"),
}


def assert_no_personal_data(log: Path) -> None:
    """A host's log carries no e-mail address, phone number or push token (checked when
    the host stops, after every test that used it)."""
    text = log.read_text(errors="replace")
    findings = [
        (name, line.strip()[:200])
        for line in text.splitlines()
        for name, pattern in _PERSONAL.items()
        if pattern.search(line)
    ]
    assert not findings, findings[:10]
