"""The report stage on fabricated upstream artifacts: files, figures, escaping, the Prefect UI helpers."""

import base64
import html
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from matplotlib.image import imread
from synthetic import make_split

from tasks.core import PipelineError, new_workdir, publish, write_json
from tasks.preprocess import to_table
from tasks.report import (
    FIGURES,
    KEY_FIGURES,
    PROMOTION_KEY,
    REPORT_HTML,
    REPORT_MD,
    confusion_table,
    metrics_table,
    promotion_markdown,
    report_results,
    summary_markdown,
    write_report,
)

REPO = Path(__file__).resolve().parents[1]
N_TEST = 50
EVIL = '<script>alert("x")</script> & <b>bold</b>'
HISTORY = {
    "loss": [0.61, 0.22, 0.11],
    "accuracy": [0.81, 0.93, 0.97],
    "val_loss": [0.35, 0.2, 0.16],
    "val_accuracy": [0.88, 0.94, 0.95],
    "epoch_seconds": [1.25, 0.75, 0.5],
    "fit_seconds": 2.5,
}
CONFIG = {"epochs": 3, "batch_size": 32, "learning_rate": 0.001, "hidden_units": 512, "seed": 7, "validation_split": 0.1,
          "optimizer": "adam", "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"], "train_rows": 120,
          "versions": {"tensorflow": "2.21.0"}}


def split_summary(images, labels):
    return {
        "count": len(images), "shape": list(images.shape), "dtype": "uint8", "label_range": [0, 9],
        "class_counts": {str(c): int(n) for c, n in enumerate(np.bincount(labels, minlength=10))},
        "pixel_mean": round(float(images.mean()), 4), "pixel_std": round(float(images.std()), 4),
    }


def fabricate(root: Path, wrong=(3, 17, 30, 41), overfitting="mild", config=None, history=None, first_labels=None):
    """Publish validation, processed, model and evaluation artifacts like the upstream stages write them."""
    train_images, train_labels = make_split(120, seed=0)
    images, labels = make_split(N_TEST, seed=1)
    predicted = labels.copy()
    for i in wrong:
        predicted[i] = (labels[i] + 1) % 10
    confidence = np.linspace(0.4, 0.99, N_TEST).astype(np.float32)

    work = new_workdir(root / "validation")
    write_json(work / "validation.json", {
        "schema_version": 1, "raw_digest": "f" * 64, "passed": True,
        "checks": [{"file": "t10k-images-idx3-ubyte.gz", "check": "magic", "passed": True, "expected": 2051, "found": 2051}],
        "splits": {"train": split_summary(train_images, train_labels), "test": split_summary(images, labels)},
    })
    validation = publish("validate", work)

    work = new_workdir(root / "processed")
    pq.write_table(to_table(images, labels, {"split": "test"}), work / "test.parquet")
    processed = publish("preprocess", work)

    work = new_workdir(root / "model")
    (work / "model.keras").write_bytes(b"not a real model")
    write_json(work / "history.json", HISTORY if history is None else history)
    write_json(work / "config.json", CONFIG if config is None else config)
    model = publish("train", work)

    matrix = np.zeros((10, 10), dtype=int)
    np.add.at(matrix, (labels, predicted), 1)
    per_class = {}
    for c in range(10):
        precision = matrix[c, c] / max(matrix[:, c].sum(), 1)
        recall = matrix[c, c] / max(matrix[c].sum(), 1)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[str(c)] = {"precision": precision, "recall": recall, "f1": f1, "support": int(matrix[c].sum())}
    accuracy = float((predicted == labels).mean())
    misclassified = np.flatnonzero(predicted != labels)
    work = new_workdir(root / "evaluation")
    write_json(work / "metrics.json", {
        "schema_version": 1, "test_loss": 0.1234, "test_accuracy": accuracy, "train_loss": 0.05, "train_accuracy": 0.99,
        "accuracy_gap": 0.99 - accuracy, "overfitting": overfitting, "num_test": N_TEST,
        "first_20_predictions": predicted[:20].tolist(),
        "first_20_labels": labels[:20].tolist() if first_labels is None else first_labels,
        "confusion_matrix": matrix.tolist(), "per_class": per_class,
        "misclassified": {"count": len(misclassified), "first": [
            {"index": int(i), "label": int(labels[i]), "predicted": int(predicted[i]), "confidence": float(confidence[i])}
            for i in misclassified[:25]]},
        "model_digest": model.digest, "data_digest": processed.digest,
    })
    pq.write_table(pa.table({
        "index": pa.array(np.arange(N_TEST, dtype=np.int32)), "label": pa.array(labels, pa.uint8()),
        "predicted": pa.array(predicted, pa.uint8()), "confidence": pa.array(confidence),
    }), work / "predictions.parquet")
    evaluation = publish("evaluate", work)
    return validation, processed, model, evaluation


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return fabricate(tmp_path_factory.mktemp("inputs"), overfitting=EVIL, config={**CONFIG, "note": EVIL})


@pytest.fixture(scope="module")
def report(inputs, tmp_path_factory):
    return write_report(*inputs, tmp_path_factory.mktemp("out") / "reports")


def rejection(model_digest: str) -> dict:
    """Return a decision as tasks.promote records it: not promoted against a better champion (reason with markup)."""
    return {
        "schema_version": 1, "model_digest": model_digest, "model_path": "/artifacts/models/x/model.keras",
        "test_accuracy": 0.9701, "test_loss": 0.0912, "promoted": False,
        "reason": "test accuracy 0.9701 is 0.0081 below the champion's 0.9782, more than the tolerance 0.0020 " + EVIL,
        "champion_before": {"model_digest": "c" * 64, "test_accuracy": 0.9782, "test_loss": 0.0704},
        "gate": 0.97, "tolerance": 0.002, "decided_at": "2025-06-01T12:00:00+00:00", "run_id": "run-1",
    }


@pytest.fixture(scope="module")
def rejected_report(inputs, tmp_path_factory):
    return write_report(*inputs, tmp_path_factory.mktemp("rejected") / "reports", decision=rejection(inputs[2].digest))


def metrics_of(inputs):
    return json.loads(inputs[3].path("metrics.json").read_text())


def section(markdown: str, title: str) -> str:
    """Return the text of one `## title` section."""
    return markdown.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_writes_report_pages_and_valid_figures_in_one_flat_folder(report):
    assert set(report.files) == {REPORT_MD, REPORT_HTML, *FIGURES}
    assert report.problem() is None
    assert {p.name for p in report.path(REPORT_MD).parent.iterdir()} == set(report.files)
    shapes = {name: imread(report.path(name)).shape for name in FIGURES}
    for height, width, _ in shapes.values():
        assert 100 <= height <= 2000 and 300 <= width <= 2500
    height, width, _ = shapes["first20.png"]
    assert width > 6 * height  # one row of 20 digits


def test_meta_holds_headline_numbers_and_final_paths(report, inputs):
    metrics = metrics_of(inputs)
    assert report.meta["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert report.meta["misclassified"] == 4
    assert Path(report.meta["report_md"]) == report.path(REPORT_MD)
    assert Path(report.meta["report_html"]).is_file()


def test_html_embeds_every_figure_and_loads_nothing_from_outside(report):
    page = report.path(REPORT_HTML).read_text()
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    embedded = [base64.b64decode(s.removeprefix("data:image/png;base64,")) for s in sources]
    assert sorted(embedded) == sorted(report.path(name).read_bytes() for name in FIGURES)
    assert all(s.startswith("data:image/png;base64,") for s in re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', page))
    assert not re.search(r"<(?:link|script|iframe)\b|url\(|@import", page, re.IGNORECASE)


def test_text_from_the_data_is_escaped_in_html_and_markdown(report):
    page = report.path(REPORT_HTML).read_text()
    assert "<script" not in page.lower() and "<b>" not in page
    assert page.count(html.escape(EVIL)) == 2  # the overfitting remark and the config value
    markdown = report.path(REPORT_MD).read_text()
    assert not re.search(r"(?<!\\)<", markdown)  # every < from the data is backslash-escaped
    assert r"\<script\>alert" in markdown


def test_markdown_has_headline_predictions_figures_and_tables(report, inputs):
    markdown = report.path(REPORT_MD).read_text()
    metrics = metrics_of(inputs)
    assert f"{metrics['test_accuracy']:.4f}" in section(markdown, "Headline")
    assert "predicted: " + " ".join(map(str, metrics["first_20_predictions"])) in markdown
    assert "true:      " + " ".join(map(str, metrics["first_20_labels"])) in markdown
    for name in FIGURES:
        assert re.search(rf"!\[[^\]]+\]\({re.escape(name)}\)", markdown)
    assert "| 0 | 1.0000 |" in section(markdown, "Test-set evaluation")
    training = section(markdown, "Training")
    assert "| 3 | 0.1100 | 0.9700 | 0.1600 | 0.9500 | 0.5 |" in training
    assert "`batch_size` | 32" in training and "`versions.tensorflow` | 2.21.0" in training
    assert "| `loss` | sparse_categorical_crossentropy |" in training  # intraword underscores need no escape


def test_data_section_repeats_the_validation_summary(report, inputs):
    data = section(report.path(REPORT_MD).read_text(), "Data")
    splits = json.loads(inputs[0].path("validation.json").read_text())["splits"]
    assert "| train | 120 | 120 x 28 x 28 | `uint8` | 0..9 |" in data
    assert "| test | 50 | 50 x 28 x 28 |" in data
    for c in map(str, range(10)):
        assert f"| {c} | {splits['train']['class_counts'][c]} | {splits['test']['class_counts'][c]} |" in data
    assert f"{splits['test']['pixel_mean']:.4f}" in data


def test_pipeline_summary_names_each_step_and_the_input_digests(report, inputs):
    summary = section(report.path(REPORT_MD).read_text(), "What the pipeline did")
    for step in ("Load", "Build", "Compile", "Preprocess", "Fit", "Predict", "Evaluate"):
        assert f"**{step}**" in summary
    assert "`adam`" in summary and "`sparse_categorical_crossentropy`" in summary and "`accuracy`" in summary
    assert "4 steps per epoch" in summary  # ceil(ceil(120 * 0.9) / 32)
    for ref in inputs:
        assert f"`{ref.digest}`" in summary


def test_same_inputs_give_a_byte_identical_report(report, inputs):
    again = write_report(*inputs, report.path(REPORT_MD).parents[1])
    assert again.digest == report.digest
    assert again.path(REPORT_HTML) == report.path(REPORT_HTML)


def test_no_misclassified_digits_and_no_validation_split(tmp_path):
    history = {"loss": [0.3], "accuracy": [0.9], "epoch_seconds": [0.4], "fit_seconds": 0.4}
    refs = fabricate(tmp_path, wrong=(), history=history, config={"epochs": 1, "batch_size": 64})
    ref = write_report(*refs, tmp_path / "reports")
    markdown = ref.path(REPORT_MD).read_text()
    assert f"0 of {N_TEST} test images are misclassified." in markdown
    assert "wrong:" not in markdown and "Val loss" not in markdown
    height, width, _ = imread(ref.path("misclassified.png")).shape
    assert height < width
    assert imread(ref.path("training_curves.png")).shape[1] > 300


def test_evaluation_of_other_data_is_refused(tmp_path):
    refs = fabricate(tmp_path, first_labels=[9] * 20)
    with pytest.raises(PipelineError, match="first_20_labels"):
        write_report(*refs, tmp_path / "reports")
    assert not (tmp_path / "reports").exists() or not any((tmp_path / "reports").iterdir())


def test_summary_markdown_embeds_key_figures_and_escapes_text(report, inputs):
    metrics = metrics_of(inputs)
    text = summary_markdown(metrics, {name: report.path(name) for name in KEY_FIGURES}, report.path(REPORT_HTML))
    assert text.count("](data:image/png;base64,") == len(KEY_FIGURES)
    uri = "data:image/png;base64," + base64.b64encode(report.path("first20.png").read_bytes()).decode()
    assert uri in text
    assert f"{metrics['test_accuracy']:.4f}" in text
    assert not re.search(r"(?<!\\)<", text)


def test_tables_are_plain_json_rows(inputs):
    metrics = metrics_of(inputs)
    # Values computed upstream may arrive as numpy scalars; the tables must not pass them on.
    metrics["per_class"]["0"] = {k: np.float32(v) for k, v in metrics["per_class"]["0"].items()}
    metrics["confusion_matrix"] = np.asarray(metrics["confusion_matrix"], dtype=np.int64).tolist()
    metrics["confusion_matrix"][0] = list(np.asarray(metrics["confusion_matrix"][0], dtype=np.int64))
    rows, matrix = metrics_table(metrics), confusion_table(metrics)
    for table in (rows, matrix):
        assert json.loads(json.dumps(table)) == table
        assert all(type(v) in (int, float, str) for row in table for v in row.values())
    assert [r["class"] for r in rows] == list(range(10))
    assert [r["total"] for r in matrix] == [r["support"] for r in rows]
    assert sum(r[f"pred {r['true']}"] for r in matrix) == N_TEST - 4


def test_importing_the_module_loads_neither_tensorflow_nor_pyplot():
    modules = ("tensorflow", "keras", "matplotlib")
    code = f"import sys, tasks.report; print(sorted(m for m in {modules!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_promotion_section_states_the_decision_against_the_champion(rejected_report, inputs):
    markdown = rejected_report.path(REPORT_MD).read_text()
    assert markdown.index("\n## Headline\n") < markdown.index("\n## Model promotion\n") < markdown.index("\n## First 20")
    promotion = section(markdown, "Model promotion")
    assert promotion.startswith("\n**Not promoted** (test accuracy 0.9701 is 0.0081 below the champion's 0.9782, "
                                "more than the tolerance 0.0020 \\<script\\>")
    assert f"| this model | `{inputs[2].digest[:16]}` | 0.9701 | 0.0912 |" in promotion
    assert "| champion before | `cccccccccccccccc` | 0.9782 | 0.0704 |" in promotion
    assert "| difference |  | -0.0081 | +0.0208 |" in promotion
    assert "at least 0.9700 and at most 0.0020 below" in promotion
    assert not re.search(r"(?<!\\)<", markdown)

    page = rejected_report.path(REPORT_HTML).read_text()
    assert "<h2>Model promotion</h2>\n<p><strong>Not promoted</strong> (test accuracy 0.9701" in page
    assert '<td>champion before</td><td><code>cccccccccccccccc</code></td><td class="num">0.9782</td>' in page
    assert page.count(html.escape(EVIL)) == 3 and "<script" not in page.lower()
    assert rejected_report.meta["promoted"] is False


def test_report_without_a_decision_has_no_promotion_section(report):
    assert "Model promotion" not in report.path(REPORT_MD).read_text()
    assert "Model promotion" not in report.path(REPORT_HTML).read_text()
    assert report.meta["promoted"] is None


def test_promotion_summary_of_a_first_model():
    decision = {**rejection("a" * 64), "promoted": True, "champion_before": None,
                "reason": "first model: no champion yet and test accuracy 0.9701 passes the gate 0.9700"}
    text = promotion_markdown(decision)
    assert "**Promoted** (first model: no champion yet and test accuracy 0.9701 passes the gate 0.9700)." in text
    assert "| this model | `aaaaaaaaaaaaaaaa` | 0.9701 | 0.0912 |" in text
    assert "champion before |" not in text and "No champion before." in text


def test_task_publishes_the_decision_as_a_prefect_artifact(prefect_api_url, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    refs = fabricate(tmp_path / "inputs")
    decision = {**rejection(refs[2].digest), "reason": "test accuracy 0.9701 is below the gate 0.9750"}
    ref = report_results(*refs, tmp_path / "artifacts", decision=decision)
    assert ref.meta["promoted"] is False
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[PROMOTION_KEY])))
    assert found and found[-1].type == "markdown"
    assert any(a.data == promotion_markdown(decision) for a in found)
    assert any(a.description == "Not promoted: test accuracy 0.9701" for a in found)
