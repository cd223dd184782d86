"""Data usage labels, marketing actions and the policies that join them, as Adobe defines
them (../shared/reference/cdp-and-campaign.md section 5), enforced where data leaves.

Labels go on what a sync sends: the whole export (the sync's `labels`, as on a dataset),
its identity, fields and audiences. A destination declares the marketing actions it
performs (Braze: Email Targeting, Export to Third Party); a sync may add more. A policy
names labels (any or all of them) and actions (any of them); it is enabled explicitly, as
in Adobe, where every policy starts disabled. An enabled policy is violated by anything a
sync would send that carries its labels to a destination performing one of its actions.
Its enforcement is `block` (the sync sends nothing until the document changes) or `drop`
(the field or audience never leaves; the rest of the sync runs).

Names are matched in any of Adobe's spellings: `Email Targeting`, `emailTargeting` and
`email_targeting` are the same action.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Adobe's labels: contract, identity, sensitive, partner ecosystem.
ADOBE_LABELS = frozenset(
    {f"C{n}" for n in range(1, 13)} | {"I1", "I2", "S1", "S2", "PSPD", "RHD", "THIRD-PARTY"}
)
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# Adobe-defined marketing actions, by id (`action_id`).
ADOBE_ACTIONS = frozenset({
    "analytics", "combine_with_directly_identifiable_data", "combine_with_pii",
    "cross_site_targeting", "data_science", "email_targeting", "export_to_third_party",
    "onsite_advertising", "onsite_personalization", "segment_match",
    "single_identity_personalization",
})  # fmt: skip
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SEPARATORS = re.compile(r"[^a-z0-9]+")


def label_id(name: str) -> str:
    """A label as matched: Adobe's are upper case (`c2` is C2); custom ones keep their case."""
    upper = name.strip().upper()
    return upper if upper in ADOBE_LABELS else name.strip()


def action_id(name: str) -> str:
    """`Export to Third Party`, `exportToThirdParty` -> `export_to_third_party`."""
    return _SEPARATORS.sub("_", _CAMEL.sub("_", name.strip()).lower()).strip("_")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Policy(_Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    description: str = ""
    enabled: bool = Field(
        default=False, description="policies start disabled, as in Adobe; enable each one"
    )
    labels: tuple[str, ...] = Field(min_length=1)
    match: Literal["any", "all"] = Field(
        default="any", description="Adobe's OR (any of the labels) or AND (all of them)"
    )
    actions: tuple[str, ...] = Field(min_length=1, description="any of these actions")
    enforcement: Literal["block", "drop"] = Field(
        default="block",
        description="block: the sync sends nothing; drop: what carries the labels never leaves",
    )

    @field_validator("labels")
    @classmethod
    def _label_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(label_id(name) for name in value)

    @field_validator("actions")
    @classmethod
    def _action_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(action_id(name) for name in value)

    def applies(self, labels: frozenset[str], actions: frozenset[str]) -> bool:
        if not self.enabled or actions.isdisjoint(self.actions):
            return False
        if self.match == "all":
            return labels.issuperset(self.labels)
        return not labels.isdisjoint(self.labels)


class Governance(_Strict):
    """The document's `governance` section."""

    labels: tuple[str, ...] = Field(
        default=(), description="custom labels (Adobe's are known); any other is a typo"
    )
    marketing_actions: tuple[str, ...] = Field(
        default=(), description="custom marketing actions (Adobe's are known)"
    )
    policies: tuple[Policy, ...] = ()

    @field_validator("labels")
    @classmethod
    def _custom_labels(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not _LABEL.match(name):
                raise ValueError(f"label {name!r}: 1-64 letters, digits, '-' or '_'")
        return tuple(label_id(name) for name in value)

    @field_validator("marketing_actions")
    @classmethod
    def _custom_actions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(action_id(name) for name in value)

    def known_labels(self) -> frozenset[str]:
        return ADOBE_LABELS | frozenset(self.labels)

    def known_actions(self) -> frozenset[str]:
        return ADOBE_ACTIONS | frozenset(self.marketing_actions)

    def problems(self) -> list[str]:
        """Labels and actions the policies name that are neither Adobe's nor declared."""
        found = []
        labels, actions = self.known_labels(), self.known_actions()
        ids = [policy.id for policy in self.policies]
        for duplicate in sorted({i for i in ids if ids.count(i) > 1}):
            found.append(f"policy id {duplicate!r} is used twice")
        for index, policy in enumerate(self.policies):
            for name in policy.labels:
                if name not in labels:
                    found.append(f"policies[{index}] ({policy.id}): unknown label {name!r}")
            for name in policy.actions:
                if name not in actions:
                    found.append(
                        f"policies[{index}] ({policy.id}): unknown marketing action {name!r}"
                    )
        return found


@dataclass(frozen=True)
class Sent:
    """One thing a sync sends, with where it comes from (its lineage)."""

    kind: Literal["identity", "field", "audience"]
    name: str
    """The destination attribute, the identity key, or the audience name."""
    source: str
    """The source column (or JSON key path) it is read from."""
    labels: frozenset[str]


@dataclass(frozen=True)
class Violation:
    policy: str
    enforcement: str
    sent: Sent
    labels: tuple[str, ...]
    """The labels of what is sent that the policy names."""
    actions: tuple[str, ...]
    """The destination's actions that the policy names."""
    sync: str
    destination: str

    def report(self) -> dict[str, object]:
        return {
            "policy": self.policy,
            "enforcement": self.enforcement,
            self.sent.kind: self.sent.name,
            "labels": list(self.labels),
            "marketing_actions": list(self.actions),
            "lineage": {
                "sync": self.sync,
                "source_column": self.sent.source,
                "target": self.sent.name,
                "destination": self.destination,
            },
        }

    def sentence(self) -> str:
        return (
            f"policy {self.policy!r} forbids {self.sent.kind} {self.sent.name!r} (column "
            f"{self.sent.source!r}, labels {', '.join(self.labels)}) going to "
            f"{self.destination} ({', '.join(self.actions)})"
        )


@dataclass(frozen=True)
class Verdict:
    """What the policies make of one sync."""

    blocked: tuple[Violation, ...] = ()
    dropped: tuple[Violation, ...] = ()
    dropped_names: frozenset[tuple[str, str]] = field(default_factory=frozenset)
    """(kind, name) of what never leaves."""

    def report(self) -> dict[str, object]:
        found: dict[str, object] = {}
        if self.blocked:
            found["blocked"] = [v.report() for v in self.blocked]
        if self.dropped:
            found["dropped"] = [v.report() for v in self.dropped]
        return found


def evaluate(
    governance: Governance,
    sync: str,
    destination: str,
    actions: Iterable[str],
    sent: Iterable[Sent],
) -> Verdict:
    """Each enabled policy against each thing sent. A drop policy on the identity blocks
    (a profile cannot be sent without it); a block wins over a drop for the same thing."""
    performed = frozenset(action_id(a) for a in actions)
    blocked: list[Violation] = []
    dropped: list[Violation] = []
    for item in sent:
        for policy in governance.policies:
            if not policy.applies(item.labels, performed):
                continue
            violation = Violation(
                policy=policy.id,
                enforcement=policy.enforcement,
                sent=item,
                labels=tuple(sorted(item.labels.intersection(policy.labels))),
                actions=tuple(sorted(performed.intersection(policy.actions))),
                sync=sync,
                destination=destination,
            )
            drop = policy.enforcement == "drop" and item.kind != "identity"
            (dropped if drop else blocked).append(violation)
    names = frozenset((v.sent.kind, v.sent.name) for v in dropped)
    return Verdict(tuple(blocked), tuple(dropped), names)
