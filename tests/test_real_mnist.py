"""End to end on the real MNIST files that the repository ships, through the command line, with the defaults."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import artifact
from test_cli import cli

from conftest import REPO, tree_state
from tasks.preprocess import PIXEL_COLUMNS, load_split

pytestmark = pytest.mark.slow  # run by CI; `pytest -m 'not slow'` skips it locally

SNAPSHOT = REPO / "data" / "snapshot" / "mnist"
REFERENCE_FIRST_20 = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9, 0, 6, 9, 0, 1, 5, 9, 7, 3, 4]
# Runs the command line in-process and reports whether it imported tensorflow.
PROBE = (
    "import sys; from flows.cli import main; rc = main(sys.argv[1:]); "
    "print('tensorflow imported:', 'tensorflow' in sys.modules, file=sys.stderr); sys.exit(rc)"
)


def idx_array(name, offset):
    return np.frombuffer(gzip.decompress((SNAPSHOT / f"{name}.gz").read_bytes()), np.uint8, offset=offset)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, prefect_api_url):
    base = tmp_path_factory.mktemp("real")
    # auto with no mirrors: the pinned, shipped copy serves, so the test never leaves this machine.
    env = {"MNIST_PIPELINE_DOWNLOAD__MIRRORS": "[]"}
    # The default configuration (5 epochs): on this data it must match the reference program's results.
    args = ["run", "--json", "--data-dir", str(base / "data"), "--artifacts-dir", str(base / "artifacts")]
    first = cli(*args, env=env, api_url=prefect_api_url)
    assert first.returncode == 0, first.stderr
    return {"base": base, "env": env, "args": args, "api": prefect_api_url, "summary": json.loads(first.stdout), "log": first.stderr}


def test_parquet_holds_every_image_divided_by_255_exactly(real_run):
    paths = {p.rsplit("/", 1)[-1]: p for p in real_run["summary"]["stages"]["preprocess"]["artifacts"]}
    for split, prefix, rows in (("train", "train", 60000), ("test", "t10k", 10000)):
        images = idx_array(f"{prefix}-images-idx3-ubyte", 16).reshape(rows, 784)
        labels = idx_array(f"{prefix}-labels-idx1-ubyte", 8)
        table = pq.read_table(paths[f"{split}.parquet"])
        assert table.num_rows == rows
        assert table.column_names == PIXEL_COLUMNS + ["label"]
        pixels, read_labels = load_split(paths[f"{split}.parquet"])
        assert pixels.dtype == np.float32
        assert np.array_equal(pixels, images.astype(np.float32) / 255)
        assert np.array_equal(read_labels, labels)
    assert labels[:20].tolist() == REFERENCE_FIRST_20


def test_validation_report_passes_with_the_mnist_class_counts(real_run):
    report = json.loads(artifact(real_run["summary"], "validate", "validation.json").read_text())
    assert report["passed"] and all(c["passed"] for c in report["checks"])
    assert report["splits"]["train"]["class_counts"]["1"] == 6742
    assert report["splits"]["test"]["count"] == 10000
    assert "served by" in real_run["log"] and str(SNAPSHOT) in real_run["log"]
    # The default source is pinned to MNIST's digests, and MNIST's counts are checked.
    assert "MNIST digests" in report["source"]["pinned_by"] and report["source"]["mnist"] is True
    assert {(c["file"], c["expected"]) for c in report["checks"] if c["check"] == "count"} >= {
        ("train-images-idx3-ubyte.gz", 60000), ("t10k-labels-idx1-ubyte.gz", 10000)}
    assert "not pinned" not in real_run["log"]


def test_default_run_reaches_the_reference_quality(real_run):
    summary = real_run["summary"]
    assert {i["state"] for i in summary["stages"].values()} == {"completed"}
    assert summary["metrics"]["test_accuracy"] >= 0.975
    assert summary["metrics"]["first_20_predictions"] == REFERENCE_FIRST_20
    report = Path(summary["report"])
    for name in ("report.html", "report.md", "first20.png", "training_curves.png", "confusion_matrix.png", "misclassified.png"):
        assert (report.parent / name).stat().st_size > 0
    assert "epoch 5/5: loss" in real_run["log"]


def test_rerun_in_a_new_process_is_cached_rewrites_nothing_and_never_imports_tensorflow(real_run):
    base = real_run["base"]
    before = tree_state(base / "data", base / "artifacts")
    env = {**os.environ, **real_run["env"], "PREFECT_API_URL": real_run["api"]}
    again = subprocess.run([sys.executable, "-c", PROBE, *real_run["args"]], capture_output=True, text=True, env=env,
                           cwd=REPO, timeout=600)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert {i["state"] for i in summary["stages"].values()} == {"cached"}
    assert summary["metrics"] == real_run["summary"]["metrics"]
    assert "tensorflow imported: False" in again.stderr
    assert tree_state(base / "data", base / "artifacts") == before


def test_cnn_learns_mnist_in_one_epoch_on_the_same_data(real_run):
    """One epoch of the CNN on the real data of the run above (its data stages cached): already above the MLP's
    five-epoch accuracy band's floor; its default eight epochs reach 0.99 (BENCHMARKS.md)."""
    result = cli(*real_run["args"], "--until", "evaluate", "--model", "cnn", "--epochs", "1", env=real_run["env"],
                 api_url=real_run["api"])
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert [summary["stages"][s]["state"] for s in ("preprocess", "train")] == ["cached", "completed"]
    assert summary["metrics"]["test_accuracy"] >= 0.975
    config = json.loads(next(Path(p) for p in summary["stages"]["train"]["artifacts"] if p.endswith("config.json")).read_text())
    assert config["model"] == "cnn" and config["architecture"]["parameters"] > 100_000


def test_mnist_kept_as_png_class_folders_gives_the_same_rows_and_a_model_as_good(real_run):
    """MNIST written out as one PNG per image in class folders: the same pixels and labels as its IDX files (in
    another order), and the default model trained on them in the IDX model's accuracy band."""
    from tasks.idx import idx_array as array_of
    from tasks.idx import read_payload
    from tasks.sources import write_class_folders

    base = real_run["base"] / "png"
    splits = {split: tuple(array_of(read_payload(SNAPSHOT / f"{prefix}-{kind}-idx{n}-ubyte.gz"))
                           for kind, n in (("images", 3), ("labels", 1)))
              for split, prefix in (("train", "train"), ("test", "t10k"))}
    write_class_folders(base / "source", splits)
    args = ["run", "--json", "--until", "evaluate", "--source", str(base / "source"), "--data-dir", str(base / "data"),
            "--artifacts-dir", str(base / "artifacts")]

    result = cli(*args, api_url=real_run["api"])

    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    paths = {p.rsplit("/", 1)[-1]: p for p in summary["stages"]["preprocess"]["artifacts"]}
    for split, (images, labels) in splits.items():
        pixels, read_labels = load_split(paths[f"{split}.parquet"])
        found = sorted(zip(map(bytes, np.rint(pixels * 255).astype(np.uint8)), read_labels.tolist()))
        assert found == sorted(zip(map(bytes, images.reshape(len(images), 784)), labels.tolist())), split
    accuracy = summary["metrics"]["test_accuracy"]
    assert accuracy >= 0.975 and abs(accuracy - real_run["summary"]["metrics"]["test_accuracy"]) <= 0.01
    assert "decoded 70,000 of 70,000 images" in result.stderr


def test_mnist_split_into_a_base_and_batches_in_three_formats_trains_and_scores_on_all(tmp_path, prefect_api_url):
    """A base of 20,000 MNIST training images and the test split, and three batches from the rest of the training
    split, one per format (PNG class folders, Keras's .npz, IDX files), added with add-batch: all accepted, trained
    on with the base, and their holdout shares scored beside the test split."""
    from tasks.batches import add_batch
    from tasks.dataset import SPLITS
    from tasks.idx import encode_idx, read_payload
    from tasks.idx import idx_array as array_of
    from tasks.sources import write_class_folders, write_npz

    def read(split):
        return tuple(array_of(read_payload(SNAPSHOT / f"{name}.gz")) for name in SPLITS[split])

    def write_idx(folder, splits):
        folder.mkdir(parents=True)
        for split, arrays in splits.items():
            for name, array in zip(SPLITS[split], arrays):
                (folder / f"{name}.gz").write_bytes(gzip.compress(encode_idx(array), mtime=0))

    (train_x, train_y), test = read("train"), read("test")
    base_rows = 20_000
    write_idx(tmp_path / "source", {"train": (train_x[:base_rows], train_y[:base_rows]), "test": test})
    part = {name: (train_x[start:end], train_y[start:end]) for name, start, end in (
        ("2026-12-07", 20_000, 21_000), ("2026-12-14", 21_000, 24_000), ("2026-12-21", 24_000, 27_000))}
    write_class_folders(tmp_path / "png", {"": part["2026-12-07"]})
    (tmp_path / "npz").mkdir()
    x, y = part["2026-12-14"]
    write_npz(tmp_path / "npz" / "week.npz", {"train": (x[:2_500], y[:2_500]), "test": (x[2_500:], y[2_500:])})
    x, y = part["2026-12-21"]
    write_idx(tmp_path / "idx", {"train": (x[:2_000], y[:2_000]), "test": (x[2_000:], y[2_000:])})
    root = tmp_path / "batches"
    for name, folder in zip(part, ("png", "npz", "idx")):
        assert add_batch(tmp_path / folder, root, name) == len(part[name][1])
    args = ["run", "--json", "--until", "evaluate", "--source", str(tmp_path / "source"), "--batches", str(root),
            "--epochs", "3", "--data-dir", str(tmp_path / "data"), "--artifacts-dir", str(tmp_path / "artifacts")]

    result = cli(*args, env={"MNIST_PIPELINE_DOWNLOAD__MIRRORS": "[]"}, api_url=prefect_api_url)

    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert {name: (b["verdict"], b["images"]) for name, b in summary["batches"].items()} == {
        "2026-12-07": ("accepted", 1_000), "2026-12-14": ("accepted", 3_000), "2026-12-21": ("accepted", 3_000)}
    checked = {name: json.loads((tmp_path / "data" / "batches" / b["digest"][:16] / "batch.json").read_text())
               for name, b in summary["batches"].items()}
    for name, batch in checked.items():  # the holdout share by the pixel hash: about 10% of each batch
        assert batch["train"] + batch["holdout"] == batch["images"] and 0.07 < batch["holdout"] / batch["images"] < 0.13
    config = json.loads(artifact(summary, "train", "config.json").read_text())
    assert config["train_rows"] == base_rows + sum(b["train"] for b in checked.values())
    assert config["data_version"] == summary["data_version"]
    assert summary["data_version"]["batches"] == [b["digest"] for b in summary["batches"].values()]
    metrics = json.loads(artifact(summary, "evaluate", "metrics.json").read_text())
    assert metrics["num_test"] == 10_000 + sum(b["holdout"] for b in checked.values())
    assert [(s["name"], s["images"]) for s in metrics["holdout_slices"]] == [("base", 10_000)] + [
        (name, b["holdout"]) for name, b in checked.items()]
    # Three epochs on 26,000 images: about 0.96; each batch's holdout share (100 to 300 images) near it.
    assert summary["metrics"]["test_accuracy"] >= 0.95 and all(s["accuracy"] >= 0.88 for s in metrics["holdout_slices"])
    assert "batch 2026-12-21: accepted;" in result.stderr
