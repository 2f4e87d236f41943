"""Datasets as people keep them: class folders, label manifests (a predict CSV among them), .npz files and Keras's own
copy of MNIST, each read into the raw IDX form and run through every stage; and every bad input refused in one line."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.config import PipelineConfig
from flows.pipeline import mnist_pipeline
from flows.status import STALE, UP_TO_DATE, pipeline_status
from helpers import states
from synthetic import make_split
from tasks.dataset import ValidateConfig, source_fingerprint
from tasks.download import download_files
from tasks.errors import PipelineError
from tasks.idx import idx_array, read_payload
from tasks.layout import SOURCES_FILE, VALIDATION_FILE
from tasks.sources import read_folder, split_by_pixels, write_class_folders, write_npz
from tasks.validate import validate_files

ALL = ["download", "validate", "preprocess", "train", "evaluate", "report"]
# Folder names whose sorted order differs from the labels the synthetic patterns were made with.
NAMES = ["nine", "eight", "seven", "six", "five", "four", "three", "two", "one", "zero"]


@pytest.fixture
def splits():
    return {"train": make_split(200, 0), "test": make_split(50, 1)}


def raw_rows(ref, split):
    """Return the (image bytes, label) rows of a raw artifact's split, sorted: its content whatever the order."""
    images_name, labels_name = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}[split]
    images = idx_array(read_payload(ref.path(f"{images_name}.gz")))
    labels = idx_array(read_payload(ref.path(f"{labels_name}.gz")))
    return sorted(zip((image.tobytes() for image in images), labels.tolist()))


def expected_rows(images, labels, label_of=lambda label: label):
    return sorted(zip((image.tobytes() for image in images), [label_of(int(label)) for label in labels]))


def test_class_folders_keep_their_rows_and_label_classes_in_sorted_order(tmp_path, splits):
    write_class_folders(tmp_path / "src", splits, NAMES)

    ref = download_files(str(tmp_path / "src"), tmp_path / "raw")

    assert ref.meta["format"] == "class-folders" and ref.meta["class_names"] == sorted(NAMES)
    relabel = lambda label: sorted(NAMES).index(NAMES[label])  # noqa: E731
    for split, (images, labels) in splits.items():
        assert raw_rows(ref, split) == expected_rows(images, labels, relabel)
    files = json.loads(ref.path(SOURCES_FILE).read_text())
    assert len(files["train"]) == 200 and all(path.startswith("train/") for path in files["train"])


def test_configured_class_names_set_the_label_order_and_must_match_the_folders(tmp_path, splits):
    write_class_folders(tmp_path / "src", splits, NAMES)

    ref = download_files(str(tmp_path / "src"), tmp_path / "raw", class_names=NAMES)

    assert ref.meta["class_names"] == NAMES
    assert raw_rows(ref, "test") == expected_rows(*splits["test"])
    with pytest.raises(PipelineError, match=r"src: class: expected the configured classes \(a, b, c\), found eight"):
        download_files(str(tmp_path / "src"), tmp_path / "raw", class_names=["a", "b", "c"])


def test_without_a_test_folder_each_image_keeps_its_side_as_the_folder_grows_and_is_renamed(tmp_path, splits):
    images, labels = splits["train"]
    write_class_folders(tmp_path / "src", {"": (images[:150], labels[:150])})
    first = download_files(str(tmp_path / "src"), tmp_path / "raw", test_fraction=0.2)
    side = {row: "test" for row in raw_rows(first, "test")} | {row: "train" for row in raw_rows(first, "train")}
    assert 10 < sum(s == "test" for s in side.values()) < 60
    # More images arrive, and every file is renamed: the images seen before stay where they were.
    shutil.rmtree(tmp_path / "src")
    write_class_folders(tmp_path / "src", {"": (images[::-1], labels[::-1])})

    second = download_files(str(tmp_path / "src"), tmp_path / "raw", test_fraction=0.2)

    now = {row: "test" for row in raw_rows(second, "test")} | {row: "train" for row in raw_rows(second, "train")}
    assert len(now) == 200 and all(now[row] == s for row, s in side.items())
    assert np.array_equal(split_by_pixels(images, 0.2), split_by_pixels(images.copy(), 0.2))


@pytest.mark.parametrize("labels_as", ["names", "integers"])
@pytest.mark.parametrize("kind", ["labels.csv", "labels.jsonl"])
def test_a_manifest_names_its_images_with_class_names_or_integers_and_splits(tmp_path, splits, kind, labels_as):
    rows = []
    for split, (images, labels) in splits.items():
        for i, (image, label) in enumerate(zip(images, labels)):
            Image.fromarray(image).save(tmp_path / f"{split}-{i}.png")
            rows.append({"file_name": f"{split}-{i}.png", "split": split,
                         "label": NAMES[label] if labels_as == "names" else int(label)})
    if kind == "labels.csv":
        with open(tmp_path / kind, "w", newline="") as fh:
            writer = csv.DictWriter(fh, ["file_name", "label", "split"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        (tmp_path / kind).write_text("".join(json.dumps(row) + "\n" for row in rows))

    ref = download_files(str(tmp_path), tmp_path / "raw")

    assert ref.meta["format"] == "manifest"
    if labels_as == "names":
        assert ref.meta["class_names"] == sorted(NAMES)
        relabel = lambda label: sorted(NAMES).index(NAMES[label])  # noqa: E731
    else:
        assert ref.meta["class_names"] is None
        relabel = lambda label: label  # noqa: E731
    for split, (images, labels) in splits.items():
        assert raw_rows(ref, split) == expected_rows(images, labels, relabel)


def test_npz_in_keras_layout_is_read_and_other_sizes_are_resized(tmp_path, splits):
    write_npz(tmp_path / "data.npz", splits)
    ref = download_files(str(tmp_path / "data.npz"), tmp_path / "raw")
    assert ref.meta["format"] == "npz" and ref.meta["changes"]["resized"] == 0
    assert raw_rows(ref, "train") == expected_rows(*splits["train"])

    large = {split: (np.kron(images, np.ones((1, 2, 2), np.uint8)), labels) for split, (images, labels) in splits.items()}
    write_npz(tmp_path / "large.npz", large)
    resized = download_files(str(tmp_path / "large.npz"), tmp_path / "raw")

    assert resized.meta["changes"]["resized"] == 250
    assert idx_array(read_payload(resized.path("train-images-idx3-ubyte.gz"))).shape == (200, 28, 28)


def test_auto_takes_keras_own_copy_of_mnist_before_the_mirrors(tmp_path, monkeypatch):
    from tasks.dataset import SNAPSHOT_DIR

    def split(prefix):
        return tuple(idx_array(read_payload(SNAPSHOT_DIR / f"{prefix}-{kind}-idx{n}-ubyte.gz"))
                     for kind, n in (("images", 3), ("labels", 1)))

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KERAS_HOME", raising=False)
    (tmp_path / "home" / ".keras" / "datasets").mkdir(parents=True)
    write_npz(tmp_path / "home" / ".keras" / "datasets" / "mnist.npz", {"train": split("train"), "test": split("t10k")})
    log = []

    ref = download_files("auto", tmp_path / "raw", mirrors=["http://127.0.0.1:9/"], snapshot_dir=None, log=log.append)

    assert ref.meta["source"] == str(tmp_path / "home" / ".keras" / "datasets" / "mnist.npz")
    assert ref.meta["mnist"] and ref.meta["pinned_by"] == ["MNIST digests"]
    # The same arrays as MNIST's files: the same raw artifact as from a mirror or the snapshot.
    assert ref.digest == download_files(str(SNAPSHOT_DIR), tmp_path / "raw-idx").digest
    assert not any("127.0.0.1:9" in line for line in log)


def test_auto_passes_over_a_keras_copy_that_is_not_mnist(tmp_path, monkeypatch, splits):
    from tasks.dataset import SNAPSHOT_DIR

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    (tmp_path / "keras" / "datasets").mkdir(parents=True)
    write_npz(tmp_path / "keras" / "datasets" / "mnist.npz", splits)
    log = []

    ref = download_files("auto", tmp_path / "raw", mirrors=[], snapshot_dir=SNAPSHOT_DIR, log=log.append)

    assert ref.meta["source"] == str(SNAPSHOT_DIR) and ref.meta["mnist"]
    assert any("mnist.npz is not taken" in line and "MNIST SHA-256" in line for line in log)


def test_corrected_predictions_become_training_data(tmp_path, splits):
    """The CSV that `predict` writes, with a label column filled in by a person, is a manifest."""
    from tasks.predict import predictions_frame, write_table

    images, labels = splits["train"]
    paths = []
    for i, image in enumerate(images[:40]):
        paths.append(str(tmp_path / "inbox" / f"scan-{i}.png"))
        Path(paths[-1]).parent.mkdir(exist_ok=True)
        Image.fromarray(image).save(paths[-1])
    probabilities = np.full((40, 10), 0.1, np.float32)
    frame = predictions_frame(paths, [None] * 40, probabilities, "f" * 64)
    frame["label"] = labels[:40]  # what a person wrote in
    write_table(frame, tmp_path / "inbox" / "labels.csv")

    ref = download_files(str(tmp_path / "inbox"), tmp_path / "raw", test_fraction=0.25)

    assert ref.meta["format"] == "manifest"
    assert sorted(raw_rows(ref, "train") + raw_rows(ref, "test")) == expected_rows(images[:40], labels[:40])


@pytest.fixture
def _server(prefect_api_url):
    return prefect_api_url


def small_config(tmp_path, source, **download):
    return PipelineConfig(data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts",
                          download={"source": str(source), "mirrors": [], "retries": 0, **download},
                          train={"epochs": 1, "hidden_units": 16, "batch_size": 32, "jit_compile": False})


@pytest.mark.parametrize("layout", ["class-folders", "manifest", "npz"])
def test_every_stage_runs_on_each_format_and_a_rerun_is_cached(_server, tmp_path, splits, layout):
    names = NAMES[:4]
    four = {split: (images[labels < 4], labels[labels < 4]) for split, (images, labels) in splits.items()}
    if layout == "class-folders":
        write_class_folders(tmp_path / "src", four, names)
        # One training image also in test (leakage, allowed up to 20% below), one in colour and twice the size.
        shutil.copy(next((tmp_path / "src" / "train" / names[0]).iterdir()), tmp_path / "src" / "test" / names[0] / "x.png")
        Image.fromarray(np.kron(four["train"][0][0], np.ones((2, 2), np.uint8))).convert("RGB").save(
            tmp_path / "src" / "train" / names[four["train"][1][0]] / "large.png")
    elif layout == "manifest":
        write_class_folders(tmp_path / "src", four, names)
        lines = ["file_name,label,split"] + [f"{p.relative_to(tmp_path / 'src')},{p.parent.name},{p.parts[-3]}"
                                             for p in sorted((tmp_path / "src").rglob("*.png"))]
        (tmp_path / "src" / "labels.csv").write_text("\n".join(lines) + "\n")
    else:
        write_npz(tmp_path / "src.npz", four)
    source = tmp_path / ("src.npz" if layout == "npz" else "src")
    config = small_config(tmp_path, source).model_copy(update={"validation": ValidateConfig(max_leakage=0.2)})

    first = mnist_pipeline(config=config)
    second = mnist_pipeline(config=config)

    assert states(first) == dict.fromkeys(ALL, "completed") and states(second) == dict.fromkeys(ALL, "cached")
    assert {row.state for row in pipeline_status(config)} == {UP_TO_DATE}
    validation = json.loads(next((tmp_path / "artifacts" / "validation").rglob(VALIDATION_FILE)).read_text())
    assert validation["source"]["format"] == layout
    # Named classes: four of them, named as the folders are, in sorted order; integer labels: the configured ten.
    expected = 10 if layout == "npz" else 4
    assert validation["num_classes"] == expected
    report = Path(first["report"]).with_name("report.md").read_text()
    if layout != "npz":
        assert all(name in report for name in names)
    described = {"class-folders": "class folders of images", "manifest": "images named by a label manifest",
                 "npz": "an .npz of arrays"}[layout]
    assert f"({described}, read into IDX files)" in report
    if layout == "class-folders":
        Image.fromarray(four["train"][0][1]).save(tmp_path / "src" / "train" / names[0] / "new.png")
        assert pipeline_status(config)[0].state == STALE  # a new file in the folder: download again
        assert "**Leakage:** 1 test images (" in report and f"`test/{names[0]}/x.png` = `train/{names[0]}/" in report
        assert "light on dark: 1 converted to grayscale, 1 resized, 0 inverted" in report
    else:
        assert "No test image is also in the training split (no leakage)." in report
    assert "| Pixel std | Exact duplicates |" in report


def test_a_changed_image_folder_is_read_again_and_an_unchanged_one_is_not(tmp_path, splits):
    write_class_folders(tmp_path / "src", splits)
    before = source_fingerprint(str(tmp_path / "src"))
    assert source_fingerprint(str(tmp_path / "src")) == before
    Image.fromarray(splits["train"][0][0]).save(tmp_path / "src" / "train" / "3" / "new.png")
    assert source_fingerprint(str(tmp_path / "src")) != before


def test_duplicates_and_leakage_are_counted_and_too_much_leakage_fails(tmp_path, splits):
    images, labels = splits["train"]
    test_images, test_labels = splits["test"]
    leaked = np.concatenate([test_images[:45], images[:5]]), np.concatenate([test_labels[:45], labels[:5]])
    duplicated = np.concatenate([images, images[:3]]), np.concatenate([labels, labels[:3]])
    write_class_folders(tmp_path / "src", {"train": duplicated, "test": leaked})
    raw = download_files(str(tmp_path / "src"), tmp_path / "raw")

    ref = validate_files(raw, tmp_path / "validation", ValidateConfig(max_leakage=0.2))

    report = json.loads(ref.path(VALIDATION_FILE).read_text())
    assert report["splits"]["train"]["duplicates"] == 3 and report["splits"]["test"]["duplicates"] == 0
    assert report["leakage"]["count"] == 5 and report["leakage"]["share"] == 0.1
    assert all(a.startswith("test/") and b.startswith("train/") for a, b in report["leakage"]["examples"])
    with pytest.raises(PipelineError, match=r"^t10k-images-idx3-ubyte.gz: leakage: expected at most 1.0% of the test "
                                            r"images also in the training split, found 5 \(10.00%\); test/"):
        validate_files(raw, tmp_path / "validation", ValidateConfig())
    assert len(list((tmp_path / "validation").iterdir())) == 1  # the failed validation published nothing


def test_images_of_any_mode_and_size_are_converted_and_counted(tmp_path, splits):
    images, labels = splits["train"]
    for i, (image, label) in enumerate(zip(images[:30], labels[:30])):
        folder = tmp_path / "src" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(image)
        if i % 3 == 1:
            picture = picture.convert("RGB")
        if i % 3 == 2:
            picture = Image.fromarray(255 - np.kron(image, np.ones((2, 2), np.uint8)))  # ink on paper, 56x56
        picture.save(folder / f"{i}.png")

    dataset = read_folder(tmp_path / "src", None, 0.1)

    assert dataset.changes == {"converted": 10, "resized": 10, "inverted": 10}


def bad(tmp_path, message, **kwargs):
    with pytest.raises(PipelineError) as error:
        download_files(str(kwargs.pop("source", tmp_path / "src")), tmp_path / "raw", **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
    raw = tmp_path / "raw"
    assert not raw.exists() or not [p for p in raw.iterdir() if not p.name.startswith(".")]  # nothing published


def test_bad_image_files_are_named(tmp_path, splits):
    write_class_folders(tmp_path / "src", splits)
    target = next((tmp_path / "src" / "train" / "4").iterdir())
    target.write_bytes(target.read_bytes()[:-60])  # its pixel data cut short
    bad(tmp_path, f"{target}: image: expected a complete, valid image, found corrupt or truncated data")
    Image.new("L", (9000, 9000)).save(target)  # 81 megapixels: refused from the header
    bad(tmp_path, f"{target}: image size: expected at most 40,000,000 pixels, found 9000x9000 in its header")


def test_bad_folders_are_refused_in_one_line(tmp_path, splits):
    write_class_folders(tmp_path / "src", splits)
    (tmp_path / "src" / "train" / "empty").mkdir()
    bad(tmp_path, f"{tmp_path / 'src' / 'train' / 'empty'}: class folder: expected image files")
    (tmp_path / "src" / "train" / "empty").rmdir()
    shutil.move(tmp_path / "src" / "train" / "9", tmp_path / "nine")
    bad(tmp_path, f"{tmp_path / 'src' / 'test' / '9'}: class: expected a class that train/ has, found 1 class(es) only "
                  "in test/: 9")
    (tmp_path / "nothing").mkdir()
    bad(tmp_path, "nothing: class folders: expected one subfolder per class, found none", source=tmp_path / "nothing")


def test_bad_manifests_are_refused_in_one_line(tmp_path, splits):
    images, labels = splits["train"]
    (tmp_path / "src").mkdir()
    for i in range(3):
        Image.fromarray(images[i]).save(tmp_path / "src" / f"{i}.png")
    manifest = tmp_path / "src" / "labels.csv"
    for rows, message in [
        ("0.png,3\n1.png,\n", "labels.csv: row 3: label: expected a class name or an integer, found a blank"),
        ("0.png,3\n7.png,4\n", "labels.csv: row 3: file_name: expected an existing image file, found none at"),
        ("0.png,3\n../x.png,4\n", "labels.csv: row 3: file_name: expected a file inside the source folder"),
        ("0.png,a\n1.png,b\n", "src: class: expected the configured classes (a, c), found b"),
        ("", "src: images: expected image files (.png, .jpg, .jpeg, .bmp, .gif, .tif, .tiff, .webp) in class folders "
             "or named by labels.csv, found none"),
    ]:
        manifest.write_text("file_name,label\n" + rows)
        bad(tmp_path, message, class_names=["a", "c"] if "configured" in message else None)


def test_bad_npz_files_are_refused_in_one_line(tmp_path, splits):
    np.savez(tmp_path / "a.npz", x_train=splits["train"][0], y_train=splits["train"][1])
    bad(tmp_path, "a.npz: arrays: expected x_train, y_train, x_test, y_test, found x_train, y_train (x_test, y_test "
                  "missing)", source=tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", x_train=splits["train"][0], y_train=splits["train"][1][:-1], x_test=splits["test"][0],
             y_test=splits["test"][1])
    bad(tmp_path, "b.npz: y_train: expected 200 labels (one per image of x_train), found 199",
        source=tmp_path / "b.npz")
    (tmp_path / "c.npz").write_bytes(b"not a zip")
    bad(tmp_path, "c.npz: format: expected an .npz (zip) file", source=tmp_path / "c.npz")


def test_class_folders_under_an_s3_prefix_are_read_and_listed_by_etag(tmp_path, splits, s3_bucket):
    from tasks.storage import filesystem

    write_class_folders(tmp_path / "src", splits, NAMES)
    prefix = f"{s3_bucket}/datasets/digits"
    filesystem().put(str(tmp_path / "src") + "/", prefix[len("s3://"):], recursive=True)
    before = source_fingerprint(prefix)
    local = download_files(str(tmp_path / "src"), tmp_path / "raw-local")

    ref = download_files(prefix, tmp_path / "raw")

    assert ref.meta["source"] == prefix and ref.meta["class_names"] == sorted(NAMES)
    assert ref.digest == local.digest  # the same files, the same raw artifact
    assert source_fingerprint(prefix) == before
    png = next((tmp_path / "src" / "train" / "one").iterdir()).read_bytes()
    filesystem().pipe_file(f"{prefix[len('s3://'):]}/train/one/new.png", png)
    assert source_fingerprint(prefix) != before
    with pytest.raises(PipelineError, match=r"^source s3://.*/empty: expected objects under this prefix, found none$"):
        download_files(f"{s3_bucket}/empty", tmp_path / "raw")
    filesystem().pipe_file(f"{prefix[len('s3://'):]}/train/one/notes.png", b"not an image")
    with pytest.raises(PipelineError) as error:  # named by its object, not by the local copy that was read
        download_files(prefix, tmp_path / "raw")
    assert str(error.value).startswith(f"{prefix}/train/one/notes.png: ") and "mnist-pipeline-source-" not in str(error.value)


def test_decoding_on_worker_processes_gives_what_one_process_gives_even_from_a_script_without_a_main_guard(tmp_path,
                                                                                                         splits):
    import subprocess
    import sys

    from tasks.sources import decode_files

    images, labels = splits["train"]
    write_class_folders(tmp_path / "src", {"": (images[:60], labels[:60])})
    paths = sorted(str(p) for p in (tmp_path / "src").rglob("*.png"))
    serial, changes = decode_files(paths, workers=1)
    assert np.array_equal(decode_files(paths, workers=2)[0], serial) and changes == decode_files(paths, workers=2)[1]
    # Spawned workers import the caller's main script again unless it is hidden: this one has no guard, and would
    # start workers of its own in each of them (multiprocessing then refuses, and the pool breaks).
    script = tmp_path / "unguarded.py"
    script.write_text("import sys\nfrom tasks.sources import decode_files\n"
                      f"print(decode_files({paths!r}, workers=2)[0].sum())\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1], env={"PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                                                                       "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(serial.sum())]
