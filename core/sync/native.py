"""The C path of a bucket: native/switchboard_sync.c, compiled from the reference's parts.

`native_mapping` compiles a sync's mapping for one file into the module's `Mapping`: which
column feeds which target through which kind of value, and, for every value C does not
recognise, the reference's own coercer to call (so the answer is always the reference's).
Configurations the module does not take return None, and those runs use the reference:
dry runs (they write previews), runs resumed from checkpoints, and mappings where two
attributes of one object would share a name.

The C path writes each queued object in one wire format, `NATIVE_OBJECT_FORMAT`; only a
destination that declares that format as its own (`Capabilities.native_format`) gets C's
objects. Every other destination's buckets run on the reference, which hands it typed
changes to encode itself (docs/ARCHITECTURE.md, "The destination seam").
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

from core.suppression import Channel, SuppressionSnapshot
from core.sync.definitions import FieldType, SyncDefinition, SyncMode
from core.sync.mapping import RowMapper, RowRejected
from core.sync.speedups import SPEEDUPS
from core.sync.state import value_hash

# Kinds of value as switchboard_sync.c numbers them (enum Kind).
(
    _STRING, _EMAIL, _PHONE, _INTEGER, _FLOAT, _DECIMAL, _BOOLEAN, _DATE, _DOB, _DATETIME,
    _ARRAY, _OTHER, _TEXT,
) = range(13)  # fmt: skip
_BY_TYPE = {
    FieldType.STRING: _STRING, FieldType.INTEGER: _INTEGER, FieldType.FLOAT: _FLOAT,
    FieldType.DECIMAL: _DECIMAL, FieldType.BOOLEAN: _BOOLEAN, FieldType.DATE: _DATE,
    FieldType.DATETIME: _DATETIME, FieldType.ARRAY: _ARRAY, FieldType.OBJECT: _OTHER,
}  # fmt: skip
_BY_TARGET = {"email": _EMAIL, "phone": _PHONE, "dob": _DOB}
# Standard fields with a handful of distinct values: C remembers the reference's answers.
_LOOKUP_TARGETS = {
    "gender",
    "country",
    "language",
    "time_zone",
    "email_subscribe",
    "push_subscribe",
}
_IDENTITY_KINDS = {"email": 1, "phone": 2}
NATIVE_OBJECT_FORMAT = "braze.users_track"
"""What switchboard_sync.c's put_item writes: a /users/track attributes object."""

Coerced = tuple[bytes, bytes, str | None] | None
"""A typed value as C takes it: its JSON, its state hash and, for text, the text."""


def _coercer(convert: Callable[[Any], Any], source: str) -> Callable[[str], Coerced]:
    def coerce(raw: str) -> Coerced:
        try:
            value = convert(raw)
        except RowRejected as exc:
            raise RowRejected(exc.code, f"{source}: {exc}") from None
        if value is None:
            return None
        return orjson.dumps(value), value_hash(value), value if isinstance(value, str) else None

    return coerce


def _names_collide(sync: SyncDefinition) -> bool:
    """Whether two entries of one /users/track object could share a key (the reference's
    dict keeps the first one's place; C writes both)."""
    names = [
        sync.identity.destination_key,
        "_update_existing_only",
        *(m.target for m in sync.fields),
    ]
    audiences = sync.audiences
    if audiences.representation == "boolean":
        names += [audiences.attribute_for(segment) for segment in audiences.segments]
    elif audiences.segments:
        names.append(audiences.array_attribute)
    return len(names) != len(set(names))


def native_mapping(
    sync: SyncDefinition,
    mapper: RowMapper,
    suppressions: SuppressionSnapshot,
    suppressed_raw: Callable[[list[str]], str | None],
) -> Any:
    """The mapping for C, or None when this sync's buckets run on the reference."""
    if SPEEDUPS is None:
        return None
    if _names_collide(sync) or len(mapper.audiences) > 64:
        return None
    fields = []
    for target, position, convert, mapping in mapper.fields:
        kind = _BY_TARGET.get(
            target, _OTHER if target in _LOOKUP_TARGETS else _BY_TYPE[mapping.type]
        )
        if kind == _STRING and mapping.whitespace == "keep":
            kind = _TEXT  # read as sent: C does not strip it either
        limit = mapping.max_length or 255
        if kind == _DOB:
            limit = datetime.now(UTC).year
        fields.append((
            kind, position, target, limit, mapping.required, mapping.send_nulls, mapping.source,
            _coercer(convert, mapping.source), target in _LOOKUP_TARGETS,
        ))  # fmt: skip
    by_segment = {segment.name: segment for segment in sync.audiences.segments}
    boolean = sync.audiences.representation == "boolean"
    audiences = [
        (position, name, sync.audiences.attribute_for(by_segment[name]) if boolean else None)
        for name, position in mapper.audiences
    ]
    order = sorted(range(len(audiences)), key=lambda index: audiences[index][1])
    targets = [target for target, _, _, _ in mapper.fields]
    consent = sync.consent
    granted = tuple(consent.granted_values) if consent is not None and consent.column else ()
    blocked = None
    if not suppressions.empty:
        blocked = tuple(
            {
                address: reason.value
                for address, reason in suppressions.by_channel.get(ch, {}).items()
            }
            for ch in (Channel.EMAIL, Channel.PHONE)
        )
    return SPEEDUPS.Mapping(
        len(mapper.columns),
        (mapper.identity_index, _IDENTITY_KINDS.get(mapper.identity_key, 0), mapper.identity_value),
        sync.identity.destination_key,
        sync.mode != SyncMode.UPSERT,
        fields,
        (audiences, order),
        None if boolean else sync.audiences.array_attribute,
        mapper.consent_index if mapper.consent_index is not None else -1,
        granted,
        mapper.digest_positions,
        (
            targets.index("email") if "email" in targets else -1,
            targets.index("phone") if "phone" in targets else -1,
            mapper.email_index if mapper.email_index is not None else -1,
            mapper.phone_index if mapper.phone_index is not None else -1,
            suppressed_raw,
        ),
        blocked,
        RowRejected,
    )
