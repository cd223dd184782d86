"""Storage layer: batched vs single table writes, streamed vs whole-blob reads.

These two choices carry the later designs (delta state written in batches, files read as
streams), so their cost is measured here on the same Azurite in one run.
"""

from __future__ import annotations

import os
import time
import tracemalloc
import uuid
from typing import Any, ClassVar

from core.settings import load_settings
from core.storage import Storage
from core.storage.tables import TableEntity

ENTITIES = 2_000
BLOB_SIZES_MB = (32, 128)


class BenchRow(TableEntity):
    table_name: ClassVar[str] = "benchrows"
    email_hash: str
    attributes: dict[str, str]


def _rows(partition: str) -> list[BenchRow]:
    return [
        BenchRow(
            partition_key=partition,
            row_key=f"{i:07d}",
            email_hash=uuid.uuid4().hex,
            attributes={"first_name": "Ana", "country": "PT", "segment": "vip"},
        )
        for i in range(ENTITIES)
    ]


def _timed(action: Any) -> tuple[float, int]:
    """Seconds taken and peak traced Python memory (bytes) of `action()`."""
    tracemalloc.start()
    started = time.perf_counter()
    action()
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return elapsed, peak


def run() -> dict[str, Any]:
    storage = Storage(load_settings().storage_account())
    table = storage.tables.get(BenchRow)
    run_id = uuid.uuid4().hex[:8]

    single_rows = _rows(f"single-{run_id}")
    single_s, _ = _timed(lambda: [table.upsert(row) for row in single_rows])
    batch_rows = _rows(f"batch-{run_id}")
    batch_s, _ = _timed(lambda: table.write_batch(batch_rows))

    container = f"bench-{run_id}"
    piece = os.urandom(1024 * 1024)
    blob_figures: dict[str, float] = {}
    for size_mb in BLOB_SIZES_MB:
        name = f"big-{size_mb}.bin"
        storage.blobs.create(container, name, (piece for _ in range(size_mb)))
        ref = storage.blobs.ref(container, name)
        client = storage.blob_service.get_blob_client(container, name)

        def streamed() -> None:
            for _ in storage.blobs.iter_chunks(ref):  # noqa: B023 - called inside this loop
                pass

        def whole() -> None:
            client.download_blob().readall()  # noqa: B023 - called inside this loop

        stream_s, stream_peak = _timed(streamed)
        whole_s, whole_peak = _timed(whole)
        blob_figures[f"blob_{size_mb}mb_streamed_mb_per_s"] = round(size_mb / stream_s, 1)
        blob_figures[f"blob_{size_mb}mb_streamed_peak_mb"] = round(stream_peak / 2**20, 1)
        blob_figures[f"blob_{size_mb}mb_whole_mb_per_s"] = round(size_mb / whole_s, 1)
        blob_figures[f"blob_{size_mb}mb_whole_peak_mb"] = round(whole_peak / 2**20, 1)
    storage.blob_service.delete_container(container)
    small, large = BLOB_SIZES_MB

    figures: dict[str, float] = {
        "table_single_upserts_per_s": round(ENTITIES / single_s),
        "table_batched_upserts_per_s": round(ENTITIES / batch_s),
        "table_batch_speedup": round(single_s / batch_s, 1),
        **blob_figures,
        "streamed_peak_growth_small_to_large": round(
            blob_figures[f"blob_{large}mb_streamed_peak_mb"]
            / blob_figures[f"blob_{small}mb_streamed_peak_mb"],
            2,
        ),
    }
    print(
        f"   table writes, {ENTITIES} entities: single {figures['table_single_upserts_per_s']}/s,"
        f" batched {figures['table_batched_upserts_per_s']}/s ({figures['table_batch_speedup']}x)"
    )
    for size_mb in BLOB_SIZES_MB:
        key = f"blob_{size_mb}mb"
        print(
            f"   blob read {size_mb} MB: streamed {figures[key + '_streamed_mb_per_s']} MB/s,"
            f" peak {figures[key + '_streamed_peak_mb']} MB | whole"
            f" {figures[key + '_whole_mb_per_s']} MB/s, peak {figures[key + '_whole_peak_mb']} MB"
        )
    print(
        f"   streamed peak memory {small} MB -> {large} MB blob:"
        f" x{figures['streamed_peak_growth_small_to_large']}"
    )
    return figures
