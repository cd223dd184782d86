"""Adobe Campaign (v7/v8) import files: an audience becomes delta files Campaign's import
workflow loads (reference/cdp-and-campaign.md §4.4).

Wire format (rules version `CampaignDestinationSpec.RULES_VERSION`):
- UTF-8, one header line, tab- or semicolon-separated, no string delimiter, `\\n` line ends,
  gzip when asked (the workflow's "Decompression (zcat)" pre-process).
- Columns, always all of them in this order: the key, each field's target, one column per
  audience (`{attribute_prefix}{name}`): a Data loading activity is set up on one layout.
- Cells: text as is; numbers in decimal notation; booleans and memberships `1`/`0`; dates
  `YYYY/MM/DD`, times `YYYY/MM/DD HH:MM:SS` in UTC.
- Delta files (the default): a line per changed profile, with only its changed cells; an
  empty cell means "unchanged" (untick "Empty the destination value if the source value is
  empty" in the Update data activity), and a value the CDP emptied (a field with
  `send_nulls`) is written as `cleared_value` (map it to empty in the workflow). Full files
  (`file_mode: full`, initial loads): every row of the export, every cell.
- A value containing the separator, a tab or a line break is never written: its row fails
  with that reason (counted in the run, retried by the next export) rather than being
  altered or corrupting a line.
- Update-only syncs write only profiles the known-profiles registry holds
  (core/destinations/known_profiles.py); the others end `unmatched`.

Files: one per batch (`rows_per_file` rows at most), named
`{folder}/{sync}_{run id}_{content hash}.txt[.gz]`: timestamped by the run, never
overwritten, and the same for the same rows when a crashed run is retried. A trigger file
`{name}.ready` is written after its data file; Campaign's file collector takes the pair.

Crash rule: a batch counts as applied (checkpoint, then state) only once its file and
trigger are written. Before the trigger a ledger marker in our own storage records that the
data file is complete. A retry that finds the marker only writes what is missing (a file
the collector already took is not written again); one that finds the data file but no
marker checks the file's bytes are its own.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.destinations.base import BatchResult, Capabilities, ItemFailure
from core.destinations.file_drop import DropExists, FileDrop
from core.errors import TerminalError
from core.governance import action_id

if TYPE_CHECKING:
    from core.destinations.known_profiles import KnownProfiles
    from core.storage.blobs import BlobStore
    from core.sync.definitions import SyncDefinition
    from core.sync.state import Change

_SEPARATORS = {"tab": "\t", "semicolon": ";"}
_INVALID_MARK = b"\x00"
"""Starts an encoded line that must not be written; the reason follows."""
TRIGGER_SUFFIX = ".ready"
LEDGER_CONTAINER = "sync-state"


class CampaignDestinationSpec(BaseModel):
    """`destination:` of a sync whose audience goes to Adobe Campaign as import files."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    MARKETING_ACTIONS: ClassVar[tuple[str, ...]] = ("email_targeting", "export_to_third_party")
    RULES_VERSION: ClassVar[int] = 1
    """Raise it when a rule of the wire format changes: the next run re-types every row,
    and profiles whose written values the rule changes are written again."""

    type: Literal["adobe_campaign"]
    marketing_actions: tuple[str, ...] = Field(
        default=(), description="marketing actions this sync performs besides its own"
    )
    separator: Literal["tab", "semicolon"] = "tab"
    key_column: str | None = Field(
        default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$",
        description="header of the key column (the workflow's reconciliation key); default "
        "identity.destination_key",
    )  # fmt: skip
    file_mode: Literal["delta", "full"] = Field(
        default="delta",
        description="delta: changed profiles and cells only; full: every row whole (initial loads)",
    )
    rows_per_file: int = Field(default=100_000, ge=1, le=2_000_000)
    gzip: bool = False
    folder: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
        description="folder of the drop the files go to; default the sync id",
    )  # fmt: skip
    cleared_value: str = Field(
        default="#NULL#", min_length=1, max_length=32,
        description="cell text for a value the CDP emptied (fields with send_nulls)",
    )  # fmt: skip
    known_profiles: str | None = Field(
        default=None, pattern=r"^[a-z0-9][a-z0-9-]{1,62}$",
        description="known-profiles registry (its prefix in the known-profiles container); "
        "required in update_only mode",
    )  # fmt: skip
    quarantine: bool = Field(
        default=True,
        description="suppress addresses the log export holds as quarantined or on denylist",
    )

    @field_validator("marketing_actions")
    @classmethod
    def _action_ids(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(action_id(name) for name in value)

    def problems(self, sync: SyncDefinition) -> list[str]:
        """What of `sync` Campaign files cannot carry."""
        found = []
        separator = _SEPARATORS[self.separator]
        for index, mapping in enumerate(sync.fields):
            if mapping.type in ("array", "object"):
                found.append(
                    f"fields[{index}] ({mapping.target}): Campaign import columns hold single "
                    f"values, not {mapping.type}s"
                )
        if sync.audiences.segments and sync.audiences.representation != "boolean":
            found.append("audiences.representation must be boolean (one 1/0 column each)")
        if sync.mode == "update_only" and self.known_profiles is None:
            found.append(
                "destination.known_profiles is required in update_only mode: Campaign files "
                "cannot tell us a profile is unknown"
            )
        if any(mark in self.cleared_value for mark in (separator, "\t", "\r", "\n")):
            found.append("destination.cleared_value contains the separator or a line break")
        return found


def campaign_cell(value: Any, kind: str) -> str:
    """One value as Campaign's Data loading activity reads it."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format(Decimal(repr(value)), "f")
    text = str(value)
    if kind == "date":
        return text[:10].replace("-", "/")
    if kind == "datetime":  # 2026-12-08T10:00:00(.123)Z, UTC already
        return f"{text[:10].replace('-', '/')} {text[11:19]}"
    return text


class CampaignDestination:
    name = "adobe_campaign"

    def __init__(
        self,
        spec: CampaignDestinationSpec,
        sync: SyncDefinition,
        drop: FileDrop,
        *,
        run_id: str,
        ledger: BlobStore,
        known: KnownProfiles | None = None,
    ) -> None:
        self.spec = spec
        self.sync_id = sync.id
        self.run_id = run_id
        self.drop = drop
        self.ledger = ledger
        self.known = known if sync.mode == "update_only" else None
        self.capabilities = Capabilities(
            modes=frozenset({"update_only", "upsert", "mirror"}),
            reports_unknown=self.known is not None,
            identities=("external_id", "email", "phone"),
            grouping="files",
            acknowledgement="file_written",
            honours_quarantine=spec.quarantine,
            resend_unchanged=spec.file_mode == "full",
        )
        self.max_batch_objects = spec.rows_per_file
        self.max_body_bytes = 1 << 30
        self.max_in_flight = 1  # files in order: a retried run rebuilds the same files
        self.separator = _SEPARATORS[spec.separator]
        key = spec.key_column or sync.identity.destination_key
        kinds = {m.target: str(m.type) for m in sync.fields}
        self._kinds: dict[str, str] = {key: "string", **kinds}
        self._audience_column = {
            s.name: sync.audiences.attribute_for(s) for s in sync.audiences.segments
        }
        self.columns = [key, *kinds, *self._audience_column.values()]
        self._header = self.separator.join(self.columns).encode() + b"\n"
        self.folder = spec.folder or sync.id
        self.files: list[str] = []
        """Files this instance wrote (or found written by an earlier attempt)."""

    def close(self) -> None:
        """Nothing held between batches."""

    def item(self, sync: SyncDefinition, identity: str, change: Change) -> dict[str, Any]:
        cells: dict[str, Any] = {self.columns[0]: identity}
        for name, value in change.attributes.items():
            cells[name] = self.spec.cleared_value if value is None else value
        for name in change.added:
            cells[self._audience_column[name]] = True
        for name in change.removed:
            cells[self._audience_column[name]] = False
        return cells

    def encode(self, item: dict[str, Any]) -> bytes:
        cells = []
        for column in self.columns:
            value = item.get(column)
            text = "" if value is None else campaign_cell(value, self._kinds.get(column, ""))
            if self.separator in text or "\t" in text or "\n" in text or "\r" in text:
                return _INVALID_MARK + (
                    f"value of {column} contains the separator or a line break".encode()
                )
            cells.append(text)
        return self.separator.join(cells).encode()

    def send_batch(self, items: list[bytes]) -> BatchResult:
        failures: dict[int, ItemFailure] = {}
        lines: list[bytes] = []
        key_end = self.separator.encode()
        for index, line in enumerate(items):
            if line.startswith(_INVALID_MARK):
                failures[index] = ItemFailure(index, False, line[1:].decode())
                continue
            if self.known is not None and line.split(key_end, 1)[0].decode() not in self.known:
                failures[index] = ItemFailure(index, True, "profile not in Adobe Campaign")
                continue
            lines.append(line)
        if not lines:
            return BatchResult(failures, requests=0)
        body = self._header + b"\n".join(lines) + b"\n"
        if self.spec.gzip:
            body = gzip.compress(body, mtime=0)
        self._deliver(self._file_name(body), body)
        return BatchResult(failures)

    def _file_name(self, body: bytes) -> str:
        digest = hashlib.sha256(body).hexdigest()[:16]
        suffix = ".txt.gz" if self.spec.gzip else ".txt"
        return f"{self.folder}/{self.sync_id}_{self.run_id}_{digest}{suffix}"

    def _deliver(self, name: str, body: bytes) -> None:
        marker = f"{self.sync_id}/campaign-files/{name.replace('/', '~')}"
        if not self.ledger.exists(LEDGER_CONTAINER, marker):
            try:
                self.drop.put(name, body)
            except DropExists:
                if self.drop.read(name) != body:
                    raise TerminalError(
                        f"{self.drop.where}: {name} exists with other contents"
                    ) from None
            self.ledger.create(LEDGER_CONTAINER, marker, b"", overwrite=True)
            self._trigger(name)
        elif self.drop.exists(name):
            self._trigger(name)  # else: the collector took the pair
        self.files.append(name)

    def _trigger(self, name: str) -> None:
        with contextlib.suppress(DropExists):  # written by the attempt that crashed after it
            self.drop.put(name + TRIGGER_SUFFIX, b"")
