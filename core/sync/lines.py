"""Line indexes: what a run's split leaves the next one, to settle rows without parsing.

For every row whose identity C keys (plain ASCII, not a phone number), the split keeps a
24-byte entry: the XXH64 of the row's line in its file (without the line break, seeded
with the hash of the file's header line), the row's raw digest and its identity's key in
the splitter's Bloom filter. The next run reads them before its split: an entry whose
digest a bucket's digest index holds (acknowledged, or held back for lack of consent) is a
line that bucket settled; a row whose line hashes as that line is the same row, under the
same columns, so it is settled as its digest would be, without being parsed
(core/sync/unchanged.py). Entries of rows that were not acknowledged simply find no digest.

Stored in the sync's state folder, `lines/{run}.bin`: a header line (JSON: version, the
mapping's fingerprint, the run, `base`), then the entries. A run that settled most rows by
their line writes only the entries of the rows it did not (a delta, a few hundred KB for a
million rows with 1% changed): its header's `base` names the files it extends, oldest
first, and a reader reads the whole chain. Once the deltas reach a quarter of the full
file (or `_MAX_CHAIN` files), the next run writes a full one again. A line found in two
files of a chain is settled by neither (the splitter settles a line only when it is
found once).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import orjson

from core.errors import StorageError
from core.storage import Storage
from core.storage.blobs import BlobRef, BlockStager, BlockWriter, read_ahead

ENTRY_BYTES = 24
_VERSION = 1
_FOLDER = "lines/"
_BLOCK_BYTES = 4 << 20
_MAX_CHAIN = 8
_READ_AHEAD_CHUNKS = 4
"""Chunks (4 MB each) of the last line index read ahead before the split takes them: the
index is never held whole, whatever the file's size (the split keeps about 21 bytes an
entry)."""
_HEADER_BYTES = 64 << 10
_KEEP_FOR = timedelta(hours=1)


@dataclass
class LineIndex:
    """The newest chain of line index files, read as the split takes its entries."""

    chain: list[str] = field(default_factory=list)
    """Its files, oldest (the full one) first."""
    full_entries: int = 0
    """Entries of the full file (as its size says); the rest are deltas'."""
    entries: int = 0
    """Entries of the whole chain, at most (as the files' sizes say)."""
    chunks: Iterator[bytes] = field(default_factory=lambda: iter(()))
    """The chain's entries, a whole number of them a chunk, read ahead on a thread."""

    def close(self) -> None:
        """Read no more of it (the thread reading ahead stops)."""
        close = getattr(self.chunks, "close", None)
        if close is not None:
            close()

    @property
    def extendable(self) -> bool:
        """Whether the next run may write a delta on top of this chain."""
        deltas = self.entries - self.full_entries
        return bool(self.chain) and len(self.chain) < _MAX_CHAIN and deltas * 4 < self.full_entries


class LineIndexes:
    """The line index files of one sync's destination state."""

    def __init__(self, storage: Storage, container: str, folder: str, fingerprint: str) -> None:
        self.storage = storage
        self.container = container
        self.prefix = folder + _FOLDER
        self.fingerprint = fingerprint

    def latest(self, run_id: str) -> LineIndex:
        """The newest chain of this mapping another run wrote (empty: none, or a file of it
        is gone), its entries read from now on, a few chunks ahead. Files of no recent chain
        are deleted once an hour old."""
        found = sorted(
            self.storage.blobs.list(self.container, self.prefix),
            key=lambda ref: (ref.last_modified or datetime.min.replace(tzinfo=UTC), ref.name),
            reverse=True,
        )
        newest = next((ref for ref in found if ref.name != self._path(run_id)), None)
        header = self._header(newest) if newest is not None else None
        if newest is None or header is None:
            return LineIndex()
        base = header.get("base")
        chain = [*(base if isinstance(base, list) else []), newest.name[len(self.prefix) :]]
        self._collect(found, keep=set(chain) | {run_id + ".bin"})
        sizes = {ref.name[len(self.prefix) :]: ref for ref in found}
        if any(name not in sizes for name in chain):
            return LineIndex()  # collected meanwhile: start again from a full file
        refs = [sizes[name] for name in chain]
        counts = [ref.size // ENTRY_BYTES for ref in refs]
        chunks = read_ahead(self._entries(refs), _READ_AHEAD_CHUNKS)
        return LineIndex(chain, counts[0], sum(counts), chunks)

    def writer(self, run_id: str, stager: BlockStager, base: list[str]) -> BlockWriter:
        """Where a run's split writes its entries: all of them, or (`base` the chain it
        extends) those of the rows not settled by their line."""
        header = {"version": _VERSION, "fingerprint": self.fingerprint, "run": run_id}
        writer = self.storage.blobs.writer(
            self.container, self._path(run_id), overwrite=True, block_bytes=_BLOCK_BYTES,
            stager=stager,
        )  # fmt: skip
        writer.write(orjson.dumps({**header, "base": base}) + b"\n")
        return writer

    def _path(self, run_id: str) -> str:
        return f"{self.prefix}{run_id}.bin"

    def _header(self, ref: BlobRef) -> dict[str, object] | None:
        """A file's header, if it is of this mapping and version."""
        reader = self.storage.blobs.open_reader(ref, length=min(ref.size, _HEADER_BYTES))
        line = reader.readline()
        header = orjson.loads(line) if line.endswith(b"\n") else {}
        if header.get("version") != _VERSION or header.get("fingerprint") != self.fingerprint:
            return None
        return dict(header)

    def _entries(self, refs: list[BlobRef]) -> Iterator[bytes]:
        """The files' entries, a whole number of them a chunk; a file of another mapping
        or version (rewritten meanwhile) ends them."""
        for ref in refs:
            data, header_read = b"", False
            for chunk in self.storage.blobs.iter_chunks(ref):
                data += chunk
                if not header_read:
                    end = data.find(b"\n")
                    if end < 0:
                        continue  # the header goes on in the next chunk
                    header = orjson.loads(data[:end])
                    if (
                        header.get("version") != _VERSION
                        or header.get("fingerprint") != self.fingerprint
                    ):
                        return
                    data, header_read = data[end + 1 :], True
                whole = len(data) - len(data) % ENTRY_BYTES
                if whole:
                    yield data[:whole]
                data = data[whole:]

    def _collect(self, found: list[BlobRef], keep: set[str]) -> None:
        stale_before = datetime.now(UTC) - _KEEP_FOR
        for ref in found:
            if ref.name[len(self.prefix) :] in keep:
                continue
            if (ref.last_modified or stale_before) < stale_before:
                with contextlib.suppress(StorageError):
                    self.storage.blobs.delete(self.container, ref.name)
