"""Bad input through the local host: every file ends in a verdict, nothing crashes the host."""

from __future__ import annotations

import uuid

import pytest

from core.suppression import Channel, Reason, SuppressionList

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
