"""Validate stage: check the raw IDX files and write a validation report: per split the counts and pixel statistics,
exact duplicates, images of the test split that are also in the training split (leakage), and how many images the
download converted, resized or inverted."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tasks.artifacts import ArtifactRef, publish
from tasks.dataset import SPLITS, ValidateConfig
from tasks.errors import Log, quiet
from tasks.files import workdir, write_json
from tasks.idx import NUM_CLASSES, Checks, check_split, pixel_digests, read_payload
from tasks.layout import DIGEST_FILES, SOURCES_FILE, VALIDATION_FILE

# Version 2: the report records num_classes and where the raw files came from (the "source" block). Version 3: the
# duplicates, the leakage and the changes made to the images.
SCHEMA_VERSION = 3
# Test images named in the report (and the error) when they are also in the training split.
LEAK_EXAMPLES = 5
# The size of each MNIST split, checked when the raw files are MNIST's and the config sets no count.
MNIST_COUNTS = {"train": 60000, "test": 10000}


def validate_files(
    raw: ArtifactRef,
    out_dir: Path,
    config: ValidateConfig = ValidateConfig(),  # noqa: B008 (never mutated)
    num_classes: int = NUM_CLASSES,
    log: Log = quiet,
) -> ArtifactRef:
    """Check every raw file and publish a JSON report under `out_dir`; raise PipelineError on the first failure."""
    checks = Checks()
    splits, arrays_of = {}, {}
    mnist = bool(raw.meta.get("mnist", False))
    configured = {"train": config.train_count, "test": config.test_count}
    for split, (images_name, labels_name) in SPLITS.items():
        expected = configured[split]
        if expected is None and mnist:
            expected = MNIST_COUNTS[split]
        images_file, labels_file = f"{images_name}.gz", f"{labels_name}.gz"
        arrays = check_split(
            read_payload(raw.path(images_file)),
            read_payload(raw.path(labels_file)),
            images_file,
            labels_file,
            checks,
            expected,
            num_classes,
        )
        if arrays is not None:
            splits[split], arrays_of[split] = summarize(*arrays, num_classes=num_classes), arrays[0]
    checks.raise_first()
    digests = {split: pixel_digests(images) for split, images in arrays_of.items()}
    for split, found in digests.items():
        splits[split]["duplicates"] = len(found) - len(set(found))
    leakage = _leakage(digests, _namer(raw), config.max_leakage, checks)
    checks.raise_first()
    source = {
        "location": raw.meta.get("source"),
        "payload_sha256": raw.meta.get("payload_sha256", {}),
        "pinned_by": list(raw.meta.get("pinned_by", [])),
        "mnist": mnist,
        "format": raw.meta.get("format", "idx"),
        "changes": raw.meta.get("changes", {"converted": 0, "resized": 0, "inverted": 0}),
    }
    report = {
        "schema_version": SCHEMA_VERSION,
        "raw_digest": raw.digest,
        "passed": True,
        "num_classes": num_classes,
        "source": source,
        "checks": checks.items,
        "splits": splits,
        "leakage": leakage,
    }
    with workdir(out_dir) as work:
        write_json(work / VALIDATION_FILE, report)
        for split, found in digests.items():  # what batches are checked against, without reading the images again
            (work / DIGEST_FILES[split]).write_bytes(b"".join(found))
        ref = publish("validate", work, meta={"splits": splits, "checks": len(checks.items), "source": source,
                                              "leakage": leakage})
    log(f"all {len(checks.items)} checks passed")
    return ref


def _namer(raw: ArtifactRef) -> Callable[[str, int], str]:
    """Return what to call an image (split, index) in messages: its file for a source of image files, else its index
    in the split's images file."""
    if SOURCES_FILE in raw.files:
        files = json.loads(raw.path(SOURCES_FILE).read_text())
        return lambda split, index: files[split][index]
    return lambda split, index: f"{SPLITS[split][0]}.gz[{index}]"


def _leakage(digests: dict[str, list[bytes]], name: Callable[[str, int], str], limit: float, checks: Checks) -> dict:
    """Return the test images that are also training images (count, share of the test split, a few of each pair);
    check the share against `limit`."""
    first_in_train: dict[bytes, int] = {}
    for index, digest in enumerate(digests["train"]):
        first_in_train.setdefault(digest, index)
    leaked = [(i, first_in_train[d]) for i, d in enumerate(digests["test"]) if d in first_in_train]
    share = len(leaked) / max(len(digests["test"]), 1)
    examples = [[name("test", i), name("train", j)] for i, j in leaked[:LEAK_EXAMPLES]]
    found = f"{len(leaked)} ({share:.2%})" + "".join(f"; {a} = {b}" for a, b in examples)
    checks.check(f"{SPLITS['test'][0]}.gz", "leakage", share <= limit,
                 f"at most {limit:.1%} of the test images also in the training split", found)
    return {"count": len(leaked), "share": round(share, 6), "examples": examples}


def summarize(images: np.ndarray, labels: np.ndarray, num_classes: int = NUM_CLASSES) -> dict:
    """Return the data summary of one split: shape, dtype, label range, class counts, pixel mean/std, the share of
    pixels that are ink (above 127)."""
    counts = np.bincount(labels, minlength=num_classes)
    # A histogram of the 256 pixel values gives exact moments without a float copy of the images.
    hist = sum(np.bincount(chunk.ravel(), minlength=256) for chunk in np.array_split(images, max(1, len(images) // 5000)))
    values = np.arange(256)
    pixels = max(int(hist.sum()), 1)  # an empty split has no pixels; report zeros rather than divide by zero
    mean = float((hist * values).sum() / pixels)
    std = float(np.sqrt((hist * (values - mean) ** 2).sum() / pixels))
    return {
        "count": len(images),
        "shape": list(images.shape),
        "dtype": str(images.dtype),
        "label_range": [int(labels.min()), int(labels.max())] if len(labels) else [],
        "class_counts": {str(c): int(n) for c, n in enumerate(counts)},
        "pixel_mean": round(mean, 4),
        "pixel_std": round(std, 4),
        "ink_fraction": round(float(hist[128:].sum() / pixels), 4),
    }
