"""Runs last (file order): the local host's log after every end-to-end test of the session
carries no email addresses, phone numbers or push tokens."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.integration

EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")
PHONE = re.compile(r"\+\d{9,15}\b")
APNS_TOKEN = re.compile(r"\b[0-9a-f]{64}\b")
FCM_TOKEN = re.compile(r"\b[A-Za-z0-9_-]{100,}(:APA91b)?")


def test_the_host_log_carries_no_personal_data(running_app) -> None:  # type: ignore[no-untyped-def]
    log = running_app.log_path.read_text(errors="replace")
    assert "segment sync finished" in log  # the log is the one the e2e tests produced
    patterns = {"email": EMAIL, "phone": PHONE, "apns token": APNS_TOKEN, "fcm token": FCM_TOKEN}
    findings = [
        (name, line.strip()[:200])
        for line in log.splitlines()
        for name, pattern in patterns.items()
        if pattern.search(line)
    ]
    assert not findings, findings[:10]
