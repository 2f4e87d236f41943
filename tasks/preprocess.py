"""Preprocess stage: turn the validated IDX files into float32 parquet, one row per image."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.artifacts import ArtifactRef, publish
from tasks.dataset import SPLITS
from tasks.errors import Log, quiet
from tasks.files import workdir
from tasks.idx import IMAGE_SHAPE, PIXELS, idx_array, read_payload
from tasks.layout import HOLDOUT_FILE, SPLIT_FILES

SCHEMA_VERSION = 1
PIXEL_COLUMNS = [f"pixel_{i:03d}" for i in range(PIXELS)]
METADATA_KEY = b"mnist_pipeline"
# One non-nullable, uncompressed float32 column per pixel in a single row group: any parquet reader sees plain named
# float columns, and a memory-mapped read goes straight into one column-major buffer. Chosen by measurement against
# compression and list columns (benchmarks/bench_load.py, BENCHMARKS.md).
SCHEMA = pa.schema(
    [pa.field(name, pa.float32(), nullable=False) for name in PIXEL_COLUMNS]
    + [pa.field("label", pa.uint8(), nullable=False)]
)


def to_table(images: np.ndarray, labels: np.ndarray, metadata: dict) -> pa.Table:
    """Return the parquet table of one split: pixels scaled to [0, 1] as float32 (x / 255) and uint8 labels."""
    # Pixel-major order (the uint8 bytes transposed, then converted), so that every column is a contiguous row that
    # pyarrow takes without copying, instead of 784 strided copies.
    pixels = np.ascontiguousarray(images.reshape(len(images), PIXELS).T).astype(np.float32)
    pixels /= np.float32(255)
    columns = [pa.array(pixels[i]) for i in range(PIXELS)] + [pa.array(labels, pa.uint8())]
    schema = SCHEMA.with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
    return pa.Table.from_arrays(columns, schema=schema)


def preprocess_files(raw: ArtifactRef, validation: ArtifactRef, out_dir: Path, log: Log = quiet) -> ArtifactRef:
    """Write `train.parquet` and `test.parquet` from validated raw files and publish them under `out_dir`."""
    with workdir(out_dir) as work:
        rows = {}
        for split, (images_name, labels_name) in SPLITS.items():
            # The validate stage has checked these files.
            images = idx_array(read_payload(raw.path(f"{images_name}.gz")))
            labels = idx_array(read_payload(raw.path(f"{labels_name}.gz")))
            metadata = {
                "schema_version": SCHEMA_VERSION,
                "split": split,
                "rows": len(images),
                "image_shape": list(IMAGE_SHAPE),
                "pixels": "float32, raw uint8 value / 255, row-major 28x28 in columns pixel_000..pixel_783",
                "source_sha256": raw.meta.get("payload_sha256", {}),
                "raw_digest": raw.digest,
                "validation_digest": validation.digest,
            }
            pq.write_table(to_table(images, labels, metadata), work / SPLIT_FILES[split], compression="none", use_dictionary=False)
            rows[split] = len(images)
        ref = publish("preprocess", work, meta={"rows": rows, "schema_version": SCHEMA_VERSION})
    log(f"wrote {rows} rows")
    return ref


def load_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a split back as (float32 images of shape (n, 784), uint8 labels of shape (n,))."""
    table = pq.read_table(path, memory_map=True).combine_chunks()
    pixels = table.select(PIXEL_COLUMNS).to_batches()[0].to_tensor(row_major=False)
    # A column-major (n, 784) array: one copy out of the mapped file, no per-row work.
    return np.asarray(pixels), table.column("label").to_numpy()


def load_parts(paths: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Read splits back (see `load_split`) and join them in order: the base's and each accepted batch's."""
    parts = [load_split(path) for path in paths]
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([images for images, _ in parts]), np.concatenate([labels for _, labels in parts])


def load_holdout(processed: ArtifactRef, batches: Sequence[ArtifactRef] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Return the holdout: the base test split, then the holdout share of each accepted batch (tasks.batches)."""
    return load_parts([processed.path(SPLIT_FILES["test"]), *(batch.path(HOLDOUT_FILE) for batch in batches)])


def read_metadata(path: Path) -> dict:
    """Return the pipeline metadata stored in a split's parquet schema."""
    return json.loads(pq.read_schema(path).metadata[METADATA_KEY])
