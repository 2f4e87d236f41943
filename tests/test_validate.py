"""The validate stage: a passing report with the data summary, or one clear failure and no report."""

import gzip
import json
import logging
import os

import numpy as np
import pytest

from flows.runner import validate_mnist
from synthetic import idx_bytes, make_split, payloads, write_source
from tasks.artifacts import publish
from tasks.download import FILES, download_files
from tasks.errors import PipelineError
from tasks.files import new_workdir
from tasks.layout import VALIDATION_FILE
from tasks.validate import MNIST_COUNTS, ValidateConfig, summarize, validate_files

ANY_SIZE = ValidateConfig(train_count=None, test_count=None)
SPLITS = {"train": make_split(200, 0), "test": make_split(50, 1)}  # what write_source() writes


@pytest.fixture
def raw(tmp_path):
    digests = write_source(tmp_path / "src")
    return download_files(str(tmp_path / "src"), tmp_path / "raw", expected_sha256=digests)


def raw_from(tmp_path, files: dict[str, bytes], meta: dict | None = None):
    """Publish raw files as the download stage would, without its checks (a raw artifact gone bad)."""
    work = new_workdir(tmp_path / "raw-bad")
    for name, data in files.items():
        (work / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0))
    return publish("download", work, meta=meta)


def entries(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_report_of_valid_data(tmp_path, raw):
    ref = validate_files(raw, tmp_path / "validation", ANY_SIZE)

    assert ref.stage == "validate" and ref.problem() is None
    assert entries(tmp_path / "validation") == [ref.digest[:16]]
    report = json.loads(ref.path(VALIDATION_FILE).read_text())
    assert report["passed"] is True and report["schema_version"] == 3
    assert report["raw_digest"] == raw.digest
    assert report["num_classes"] == 10
    assert report["source"] == {"location": raw.meta["source"], "payload_sha256": raw.meta["payload_sha256"],
                                "pinned_by": ["--sha256"], "mnist": False, "format": "idx",
                                "changes": {"converted": 0, "resized": 0, "inverted": 0}}
    assert report["leakage"] == {"count": 0, "share": 0.0, "examples": []}
    assert report["checks"] and all(c["passed"] for c in report["checks"])
    assert {c["file"] for c in report["checks"]} == {f"{n}.gz" for n in FILES}
    assert {"magic number", "type code", "payload size", "image size", "label range", "count match"} <= {c["check"] for c in report["checks"]}
    assert ref.meta["checks"] == len(report["checks"])
    assert ref.meta["splits"] == report["splits"]

    for split, (images, labels) in SPLITS.items():
        summary = report["splits"][split]
        assert summary["count"] == len(images)
        assert summary["shape"] == [len(images), 28, 28]
        assert summary["dtype"] == "uint8"
        assert summary["label_range"] == [int(labels.min()), int(labels.max())]
        assert summary["class_counts"] == {str(c): int((labels == c).sum()) for c in range(10)}
        assert sum(summary["class_counts"].values()) == len(labels)
        assert summary["pixel_mean"] == pytest.approx(float(images.mean()), abs=1e-3)
        assert summary["pixel_std"] == pytest.approx(float(images.std()), abs=1e-3)
        assert summary["duplicates"] == len(images) - len({image.tobytes() for image in images})


def test_expected_counts_that_match_pass(tmp_path, raw):
    ref = validate_files(raw, tmp_path / "validation", ValidateConfig(train_count=200, test_count=50))
    report = json.loads(ref.path(VALIDATION_FILE).read_text())
    counts = [c for c in report["checks"] if c["check"] == "count"]
    assert len(counts) == 4 and all(c["passed"] for c in counts)
    assert {(c["file"], c["expected"]) for c in counts} >= {("train-images-idx3-ubyte.gz", 200), ("t10k-labels-idx1-ubyte.gz", 50)}


def test_wrong_expected_counts_fail_and_publish_no_report(tmp_path, raw):
    with pytest.raises(PipelineError) as info:
        validate_files(raw, tmp_path / "validation", ValidateConfig(train_count=200, test_count=51))
    assert str(info.value) == "t10k-images-idx3-ubyte.gz: count: expected 51, found 50"
    assert entries(tmp_path / "validation") == []
    assert raw.problem() is None


def test_by_default_any_count_passes_for_data_other_than_mnist(tmp_path, raw):
    assert ValidateConfig().train_count is None and ValidateConfig().test_count is None
    ref = validate_files(raw, tmp_path / "validation")
    assert not [c for c in json.loads(ref.path(VALIDATION_FILE).read_text())["checks"] if c["check"] == "count"]


def test_mnist_counts_are_checked_when_the_raw_files_are_mnist(tmp_path):
    # A raw artifact that says it is MNIST (the download stage sets meta["mnist"] from the payload digests).
    raw = raw_from(tmp_path, payloads(), meta={"source": "somewhere", "pinned_by": [], "mnist": True})
    with pytest.raises(PipelineError) as info:
        validate_files(raw, tmp_path / "validation")
    assert str(info.value) == f"train-images-idx3-ubyte.gz: count: expected {MNIST_COUNTS['train']}, found 200"
    assert entries(tmp_path / "validation") == []

    # Counts in the config take precedence.
    ref = validate_files(raw, tmp_path / "validation", ValidateConfig(train_count=200, test_count=50))
    assert json.loads(ref.path(VALIDATION_FILE).read_text())["source"]["mnist"] is True


def test_a_three_class_dataset_of_other_sizes(tmp_path):
    source = tmp_path / "src"
    write_source(source, n_train=90, n_test=30, num_classes=3)
    raw = download_files(str(source), tmp_path / "raw")

    ref = validate_files(raw, tmp_path / "validation", num_classes=3)

    report = json.loads(ref.path(VALIDATION_FILE).read_text())
    assert report["num_classes"] == 3
    assert report["splits"]["train"]["count"] == 90 and report["splits"]["test"]["count"] == 30
    assert report["splits"]["train"]["class_counts"] == {"0": 30, "1": 30, "2": 30}
    assert report["splits"]["test"]["class_counts"] == {"0": 10, "1": 10, "2": 10}
    ranges = [c for c in report["checks"] if c["check"] == "label range"]
    assert len(ranges) == 2 and all(c["expected"] == "0..2" and c["found"] == "0..2" for c in ranges)
    assert report["source"] == {"location": str(source), "payload_sha256": raw.meta["payload_sha256"],
                                "pinned_by": [], "mnist": False, "format": "idx",
                                "changes": {"converted": 0, "resized": 0, "inverted": 0}}


def test_labels_beyond_num_classes_are_refused_naming_the_file_and_the_range(tmp_path, raw):
    with pytest.raises(PipelineError) as info:
        validate_files(raw, tmp_path / "validation", num_classes=3)
    assert str(info.value) == "train-labels-idx1-ubyte.gz: label range: expected 0..2, found 0..9"
    assert entries(tmp_path / "validation") == []


def test_twelve_classes_pass_download_and_need_num_classes_12(tmp_path):
    write_source(tmp_path / "src", num_classes=12)
    raw = download_files(str(tmp_path / "src"), tmp_path / "raw")
    with pytest.raises(PipelineError, match=r"^train-labels-idx1-ubyte\.gz: label range: expected 0\.\.9, found 0\.\.11$"):
        validate_files(raw, tmp_path / "validation")
    ref = validate_files(raw, tmp_path / "validation", num_classes=12)
    assert sorted(ref.meta["splits"]["train"]["class_counts"], key=int) == [str(c) for c in range(12)]


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "unpinned"])
def test_the_task_warns_when_the_source_was_not_pinned(tmp_path, prefect_api_url, caplog, pinned):
    source = tmp_path / "src"
    digests = write_source(source)
    raw = download_files(str(source), tmp_path / "raw", expected_sha256=digests if pinned else None)
    with caplog.at_level(logging.INFO, logger="prefect"):
        ref = validate_mnist(raw, ValidateConfig(), 10, artifacts_dir=tmp_path / "artifacts")
    assert ref.path(VALIDATION_FILE).is_file()
    assert ref.path(VALIDATION_FILE).parent.parent == tmp_path / "artifacts" / "validation"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("prefect")]
    expected = f"source {source} was not pinned (no SHA256SUMS, no --sha256): its files are trusted on the IDX checks alone"
    assert warnings == ([] if pinned else [expected])


def test_bad_raw_data_is_caught_by_validate_itself(tmp_path):
    files = payloads()
    labels = SPLITS["test"][1].copy()
    labels[0] = 10
    files["t10k-labels-idx1-ubyte"] = idx_bytes(labels)
    raw = raw_from(tmp_path, files)

    with pytest.raises(PipelineError) as info:
        validate_files(raw, tmp_path / "validation", ANY_SIZE)

    assert str(info.value) == "t10k-labels-idx1-ubyte.gz: label range: expected 0..9, found 0..10"
    assert entries(tmp_path / "validation") == []


def test_images_of_28x27_are_caught_by_validate(tmp_path):
    files = payloads()
    files["train-images-idx3-ubyte"] = idx_bytes(SPLITS["train"][0][:, :, :27])
    with pytest.raises(PipelineError, match=r"^train-images-idx3-ubyte\.gz: image size: expected 28x28, found 28x27$"):
        validate_files(raw_from(tmp_path, files), tmp_path / "validation", ANY_SIZE)
    assert entries(tmp_path / "validation") == []


def test_validating_twice_rewrites_nothing(tmp_path, raw):
    first = validate_files(raw, tmp_path / "validation", ANY_SIZE)
    before = os.stat(first.path(VALIDATION_FILE))
    second = validate_files(raw, tmp_path / "validation", ANY_SIZE)
    after = os.stat(second.path(VALIDATION_FILE))
    assert second.digest == first.digest
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert entries(tmp_path / "validation") == [first.digest[:16]]


def test_other_raw_data_gives_another_report(tmp_path, raw):
    other_src = tmp_path / "other"
    digests = write_source(other_src, payloads(n_train=100, n_test=20, seed=9))
    other = download_files(str(other_src), tmp_path / "raw", expected_sha256=digests)
    a = validate_files(raw, tmp_path / "validation", ANY_SIZE)
    b = validate_files(other, tmp_path / "validation", ANY_SIZE)
    assert a.digest != b.digest
    assert json.loads(b.path(VALIDATION_FILE).read_text())["splits"]["test"]["count"] == 20


def test_summarize_matches_numpy_on_many_chunks():
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, size=(12000, 28, 28), dtype=np.uint8)  # more than one 5000-image chunk
    labels = rng.integers(0, 10, size=12000).astype(np.uint8)
    summary = summarize(images, labels)
    assert summary["pixel_mean"] == pytest.approx(float(images.mean()), abs=1e-3)
    assert summary["pixel_std"] == pytest.approx(float(images.std()), abs=1e-3)
    assert summary["class_counts"] == {str(c): int(n) for c, n in enumerate(np.bincount(labels, minlength=10))}
    assert summary["label_range"] == [int(labels.min()), int(labels.max())]


def test_summarize_uses_the_population_moments_of_a_tiny_split():
    images = np.zeros((2, 28, 28), np.uint8)
    images[0, :4] = 255
    images[1, 10:12, 3:9] = 77
    labels = np.array([9, 0], np.uint8)
    summary = summarize(images, labels)
    assert summary["pixel_mean"] == pytest.approx(float(images.mean()), abs=1e-4)
    assert summary["pixel_std"] == pytest.approx(float(images.std()), abs=1e-4)  # ddof=0, as numpy
    assert summary["count"] == 2 and summary["shape"] == [2, 28, 28]
    assert summary["label_range"] == [0, 9]
    assert summary["class_counts"] == {"0": 1, "1": 0, "2": 0, "3": 0, "4": 0, "5": 0, "6": 0, "7": 0, "8": 0, "9": 1}


def test_summarize_counts_every_class_even_absent_ones():
    summary = summarize(np.zeros((2, 28, 28), np.uint8), np.array([0, 0], np.uint8), num_classes=3)
    assert summary["class_counts"] == {"0": 2, "1": 0, "2": 0}


def test_an_empty_split_is_reported_not_crashed(tmp_path):
    files = payloads()
    files["t10k-images-idx3-ubyte"] = idx_bytes(np.zeros((0, 28, 28), np.uint8))
    files["t10k-labels-idx1-ubyte"] = idx_bytes(np.zeros((0,), np.uint8))
    write_source(tmp_path / "src", files)
    raw = download_files(str(tmp_path / "src"), tmp_path / "raw", expected_sha256=None)
    ref = validate_files(raw, tmp_path / "val", ValidateConfig(train_count=None, test_count=None))
    assert ref.meta["splits"]["test"]["count"] == 0
    assert ref.meta["splits"]["test"]["pixel_mean"] == 0.0
