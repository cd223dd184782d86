"""Sync definitions: the versioned document that declares every segment sync.

Past 500 lines because the document's models validate across sections (fields,
audiences, consent, governance), and their validators need the models side by side.

One YAML (or JSON) document, `version: 1`, with a list of syncs. Each sync says where its
files land, how to read them, which column identifies a person, how columns map to typed
destination attributes and audience memberships, what the destination is, and the mode.
Validation errors name the sync, the field and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from core.destinations.campaign import CampaignDestinationSpec
from core.errors import ConfigError
from core.governance import Governance, Sent, Verdict, action_id, evaluate, label_id
from core.push.apps import PushApp

log = logging.getLogger(__name__)

SUPPORTED_VERSIONS = (1,)
_SYNC_ID = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
# Custom attribute names that would shadow a standard field (Braze creates a duplicate).
SHADOWED_STANDARD_FIELDS = {
    "birthday": "dob", "birthdate": "dob", "birth_date": "dob", "date_of_birth": "dob",
    "dateofbirth": "dob", "firstname": "first_name", "lastname": "last_name",
    "phone_number": "phone", "mobile": "phone", "city": "home_city", "timezone": "time_zone",
}  # fmt: skip
_RESERVED_TARGETS = {"external_id", "braze_id", "user_alias", "_update_existing_only"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Labels = Annotated[
    tuple[str, ...],
    Field(description="data usage labels (Adobe's C1-C12, I1, I2, S1, S2, ... or custom)"),
]


def _labels(value: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(label_id(name) for name in value)


class FieldType(StrEnum):
    STRING = "string"
    INTEGER = "integer"
    FLOAT = "float"
    DECIMAL = "decimal"
    BOOLEAN = "boolean"
    DATE = "date"
    DATETIME = "datetime"
    ARRAY = "array"
    OBJECT = "object"


class SyncMode(StrEnum):
    UPDATE_ONLY = "update_only"
    UPSERT = "upsert"
    MIRROR = "mirror"


class FileFormat(StrEnum):
    CSV = "csv"
    TSV = "tsv"
    JSONL = "jsonl"


class FieldMapping(Strict):
    source: str = Field(min_length=1, description="column name (or JSON key path a.b.c)")
    target: str = Field(min_length=1, description="destination attribute name")
    type: FieldType = FieldType.STRING
    required: bool = False
    max_length: int | None = Field(default=None, ge=1, le=255)
    send_nulls: bool = False
    labels: Labels = ()
    whitespace: Literal["keep", "trim"] = Field(
        default="keep",
        description=(
            "surrounding whitespace of a string value: keep it as the CDP sent it, or trim "
            "it; coded values (standard fields with a format, numbers, dates, booleans) are "
            "always read trimmed"
        ),
    )

    _labels = field_validator("labels")(_labels)

    @field_validator("target")
    @classmethod
    def _target_is_allowed(cls, value: str) -> str:
        if value in _RESERVED_TARGETS:
            raise ValueError(f"{value!r} is an identifier, not an attribute")
        standard = SHADOWED_STANDARD_FIELDS.get(value.lower().replace(" ", "_"))
        if standard:
            raise ValueError(
                f"{value!r} would create a custom attribute shadowing Braze's standard "
                f"{standard!r}; map the column to target {standard!r}"
            )
        if " " in value or "." in value or "$" in value:
            raise ValueError("attribute names cannot contain spaces, '.' or '$'")
        if len(value) > 255:
            raise ValueError("attribute names are at most 255 characters")
        return value

    @model_validator(mode="after")
    def _standard_field_types(self) -> FieldMapping:
        expected = {"dob": FieldType.DATE, "email_subscribe": FieldType.STRING}
        if self.target in expected and self.type != expected[self.target]:
            raise ValueError(f"target {self.target!r} must have type {expected[self.target]}")
        return self


class Identity(Strict):
    column: str = Field(min_length=1, description="source column holding the identity")
    namespace: str = Field(min_length=1, description="CDP identity namespace, e.g. crmId")
    destination_key: Literal["external_id", "braze_id", "email", "phone"] = "external_id"
    labels: Labels = ()

    _labels = field_validator("labels")(_labels)


class AudienceSegment(Strict):
    id: str = Field(min_length=1, description="segment id in segmentMembership.<ns>.<id>")
    name: str = Field(min_length=1, description="audience name in the destination")
    namespace: str = "ups"
    labels: Labels = ()

    _labels = field_validator("labels")(_labels)

    @property
    def column(self) -> str:
        return f"segmentMembership.{self.namespace}.{self.id}.status"


class Audiences(Strict):
    representation: Literal["boolean", "array"] = "boolean"
    attribute_prefix: str = Field(default="audience_", description="boolean attribute prefix")
    array_attribute: str = Field(default="cdp_audiences", description="array attribute name")
    segments: tuple[AudienceSegment, ...] = ()

    def attribute_for(self, segment: AudienceSegment) -> str:
        return f"{self.attribute_prefix}{segment.name}"


ConsentChannel = Literal["email", "sms", "push", "whatsapp"]
# AEP's consent values (consents.marketing.<channel>.val), lower-cased as rows are read.
AEP_CONSENT_VALUES = {
    "y": "yes, opted in", "n": "no, opted out", "p": "pending verification",
    "u": "unknown", "dy": "default of yes", "dn": "default of no",
    "li": "legitimate interest", "ct": "contract", "cp": "compliance with a legal obligation",
    "vi": "vital interest of the individual", "pi": "public interest",
}  # fmt: skip
_NEVER_GRANTED = ("n", "dn", "p", "u")
_MARKETING_CONSENT = re.compile(r"^consents\.marketing\.([A-Za-z]+)\.val$")
# Braze profile attributes that carry one channel's marketing permission.
_SUBSCRIPTION_TARGETS = {"email_subscribe": "email", "push_subscribe": "push"}


def consent_channel_of(column: str) -> str | None:
    """`consents.marketing.sms.val` -> `sms`: the channel an AEP consent column is about."""
    found = _MARKETING_CONSENT.match(column)
    return found.group(1).lower() if found else None


class Consent(Strict):
    """The one marketing permission a sync carries (a list never mixes them)."""

    channel: ConsentChannel
    column: str | None = Field(
        default=None,
        description=(
            "column with the consent value, e.g. consents.marketing.email.val; unset means "
            "not checked"
        ),
    )
    granted_values: tuple[str, ...] = Field(
        default=("y", "dy", "yes", "true", "1", "opted_in", "subscribed", "in"),
        description=(
            "values that grant it (any case): AEP's y and dy (a default of yes), and common "
            "spellings of yes; add li, ct, cp, vi or pi to send on another legal basis"
        ),
    )

    @field_validator("granted_values")
    @classmethod
    def _grants(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        lowered = tuple(v.strip().lower() for v in value)
        for refused in _NEVER_GRANTED:
            if refused in lowered:
                raise ValueError(
                    f"{refused!r} cannot grant consent: in AEP it means "
                    f"{AEP_CONSENT_VALUES[refused]!r}"
                )
        if not any(lowered):
            raise ValueError("at least one value must grant consent")
        return lowered

    @model_validator(mode="after")
    def _one_channel(self) -> Consent:
        about = consent_channel_of(self.column or "")
        if about is not None and about != self.channel:
            raise ValueError(
                f"column {self.column!r} is the {about} permission but channel is "
                f"{self.channel!r}: a sync carries exactly one marketing permission"
            )
        return self


class BrazeDestinationSpec(Strict):
    MARKETING_ACTIONS: ClassVar[tuple[str, ...]] = ("email_targeting", "export_to_third_party")
    """What sending profiles to Braze always is, whatever a sync adds."""

    RULES_VERSION: ClassVar[int] = 1
    """Raise it when a Braze rule in code changes (the typing of a standard field, say):
    the next run re-types every row and re-sends the values the change affects."""

    type: Literal["braze"] = "braze"
    marketing_actions: tuple[str, ...] = Field(
        default=(), description="marketing actions this sync performs besides Braze's own"
    )

    @field_validator("marketing_actions")
    @classmethod
    def _action_ids(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(action_id(name) for name in value)

    batch_size: int = Field(default=75, ge=1, le=75, description="objects per /users/track")
    max_body_bytes: int = Field(default=3_900_000, ge=10_000, le=4_000_000)
    requests_per_second: float = Field(
        default=50.0, gt=0,
        description="the workspace's request budget for /users/track, shared by every worker "
        "and sync with the same endpoint and key (give them the same value)",
    )  # fmt: skip
    max_attempts: int = Field(default=5, ge=1, le=20)
    timeout_seconds: float = Field(default=30.0, gt=0)
    max_in_flight: int | None = Field(
        default=None, ge=1, le=128,
        description="batches one worker has in flight at once; by default enough to reach "
        "`requests_per_second` at 150 ms per request (at least 2, at most 64)",
    )  # fmt: skip
    shared_budget: bool = Field(
        default=True,
        description="pace through the budget in Table storage that every worker and sync of "
        "this workspace shares (off: each worker paces alone)",
    )

    def problems(self, sync: SyncDefinition) -> list[str]:
        """What of `sync` Braze cannot take as it is."""
        targets = [mapping.target for mapping in sync.fields]
        if sync.identity.destination_key == "phone" and "email" in targets:
            # /users/track identifies an object by its email when it has both.
            return [
                f"fields[{targets.index('email')}].target 'email' with identity.destination_key"
                " 'phone': Braze would identify these profiles by the e-mail address; key the "
                "sync by email or external_id, or map the address to a custom attribute"
            ]
        return []

    @property
    def in_flight(self) -> int:
        if self.max_in_flight is not None:
            return self.max_in_flight
        return min(64, max(2, math.ceil(self.requests_per_second * 0.15)))


DestinationSpec = Annotated[
    BrazeDestinationSpec | CampaignDestinationSpec, Field(discriminator="type")
]


class InputSpec(Strict):
    format: FileFormat = FileFormat.CSV
    delimiter: str | None = Field(default=None, min_length=1, max_length=1)
    wait_for_manifest: bool = False
    parts_deadline_minutes: float = Field(
        default=60, gt=0, le=7 * 24 * 60,
        description=(
            "how long a manifest waits for the parts it lists to land (with the size it "
            "gives) before its run ends as failed (parts_missing)"
        ),
    )  # fmt: skip

    @property
    def field_delimiter(self) -> str:
        if self.delimiter:
            return self.delimiter
        return "\t" if self.format == FileFormat.TSV else ","


class Processing(Strict):
    state_buckets: int = Field(
        default=256, ge=1, le=4096,
        description=(
            "identity-hash buckets of input and delta state, fixed for a sync's life; "
            "memory per worker follows profiles / state_buckets (256 suits ~10M profiles)"
        ),
    )  # fmt: skip
    rows_per_worker: int = Field(
        default=250_000, ge=1_000, description="rows per parallel worker before fanning out"
    )
    in_memory_max_rows: int = Field(
        default=50_000,
        ge=0,
        description="files up to this many rows are partitioned in memory and never fan out",
    )
    in_memory_max_mb: int = Field(
        default=48,
        ge=0,
        description=(
            "compressed work a larger file's split holds in memory before it spills to work "
            "blobs (about 40 MB per million rows of 20 columns)"
        ),
    )
    unchanged_lookup_mb: float = Field(
        default=224,
        ge=0,
        description=(
            "memory the split gives the tables that recognise unchanged rows (about 44 bytes "
            "per profile: ~5.3M profiles at the default); rows of the profiles past it are "
            "recognised in their buckets instead, more slowly; 0 turns the tables off"
        ),
    )


class SyncDefinition(Strict):
    id: str
    description: str = ""
    labels: Labels = Field(
        default=(), description="labels of the whole export (as on a dataset): all it sends"
    )
    input: InputSpec = InputSpec()
    identity: Identity
    fields: tuple[FieldMapping, ...] = ()
    audiences: Audiences = Audiences()
    mode: SyncMode = SyncMode.UPDATE_ONLY
    consent: Consent | None = None
    destination: DestinationSpec = BrazeDestinationSpec()
    processing: Processing = Processing()
    dry_run: bool = Field(
        default=False, description="every run of this sync is a preview: nothing is sent"
    )
    duplicates: Literal["first_wins"] = Field(
        default="first_wins",
        description="a repeated identity in one file is rejected; the first row is used",
    )

    _labels = field_validator("labels")(_labels)

    @field_validator("id")
    @classmethod
    def _id_shape(cls, value: str) -> str:
        if not _SYNC_ID.match(value):
            raise ValueError("must be 2-63 characters of a-z, 0-9 and '-' (it is a blob prefix)")
        return value

    @field_validator("consent", mode="before")
    @classmethod
    def _one_consent(cls, value: Any) -> Any:
        if isinstance(value, list):
            raise ValueError(
                "a sync carries exactly one marketing permission: give one consent "
                "(channel and column), and one sync per permission"
            )
        return value

    @model_validator(mode="after")
    def _one_permission(self) -> SyncDefinition:
        """Nothing the sync sends or reads is another channel's marketing permission."""
        channels: dict[str, str] = {}
        if self.consent is not None:
            channels[self.consent.channel] = "consent.channel"
        for index, mapping in enumerate(self.fields):
            about = _SUBSCRIPTION_TARGETS.get(mapping.target) or consent_channel_of(mapping.source)
            if about is not None:
                channels.setdefault(about, f"fields[{index}]")
        if len(channels) > 1:
            named = ", ".join(f"{channel} ({where})" for channel, where in channels.items())
            raise ValueError(
                f"mixes marketing permissions: {named}; a sync (one list in the destination) "
                "carries exactly one"
            )
        return self

    def marketing_actions(self) -> tuple[str, ...]:
        spec = self.destination
        return tuple(dict.fromkeys((*spec.MARKETING_ACTIONS, *spec.marketing_actions)))

    def sent(self) -> list[Sent]:
        """Everything the sync sends to its destination, with its source and labels."""
        common = set(self.labels)
        items = [
            Sent("identity", self.identity.destination_key, self.identity.column,
                 frozenset(common.union(self.identity.labels))),
        ]  # fmt: skip
        items += [
            Sent("field", m.target, m.source, frozenset(common.union(m.labels)))
            for m in self.fields
        ]
        items += [
            Sent("audience", s.name, s.column, frozenset(common.union(s.labels)))
            for s in self.audiences.segments
        ]
        return items

    def without(self, dropped: frozenset[tuple[str, str]]) -> SyncDefinition:
        """This sync less the fields and audiences a drop policy keeps from leaving."""
        if not dropped:
            return self
        fields = tuple(m for m in self.fields if ("field", m.target) not in dropped)
        segments = tuple(s for s in self.audiences.segments if ("audience", s.name) not in dropped)
        audiences = self.audiences.model_copy(update={"segments": segments})
        return self.model_copy(update={"fields": fields, "audiences": audiences})

    @model_validator(mode="after")
    def _targets_unique(self) -> SyncDefinition:
        seen: set[str] = set()
        for mapping in self.fields:
            if mapping.target in seen:
                raise ValueError(f"target {mapping.target!r} is mapped twice")
            seen.add(mapping.target)
        audience_names = [s.name for s in self.audiences.segments]
        if len(set(audience_names)) != len(audience_names):
            raise ValueError("audience names must be unique")
        problems = self.destination.problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self


@dataclass(frozen=True)
class GovernedSync:
    """A sync as the policies let it run: `sync` less what is dropped; blocked or not."""

    sync: SyncDefinition
    verdict: Verdict

    @property
    def blocked(self) -> bool:
        return bool(self.verdict.blocked)


class SyncDocument(Strict):
    version: int
    governance: Governance = Governance()
    syncs: tuple[SyncDefinition, ...]
    push_apps: tuple[PushApp, ...] = ()
    """Mobile apps for push (tokens, dispatch); see core/push/apps.py."""
    _governed: dict[str, GovernedSync] = PrivateAttr(default_factory=dict)

    @field_validator("version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value not in SUPPORTED_VERSIONS:
            raise ValueError(f"unsupported version {value}; supported: {SUPPORTED_VERSIONS}")
        return value

    @model_validator(mode="after")
    def _ids_unique(self) -> SyncDocument:
        for kind, ids in (
            ("sync", [s.id for s in self.syncs]),
            ("push app", [a.id for a in self.push_apps]),
        ):
            duplicated = sorted({i for i in ids if ids.count(i) > 1})
            if duplicated:
                raise ValueError(f"{kind} ids must be unique: {duplicated}")
        return self

    @model_validator(mode="after")
    def _governed_syncs(self) -> SyncDocument:
        """Labels and actions checked against the catalog; each sync's verdict computed."""
        problems = self.governance.problems()
        known_labels = self.governance.known_labels()
        known_actions = self.governance.known_actions()
        for sync in self.syncs:
            labels = {label for item in sync.sent() for label in item.labels}
            for label in sorted(labels - known_labels):
                problems.append(
                    f"sync {sync.id!r}: unknown label {label!r} (declare custom labels in "
                    "governance.labels)"
                )
            for action in sync.destination.marketing_actions:
                if action not in known_actions:
                    problems.append(f"sync {sync.id!r}: unknown marketing action {action!r}")
        if problems:
            raise ValueError("; ".join(problems))
        for sync in self.syncs:
            verdict = evaluate(
                self.governance, sync.id, sync.destination.type, sync.marketing_actions(),
                sync.sent(),
            )  # fmt: skip
            self._governed[sync.id] = GovernedSync(sync.without(verdict.dropped_names), verdict)
        return self

    def get(self, sync_id: str) -> SyncDefinition | None:
        """The sync as it runs: less the fields and audiences a drop policy keeps back."""
        governed = self._governed.get(sync_id)
        return governed.sync if governed else None

    def governed(self, sync_id: str) -> GovernedSync | None:
        return self._governed.get(sync_id)

    def blocked(self) -> list[GovernedSync]:
        return [g for g in self._governed.values() if g.blocked]

    def push_app(self, app_id: str) -> PushApp | None:
        return next((a for a in self.push_apps if a.id == app_id), None)


def mapping_fingerprint(sync: SyncDefinition) -> str:
    """Changes whenever the columns a sync reads, how it reads them, or its destination's
    rules change (raw digests under another fingerprint are not trusted: core/sync/state.py)."""
    relevant = sync.model_dump_json(include={"identity", "fields", "audiences", "consent", "input"})
    rules = f"{sync.destination.type}:{sync.destination.RULES_VERSION}"
    return hashlib.sha256(f"{relevant}\n{rules}".encode()).hexdigest()[:16]


def _location(data: Any, loc: tuple[int | str, ...]) -> str:
    """`sync 'vip' field fields[2].type` from a pydantic error location."""
    parts = list(loc)
    prefix = ""
    if len(parts) >= 2 and parts[0] == "syncs" and isinstance(parts[1], int):
        index = parts[1]
        try:
            prefix = f"sync {data['syncs'][index]['id']!r}: "
        except (KeyError, IndexError, TypeError):
            prefix = f"sync #{index + 1}: "
        parts = parts[2:]
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return prefix + (path or "document")


def parse_document(data: Any) -> SyncDocument:
    try:
        return SyncDocument.model_validate(data)
    except ValidationError as exc:
        problems = [
            f"{_location(data, tuple(e['loc']))}: {str(e['msg']).removeprefix('Value error, ')}"
            for e in exc.errors(include_url=False)
        ]
        raise ConfigError("invalid sync definitions: " + "; ".join(problems)) from None


def load_document(path: Path) -> SyncDocument:
    """Read a YAML or JSON sync document; ConfigError says what and where. A sync a policy
    blocks is an error in the log here, and its runs end blocked, sending nothing."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read sync definitions {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"sync definitions {path} are not valid YAML/JSON: {exc}") from None
    document = parse_document(data)
    for governed in document.blocked():
        log.error(
            "sync %r is blocked by policy: %s", governed.sync.id,
            "; ".join(v.sentence() for v in governed.verdict.blocked),
        )  # fmt: skip
    return document
