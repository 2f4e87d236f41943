"""Batch prediction: bring new images to the model's input (28x28, light on dark, [0, 1]) and score them.

One path for both uses: `iter_batches` decodes the inputs (each row with its source file and index inside it; image
files through tasks.images, as training data is), `tasks.models.class_probabilities` scores them as evaluate does,
`predictions_frame` writes the table.
`predict_images(model_path, inputs)` runs them in memory, without Prefect (notebooks, tests); the `mnist-predict` flow
(flows/predict.py) runs them as the three cached stages at the end of this module, each a content-addressed
artifact. Inputs are decoded and scored in batches, so memory stays bounded by the batch, not by the number of
images.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.artifacts import ArtifactRef, publish
from tasks.errors import Log, PipelineError, quiet
from tasks.files import atomic_file, sha256_file, workdir, write_json
from tasks.idx import IMAGE_SHAPE, IMAGES_MAGIC, PIXELS, dims_of, header_size
from tasks.images import IMAGE_SUFFIXES, Invert, read_image
from tasks.layout import COUNTS_FILE, INPUTS_FILE, MODEL_FILE, PREDICTIONS_FILE, PROBABILITIES_FILE
from tasks.models import SCORE_BATCH, class_probabilities, load_model
from tasks.preprocess import PIXEL_COLUMNS, SCHEMA
from tasks.storage import read_bytes

TOP_K = 3
IDX_SUFFIXES = ("-ubyte", "-ubyte.gz", ".idx", ".idx.gz")
PARQUET_SUFFIXES = (".parquet",)
_PARQUET_MAGIC = b"PAR1"
_IDX_HEADER = header_size(3)  # images: count, rows, columns


@dataclass(frozen=True)
class Batch:
    """Model-ready pixels (n, 784) float32 in [0, 1], with the file and index inside it (None for an image file)."""

    pixels: np.ndarray
    sources: list[str]
    indexes: list[int | None]


def list_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Return the files to score: each file as given, each folder's image, IDX and parquet files (sorted, recursive)."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = [Path(path) for path in sorted(
                os.path.join(folder, name) for folder, _, names in os.walk(item) for name in names
                if name.lower().endswith(IMAGE_SUFFIXES + IDX_SUFFIXES + PARQUET_SUFFIXES) and not name.startswith("."))]
            if not found:
                raise PipelineError(f"{item}: empty folder: expected image files ({', '.join(IMAGE_SUFFIXES)}), "
                                    "IDX image files or parquet files in it, found none")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise PipelineError(f"{item}: not found: expected an image file, an IDX or parquet file, or a folder")
    if not files:
        raise PipelineError("no inputs: expected at least one image file, IDX or parquet file, or folder")
    return list(dict.fromkeys(f.absolute() for f in files))  # a file named twice is scored once


def kind_of(path: Path) -> Literal["image", "idx", "parquet"]:
    """Return what a file holds: an image by its name, else by its first bytes (parquet, IDX gzip or not, or an image)."""
    if path.name.lower().endswith(IMAGE_SUFFIXES):
        return "image"  # Pillow tells what it is when it opens it (and refuses what is not an image)
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head == _PARQUET_MAGIC:
        return "parquet"
    if head[:2] == b"\x1f\x8b" or head[:4] == IMAGES_MAGIC.to_bytes(4, "big"):
        return "idx"
    return "image"


def iter_batches(files: Sequence[Path], invert: Invert = "auto", batch_size: int = SCORE_BATCH) -> Iterator[Batch]:
    """Yield the inputs of `files` as model-ready batches of at most `batch_size` images, in order."""
    pending: list[Batch] = []
    count = 0
    images: list[Path] = []

    def flush_images() -> Iterator[Batch]:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pixels = np.stack([read_image(p, invert) for p in chunk])
            yield Batch(pixels.reshape(len(chunk), PIXELS).astype(np.float32) / np.float32(255),
                        [str(p) for p in chunk], [None] * len(chunk))
        images.clear()

    def parts() -> Iterator[Batch]:
        for path in files:
            kind = kind_of(path)
            if kind == "image":
                images.append(path)
                continue
            yield from flush_images()
            yield from (_read_idx(path, invert, batch_size) if kind == "idx" else _read_parquet(path, invert, batch_size))
        yield from flush_images()

    # Regroup the per-file parts into batches of batch_size (a folder of images and a few IDX files alike).
    for part in parts():
        pending.append(part)
        count += len(part.sources)
        while count >= batch_size:
            merged = _concat(pending)
            yield _slice(merged, 0, batch_size)
            pending, count = [_slice(merged, batch_size, count)], count - batch_size
    if count:
        yield _concat(pending)


def _concat(batches: list[Batch]) -> Batch:
    if len(batches) == 1:
        return batches[0]
    return Batch(np.concatenate([b.pixels for b in batches]), [s for b in batches for s in b.sources],
                 [i for b in batches for i in b.indexes])


def _slice(batch: Batch, start: int, stop: int) -> Batch:
    return Batch(batch.pixels[start:stop], batch.sources[start:stop], batch.indexes[start:stop])


def _read_idx(path: Path, invert: Invert, batch_size: int) -> Iterator[Batch]:
    """Yield the images of an IDX file (gzip or not) in batches, reading no more than a batch at a time."""
    with open(path, "rb") as fh:
        opener = gzip.open if fh.read(2) == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as fh:
            header = fh.read(_IDX_HEADER)
            magic = int.from_bytes(header[:4], "big") if len(header) >= 4 else None
            if magic != IMAGES_MAGIC or len(header) < _IDX_HEADER:
                found = "a short file" if magic is None else f"magic 0x{magic:08x}"
                raise PipelineError(f"{path}: IDX header: expected an IDX images file (magic 0x{IMAGES_MAGIC:08x}, "
                                    f"unsigned bytes, 3 dimensions), found {found}")
            count, rows, cols = dims_of(header, 3)
            if (rows, cols) != IMAGE_SHAPE:
                raise PipelineError(f"{path}: image size: expected {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]} images, found "
                                    f"{rows}x{cols} in its header")
            if opener is open and (size := path.stat().st_size - _IDX_HEADER) != count * PIXELS:
                raise PipelineError(f"{path}: payload size: expected {count * PIXELS} bytes for {count} images, "
                                    f"found {size}")
            for start in range(0, count, batch_size):
                n = min(batch_size, count - start)
                data = fh.read(n * PIXELS)
                if len(data) != n * PIXELS:
                    raise PipelineError(f"{path}: payload size: expected {count} images of {PIXELS} bytes, found "
                                        f"the file truncated after {start + len(data) // PIXELS}")
                images = np.frombuffer(data, np.uint8).reshape(n, PIXELS)
                if invert == "yes":
                    images = 255 - images
                yield Batch(images.astype(np.float32) / np.float32(255), [str(path)] * n, list(range(start, start + n)))
    except (EOFError, gzip.BadGzipFile, OSError) as exc:
        raise PipelineError(f"{path}: gzip: expected a complete gzip stream, found corrupt or truncated data ({exc})") from None


def _read_parquet(path: Path, invert: Invert, batch_size: int) -> Iterator[Batch]:
    """Yield the rows of a parquet file in the pipeline's layout (pixel_000..pixel_783, float32) in batches."""
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise PipelineError(f"{path}: parquet: expected a readable parquet file, found a damaged one ({exc})") from None
    types = {field.name: field.type for field in parquet.schema_arrow}
    missing = [name for name in PIXEL_COLUMNS if name not in types]
    wrong = [name for name in PIXEL_COLUMNS if name in types and types[name] != pa.float32()]
    if missing or wrong:
        found = f"{len(missing)} of the {PIXELS} pixel columns missing" if missing else f"{wrong[0]} of type {types[wrong[0]]}"
        raise PipelineError(f"{path}: parquet layout: expected the pipeline's columns pixel_000..pixel_783 (float32), "
                            f"found {found}")
    start = 0
    for record_batch in parquet.iter_batches(batch_size=batch_size, columns=PIXEL_COLUMNS):
        # Column-major: one copy per column out of Arrow (a row-major tensor would transpose in Arrow, 3x slower).
        pixels = np.ascontiguousarray(record_batch.to_tensor(row_major=False, null_to_nan=True))
        if not (pixels.min() >= 0 and pixels.max() <= 1):  # also false for NaN
            raise PipelineError(f"{path}: pixel values: expected floats in [0, 1] as preprocessing writes them, "
                                f"found others in rows {start}..{start + len(pixels) - 1}")
        if invert == "yes":
            pixels = 1 - pixels
        n = len(pixels)
        yield Batch(pixels, [str(path)] * n, list(range(start, start + n)))
        start += n


def top_classes(probabilities: np.ndarray, k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
    """Return the k most probable classes of each row (most probable first) and their probabilities."""
    k = min(k, probabilities.shape[1])
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return order.astype(np.int16), np.take_along_axis(probabilities, order, axis=1).astype(np.float32)


def predictions_frame(sources: Sequence[str], indexes: Sequence[int | None], probabilities: np.ndarray,
                      model_digest: str, class_names: Sequence[str] | None = None) -> pd.DataFrame:
    """Return one row per image: source, index, predicted class (and name), probability, top 3, model digest."""
    if class_names is not None and len(class_names) != probabilities.shape[1]:
        raise PipelineError(f"class names: expected {probabilities.shape[1]} names (the model's classes), "
                            f"found {len(class_names)}")
    classes, probs = top_classes(probabilities)
    frame = pd.DataFrame({"source": pd.Series(sources, dtype="string"),
                          "index": pd.array(list(indexes), dtype="Int32")})
    for rank in range(classes.shape[1]):
        suffix = "" if rank == 0 else f"_top{rank + 1}"
        column = "predicted" if rank == 0 else f"top{rank + 1}"
        frame[column] = classes[:, rank]
        if class_names is not None:
            frame["name" + suffix] = pd.Series(np.asarray(class_names, dtype=object)[classes[:, rank]], dtype="string")
        frame["probability" + suffix] = probs[:, rank]
    frame["model"] = model_digest
    return frame


def predict_images(model: str | Path | Any, inputs: Sequence[str | Path], *, invert: Invert = "auto",
                   class_names: Sequence[str] | None = None, model_digest: str | None = None) -> pd.DataFrame:
    """Score image files, folders, IDX and parquet files with a model; return one row per image.

    `model`: a path to a saved `model.keras` (its digest defaults to the file's SHA-256), or a Keras model already
    loaded (then `model_digest` names it), to score many inputs with one load.
    """
    if isinstance(model, (str, Path)):
        net, model_digest = load_model(Path(model)), model_digest or sha256_file(Path(model))
    elif model_digest is None:
        raise ValueError("model_digest: expected the digest that names a loaded model in the output, found none")
    else:
        net = model
    sources: list[str] = []
    indexes: list[int | None] = []
    chunks = []
    for batch in iter_batches(list_inputs(inputs), invert):  # only the scores are kept, not the pixels
        chunks.append(class_probabilities(net, batch.pixels))
        sources += batch.sources
        indexes += batch.indexes
    return predictions_frame(sources, indexes, np.concatenate(chunks), model_digest, class_names)


def write_table(frame: pd.DataFrame, output: Path) -> None:
    """Write predictions to `output` atomically: CSV when it ends in .csv, parquet otherwise."""
    output = Path(output)
    if not output.parent.is_dir():
        raise PipelineError(f"{output}: output folder {output.parent} does not exist: expected an existing folder")
    with atomic_file(output) as temp:
        if output.suffix.lower() == ".csv":
            frame.to_csv(temp, index=False)
        else:
            pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), temp)


# --- Stages of the mnist-predict flow: each publishes a content-addressed artifact, as the training stages do. ---

STRIP = 20
# The decoded inputs: the pixels of each image and its index inside a multi-image file (null for an image file).
INPUTS_SCHEMA = pa.schema([*(SCHEMA.field(name) for name in PIXEL_COLUMNS), pa.field("index", pa.int32())])


def decode_inputs(files: Sequence[Path], invert: Invert, out_dir: Path, log: Log = quiet) -> ArtifactRef:
    """Decode the inputs into one parquet file of model-ready pixels (written batch by batch) and publish it.

    The artifact holds pixels, indexes and the number of images per file, not the file names: the same content under
    other names is the same artifact, and is not scored again.
    """
    counts = {str(path): 0 for path in files}
    with workdir(out_dir) as work:
        with pq.ParquetWriter(work / INPUTS_FILE, INPUTS_SCHEMA, compression="none", use_dictionary=False) as writer:
            for batch in iter_batches(files, invert):
                columns = [pa.array(column) for column in np.ascontiguousarray(batch.pixels.T)]
                writer.write_table(pa.Table.from_arrays([*columns, pa.array(batch.indexes, pa.int32())],
                                                        schema=INPUTS_SCHEMA))
                for source in batch.sources:
                    counts[source] += 1
        write_json(work / COUNTS_FILE, list(counts.values()))
        ref = publish("predict-inputs", work, meta={"images": sum(counts.values()), "files": len(files)})
    log(f"decoded {ref.meta['images']} images from {len(files)} files")
    return ref


def score_inputs(inputs: ArtifactRef, model: ArtifactRef, out_dir: Path, log: Log = quiet) -> ArtifactRef:
    """Score the decoded inputs with the model, batch by batch; publish the class probabilities of every image."""
    net = load_model(model.path(MODEL_FILE))
    parquet = pq.ParquetFile(inputs.path(INPUTS_FILE))
    with workdir(out_dir) as work:
        writer = None
        for record_batch in parquet.iter_batches(batch_size=SCORE_BATCH, columns=PIXEL_COLUMNS):
            probabilities = class_probabilities(net, np.asarray(record_batch.to_tensor(row_major=False)))
            table = pa.Table.from_arrays([pa.array(column) for column in np.ascontiguousarray(probabilities.T)],
                                         names=[f"p_{c}" for c in range(probabilities.shape[1])])
            writer = writer or pq.ParquetWriter(work / PROBABILITIES_FILE, table.schema, compression="none")
            writer.write_table(table)
        if writer is None:
            raise PipelineError(f"{inputs.path(INPUTS_FILE)}: expected at least one image to score, found none")
        writer.close()
        ref = publish("predict-scores", work, meta={"images": inputs.meta["images"], "model_digest": model.digest})
    log(f"scored {ref.meta['images']} images with model {model.digest[:16]}")
    return ref


def collect_predictions(files: Sequence[Path], inputs: ArtifactRef, scores: ArtifactRef, model_digest: str,
                        class_names: Sequence[str] | None, out_dir: Path, log: Log = quiet) -> ArtifactRef:
    """Join the scores with the file names, indexes and class names into the predictions table; publish it."""
    counts = json.loads(inputs.path(COUNTS_FILE).read_text())
    sources = [str(path) for path, count in zip(files, counts) for _ in range(count)]
    with inputs.path(INPUTS_FILE).open("rb") as fh:  # a local file or an object: only this column is read
        indexes = pq.read_table(fh, columns=["index"]).column("index").to_pylist()
    frame = predictions_frame(sources, indexes, _concat_probabilities(scores), model_digest, class_names)
    per_class = frame["predicted"].value_counts().sort_index()
    counts = {(class_names[c] if class_names else str(c)): int(n) for c, n in per_class.items()}
    with workdir(out_dir) as work:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), work / PREDICTIONS_FILE)
        ref = publish("predict", work, meta={"images": len(frame), "model_digest": model_digest, "counts": counts})
    log(f"wrote {len(frame)} predictions")
    return ref


def _concat_probabilities(scores: ArtifactRef) -> np.ndarray:
    parquet = pq.ParquetFile(scores.path(PROBABILITIES_FILE))
    return np.concatenate([np.asarray(b.to_tensor(row_major=True)) for b in parquet.iter_batches(batch_size=65536)])


def strip_images(inputs: ArtifactRef, count: int = STRIP) -> np.ndarray:
    """Return the first `count` decoded inputs as (n, 784) floats, for the strip in the UI."""
    with inputs.path(INPUTS_FILE).open("rb") as fh:  # a local file or an object
        first = next(pq.ParquetFile(fh).iter_batches(batch_size=count, columns=PIXEL_COLUMNS), None)
    return np.zeros((0, PIXELS), np.float32) if first is None else np.asarray(first.to_tensor(row_major=True))


def read_table(path: Path) -> pd.DataFrame:
    """Read a predictions table written by `write_table` or the flow (parquet; a local file or an object)."""
    return pd.read_parquet(io.BytesIO(read_bytes(path)))
