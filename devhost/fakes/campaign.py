"""Adobe Campaign's side of import files, for tests and the demo.

`FakeCampaignCollector.collect()` does what Campaign's file collector and a Data loading
(file) + Update data workflow do with a drop (reference/cdp-and-campaign.md §4.4): it
takes each data file whose trigger (`{name}.ready`) is there, checks it against the format
rules, moves the pair to the archive container (a name already archived is refused, the
way a collector counts a file once), and applies its lines to its profile table: an empty
cell leaves a value as it is, the cleared marker empties it. A file that breaks a rule is
moved to the archive too but not applied, and its problems are kept in `refused`.
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass, field

from core.destinations.campaign import TRIGGER_SUFFIX
from core.storage import Storage

_DATE = re.compile(r"^\d{4}/\d{2}/\d{2}( \d{2}:\d{2}:\d{2})?$")
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")


@dataclass
class CollectedFile:
    name: str
    columns: list[str]
    lines: list[list[str]]


@dataclass
class FakeCampaignCollector:
    storage: Storage
    container: str = "campaign-imports"
    archive: str = "campaign-archive"
    separator: str = "\t"
    cleared_value: str = "#NULL#"
    profiles: dict[str, dict[str, str]] = field(default_factory=dict)
    collected: list[CollectedFile] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)

    def pending(self) -> list[str]:
        """Data files in the drop (with or without their trigger)."""
        return sorted(
            ref.name
            for ref in self.storage.blobs.list(self.container)
            if not ref.name.endswith(TRIGGER_SUFFIX)
        )

    def collect(self) -> list[CollectedFile]:
        """Take every triggered file in name order (names sort by run time)."""
        blobs = self.storage.blobs
        triggers = sorted(
            ref.name[: -len(TRIGGER_SUFFIX)]
            for ref in blobs.list(self.container)
            if ref.name.endswith(TRIGGER_SUFFIX)
        )
        taken = []
        for name in triggers:
            found = blobs.read_versioned(self.container, name)
            if found is None:
                self.refused.append((name, "trigger without its data file"))
                blobs.delete(self.container, name + TRIGGER_SUFFIX)
                continue
            if blobs.exists(self.archive, name):
                self.refused.append((name, "a file of that name was collected before"))
                continue
            blobs.create(self.archive, name, found[0])
            blobs.delete(self.container, name)
            blobs.delete(self.container, name + TRIGGER_SUFFIX)
            try:
                collected = self._parse(name, found[0])
            except ValueError as exc:
                self.refused.append((name, str(exc)))
                continue
            self._apply(collected)
            self.collected.append(collected)
            taken.append(collected)
        return taken

    def _parse(self, name: str, data: bytes) -> CollectedFile:
        if name.endswith(".gz"):
            data = gzip.decompress(data)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"not UTF-8 at byte {exc.start}") from None
        if not text.endswith("\n"):
            raise ValueError("the last line is not terminated")
        rows = text[:-1].split("\n")
        columns = rows[0].split(self.separator)
        if len(columns) < 2 or not all(columns):
            raise ValueError("the header line is missing or has an empty column name")
        lines = []
        for number, line in enumerate(rows[1:], start=2):
            cells = line.split(self.separator)
            if len(cells) != len(columns) or "\r" in line:
                raise ValueError(f"line {number} has {len(cells)} cells for {len(columns)} columns")
            if not cells[0]:
                raise ValueError(f"line {number} has no key")
            for cell in cells:
                if _ISO_DATE.match(cell) and not _DATE.match(cell):
                    raise ValueError(f"line {number}: date not in YYYY/MM/DD form")
            lines.append(cells)
        return CollectedFile(name, columns, lines)

    def _apply(self, collected: CollectedFile) -> None:
        for cells in collected.lines:
            profile = self.profiles.setdefault(cells[0], {})
            for column, cell in zip(collected.columns[1:], cells[1:], strict=True):
                if cell == self.cleared_value:
                    profile.pop(column, None)
                elif cell:
                    profile[column] = cell
