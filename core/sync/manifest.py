"""AEP export manifests: one export split into parts, processed together.

AEP can write `manifest-<destinationId>-<dataflowRunId>.json` after the data files of an
export (`{"flowRunId", "scheduledTime", "exportResults": [{"sinkPath", "name", "size"}]}`)
and splits large exports into parts (`name.csv`, `name_2.csv`, ...). A sync with
`input.wait_for_manifest` ignores data files as they land and processes every part the
manifest lists, as one run, once the manifest arrives. Without it, manifests are ignored
and every file is a run of its own.
"""

from __future__ import annotations

import posixpath
import re

from pydantic import BaseModel, ConfigDict, ValidationError

from core.errors import TransientError
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


def is_manifest(blob_name: str) -> bool:
    return bool(_MANIFEST_NAME.match(posixpath.basename(blob_name)))


def read_manifest(storage: Storage, manifest: BlobRef) -> Manifest:
    if manifest.size > _MAX_MANIFEST_BYTES:
        raise FileRejected("bad_manifest", "manifest is larger than 1 MB")
    data = b"".join(storage.blobs.iter_chunks(manifest))
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as exc:
        raise FileRejected("bad_manifest", f"manifest is not an AEP manifest: {exc}") from None


def listed_parts(storage: Storage, manifest: BlobRef) -> list[BlobRef]:
    """The data files a manifest lists, found next to it (or under its sinkPath).

    A listed file that is not there yet is a transient error: the trigger retries.
    """
    folder = posixpath.dirname(manifest.name)
    parts = []
    for result in read_manifest(storage, manifest).exportResults:
        candidates = [posixpath.join(folder, result.name)]
        if result.sinkPath:
            candidates.append(posixpath.join(result.sinkPath.strip("/"), result.name))
        found = next(
            (name for name in candidates if storage.blobs.exists(manifest.container, name)), None
        )
        if found is None:
            raise TransientError(f"manifest lists {result.name!r}, which has not arrived yet")
        ref = storage.blobs.ref(manifest.container, found)
        if result.size is not None and ref.size != result.size:
            raise TransientError(
                f"{result.name!r} is {ref.size} bytes, manifest says {result.size}"
            )
        parts.append(ref)
    if not parts:
        raise FileRejected("bad_manifest", "manifest lists no files")
    return parts
