"""Labelled batches that land over time beside the base dataset: found, checked, and accepted or quarantined.

A batches root holds one subfolder per batch, in any dataset format of tasks.sources (class folders, a manifest,
an .npz, IDX files), taken in name order and only once its `_SUCCESS` marker exists (written last, as Hadoop and
Spark do): a half-copied batch is not seen. `check_batch` reads one batch, divides its images into training rows and
a holdout share by a hash of their pixels (the rule of `tasks.sources.split_by_digests`: an image's side never
changes), and checks it against the base: classes outside the dataset's, images identical to holdout images, copies
of earlier batches, and drift of its labels and pixels. A batch that fails a check is quarantined with its reasons,
unless it is named in `accept`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from tasks import storage
from tasks.artifacts import ArtifactRef, publish
from tasks.dataset import SPLITS, BatchesConfig
from tasks.errors import Log, PipelineError, quiet
from tasks.files import workdir, write_json
from tasks.download import local_payloads
from tasks.idx import Checks, check_split, pixel_digests
from tasks.layout import (BATCH_FILE, DIGEST_FILES, DIGESTS_FILE, HOLDOUT_FILE, SPLIT_FILES, SUCCESS_MARKER,
                          VALIDATION_FILE)
from tasks.preprocess import to_table
from tasks.sources import (MAX_SOURCE_BYTES, MAX_SOURCE_FILES, Dataset, format_of, read_folder, read_npz,
                           split_by_digests)
from tasks.validate import summarize

def add_batch(source: Path, root: object, name: str) -> int:
    """Copy a batch into a batches root under `name`: it is read and checked first (one line, nothing copied, when it
    is not a dataset), then its files are copied, then the `_SUCCESS` marker last. Return the number of images."""
    source = Path(source)
    if not source.is_dir():
        raise PipelineError(f"{source}: batch: expected a folder holding a dataset (class folders, a manifest, an .npz "
                            "or IDX files), found none")
    if name.startswith((".", "_")) or "/" in name or not name.strip():
        raise PipelineError(f"--name {name!r}: expected a folder name not starting with . or _, found this one")
    target = f"{root}/{name}"
    if storage.exists(target) and not storage.exists(f"{target}/{SUCCESS_MARKER}"):
        # Not removed here: another add-batch may be copying it right now.
        raise PipelineError(f"{target}: batch: expected a new batch name, found a folder of that name without its "
                            f"{SUCCESS_MARKER} marker (still being copied, or left by an add-batch that was "
                            "interrupted; runs skip it): remove it, then add the batch again")
    if storage.exists(target):
        raise PipelineError(f"{target}: batch: expected a new batch name, found a batch of that name already")
    images = sum(len(labels) for labels in read_batch(source).labels.values())
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.name != SUCCESS_MARKER)
    outside = next((p for p in files if not p.resolve().is_relative_to(source.resolve())), None)
    if outside is not None:  # what a link points at is not the batch's to copy
        raise PipelineError(f"{outside}: location: expected a file inside the batch folder {source}, found a link to "
                            f"{outside.resolve()}")
    try:
        for path in files:
            storage.copy_file(path, f"{target}/{path.relative_to(source).as_posix()}")
        storage.write_text(f"{target}/{SUCCESS_MARKER}", "")
    except BaseException:
        storage.remove_tree(target)  # nothing half-copied stays behind (it would not be taken: no marker)
        raise
    return images


def read_batch(folder: Path) -> Dataset:
    """Read a batch in any dataset format (an .npz in it, IDX files, a manifest, class folders); its classes as it
    names them (check_batch maps them to the dataset's)."""
    npz = sorted(folder.glob("*.npz"))
    if npz:
        return read_npz(npz[0], str(npz[0]))
    if format_of(folder) != "idx":
        return read_folder(folder, None, test_fraction=0.5)  # the split is redrawn by check_batch
    dataset = Dataset({}, {}, {"train": [], "test": []}, None, format="idx")
    payloads = local_payloads(folder)
    for split, (images, labels) in SPLITS.items():
        checks = Checks()
        arrays = check_split(payloads[images], payloads[labels], images, labels, checks, num_classes=None)
        checks.raise_first()
        dataset.images[split], dataset.labels[split] = arrays
    return dataset


def check_batch(batch: str, name: str, validation: ArtifactRef, earlier: list[ArtifactRef],
                config: BatchesConfig, class_names: list[str] | None, num_classes: int, out_dir: Path,
                log: Log = quiet) -> ArtifactRef:
    """Read and check one batch against the base dataset (its `validation`) and the batches accepted before it
    (`earlier`); publish its training rows, its holdout share, the digests of its images and `batch.json` (the
    verdict, with the reasons of a quarantine and the figures behind them)."""
    try:
        with storage.local_copy(batch, MAX_SOURCE_FILES, MAX_SOURCE_BYTES) as local:
            dataset = read_batch(Path(local))
    except PipelineError as exc:  # a batch that cannot be read is quarantined; the run goes on
        dataset, unreadable = None, str(exc)
    reasons: list[str] = []
    unknown: list[str] = []  # classes outside the dataset's: their labels mean nothing, nor does their distribution
    report: dict = {"name": name, "source": str(batch)}
    if dataset is None:
        reasons.append(f"unreadable: {unreadable}")
        images, labels = np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8)
    else:
        images = np.concatenate([dataset.images[s] for s in dataset.images])
        labels, unknown = _labels(dataset, class_names, num_classes)
        if unknown:
            reasons.append(f"classes outside the dataset's: {', '.join(unknown[:5])}")
    digests = pixel_digests(images)
    base_test = set(_digests(validation.path(DIGEST_FILES["test"])))
    seen = set(_digests(validation.path(DIGEST_FILES["train"])))
    for ref in earlier:
        seen.update(_digests(ref.path(DIGESTS_FILE)))
    leaked = sum(d in base_test for d in digests)
    copies = sum(d in seen for d in digests)
    if leaked:
        reasons.append(f"{leaked} images identical to holdout images")
    if len(images) and copies / len(images) > config.max_duplicates:
        reasons.append(f"{copies} of {len(images)} images are copies of training images or earlier batches "
                       f"(more than {config.max_duplicates:.0%})")
    drift = _drift(images, labels, num_classes, json.loads(validation.path(VALIDATION_FILE).read_text()))
    for what, value, limit in (("label distribution", drift["label_tvd"], config.max_label_shift),
                               ("mean intensity", drift["mean_shift"], config.max_pixel_shift),
                               ("ink fraction", drift["ink_shift"], config.max_pixel_shift)):
        if len(images) and value > limit and not (unknown and what == "label distribution"):
            reasons.append(f"drift of the {what}: {value:.3f} (more than {limit})")
    # Taken by `accept` unless its labels cannot be given in the dataset's classes.
    accepted = not reasons or (name in config.accept and not unknown)
    holdout = split_by_digests(digests, config.holdout_fraction)  # the digests computed above: one hash per image
    report.update(verdict="accepted" if accepted else "quarantined", reasons=reasons,
                  accepted_by_config=bool(reasons) and accepted, images=len(images), train=int((~holdout).sum()),
                  holdout=int(holdout.sum()), holdout_leaks=leaked, duplicates=copies, drift=drift)
    with workdir(out_dir) as work:
        for rows, file in ((~holdout, SPLIT_FILES["train"]), (holdout, HOLDOUT_FILE)):
            pq.write_table(to_table(images[rows], labels[rows], {"batch": name}), work / file, compression="none")
        (work / DIGESTS_FILE).write_bytes(b"".join(digests))
        write_json(work / BATCH_FILE, report)
        ref = publish("batch", work, meta={key: report[key] for key in ("name", "verdict", "reasons", "images", "train",
                                                                      "holdout")})
    log(f"batch {name}: {report['verdict']}" + (f" ({'; '.join(reasons)})" if reasons else "")
        + f"; {report['train']} training and {report['holdout']} holdout images")
    return ref


def _labels(dataset: Dataset, class_names: list[str] | None, num_classes: int) -> tuple[np.ndarray, list[str]]:
    """Return a batch's labels in the dataset's numbering, and the classes it has that the dataset lacks."""
    labels = np.concatenate([dataset.labels[s] for s in dataset.labels])
    names = dataset.class_names
    if names is None:  # integer labels: as they are
        unknown = sorted({str(int(v)) for v in labels if v >= num_classes})
        return labels, unknown
    # Named classes (folders, a manifest's names): the dataset's names, or its labels written as names.
    known = list(class_names) if class_names else [str(c) for c in range(num_classes)]
    unknown = sorted(set(names) - set(known))
    mapping = np.array([known.index(n) if n in known else 0 for n in names], dtype=np.uint8)
    return mapping[labels], unknown


def _digests(path: Path) -> list[bytes]:
    """Return the image digests of a digests file (16 bytes each, see tasks.idx.pixel_digests)."""
    data = path.read_bytes()
    return [data[i : i + 16] for i in range(0, len(data), 16)]


def _drift(images: np.ndarray, labels: np.ndarray, num_classes: int, validation: dict) -> dict:
    """Return how far a batch is from the base training split: the total variation distance of the label
    distributions, and the relative change of the mean intensity and of the ink fraction."""
    base = validation["splits"]["train"]
    ours = summarize(images, labels, num_classes) if len(images) else base
    p = np.array([base["class_counts"].get(str(c), 0) for c in range(num_classes)], float)
    q = np.array([ours["class_counts"].get(str(c), 0) for c in range(num_classes)], float)
    tvd = 0.5 * float(np.abs(p / max(p.sum(), 1) - q / max(q.sum(), 1)).sum())

    def shift(key: str) -> float:
        return abs(ours[key] - base[key]) / max(base[key], 1e-9)

    return {"label_tvd": round(tvd, 4), "mean_shift": round(shift("pixel_mean"), 4),
            "ink_shift": round(shift("ink_fraction"), 4), "pixel_mean": ours["pixel_mean"],
            "ink_fraction": ours["ink_fraction"]}
