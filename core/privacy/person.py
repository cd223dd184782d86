"""The person an erasure request is about: their identifiers, and how to find them in text.

Identifiers are matched as whole values: `CRM-1` is not in `CRM-10`, `a@example.com` is not
in `ba@example.com` or `a@example.com.au`. E-mail addresses are matched in any case, phone
numbers in E.164 (as Switchboard stores them), profile ids exactly.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from core.audit import SubjectKind
from core.sync.mapping import RowRejected, normalise_email, normalise_phone

# Characters an identifier may continue with: a match must not be followed or preceded by
# one (a dot only counts when more follows, as in `.com.au`).
_BEFORE = r"(?<![\w.@+%-])"
_AFTER = r"(?![\w@%-]|\.\w)"


@dataclass(frozen=True)
class Person:
    profile_ids: frozenset[str]
    emails: frozenset[str]
    """Normalised (lower case)."""
    phones: frozenset[str]
    """E.164."""

    @classmethod
    def of(
        cls, *, profile_ids: Iterable[str] = (), emails: Iterable[str] = (),
        phones: Iterable[str] = (),
    ) -> Person:  # fmt: skip
        """Raises ValueError for an address that is not one."""
        try:
            normal_emails = frozenset(normalise_email(e) for e in emails)
            normal_phones = frozenset(normalise_phone(p) for p in phones)
        except RowRejected as exc:
            raise ValueError(str(exc)) from None
        ids = frozenset(p.strip() for p in profile_ids if p.strip())
        return cls(ids, normal_emails, normal_phones)

    @property
    def empty(self) -> bool:
        return not (self.profile_ids or self.emails or self.phones)

    def values(self) -> frozenset[str]:
        """Every identifier as it is stored (identities of syncs, event fields, ...)."""
        return self.profile_ids | self.emails | self.phones

    def subjects(self) -> list[tuple[SubjectKind, str]]:
        """(kind, value) per identifier, as the audit trail keys them."""
        return [
            *(("profile", v) for v in sorted(self.profile_ids)),
            *(("email", v) for v in sorted(self.emails)),
            *(("phone", v) for v in sorted(self.phones)),
        ]

    def hashes(self) -> list[str]:
        """What the erasure record keeps of each identifier: its kind and hash prefix."""
        return [
            f"{kind}:{hashlib.sha256(f'{kind}:{value}'.encode()).hexdigest()[:16]}"
            for kind, value in self.subjects()
        ]

    def matcher(self) -> Matcher:
        return Matcher(self)


class Matcher:
    """Finds the person's identifiers in text and values."""

    def __init__(self, person: Person) -> None:
        self.person = person
        exact = sorted(person.profile_ids | person.phones, key=len, reverse=True)
        patterns = [re.escape(v) for v in exact]
        folded = [f"(?i:{re.escape(v)})" for v in sorted(person.emails, key=len, reverse=True)]
        alternatives = "|".join([*patterns, *folded]) or r"(?!x)x"
        self._pattern = re.compile(f"{_BEFORE}(?:{alternatives}){_AFTER}")
        self._exact = [v.encode() for v in exact]
        self._folded = [v.encode() for v in person.emails]

    def may_be_in(self, data: bytes) -> bool:
        """A fast first look at raw bytes (e-mail addresses compared lower-cased)."""
        if any(needle in data for needle in self._exact):
            return True
        if self._folded:
            lowered = data.lower()
            return any(needle in lowered for needle in self._folded)
        return False

    def in_text(self, text: str) -> bool:
        return self._pattern.search(text) is not None

    def in_value(self, value: Any) -> bool:
        """Anywhere in a JSON-like value: a string, or any string within lists and dicts
        (their keys too)."""
        if isinstance(value, str):
            return self.in_text(value)
        if isinstance(value, dict):
            return any(self.in_text(str(k)) or self.in_value(v) for k, v in value.items())
        if isinstance(value, list | tuple):
            return any(self.in_value(v) for v in value)
        return False
