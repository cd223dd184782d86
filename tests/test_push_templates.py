"""Push templates: Liquid per profile, strict about missing attributes, bounded, 4 KB."""

from __future__ import annotations

import json

import pytest

from core.push.templates import (
    CompiledTemplate,
    ProfileSkipped,
    PushTemplate,
    TemplateInvalid,
    apns_payload,
    fcm_message,
)

TEMPLATE = PushTemplate(
    title="Hi {{ first_name | default: 'there' }}",
    body="You have {{ points }} points{% if tier == 'gold' %}, gold member{% endif %}.",
    data={"offer": "{{ offer_id }}"},
    deep_link="shop://offers/{{ offer_id }}",
    badge=1,
    sound="default",
    collapse_id="points",
    ttl_seconds=3600,
)


def test_renders_per_profile_and_builds_both_platforms_payloads() -> None:
    compiled = CompiledTemplate(TEMPLATE)
    ana = compiled.render({"first_name": "Ana", "points": 1200, "tier": "gold", "offer_id": "A1"})
    assert (ana.title, ana.body) == ("Hi Ana", "You have 1200 points, gold member.")
    anonymous = compiled.render({"points": 3, "offer_id": "B2"})
    assert anonymous.title == "Hi there"  # the template's default for a missing attribute
    assert anonymous.body == "You have 3 points."  # a condition on a missing one is false

    apns = json.loads(apns_payload(ana, TEMPLATE))
    assert apns["aps"] == {
        "alert": {"title": "Hi Ana", "body": ana.body},
        "badge": 1,
        "sound": "default",
    }
    assert apns["offer"] == "A1" and apns["deep_link"] == "shop://offers/A1"
    fcm = json.loads(fcm_message(ana, TEMPLATE, "tok"))["message"]
    assert fcm["token"] == "tok" and fcm["notification"]["title"] == "Hi Ana"
    assert fcm["data"] == {"offer": "A1", "deep_link": "shop://offers/A1"}
    assert fcm["android"] == {"priority": "HIGH", "ttl": "3600s", "collapse_key": "points",
                              "notification": {"sound": "default"}}  # fmt: skip


def test_a_missing_attribute_without_default_skips_the_profile_with_its_name() -> None:
    with pytest.raises(ProfileSkipped) as skipped:
        CompiledTemplate(TEMPLATE).render({"first_name": "Bo", "offer_id": "X"})
    assert skipped.value.reason == "missing_attribute" and "points" in str(skipped.value)


def test_limits_and_bad_templates() -> None:
    loop = PushTemplate(title="x", body="{% for i in (1..100000) %}{{ i }}{% endfor %}")
    with pytest.raises(ProfileSkipped) as skipped:
        CompiledTemplate(loop).render({})
    assert skipped.value.reason in ("template_loop_limit", "template_output_limit")
    with pytest.raises(TemplateInvalid):
        CompiledTemplate(PushTemplate(title="{% if %}", body="x"))
    big = PushTemplate(title="t", body="{{ text }}")
    message = CompiledTemplate(big).render({"text": "é" * 2500})  # 5,000 bytes of UTF-8
    with pytest.raises(ProfileSkipped) as too_large:
        apns_payload(message, big)
    assert too_large.value.reason == "payload_too_large"
    with pytest.raises(ProfileSkipped):
        fcm_message(message, big, "tok")
