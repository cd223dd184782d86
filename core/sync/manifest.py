"""AEP export manifests: one export split into parts, processed together.

AEP can write `manifest-<destinationId>-<dataflowRunId>.json` with the data files of an
export (`{"flowRunId", "scheduledTime", "exportResults": [{"sinkPath", "name", "size"}]}`)
and splits large exports into parts (`name.csv`, `name_2.csv`, ...). A sync with
`input.wait_for_manifest` ignores data files as they land and processes every part the
manifest lists, as one run, once the manifest and all its parts are there. Without it,
manifests are ignored and every file is a run of its own.

Where a part is looked for, first found wins: next to the manifest; at `sinkPath` when it
is the part's whole path (`/vip/export_2.csv`); under `sinkPath` when it is a folder
(`/vip`). A leading `/` and a leading container name (`segments/`) are dropped. A part
must lie under the sync's own folder. A part counts as landed once it is there with the
size the manifest gives; a manifest that lands before its parts waits for them (see
`core/sync/service.py`, `resume_manifest`), up to the sync's
`input.parts_deadline_minutes`.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, ValidationError

from core.storage import BlobRef, Storage
from core.sync.readers import FileRejected

_MANIFEST_NAME = re.compile(r"^manifest-.*\.json$", re.IGNORECASE)
_MAX_MANIFEST_BYTES = 1 << 20


class ExportResult(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    sinkPath: str = ""  # noqa: N815 - AEP's field name
    size: int | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    flowRunId: str = ""  # noqa: N815 - AEP's field name
    scheduledTime: str = ""  # noqa: N815
    exportResults: list[ExportResult]  # noqa: N815


@dataclass
class Parts:
    """What a manifest lists, as found now."""

    found: list[BlobRef] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    """Names not there yet, or there with another size than the manifest gives."""


def is_manifest(blob_name: str) -> bool:
    return bool(_MANIFEST_NAME.match(posixpath.basename(blob_name)))


def read_manifest(storage: Storage, manifest: BlobRef) -> Manifest:
    if manifest.size > _MAX_MANIFEST_BYTES:
        raise FileRejected("bad_manifest", "manifest is larger than 1 MB")
    data = b"".join(storage.blobs.iter_chunks(manifest))
    try:
        parsed = Manifest.model_validate_json(data)
    except ValidationError as exc:
        raise FileRejected("bad_manifest", f"manifest is not an AEP manifest: {exc}") from None
    if not parsed.exportResults:
        raise FileRejected("bad_manifest", "manifest lists no files")
    return parsed


def candidates(manifest: BlobRef, result: ExportResult) -> list[str]:
    """Where a listed part may be, in the manifest's container, most likely first."""
    names = [posixpath.join(posixpath.dirname(manifest.name), result.name)]
    sink = result.sinkPath.strip("/")
    if sink.startswith(manifest.container + "/"):
        sink = sink[len(manifest.container) + 1 :]
    if sink:
        if posixpath.basename(sink) == result.name:
            names.append(sink)  # the part's whole path
        names.append(posixpath.join(sink, result.name))  # a folder
    return list(dict.fromkeys(posixpath.normpath(name) for name in names))


def find_parts(storage: Storage, manifest: BlobRef) -> Parts:
    """The parts a manifest lists, found or missing; raises FileRejected for a manifest
    that is not one."""
    folder = manifest.name.split("/", 1)[0] + "/"
    parts = Parts()
    for result in read_manifest(storage, manifest).exportResults:
        if posixpath.basename(result.name) != result.name or result.name in ("", ".", ".."):
            raise FileRejected("bad_manifest", f"{result.name!r} is not a file name")
        # Next to the manifest is always a candidate; a sinkPath out of the sync's folder
        # is never followed (a manifest could name another sync's files).
        names = [name for name in candidates(manifest, result) if name.startswith(folder)]
        found = next(
            (ref for ref in (storage.blobs.find(manifest.container, n) for n in names) if ref),
            None,
        )
        if found is None or (result.size is not None and found.size != result.size):
            parts.missing.append(result.name)
        else:
            parts.found.append(found)
    return parts
