"""Batch prediction: image decoding, the champion from a real run, the mnist-predict flow, the CLI, bad inputs."""

import gzip
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import tree_state
from helpers import champion_of, dataset_key
from synthetic import idx_bytes, make_split, write_source
from tasks import images, predict
from tasks.errors import PipelineError
from tasks.models import load_model
from tasks.preprocess import to_table

REPO = Path(__file__).resolve().parents[1]
NAMES = [f"bar{c}" for c in range(10)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prefect_api_url):
    """Roots holding one real pipeline run on synthetic data whose model became the champion, with class names."""
    from flows.config import PipelineConfig
    from flows.pipeline import mnist_pipeline

    base = tmp_path_factory.mktemp("predict")
    write_source(base / "source", n_train=400, n_test=50)
    config = PipelineConfig(
        data_dir=base / "data", artifacts_dir=base / "artifacts",
        download={"source": str(base / "source"), "mirrors": [], "retries": 0},
        validation={"train_count": 400, "test_count": 50},
        dataset={"class_names": NAMES},
        train={"epochs": 5, "hidden_units": 32, "batch_size": 32, "jit_compile": False},
        promotion={"min_test_accuracy": 0.5},
    )
    summary = mnist_pipeline(config=config)
    assert summary["promotion"]["promoted"], summary["promotion"]
    champion = champion_of(config)
    images, labels = make_split(40, seed=7)
    return {"base": base, "config": config, "champion": champion, "images": images, "labels": labels}


def write_pngs(folder: Path, images: np.ndarray, **kwargs) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray(image).save(paths[-1], **kwargs)
    return paths


def model_classes(trained, images: np.ndarray) -> np.ndarray:
    """Classes the champion gives to 28x28 uint8 images, straight from Keras (the reference for every input path)."""
    net = load_model(Path(trained["champion"].model_path))
    return np.asarray(net.predict(images.reshape(len(images), 784).astype("float32") / 255, verbose=0)).argmax(axis=1)


# --- decoding ---

def test_a_28x28_grayscale_png_keeps_its_pixels(tmp_path, trained):
    [path] = write_pngs(tmp_path, trained["images"][:1])
    assert np.array_equal(images.read_image(path), trained["images"][0])


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "LA", "I;16"])
def test_colour_and_other_modes_become_the_same_grayscale(tmp_path, trained, mode):
    image = trained["images"][0]
    source = Image.fromarray(image)
    if mode == "I;16":
        converted = Image.fromarray(image.astype(np.uint16) * 257)  # 16-bit: the full range scaled
    else:
        converted = source.convert(mode)
    converted.save(tmp_path / "x.png")
    found = images.read_image(tmp_path / "x.png").astype(int)
    assert np.abs(found - image).max() <= 1


def test_dark_on_light_is_detected_and_inverted_unless_told_otherwise(tmp_path, trained):
    image = trained["images"][3]
    Image.fromarray(255 - image).save(tmp_path / "ink.png")
    assert images.dark_on_light(255 - image) and not images.dark_on_light(image)
    assert np.array_equal(images.read_image(tmp_path / "ink.png"), image)
    assert np.array_equal(images.read_image(tmp_path / "ink.png", invert="no"), 255 - image)
    Image.fromarray(image).save(tmp_path / "plain.png")
    assert np.array_equal(images.read_image(tmp_path / "plain.png", invert="yes"), 255 - image)


def test_larger_and_non_square_images_and_jpegs_are_brought_to_28x28(tmp_path, trained):
    image = trained["images"][5]
    big = Image.fromarray(image).resize((112, 112), Image.Resampling.NEAREST)
    big.save(tmp_path / "big.png")
    big.convert("RGB").save(tmp_path / "big.jpg", quality=95)
    wide = np.zeros((28, 56), np.uint8)
    wide[:, 14:42] = image
    Image.fromarray(wide).save(tmp_path / "wide.png")
    for name in ("big.png", "big.jpg"):
        found = images.read_image(tmp_path / name)
        assert found.shape == (28, 28) and found.dtype == np.uint8
        assert np.abs(found.astype(int) - image).mean() < 12, name
    # Padded to 56x56 (the digit in the middle rows), then halved: the digit is in rows 7..20, columns 7..20.
    found = images.read_image(tmp_path / "wide.png")
    assert found.shape == (28, 28) and found[:6].max() == 0 and found[22:].max() == 0 and found[7:21, 7:21].max() > 200


def test_batches_keep_file_order_across_images_idx_and_parquet(tmp_path, trained):
    images = trained["images"]
    pngs = write_pngs(tmp_path / "pngs", images[:5])
    (tmp_path / "more.idx.gz").write_bytes(gzip.compress(idx_bytes(images[5:20])))
    (tmp_path / "raw-ubyte").write_bytes(idx_bytes(images[20:30]))
    import pyarrow.parquet as pq

    pq.write_table(to_table(images[30:], trained["labels"][30:], {}), tmp_path / "rest.parquet")
    files = predict.list_inputs([tmp_path / "pngs", tmp_path / "more.idx.gz", tmp_path / "raw-ubyte", tmp_path / "rest.parquet"])
    for batch_size in (7, 4096):
        batches = list(predict.iter_batches(files, batch_size=batch_size))
        assert all(len(b.sources) <= batch_size for b in batches)
        pixels = np.concatenate([b.pixels for b in batches])
        assert pixels.dtype == np.float32
        assert np.array_equal(pixels, images.reshape(40, 784).astype(np.float32) / 255)
        sources = [s for b in batches for s in b.sources]
        indexes = [i for b in batches for i in b.indexes]
        assert sources[:5] == [str(p) for p in pngs] and indexes[:5] == [None] * 5
        assert sources[5:20] == [str(tmp_path / "more.idx.gz")] * 15 and indexes[5:20] == list(range(15))
        assert indexes[20:30] == list(range(10)) and indexes[30:] == list(range(10))


# --- the pure function ---

def test_predict_images_agrees_with_keras_on_every_kind_of_input(tmp_path, trained):
    images, labels = trained["images"], trained["labels"]
    write_pngs(tmp_path / "pngs", images[:20])
    Image.fromarray(255 - images[20]).save(tmp_path / "pngs" / "ink.png")  # dark on light: inverted back
    (tmp_path / "rest-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images[21:])))
    champion = trained["champion"]

    frame = predict.predict_images(champion.model_path, [tmp_path / "pngs", tmp_path / "rest-ubyte.gz"],
                                   class_names=NAMES, model_digest=champion.model_digest)

    order = np.r_[0:20, 20, 21:40]  # "ink.png" sorts after the numbered files
    expected = model_classes(trained, images[order])
    assert list(frame["predicted"]) == list(expected)
    assert (frame["predicted"].to_numpy() == labels[order]).mean() >= 0.9  # the model learned the bars
    assert list(frame["name"]) == [NAMES[c] for c in expected]
    assert frame["source"].iloc[20].endswith("ink.png") and pd.isna(frame["index"].iloc[20])
    assert list(frame["index"].iloc[21:]) == list(range(19))
    probabilities = frame[["probability", "probability_top2", "probability_top3"]].to_numpy()
    assert np.all(np.diff(probabilities, axis=1) <= 0) and np.all(probabilities[:, 0] > 0.1)
    assert (frame["top2"] != frame["predicted"]).all() and (frame["model"] == champion.model_digest).all()


# --- model resolution ---

def test_models_are_found_by_champion_digest_prefix_and_path(trained):
    from flows.predict import resolve_model

    config, champion = trained["config"], trained["champion"]
    assert resolve_model("champion", config, dataset_key(config)).digest == champion.model_digest
    assert resolve_model("champion", config, dataset_key(config)).class_names == NAMES
    assert resolve_model(champion.model_digest[:6], config, dataset_key(config)).path == Path(champion.model_path)
    # A path to a model the registry knows keeps its digest and class names.
    by_path = resolve_model(champion.model_path, config, dataset_key(config))
    assert (by_path.digest, by_path.class_names) == (champion.model_digest, NAMES)


# --- the flow ---

def test_the_flow_writes_predictions_caches_by_content_and_changes_nothing(tmp_path, trained):
    from flows.predict import mnist_predict
    config = trained["config"]
    write_pngs(tmp_path / "a", trained["images"][:12])
    kept = tree_state(config.registry_dir, config.artifacts_dir / "models")

    first = mnist_predict(inputs=[str(tmp_path / "a")], output=str(tmp_path / "out.csv"), config=config)
    assert first["stages"] == dict.fromkeys(["load_inputs", "predict_classes", "write_predictions"], "completed")
    table = pd.read_csv(tmp_path / "out.csv")
    assert len(table) == 12 and list(table["predicted"]) == list(model_classes(trained, trained["images"][:12]))
    assert first["counts"] == {NAMES[c]: int(n) for c, n in table["predicted"].value_counts().sort_index().items()}
    assert sum(first["counts"].values()) == 12 == first["images"]

    again = mnist_predict(inputs=[str(tmp_path / "a")], config=config)
    assert again["stages"] == dict.fromkeys(["load_inputs", "predict_classes", "write_predictions"], "cached")
    # The same content under other names: decoded again (the names differ), not scored again.
    write_pngs(tmp_path / "b", trained["images"][:12])
    renamed = mnist_predict(inputs=[str(tmp_path / "b")], config=config)
    assert renamed["stages"] == {"load_inputs": "completed", "predict_classes": "cached", "write_predictions": "completed"}
    assert pd.read_parquet(renamed["output"])["source"].str.startswith(str(tmp_path / "b")).all()

    assert tree_state(config.registry_dir, config.artifacts_dir / "models") == kept
    artifacts = run_artifacts(first["run_id"])
    assert {"mnist-predictions", "mnist-predictions-strip"} <= set(artifacts)
    assert len(artifacts["mnist-predictions"]) == 12
    assert "data:image/png;base64," in artifacts["mnist-predictions-strip"]


def test_the_flow_and_predict_images_give_the_same_table_for_mixed_inputs(tmp_path, trained):
    from flows.predict import mnist_predict

    images, champion = trained["images"], trained["champion"]
    write_pngs(tmp_path / "pngs", images[:5])
    (tmp_path / "more-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images[5:12])))
    inputs = [tmp_path / "pngs", tmp_path / "more-ubyte.gz"]

    flow = pd.read_parquet(mnist_predict(inputs=[str(i) for i in inputs], config=trained["config"])["output"])
    direct = predict.predict_images(champion.model_path, inputs, class_names=NAMES, model_digest=champion.model_digest)
    # Each row keeps its file and its index inside it (none for an image file), decoded and scored the same way.
    pd.testing.assert_frame_equal(flow, direct)
    assert flow["index"].isna().sum() == 5 and list(flow["index"].iloc[5:]) == list(range(7))


def run_artifacts(run_id: str) -> dict:
    """Return {key: data} of the artifacts a flow run published on the test server."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(run_id)])))
    return {a.key: (json.loads(a.data) if a.type == "table" else a.data) for a in found if a.key}


# --- the command line and bad input ---

def cli(*args, env=None):
    """Run `mnist-pipeline predict ARGS` configured for the dataset of `trained` (its champion is the default model)."""
    return subprocess.run([sys.executable, "-m", "flows.cli", "predict", *args], capture_output=True, text=True,
                          env={**os.environ, "MNIST_PIPELINE_DATASET__CLASS_NAMES": ",".join(NAMES), **(env or {})},
                          timeout=600, cwd=REPO)


def test_cli_scores_a_folder_with_the_champion(tmp_path, trained, prefect_api_url):
    write_pngs(tmp_path / "digits", trained["images"][:8])
    out = tmp_path / "scores.parquet"
    # The champion of the configured dataset: these ten named classes.
    env = {"PREFECT_API_URL": prefect_api_url}
    result = cli(str(tmp_path / "digits"), "--output", str(out), "--artifacts-dir", str(trained["config"].artifacts_dir),
                 "--json", env=env)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    frame = pd.read_parquet(out)
    assert summary["output"] == str(out) and summary["images"] == 8 == len(frame)
    assert summary["model"] == trained["champion"].model_digest
    assert list(frame["predicted"]) == list(model_classes(trained, trained["images"][:8]))

    human = cli(str(tmp_path / "digits"), "--artifacts-dir", str(trained["config"].artifacts_dir), env=env)
    assert human.returncode == 0, human.stderr
    assert (f"8 images scored by model {trained['champion'].model_digest[:16]} (champion of "
            f"{trained['champion'].dataset}) (cached)") in human.stdout
    assert "predicted classes: " in human.stdout


def _png_claiming(width: int, height: int) -> bytes:
    """A valid small PNG whose header (IHDR, with a correct CRC) claims other dimensions."""
    import io

    buffer = io.BytesIO()
    Image.new("L", (4, 4)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def _bad_inputs(tmp_path: Path, images: np.ndarray) -> dict[str, tuple[Path, str]]:
    cases = {}
    (tmp_path / "notes.png").write_text("not an image at all\n")
    cases["not an image"] = (tmp_path / "notes.png", "expected an image file")
    write_pngs(tmp_path / "t", images[:1])
    whole = (tmp_path / "t" / "000.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    cases["truncated"] = (tmp_path / "cut.png", "corrupt or truncated")
    (tmp_path / "huge.png").write_bytes(_png_claiming(100_000, 100_000))
    cases["huge"] = (tmp_path / "huge.png", "refused before decoding")
    (tmp_path / "empty").mkdir()
    cases["empty folder"] = (tmp_path / "empty", "empty folder")
    (tmp_path / "short-ubyte").write_bytes(idx_bytes(images[:3])[:-100])
    cases["short IDX"] = (tmp_path / "short-ubyte", "payload size")
    return cases


def test_bad_image_inputs_are_refused_by_the_pure_function(tmp_path, trained):
    for case, (path, fragment) in _bad_inputs(tmp_path, trained["images"]).items():
        with pytest.raises(PipelineError) as error:
            list(predict.iter_batches(predict.list_inputs([path])))
        assert str(path) in str(error.value) and fragment in str(error.value), case


def test_a_header_claiming_huge_dimensions_is_refused_without_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    # Beyond our limit but within Pillow's own (89 megapixels): refused by the size check, from the header alone.
    (tmp_path / "huge.png").write_bytes(_png_claiming(7000, 7000))
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1))
    with pytest.raises(PipelineError, match="7000x7000 in its header"):
        images.read_image(tmp_path / "huge.png")
    assert decoded == []


@pytest.mark.parametrize("case", ["not an image", "truncated", "huge", "empty folder", "unknown digest",
                                  "ambiguous prefix", "no champion", "no output folder"])
def test_cli_bad_input_one_line_exit_1_no_output(tmp_path, trained, prefect_api_url, case):
    artifacts = trained["config"].artifacts_dir
    write_pngs(tmp_path / "ok", trained["images"][:2])
    inputs, extra, fragment = str(tmp_path / "ok"), [], None
    bad = _bad_inputs(tmp_path, trained["images"])
    if case in bad:
        inputs, fragment = str(bad[case][0]), bad[case][1]
    elif case == "unknown digest":
        extra, fragment = ["--model", "ffffffff"], "no model with this digest"
    elif case == "ambiguous prefix":
        # A second model folder sharing the champion's first 4 hex digits makes that prefix ambiguous.
        digest = trained["champion"].model_digest
        twin = tmp_path / "twin"
        (twin / "models" / (digest[:4] + "0" * 12)).mkdir(parents=True)
        (twin / "models" / (digest[:4] + "0" * 12) / "model.keras").write_bytes(b"")
        (twin / "models" / digest[:16]).mkdir()
        (twin / "models" / digest[:16] / "model.keras").write_bytes(b"")
        artifacts, extra, fragment = twin, ["--model", digest[:4]], "ambiguous prefix"
    elif case == "no champion":
        artifacts, fragment = tmp_path / "fresh", "no champion yet: run `mnist-pipeline run` first"
    elif case == "no output folder":
        extra, fragment = ["--output", str(tmp_path / "missing" / "out.parquet")], "does not exist"
    before = tree_state(trained["config"].artifacts_dir)

    result = cli(inputs, "--artifacts-dir", str(artifacts), "--output", str(tmp_path / "out.parquet"), *extra,
                 env={"PREFECT_API_URL": prefect_api_url})

    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("mnist-pipeline: error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.parquet").exists() and not (tmp_path / "missing").exists()
    assert tree_state(trained["config"].artifacts_dir) == before
