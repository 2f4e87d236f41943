"""Datasets as people keep them, read into the pipeline's raw form (the four IDX files of MNIST's layout).

- Class folders (Keras's `image_dataset_from_directory`, torchvision's `ImageFolder`): `SRC/train/<class>/*` and
  `SRC/test/<class>/*`, or `SRC/<class>/*` alone; classes in sorted order unless the config names their order.
- A manifest beside the images (Hugging Face's `imagefolder` metadata): `labels.csv` or `labels.jsonl` with
  `file_name` (or `source`, as `mnist-pipeline predict` writes it), `label` (class names or integers) and optionally
  `split` (train or test).
- An `.npz` with `x_train, y_train, x_test, y_test` (Keras's `mnist.npz`).
Image files are brought to 28x28, grayscale, light on dark by tasks.images, the function `predict` uses too. Where
a source has no test split, each image's split follows from a hash of its pixels (`split_by_pixels`): the same
image lands on the same side however the folder grows or is reordered. Every check fails with one line naming the
file. Decoding runs on every core; the writers at the end produce each format (for tests, benchmarks and exports).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import types
import zipfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from tasks.errors import Log, PipelineError, quiet
from tasks.dataset import FILES
from tasks.idx import IMAGE_SHAPE, MAX_IMAGES, PIXELS, pixel_digests
from tasks.images import IMAGE_SUFFIXES, load_image, to_model_size

SPLIT_NAMES = ("train", "test")
MANIFESTS = ("labels.csv", "labels.jsonl")
NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
MAX_MANIFEST_BYTES = 256 << 20
# The most that is copied from an s3:// prefix (a source or a batch): a million images of 8 KB on average, and a few
# other files (a manifest, SHA256SUMS, the _SUCCESS marker).
MAX_SOURCE_BYTES, MAX_SOURCE_FILES = 8 << 30, MAX_IMAGES + 16
# Below this many files decoding stays in this process: starting worker processes costs more than it saves.
PARALLEL_FROM = 2048
_CHUNK = 1024
_LOG_EVERY = 10_000


@dataclass
class Dataset:
    """A dataset read from a source: per split the images (n, 28, 28) uint8, labels (n,) uint8 and each image's file
    (relative to the source; empty for arrays), the class names (None: integer labels), how many images were
    converted to grayscale, resized or inverted, and the format it was read from."""

    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    files: dict[str, list[str]]
    class_names: list[str] | None
    changes: dict[str, int] = field(default_factory=lambda: {"converted": 0, "resized": 0, "inverted": 0})
    format: str = "npz"


def split_by_pixels(images: np.ndarray, test_fraction: float) -> np.ndarray:
    """Return, per image, whether it belongs to the test split (see `split_by_digests`)."""
    return split_by_digests(pixel_digests(images), test_fraction)


def split_by_digests(digests: Sequence[bytes], test_fraction: float) -> np.ndarray:
    """Return, per image digest (tasks.idx.pixel_digests), whether it belongs to the test split: its first 8 bytes, as
    a fraction of 2**64, below `test_fraction`. Identical images always share a side."""
    cut = int(test_fraction * 2**64)
    return np.fromiter((int.from_bytes(d[:8], "big") < cut for d in digests), dtype=bool, count=len(digests))


def format_of(folder: Path) -> str:
    """Return the format of a source folder: idx (MNIST's files), manifest (a labels file) or class-folders."""
    names = {p.name for p in folder.iterdir()}
    if any(name in names or f"{name}.gz" in names for name in FILES):
        return "idx"
    if any(name in names for name in MANIFESTS):
        return "manifest"
    return "class-folders"


def read_folder(folder: Path, class_names: Sequence[str] | None, test_fraction: float, log: Log = quiet) -> Dataset:
    """Read a folder of images: a manifest's rows if it has one, else its class folders."""
    kind = format_of(folder)
    labelled = _manifest_rows(folder) if kind == "manifest" else _class_folder_rows(folder)
    if not any(labelled.values()):
        raise PipelineError(f"{folder}: images: expected image files ({', '.join(IMAGE_SUFFIXES)}) in class folders "
                            "or named by labels.csv, found none")
    names = _class_order({label for rows in labelled.values() for _, label in rows}, class_names, folder, kind)
    if kind == "class-folders" and labelled["test"]:
        unknown = sorted({label for _, label in labelled["test"]} - {label for _, label in labelled["train"]})
        if unknown:
            raise PipelineError(f"{folder / 'test' / unknown[0]}: class: expected a class that train/ has, found "
                                f"{len(unknown)} class(es) only in test/: {', '.join(unknown[:5])}")
    paths = [os.path.join(folder, path) for rows in labelled.values() for path, _ in rows]
    images, changes = decode_files(paths, log)  # both splits at once: one set of workers
    dataset = Dataset({}, {}, {}, names, changes, kind)
    start = 0
    for split, rows in labelled.items():
        dataset.images[split], dataset.files[split] = images[start : start + len(rows)], [path for path, _ in rows]
        dataset.labels[split] = np.array([_label_of(label, names, folder) for _, label in rows], dtype=np.uint8)
        start += len(rows)
    if not len(dataset.images["test"]):  # no test split given: each image's side by its pixels
        return _split(dataset, test_fraction)
    return dataset


def _class_folder_rows(folder: Path) -> dict[str, list[tuple[str, str]]]:
    """Return per split the (relative path, class folder) of every image under `folder`."""
    has_splits = (folder / "train").is_dir()
    rows: dict[str, list[tuple[str, str]]] = {split: [] for split in SPLIT_NAMES}
    for split in SPLIT_NAMES if has_splits else ("train",):
        base = folder / split if has_splits else folder
        if not base.is_dir():
            continue
        classes = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes and split == "train":
            raise PipelineError(f"{base}: class folders: expected one subfolder per class, found none")
        for name in classes:
            files = _image_files(base / name, folder)
            if not files:
                raise PipelineError(f"{base / name}: class folder: expected image files ({', '.join(IMAGE_SUFFIXES)}), "
                                    "found none")
            rows[split] += [(path, name) for path in files]
    return rows


def _image_files(base: Path, folder: Path) -> list[str]:
    """Return the image files under `base` (recursive, sorted, hidden ones skipped), relative to `folder`."""
    found = []
    for parent, dirs, names in os.walk(base):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        relative = os.path.relpath(parent, folder)
        found += [f"{relative}/{n}" for n in names if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith(".")]
    return sorted(found)


def _manifest_rows(folder: Path) -> dict[str, list[tuple[str, str]]]:
    """Return per split the (relative path, label) of every row of the folder's manifest, checked."""
    path = next(folder / name for name in MANIFESTS if (folder / name).is_file())
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise PipelineError(f"{path}: size: expected at most {MAX_MANIFEST_BYTES} bytes, found {path.stat().st_size}")
    try:
        text = path.read_text(encoding="utf-8-sig")
        records = (list(csv.DictReader(io.StringIO(text))) if path.suffix == ".csv"
                   else [json.loads(line) for line in text.splitlines() if line.strip()])
    except (UnicodeDecodeError, ValueError, csv.Error) as exc:
        expected = "CSV with a header row" if path.suffix == ".csv" else "one JSON object per line"
        raise PipelineError(f"{path}: format: expected {expected}, found unreadable content ({exc})") from None
    rows: dict[str, list[tuple[str, str]]] = {split: [] for split in SPLIT_NAMES}
    root = folder.resolve()
    for number, record in enumerate(records, 2 if path.suffix == ".csv" else 1):
        where = f"{path}: row {number}"
        if not isinstance(record, dict):
            raise PipelineError(f"{where}: expected an object with file_name and label, found {type(record).__name__}")
        name = record.get("file_name", record.get("source"))
        if not name or not str(name).strip():
            raise PipelineError(f"{where}: file_name: expected the image's file name (column file_name or source), "
                                "found none")
        if str(record.get("index") or "").strip():
            raise PipelineError(f"{where}: index: expected rows of image files, found a row of an IDX or parquet file "
                                f"({name} index {record['index']})")
        label = "" if record.get("label") is None else str(record["label"]).strip()
        if not label:
            raise PipelineError(f"{where}: label: expected a class name or an integer, found a blank")
        split = str(record.get("split") or "train").strip()
        if split not in SPLIT_NAMES:
            raise PipelineError(f"{where}: split: expected train or test, found {split!r}")
        file = (folder / str(name)).resolve()  # relative to the manifest, or absolute as `predict` writes them
        if not file.is_relative_to(root):
            raise PipelineError(f"{where}: file_name: expected a file inside the source folder {folder}, found {name}")
        if not file.is_file():
            raise PipelineError(f"{where}: file_name: expected an existing image file, found none at {file}")
        rows[split].append((file.relative_to(root).as_posix(), label))
    return rows


def _class_order(found: set[str], configured: Sequence[str] | None, folder: Path, kind: str) -> list[str] | None:
    """Return the class names in label order: the configured order (Keras's `class_names`), else sorted; None when a
    manifest's labels are all integers."""
    if configured is not None:
        unknown = sorted(found - set(configured))
        if unknown:
            raise PipelineError(f"{folder}: class: expected the configured classes ({', '.join(configured)}), found "
                                f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
        return list(configured)
    if kind == "manifest" and all(label.isdecimal() for label in found):
        return None
    return sorted(found)


def _label_of(label: str, names: list[str] | None, folder: Path) -> int:
    if names is not None:
        return names.index(label)
    if int(label) > 255:
        raise PipelineError(f"{folder}: label: expected integers 0..255, found {label}")
    return int(label)


def _split(dataset: Dataset, test_fraction: float) -> Dataset:
    """Return the dataset with its training images divided into train and test by `split_by_pixels`."""
    test = split_by_pixels(dataset.images["train"], test_fraction)
    images, labels, files = dataset.images["train"], dataset.labels["train"], dataset.files["train"]
    return Dataset({"train": images[~test], "test": images[test]}, {"train": labels[~test], "test": labels[test]},
                   {split: [f for f, t in zip(files, test) if t == (split == "test")] for split in SPLIT_NAMES},
                   dataset.class_names, dataset.changes, dataset.format)


def decode_files(paths: Sequence[str], log: Log = quiet,
                 workers: int | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """Decode image files into one (n, 28, 28) uint8 array (tasks.images), on every core when there are many; return
    it and how many were converted, resized and inverted."""
    if len(paths) > MAX_IMAGES:
        raise PipelineError(f"{os.path.dirname(paths[0])}: images: expected at most {MAX_IMAGES:,}, "
                            f"found {len(paths):,}")
    images = np.empty((len(paths), *IMAGE_SHAPE), np.uint8)
    changes = np.zeros(3, np.int64)
    chunks = [(start, paths[start : start + _CHUNK]) for start in range(0, len(paths), _CHUNK)]
    workers = workers or ((os.cpu_count() or 1) if len(paths) >= PARALLEL_FROM else 1)
    done = 0

    def take(start: int, decoded: np.ndarray, counts: np.ndarray) -> None:
        nonlocal done
        images[start : start + len(decoded)] = decoded
        changes[:] += counts
        done, before = done + len(decoded), done
        if done // _LOG_EVERY > before // _LOG_EVERY or done == len(paths) > _LOG_EVERY:
            log(f"decoded {done:,} of {len(paths):,} images")

    if workers == 1:
        for start, chunk in chunks:
            take(start, *_decode_chunk(chunk))
    else:
        # Spawned, not forked: the calling process runs threads (Prefect's) that a fork would copy mid-state. The
        # workers start while the caller's main script is hidden: they run this module only, and a script without
        # the `if __name__ == "__main__"` guard would otherwise run again in each of them.
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            main, sys.modules["__main__"] = sys.modules["__main__"], types.ModuleType("__main__")
            try:
                results = pool.map(_decode_chunk, [chunk for _, chunk in chunks])  # starts the workers
            finally:
                sys.modules["__main__"] = main
            for (start, _), result in zip(chunks, results):
                take(start, *result)
    return images, dict(zip(("converted", "resized", "inverted"), map(int, changes)))


def _decode_chunk(paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Decode some image files; return their pixels and the count of each kind of change."""
    out = np.empty((len(paths), *IMAGE_SHAPE), np.uint8)
    converted = resized = inverted = 0
    for i, path in enumerate(paths):
        out[i], changed = load_image(path)
        converted, resized, inverted = converted + changed[0], resized + changed[1], inverted + changed[2]
    return out, np.array([converted, resized, inverted])


def read_npz(data: bytes | Path, name: str) -> Dataset:
    """Read an `.npz` with `x_train, y_train, x_test, y_test` (Keras's mnist.npz); images of another size are brought
    to 28x28 (taken light on dark as they are, like IDX images)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data) if isinstance(data, bytes) else data)
        members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
    except (OSError, zipfile.BadZipFile) as exc:
        raise PipelineError(f"{name}: format: expected an .npz (zip) file, found unreadable data ({exc})") from None
    missing = [array for array in NPZ_ARRAYS if array not in members]
    if missing:
        raise PipelineError(f"{name}: arrays: expected {', '.join(NPZ_ARRAYS)}, found "
                            f"{', '.join(sorted(members)) or 'none'} ({', '.join(missing)} missing)")
    total = sum(members[array].file_size for array in NPZ_ARRAYS)
    if total > MAX_IMAGES * PIXELS * 2:
        raise PipelineError(f"{name}: size: expected at most {MAX_IMAGES * PIXELS * 2} bytes of arrays, found {total}")
    arrays = {}
    for array in NPZ_ARRAYS:
        try:
            with archive.open(members[array]) as fh:
                arrays[array] = np.lib.format.read_array(fh, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise PipelineError(f"{name}: {array}: expected a readable array, found damaged data ({exc})") from None
    dataset = Dataset({}, {}, {split: [] for split in SPLIT_NAMES}, None)
    for split in SPLIT_NAMES:
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 3:
            raise PipelineError(f"{name}: x_{split}: expected uint8 images of shape (n, height, width), found "
                                f"{x.dtype} of shape {x.shape}")
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1 or y.dtype.kind not in "iu" or (len(y) and (y.min() < 0 or y.max() > 255)):
            raise PipelineError(f"{name}: y_{split}: expected integer labels 0..255 of shape (n,), found {y.dtype} of "
                                f"shape {y.shape}")
        if len(x) != len(y):
            raise PipelineError(f"{name}: y_{split}: expected {len(x)} labels (one per image of x_{split}), "
                                f"found {len(y)}")
        if x.shape[1:] != IMAGE_SHAPE:
            x = np.stack([to_model_size(image) for image in x]) if len(x) else np.empty((0, *IMAGE_SHAPE), np.uint8)
            dataset.changes["resized"] += len(x)
        dataset.images[split], dataset.labels[split] = np.ascontiguousarray(x), y.astype(np.uint8)
    return dataset


# --- Writers: each format from arrays (tests, benchmarks, and exporting a dataset for other tools). ---


def write_class_folders(root: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]],
                        class_names: Sequence[str] | None = None, suffix: str = ".png") -> None:
    """Write images as `root/<split>/<class>/<index>.png` (a split named "" writes `root/<class>/...`)."""
    from PIL import Image

    for split, (images, labels) in splits.items():
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / (class_names[label] if class_names else str(label))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:06d}{suffix}")


def write_npz(path: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Write train and test splits as Keras's mnist.npz does (`x_train, y_train, x_test, y_test`, compressed)."""
    np.savez_compressed(path, **{f"{kind}_{split}": array for split, pair in splits.items()
                                 for kind, array in zip("xy", pair)})
