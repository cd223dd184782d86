"""Typed mapping of source rows to destination attributes and audience memberships.

Past 500 lines: one coercer per target type and Braze's standard-field formats; the C
path mirrors this file, so it stays whole.

A `RowMapper` is compiled once per file from the sync definition and the file's columns:
each mapped field gets a coercer for its type, and Braze standard fields get their exact
formats on top (`dob` YYYY-MM-DD, `gender` M/F/O/N/P, `country` ISO 3166-1 alpha-2,
`language` ISO 639-1, `phone` E.164, `time_zone` IANA, subscription states). A value that
does not fit raises `RowRejected` with a reason code; nothing is guessed.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pycountry

from core.sync.definitions import FieldMapping, FieldType, SyncDefinition
from core.sync.readers import FileRejected

log = logging.getLogger(__name__)

CUSTOM_STRING_LIMIT = 255
ARRAY_LIMIT = 100
OBJECT_BYTES_LIMIT = 100_000
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_E164 = re.compile(r"^\+[1-9]\d{6,14}$")
_PHONE_PUNCTUATION = str.maketrans("", "", " -().")
_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}
_GENDERS = {
    "m": "M", "male": "M", "man": "M", "f": "F", "female": "F", "woman": "F",
    "o": "O", "other": "O", "n": "N", "not applicable": "N", "p": "P",
    "prefer not to say": "P", "u": None, "unknown": None,
}  # fmt: skip
_SUBSCRIPTION_STATES = {"opted_in", "subscribed", "unsubscribed"}
MEMBER_STATUSES = {"realized": True, "existing": True, "exited": False}
# A UTF-8 lead byte read as Latin-1/cp1252 (Â..ô) followed by what a continuation byte
# becomes (0x80-0xBF, or cp1252's characters for 0x80-0x9F): the only place mojibake can be.
_MOJIBAKE_PAIR = re.compile("[\u00c2-\u00f4][\u0080-\u00bf\u0152-\u0192\u02c6-\u02dc\u2013-\u2122]")


class RowRejected(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@functools.cache
def _countries() -> dict[str, str]:
    """Alpha-2 codes and lower-case names/alpha-3 codes to alpha-2."""
    table: dict[str, str] = {}
    for country in pycountry.countries:
        code = country.alpha_2
        table[code.lower()] = code
        table[country.alpha_3.lower()] = code
        table[country.name.lower()] = code
        common = getattr(country, "common_name", None)
        if common:
            table[common.lower()] = code
    return table


@functools.cache
def _languages() -> frozenset[str]:
    return frozenset(lang.alpha_2 for lang in pycountry.languages if getattr(lang, "alpha_2", None))


@functools.cache
def _valid_zone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def looks_like_mojibake(text: str) -> bool:
    """UTF-8 text that was decoded as cp1252/latin-1 and re-encoded ('JosÃ©')."""
    if text.isascii() or not _MOJIBAKE_PAIR.search(text):
        return False
    for legacy in ("cp1252", "latin-1"):
        try:
            repaired = text.encode(legacy).decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            continue
        if repaired != text:
            return True
    return False


# -- type coercers: raw value (str from CSV, or JSON value) -> typed value ---------------
#
# What each target type accepts, and nothing else (a reject `wrong_type` says what came):
#   text (string; identities, coded standard fields)  a string; a JSON integer as its digits
#   integer   ASCII digits with an optional sign; a JSON integer
#   float / decimal  an ASCII decimal number (float: with an optional exponent); a JSON number
#   boolean   true/t/yes/y/1 or false/f/no/n/0 in any case; a JSON boolean
#   date / datetime  ISO-8601 text
#   array     a JSON array; its JSON text; or text split at `|`
#   object    a JSON object; its JSON text
# Text is read as sent, except that values of coded formats (standard fields, numbers,
# dates, booleans) and identities lose surrounding whitespace; a string field keeps it
# unless its mapping says `whitespace: trim`. A value of whitespace only is empty.

_INTEGER = re.compile(r"[+-]?[0-9]+", re.ASCII)
_NUMBER = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?", re.ASCII)
_DECIMAL = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)", re.ASCII)
_JSON_KINDS = {bool: "a boolean", list: "an array", dict: "an object", float: "a number"}


def _kind(value: Any) -> str:
    return _JSON_KINDS.get(type(value), "an integer" if isinstance(value, int) else "a value")


def wrong_type(value: Any, expected: str) -> RowRejected:
    return RowRejected("wrong_type", f"expected {expected}, found {_kind(value)}")


def _as_text(value: Any) -> str:
    """A coded value's text, surrounding whitespace dropped (a JSON integer: its digits)."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise wrong_type(value, "text")


def _string(value: Any, limit: int, trim: bool) -> str:
    if isinstance(value, str):
        text = value.strip() if trim else value
    elif isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
    else:
        raise wrong_type(value, "text")
    if len(text) > limit:
        raise RowRejected("string_too_long", f"{len(text)} characters, at most {limit}")
    if looks_like_mojibake(text):
        raise RowRejected("mojibake", "text looks double-encoded (UTF-8 read as Latin-1)")
    return text


def _integer(value: Any) -> int:
    if isinstance(value, bool | float):
        raise wrong_type(value, "an integer")
    if isinstance(value, int):
        number = value
    else:
        text = _as_text(value)
        if not _INTEGER.fullmatch(text):
            raise RowRejected("not_integer", f"{text[:40]!r} is not an integer")
        number = int(text)
    if not -(2**63) <= number < 2**63:
        raise RowRejected("out_of_range", "integer outside 64-bit range")
    return number


def _float(value: Any) -> float:
    if isinstance(value, bool):
        raise wrong_type(value, "a number")
    if isinstance(value, int | float):
        number = float(value)
    else:
        text = _as_text(value)
        if not _NUMBER.fullmatch(text):
            raise RowRejected("not_number", f"{text[:40]!r} is not a number")
        number = float(text)
    if not math.isfinite(number):
        raise RowRejected("not_number", f"{str(value)[:40]!r} is not a finite number")
    return number


def _decimal(value: Any) -> float:
    # Braze has no decimal type; the exact text is validated, then sent as a JSON number.
    if isinstance(value, bool):
        raise wrong_type(value, "a decimal")
    if isinstance(value, int | float):
        return _float(value)
    text = _as_text(value)
    if not _DECIMAL.fullmatch(text):
        raise RowRejected("not_decimal", f"{text[:40]!r} is not a decimal")
    return float(Decimal(text))


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise wrong_type(value, "a boolean")
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise RowRejected("not_boolean", f"{text[:40]!r} is not a boolean")


def _date(value: Any) -> str:
    if not isinstance(value, str):
        raise wrong_type(value, "a YYYY-MM-DD date")
    text = value.strip()
    try:
        parsed = date.fromisoformat(text)
    except ValueError:
        raise RowRejected("not_date", f"{text[:40]!r} is not a YYYY-MM-DD date") from None
    if len(text) != 10:
        raise RowRejected("not_date", f"{text[:40]!r} is not a YYYY-MM-DD date")
    return parsed.isoformat()


def _datetime(value: Any) -> str:
    if not isinstance(value, str):
        raise wrong_type(value, "an ISO-8601 time")
    text = value.strip()
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise RowRejected("not_datetime", f"{text[:40]!r} is not an ISO-8601 time") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)  # Braze reads zone-less times as UTC too
    try:
        in_utc = parsed.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:59:59-01:00 is past year 9999 in UTC
        message = f"{text[:40]!r} is outside years 1 to 9999 in UTC"
        raise RowRejected("out_of_range", message) from None
    return in_utc.isoformat().replace("+00:00", "Z")


def _array(value: Any) -> list[Any]:
    if isinstance(value, list):
        items = value
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                raise RowRejected("not_array", "array text is not valid JSON") from None
        else:
            items = [part.strip() for part in text.split("|") if part.strip()]
    else:
        raise wrong_type(value, "an array")
    if not isinstance(items, list):
        raise RowRejected("not_array", "value is not an array")
    if len(items) > ARRAY_LIMIT:
        raise RowRejected("array_too_long", f"{len(items)} items, at most {ARRAY_LIMIT}")
    for item in items:
        if isinstance(item, str) and len(item) > CUSTOM_STRING_LIMIT:
            raise RowRejected("string_too_long", f"array item over {CUSTOM_STRING_LIMIT} chars")
    # Braze keeps array values unique; collapse duplicates here so the diff sees the same.
    unique = {json.dumps(item, sort_keys=True): item for item in items}
    return list(unique.values())


def _check_object_keys(value: Any) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or any(c in key for c in " .$") or len(key) > 255:
                raise RowRejected("bad_object_key", f"object key {str(key)[:40]!r} not allowed")
            _check_object_keys(item)
    elif isinstance(value, list):
        for item in value:
            _check_object_keys(item)


def _object(value: Any) -> dict[str, Any]:
    parsed = value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            raise RowRejected("not_object", "object text is not valid JSON") from None
    elif not isinstance(value, dict):
        raise wrong_type(value, "an object")
    if not isinstance(parsed, dict):
        raise RowRejected("not_object", "value is not a JSON object")
    if len(json.dumps(parsed)) > OBJECT_BYTES_LIMIT:
        raise RowRejected("object_too_large", f"nested object over {OBJECT_BYTES_LIMIT} bytes")
    _check_object_keys(parsed)
    return parsed


# -- Braze standard fields ---------------------------------------------------------------


def normalise_email(value: Any) -> str:
    text = _as_text(value).lower()
    if not _EMAIL.match(text) or len(text) > 254:
        raise RowRejected("invalid_email", "not an e-mail address")
    return text


def normalise_phone(value: Any) -> str:
    text = _as_text(value).translate(_PHONE_PUNCTUATION)
    if text.startswith("00"):
        text = "+" + text[2:]
    if not _E164.match(text):
        raise RowRejected("invalid_phone", "phone must be E.164, e.g. +31612345678")
    return text


def _gender(value: Any) -> str | None:
    key = _as_text(value).lower()
    if key not in _GENDERS:
        raise RowRejected("invalid_gender", "gender must be M, F, O, N or P")
    return _GENDERS[key]


def _country(value: Any) -> str:
    code = _countries().get(_as_text(value).lower())
    if code is None:
        raise RowRejected("invalid_country", "country must be ISO 3166-1 (alpha-2 preferred)")
    return code


def _language(value: Any) -> str:
    code = _as_text(value).lower().replace("_", "-").split("-")[0]
    if code not in _languages():
        raise RowRejected("invalid_language", "language must be an ISO 639-1 code")
    return code


def _time_zone(value: Any) -> str:
    name = _as_text(value)
    if not _valid_zone(name):
        raise RowRejected("invalid_time_zone", "time_zone must be an IANA name")
    return name


def _subscription(value: Any) -> str:
    state = _as_text(value).lower()
    if state not in _SUBSCRIPTION_STATES:
        raise RowRejected("invalid_subscription", "must be opted_in, subscribed or unsubscribed")
    return state


def _dob(value: Any) -> str:
    text = _date(value)
    if not 1900 <= int(text[:4]) <= datetime.now(UTC).year:
        raise RowRejected("invalid_dob", "date of birth outside 1900 to this year")
    return text


_STANDARD: dict[str, Callable[[Any], Any]] = {
    "email": normalise_email,
    "phone": normalise_phone,
    "gender": _gender,
    "country": _country,
    "language": _language,
    "time_zone": _time_zone,
    "email_subscribe": _subscription,
    "push_subscribe": _subscription,
    "dob": _dob,
}


def coercer(mapping: FieldMapping) -> Callable[[Any], Any]:
    """Raw value (never empty) to the typed value the destination receives; a value a
    coercer fails on in a way it did not foresee rejects the row (`unreadable_value`,
    logged as an error without the value) instead of failing the bucket."""
    convert = _type_coercer(mapping)

    def guarded(value: Any) -> Any:
        try:
            return convert(value)
        except RowRejected:
            raise
        except (ArithmeticError, ValueError, TypeError) as exc:
            log.error(
                "coercer for %s failed on a %s value: %s", mapping.target,
                type(value).__name__, type(exc).__name__,
            )  # fmt: skip
            message = f"cannot read the value as {mapping.type}"
            raise RowRejected("unreadable_value", message) from None

    return guarded


def _type_coercer(mapping: FieldMapping) -> Callable[[Any], Any]:
    standard = _STANDARD.get(mapping.target)
    if standard is not None:
        return standard
    limit = mapping.max_length or CUSTOM_STRING_LIMIT
    trim = mapping.whitespace == "trim"
    by_type: dict[FieldType, Callable[[Any], Any]] = {
        FieldType.STRING: lambda v: _string(v, limit, trim),
        FieldType.INTEGER: _integer,
        FieldType.FLOAT: _float,
        FieldType.DECIMAL: _decimal,
        FieldType.BOOLEAN: _boolean,
        FieldType.DATE: _date,
        FieldType.DATETIME: _datetime,
        FieldType.ARRAY: _array,
        FieldType.OBJECT: _object,
    }
    return by_type[mapping.type]


@dataclass(frozen=True)
class MappedRow:
    identity: str
    attributes: dict[str, Any]
    """Target name to typed value; None means the source was empty (sent only with send_nulls)."""
    memberships: dict[str, bool]
    """Audience name to membership; audiences without a status in this row are absent."""
    email: str | None
    phone: str | None
    consent: str | None


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


class RowMapper:
    """Compiled for one file: which value index feeds which target, through which coercer."""

    def __init__(self, sync: SyncDefinition, columns: Sequence[str]) -> None:
        self.columns = list(columns)
        index = {name: i for i, name in enumerate(columns)}

        def position(column: str, what: str) -> int:
            if column not in index:
                raise FileRejected("missing_column", f"{what} column {column!r} is not in the file")
            return index[column]

        self.identity_index = position(sync.identity.column, "identity")
        self.identity_key = sync.identity.destination_key
        self.fields = [
            (mapping.target, position(mapping.source, "mapped"), coercer(mapping), mapping)
            for mapping in sync.fields
        ]
        self.audiences = [
            (segment.name, index[segment.column])
            for segment in sync.audiences.segments
            if segment.column in index
        ]
        consent = sync.consent
        self.consent_index = (
            position(consent.column, "consent") if consent and consent.column else None
        )
        self.email_index = next((p for t, p, _, _ in self.fields if t == "email"), None)
        self.phone_index = next((p for t, p, _, _ in self.fields if t == "phone"), None)
        positions = [self.identity_index, *(p for _, p, _, _ in self.fields)]
        positions += [p for _, p in self.audiences]
        if self.consent_index is not None:
            positions.append(self.consent_index)
        self.digest_positions = positions
        """Positions of every value the mapping reads: the raw digest covers exactly these."""
        self.digest_values: Callable[[Sequence[Any]], tuple[Any, ...]] = (
            operator.itemgetter(*positions) if len(positions) > 1
            else lambda values: (values[positions[0]],)
        )  # fmt: skip
        """Those values, picked in C (this runs for every row of every file)."""

    @staticmethod
    def wanted_columns(sync: SyncDefinition) -> list[str]:
        """Columns to extract from JSON Lines records."""
        names = [sync.identity.column, *(m.source for m in sync.fields)]
        names += [s.column for s in sync.audiences.segments]
        if sync.consent and sync.consent.column:
            names.append(sync.consent.column)
        return list(dict.fromkeys(names))

    def identity(self, values: Sequence[Any]) -> str:
        return self.identity_value(values[self.identity_index])

    def identity_value(self, raw_identity: Any) -> str:
        """The identity a raw identity value stands for, normalised and checked."""
        if _is_empty(raw_identity):
            raise RowRejected("missing_identity", "the identity column is empty")
        identity = _as_text(raw_identity)
        if self.identity_key == "email":
            return normalise_email(identity)
        if self.identity_key == "phone":
            return normalise_phone(identity)
        if len(identity.encode()) > 987:
            raise RowRejected("identity_too_long", "external ids must be under 988 bytes")
        return identity

    def contact(self, values: Sequence[Any]) -> tuple[str | None, str | None]:
        """E-mail and phone of an already validated row, normalised, for suppression."""
        email = phone = None
        if self.identity_key == "email":
            email = self.identity(values)
        elif self.email_index is not None and not _is_empty(values[self.email_index]):
            email = _as_text(values[self.email_index]).lower()
        if self.identity_key == "phone":
            phone = self.identity(values)
        elif self.phone_index is not None and not _is_empty(values[self.phone_index]):
            phone = normalise_phone(values[self.phone_index])
        return email, phone

    def map(self, values: Sequence[Any]) -> MappedRow:
        identity = self.identity(values)
        attributes: dict[str, Any] = {}
        for target, position, convert, mapping in self.fields:
            raw = values[position]
            if raw is None or raw == "" or (type(raw) is str and raw.isspace()):
                if mapping.required:
                    raise RowRejected("missing_value", f"{mapping.source} is required")
                attributes[target] = None
                continue
            try:
                attributes[target] = convert(raw)
            except RowRejected as exc:
                raise RowRejected(exc.code, f"{mapping.source}: {exc}") from None
        memberships: dict[str, bool] = {}
        for name, position in self.audiences:
            status = values[position]
            if _is_empty(status):
                continue
            text = status.strip().lower() if isinstance(status, str) else None
            member = MEMBER_STATUSES.get(text) if text is not None else None
            if member is None:
                raise RowRejected(
                    "invalid_membership_status", f"{name}: status must be realized/existing/exited"
                )
            memberships[name] = member
        consent = None
        if self.consent_index is not None:
            raw_consent = values[self.consent_index]
            consent = None if _is_empty(raw_consent) else _as_text(raw_consent).lower()
        return MappedRow(
            identity=identity,
            attributes=attributes,
            memberships=memberships,
            email=identity if self.identity_key == "email" else attributes.get("email"),
            phone=identity if self.identity_key == "phone" else attributes.get("phone"),
            consent=consent,
        )
