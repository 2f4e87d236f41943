"""Validate stage: check the raw IDX files and write a validation report."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.artifacts import ArtifactRef, publish
from tasks.dataset import SPLITS, ValidateConfig
from tasks.errors import Log, quiet
from tasks.files import workdir, write_json
from tasks.idx import NUM_CLASSES, Checks, check_split, read_payload
from tasks.layout import VALIDATION_FILE

# Version 2: the report records num_classes and where the raw files came from (the "source" block).
SCHEMA_VERSION = 2
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
    splits = {}
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
            splits[split] = summarize(*arrays, num_classes=num_classes)
    checks.raise_first()
    source = {
        "location": raw.meta.get("source"),
        "payload_sha256": raw.meta.get("payload_sha256", {}),
        "pinned_by": list(raw.meta.get("pinned_by", [])),
        "mnist": mnist,
    }
    report = {
        "schema_version": SCHEMA_VERSION,
        "raw_digest": raw.digest,
        "passed": True,
        "num_classes": num_classes,
        "source": source,
        "checks": checks.items,
        "splits": splits,
    }
    with workdir(out_dir) as work:
        write_json(work / VALIDATION_FILE, report)
        ref = publish("validate", work, meta={"splits": splits, "checks": len(checks.items), "source": source})
    log(f"all {len(checks.items)} checks passed")
    return ref


def summarize(images: np.ndarray, labels: np.ndarray, num_classes: int = NUM_CLASSES) -> dict:
    """Return the data summary of one split: shape, dtype, label range, class counts, pixel mean/std."""
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
    }
