"""The report stage on the real upstream stages' artifacts: files, figures, escaping, promotion, the Prefect UI."""

import base64
import html
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from markdown_it import MarkdownIt
from matplotlib.image import imread

from flows.runner import report_results
from flows.ui import PROMOTION_KEY
from synthetic import NAMES, idx_bytes, make_split, payloads, write_source
from tasks.artifacts import ArtifactRef, publish
from tasks.dataset import DatasetConfig
from tasks.download import download_files
from tasks.errors import PipelineError
from tasks.evaluate import score_model
from tasks.files import new_workdir, write_json
from tasks.layout import (
    CONFIG_FILE,
    CONFUSION_PNG,
    CURVES_PNG,
    FIRST20_PNG,
    HISTORY_FILE,
    MANIFEST,
    METRICS_FILE,
    MISCLASSIFIED_PNG,
    MODEL_FILE,
    PREDICTIONS_FILE,
    REPORT_HTML,
    REPORT_MD,
    SPLIT_FILES,
    VALIDATION_FILE,
)
from tasks.models import TrainConfig
from tasks.preprocess import load_split, preprocess_files
from tasks.promote import decide_promotion
from tasks.registry import PromotionConfig
from tasks.report import write_report
from tasks.report.context import load_context
from tasks.report.figures import FIGURES, KEY_FIGURES, WRONG, draw_figures, short, to_png
from tasks.report.ui import confusion_table, metrics_table, promotion_markdown, summary_markdown
from tasks.train import fit_model
from tasks.validate import ValidateConfig, validate_files

REPO = Path(__file__).resolve().parents[1]
N_TEST = 50
EVIL = '<script>alert("x")</script> & <b>bold</b>'
MARKUP = "*em* _u_ [link](http://x.test) | # h `tick`"  # Markdown metacharacters, a pipe and a backtick
BAR_NAMES = [f"bar {c}" for c in range(10)]
# A model that learns the synthetic data perfectly (validation split on), and one that stays weak (no split).
GOOD = TrainConfig(epochs=2, hidden_units=32, batch_size=32, jit_compile=False, validation_split=0.1)
WEAK = TrainConfig(epochs=1, hidden_units=32, batch_size=32, jit_compile=False, learning_rate=0.0003)


def data_chain(root: Path, files=None, num_classes: int = 10, pinned: bool = True):
    """Run download, validate and preprocess on synthetic IDX files; return (validation, processed).

    `pinned`: the payload digests are given to the download (`--sha256`); else the source is not pinned.
    """
    digests = write_source(root / "source", files, num_classes=num_classes)
    raw = download_files(str(root / "source"), root / "data" / "raw", expected_sha256=digests if pinned else None)
    validation = validate_files(raw, root / "validation", ValidateConfig(train_count=200, test_count=50), num_classes)
    return validation, preprocess_files(raw, validation, root / "processed")


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """The real stages once: two models on the same data, the good one promoted first, the weak one then rejected."""
    root = tmp_path_factory.mktemp("stages")
    validation, processed = data_chain(root)
    runs = {}
    for name, config in (("good", GOOD), ("weak", WEAK)):
        model = fit_model(processed, root / "models", config)
        runs[name] = (model, score_model(model, processed, root / "evaluations"))
    promoted = decide_promotion(*runs["good"], root / "registry", PromotionConfig(), DatasetConfig().key(), run_id="run-1")
    rejected = decide_promotion(*runs["weak"], root / "registry", PromotionConfig(), DatasetConfig().key(), run_id="run-2")
    return SimpleNamespace(root=root, validation=validation, processed=processed, good=runs["good"], weak=runs["weak"],
                           promoted=promoted, rejected=rejected)


def republish(ref: ArtifactRef, root: Path, name: str, change) -> ArtifactRef:
    """Publish a copy of an artifact with one file changed by `change(path)`, as its stage would have written it."""
    work = new_workdir(root)
    for file in ref.files:
        (work / file).write_bytes(ref.path(file).read_bytes())
    change(work / name)
    return publish(ref.stage, work, meta=ref.meta)


def edit_json(**values):
    def change(path: Path) -> None:
        write_json(path, {**json.loads(path.read_text()), **values})
    return change


@pytest.fixture(scope="module")
def inputs(stages):
    """The weak run's artifacts with hostile text in the config and in the overfitting remark."""
    model, evaluation = stages.weak
    model = republish(model, stages.root / "hostile", CONFIG_FILE, edit_json(note=EVIL, markup=MARKUP))
    overfitting = json.loads(evaluation.path(METRICS_FILE).read_text())["overfitting"]
    evaluation = republish(evaluation, stages.root / "hostile", METRICS_FILE,
                           edit_json(overfitting=f"{overfitting} {EVIL} {MARKUP}"))
    return stages.validation, stages.processed, model, evaluation


@pytest.fixture(scope="module")
def report(inputs, tmp_path_factory):
    return write_report(*inputs, tmp_path_factory.mktemp("out") / "reports")


@pytest.fixture(scope="module")
def hostile_rejection(stages):
    """The real rejection of the weak model, its reason extended with hostile text."""
    return stages.rejected.model_copy(update={"reason": f"{stages.rejected.reason} {EVIL}"})


@pytest.fixture(scope="module")
def rejected_report(inputs, hostile_rejection, tmp_path_factory):
    return write_report(*inputs, tmp_path_factory.mktemp("rejected") / "reports", decision=hostile_rejection)


@pytest.fixture(scope="module")
def good_report(stages, tmp_path_factory):
    return write_report(stages.validation, stages.processed, *stages.good, tmp_path_factory.mktemp("good") / "reports",
                        decision=stages.promoted)


def metrics_of(evaluation):
    return json.loads(evaluation.path(METRICS_FILE).read_text())


def predictions_of(evaluation):
    return pd.read_parquet(evaluation.path(PREDICTIONS_FILE))


def section(markdown: str, title: str) -> str:
    """Return the text of one `## title` section."""
    return markdown.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def permissive_html(markdown: str) -> str:
    """Render Markdown as a renderer that lets raw HTML through would (GitHub, most editors)."""
    return MarkdownIt("commonmark", {"html": True}).enable("table").render(markdown)


def escaped(text: str) -> str:
    """Return text as markdown-it writes it into HTML (&, <, > and double quotes as entities)."""
    return html.escape(text, quote=False).replace('"', "&quot;")


def texts(artist) -> list[str]:
    return [t.get_text() for t in artist.texts]


def test_the_fixture_runs_are_what_the_tests_need(stages):
    assert metrics_of(stages.good[1])["misclassified"]["count"] == 0
    assert metrics_of(stages.weak[1])["misclassified"]["count"] > 0
    assert stages.promoted.promoted and stages.promoted.champion_before is None
    assert not stages.rejected.promoted and stages.rejected.champion_before.model_digest == stages.good[0].digest


def test_writes_report_pages_and_valid_figures_in_one_flat_folder(report):
    assert set(report.files) == {REPORT_MD, REPORT_HTML, *FIGURES}
    assert report.problem() is None
    assert {p.name for p in report.path(REPORT_MD).parent.iterdir()} == {*report.files, MANIFEST}
    shapes = {name: imread(report.path(name)).shape for name in FIGURES}
    for height, width, _ in shapes.values():
        assert 100 <= height <= 2000 and 300 <= width <= 2500
    height, width, _ = shapes[FIRST20_PNG]
    assert width > 6 * height  # one row of 20 digits


def test_meta_holds_headline_numbers(report, inputs):
    metrics = metrics_of(inputs[3])
    assert report.meta["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert report.meta["misclassified"] == metrics["misclassified"]["count"] > 0
    assert report.meta["overfitting"] == metrics["overfitting"]
    assert report.path(REPORT_HTML).is_file() and report.path(REPORT_MD).is_file()


def test_html_embeds_every_figure_and_loads_nothing_from_outside(report):
    page = report.path(REPORT_HTML).read_text()
    assert "content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\"" in page
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    embedded = [base64.b64decode(s.removeprefix("data:image/png;base64,")) for s in sources]
    assert sorted(embedded) == sorted(report.path(name).read_bytes() for name in FIGURES)
    assert all(s.startswith("data:image/png;base64,") for s in re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', page))
    assert not re.search(r"<(?:link|script|iframe)\b|url\(|@import", page, re.IGNORECASE)


def test_text_from_the_data_is_escaped_in_html_and_literal_in_markdown(report):
    page = report.path(REPORT_HTML).read_text()
    assert "<script" not in page.lower() and "<b>" not in page and "&lt;script&gt;" in page
    assert page.count(escaped(EVIL)) == 2  # the overfitting remark and a config value
    assert page.count(escaped(MARKUP)) == 2  # the same, metacharacters shown as they are
    assert "<em>em</em>" not in page and "<a " not in page and "<h1>h" not in page

    markdown = report.path(REPORT_MD).read_text()
    assert r"\<script\>alert" in markdown  # the overfitting remark, backslash-escaped
    assert f"| `note` | `{EVIL}` |" in markdown  # a config value, in a code span
    # Literal even for a renderer that passes raw HTML through.
    shown = permissive_html(markdown)
    assert "<script" not in shown.lower() and "<b>" not in shown and "<em>em</em>" not in shown and "<a " not in shown
    assert shown.count(escaped(EVIL)) == 2 and shown.count(escaped(MARKUP)) == 2


def test_markdown_has_headline_predictions_figures_and_tables(report, inputs):
    markdown = report.path(REPORT_MD).read_text()
    metrics = metrics_of(inputs[3])
    assert f"| Test accuracy | **{metrics['test_accuracy']:.4f} (" in section(markdown, "Headline")
    predicted, labels = metrics["first_20_predictions"], metrics["first_20_labels"]
    assert "predicted: " + " ".join(map(str, predicted)) in markdown
    assert "true:      " + " ".join(map(str, labels)) in markdown
    assert "wrong:     " + " ".join("^" if p != t else " " for p, t in zip(predicted, labels)).rstrip() + "\n" in markdown
    assert f"{sum(p == t for p, t in zip(predicted, labels))} of 20 correct." in markdown
    for name in FIGURES:
        assert re.search(rf"!\[[^\]]+\]\({re.escape(name)}\)", markdown)
    evaluation = section(markdown, "Test-set evaluation")
    for c, v in metrics["per_class"].items():
        assert f"| {c} | {v['precision']:.4f} | {v['recall']:.4f} | {v['f1']:.4f} | {v['support']} |" in evaluation
    mean = {k: np.mean([v[k] for v in metrics["per_class"].values()]) for k in ("precision", "recall", "f1")}
    assert f"| **macro average** | {mean['precision']:.4f} | {mean['recall']:.4f} | {mean['f1']:.4f} | {N_TEST} |" in evaluation
    count = metrics["misclassified"]["count"]
    assert f"{count} of {N_TEST} test images are misclassified; the first {min(count, 30)} by test index" in evaluation
    training = section(markdown, "Training")
    assert "| `batch_size` | `32` |" in training and "| `tensorflow_version` | `2." in training
    assert "| `loss` | `sparse_categorical_crossentropy` |" in training


def test_per_epoch_table_with_validation_columns(good_report, stages):
    history = json.loads(stages.good[0].path(HISTORY_FILE).read_text())
    training = section(good_report.path(REPORT_MD).read_text(), "Training")
    assert "| Epoch | Loss | Accuracy | Val loss | Val accuracy | Seconds |" in training
    assert history["best_epoch"] == 2  # the last epoch's weights, marked as kept
    for i, epoch in enumerate(["1", "**2** (kept)"]):
        assert (f"| {epoch} | {history['loss'][i]:.4f} | {history['accuracy'][i]:.4f} | {history['val_loss'][i]:.4f} "
                f"| {history['val_accuracy'][i]:.4f} | {stages.good[0].meta['epoch_seconds'][i]:.1f} |") in training
    # ceil(180 / 32) steps; the timings are the training run's, in the model's reference
    assert f"Fitting took {stages.good[0].meta['fit_seconds']:.1f} s for 2 epochs of 6 steps each." in training
    assert "Training ran all 2 planned epochs.\nThe model keeps the weights of the last epoch (2)." in training
    assert "stopped early" not in good_report.path(REPORT_MD).read_text() and "resumed" not in training


def test_data_section_repeats_the_validation_summary(report, inputs):
    data = section(report.path(REPORT_MD).read_text(), "Data")
    validation = json.loads(inputs[0].path(VALIDATION_FILE).read_text())
    splits = validation["splits"]
    assert f"{len(validation['checks'])} of {len(validation['checks'])} checks passed (raw data digest " in data
    assert "| train | 200 | 200 x 28 x 28 | `uint8` | 0..9 |" in data
    assert "| test | 50 | 50 x 28 x 28 |" in data
    for c in map(str, range(10)):
        assert f"| {c} | {splits['train']['class_counts'][c]} | {splits['test']['class_counts'][c]} |" in data
    assert "| **total** | 200 | 50 |" in data
    assert f"{splits['test']['pixel_mean']:.4f}" in data


def test_pipeline_summary_names_each_step_and_the_input_digests(report, inputs):
    summary = section(report.path(REPORT_MD).read_text(), "What the pipeline did")
    for step in ("Load", "Build", "Compile", "Preprocess", "Fit", "Predict", "Evaluate"):
        assert f"**{step}**" in summary
    # The architecture the train stage recorded: 784 * 32 + 32 and 32 * 10 + 10 parameters.
    assert "**Build**: a Keras Sequential `mlp` network, Dense (32) → Dense (10); 25,450 parameters." in summary
    assert "**Fit**: 1 epoch, batch size 32," in summary and "10 classes, labels 0..9" in summary
    assert "`adam`" in summary and "`sparse_categorical_crossentropy`" in summary and "`accuracy`" in summary
    assert "7 steps per epoch" in summary  # ceil(200 / 32), no validation split
    for ref in inputs:
        assert f"`{ref.digest}`" in summary


def test_same_inputs_give_a_byte_identical_report(report, inputs):
    again = write_report(*inputs, report.path(REPORT_MD).parents[1])
    assert again.digest == report.digest
    assert again.path(REPORT_HTML) == report.path(REPORT_HTML)


def test_no_misclassified_digits_and_no_validation_split(good_report, report):
    good = good_report.path(REPORT_MD).read_text()
    assert f"0 of {N_TEST} test images are misclassified." in good
    assert "wrong:" not in good and "20 of 20 correct." in good
    height, width, _ = imread(good_report.path(MISCLASSIFIED_PNG)).shape
    assert height < width
    weak = report.path(REPORT_MD).read_text()
    assert "Val loss" not in weak and "held out for validation" not in weak
    assert "10% of the training images held out for validation" in good
    assert imread(report.path(CURVES_PNG)).shape[1] > 300


def test_figures_show_the_numbers_of_the_artifacts(report, inputs):
    metrics, predictions = metrics_of(inputs[3]), predictions_of(inputs[3])
    figures = draw_figures(load_context(*inputs))
    # The published PNGs are these figures.
    for name, fig in figures.items():
        assert to_png(fig) == report.path(name).read_bytes()

    # Confusion matrix: one count per cell, recounted here from the per-image predictions.
    counts = np.bincount(predictions["label"].astype(int) * 10 + predictions["predicted"], minlength=100)
    ax = figures[CONFUSION_PNG].axes[0]
    assert texts(ax) == [str(n) for n in counts]
    assert ax.get_title() == f"Confusion matrix ({N_TEST} test images)"

    # First 20: each digit titled with its prediction and true label, wrong ones in red.
    first = predictions.sort_values("index").head(20)
    captions = figures[FIRST20_PNG].axes[0].texts
    assert [t.get_text() for t in captions] == [f"pred {p}\ntrue {t}" for p, t in zip(first["predicted"], first["label"])]
    assert [t.get_color() == WRONG for t in captions] == list(first["predicted"] != first["label"])
    _, labels = load_split(inputs[1].path(SPLIT_FILES["test"]))
    assert list(first["label"]) == labels[:20].tolist()

    # Gallery: the first misclassified digits by test index, with their confidence.
    wrong = predictions[predictions["label"] != predictions["predicted"]].sort_values("index")
    shown = wrong.head(30)
    assert texts(figures[MISCLASSIFIED_PNG].axes[0]) == [
        f"true {t}\npred {p}\nconf {c:.2f}" for t, p, c in zip(shown["label"], shown["predicted"], shown["confidence"])
    ]
    # Without class names the classes are called by their labels, on the confusion matrix's axes too.
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(c) for c in range(10)]
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(c) for c in range(10)]
    title = f"first {len(shown)} of {len(wrong)}, by test index" if len(wrong) > 30 else f"All {len(wrong)} misclassified"
    assert title in " ".join(texts(figures[MISCLASSIFIED_PNG]))
    assert metrics["misclassified"]["count"] == len(wrong)


def test_training_curves_plot_the_history(stages):
    history = json.loads(stages.good[0].path(HISTORY_FILE).read_text())
    fig = draw_figures(load_context(stages.validation, stages.processed, *stages.good))[CURVES_PNG]
    for ax, key in zip(fig.axes, ("loss", "accuracy")):
        train, validation = ax.get_lines()
        assert list(train.get_ydata()) == history[key] and list(validation.get_ydata()) == history[f"val_{key}"]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "validation"]


def test_evaluation_of_other_data_is_refused(stages, tmp_path):
    _, other = data_chain(tmp_path / "other", payloads(seed=7))
    with pytest.raises(PipelineError, match="first_20_labels .* the evaluation was made on other data"):
        write_report(stages.validation, other, *stages.weak, tmp_path / "reports")
    assert not (tmp_path / "reports").exists() or not any((tmp_path / "reports").iterdir())


def test_predictions_of_other_labels_are_refused(stages, tmp_path):
    def relabel(path: Path) -> None:
        table = pd.read_parquet(path)
        table.loc[30, "label"] = (table.loc[30, "label"] + 1) % 10
        table.to_parquet(path, index=False)

    model, evaluation = stages.weak
    evaluation = republish(evaluation, tmp_path / "evaluation", PREDICTIONS_FILE, relabel)
    with pytest.raises(PipelineError, match=f"{PREDICTIONS_FILE}: labels do not match"):
        write_report(stages.validation, stages.processed, model, evaluation, tmp_path / "reports")


def test_summary_markdown_embeds_key_figures_and_escapes_text(report, inputs):
    metrics = metrics_of(inputs[3])
    text = summary_markdown(metrics, {name: report.path(name) for name in KEY_FIGURES}, report.path(REPORT_HTML))
    assert text.count("](data:image/png;base64,") == len(KEY_FIGURES)
    uri = "data:image/png;base64," + base64.b64encode(report.path(FIRST20_PNG).read_bytes()).decode()
    assert uri in text
    assert f"**{metrics['test_accuracy']:.4f} (" in text
    assert "predicted: " + " ".join(map(str, metrics["first_20_predictions"])) in text
    assert f"Full report: `{report.path(REPORT_HTML)}`" in text
    shown = permissive_html(text)
    assert "<script" not in shown.lower() and escaped(EVIL) in shown
    assert shown.count('<img src="data:image/png;base64,') == len(KEY_FIGURES)


def test_tables_are_plain_json_rows(stages):
    metrics = metrics_of(stages.weak[1])
    # Values computed upstream may arrive as numpy scalars; the tables must not pass them on.
    metrics["per_class"]["0"] = {k: np.float32(v) for k, v in metrics["per_class"]["0"].items()}
    metrics["confusion_matrix"][0] = list(np.asarray(metrics["confusion_matrix"][0], dtype=np.int64))
    rows, matrix = metrics_table(metrics), confusion_table(metrics)
    for table in (rows, matrix):
        assert json.loads(json.dumps(table)) == table
        assert all(type(v) in (int, float, str) for row in table for v in row.values())
    assert [r["class"] for r in rows] == list(range(10))
    assert [r["total"] for r in matrix] == [r["support"] for r in rows]
    assert sum(r[f"pred {r['true']}"] for r in matrix) == N_TEST - metrics["misclassified"]["count"]


def test_importing_the_package_loads_neither_tensorflow_nor_matplotlib():
    modules = ("tensorflow", "keras", "matplotlib")
    code = f"import sys, tasks.report; print(sorted(m for m in {modules!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_promotion_section_states_the_decision_against_the_champion(rejected_report, hostile_rejection, stages):
    d, before = hostile_rejection, hostile_rejection.champion_before
    markdown = rejected_report.path(REPORT_MD).read_text()
    assert markdown.index("\n## Headline\n") < markdown.index("\n## Model promotion\n") < markdown.index("\n## First 20")
    promotion = section(markdown, "Model promotion")
    assert promotion.startswith("\n**Not promoted** (test accuracy ")
    assert f"| this model | `{stages.weak[0].digest[:16]}` | {d.test_accuracy:.4f} | {d.test_loss:.4f} |" in promotion
    assert f"| champion before | `{stages.good[0].digest[:16]}` | {before.test_accuracy:.4f} |" in promotion
    assert (f"| difference |  | {d.test_accuracy - before.test_accuracy:+.4f} "
            f"| {d.test_loss - before.test_loss:+.4f} |") in promotion
    assert "at least 0.9700 and at most 0.0020 below" in promotion and "No champion before" not in promotion
    assert f"Both scored on the same images (data version {d.data_version['base'][:8]}). Rule:" in promotion

    page = rejected_report.path(REPORT_HTML).read_text()
    assert f"<h2>Model promotion</h2>\n<p><strong>Not promoted</strong> ({escaped(d.reason)}).</p>" in page
    assert (f'<td>champion before</td>\n<td><code>{stages.good[0].digest[:16]}</code></td>\n'
            f'<td style="text-align:right">{before.test_accuracy:.4f}</td>') in page
    assert page.count(escaped(EVIL)) == 3 and "<script" not in page.lower()
    assert "<script" not in permissive_html(markdown).lower()
    assert rejected_report.meta["promoted"] is False


def test_report_without_a_decision_has_no_promotion_section(report):
    assert "Model promotion" not in report.path(REPORT_MD).read_text()
    assert "Model promotion" not in report.path(REPORT_HTML).read_text()
    assert report.meta["promoted"] is None


def test_promotion_summary_of_a_first_model(stages, good_report):
    d = stages.promoted
    assert d.reason.startswith("first model: no champion yet")
    text = promotion_markdown(d)
    assert text.startswith("## Model promotion\n")
    assert f"<p><strong>Promoted</strong> ({escaped(d.reason)}).</p>" in permissive_html(text)
    assert f"| this model | `{stages.good[0].digest[:16]}` | 1.0000 | {d.test_loss:.4f} |" in text
    assert "champion before |" not in text and "No champion before." in text
    # The full report shows the same section.
    assert section(good_report.path(REPORT_MD).read_text(), "Model promotion").strip() in text
    assert good_report.meta["promoted"] is True


def test_task_publishes_the_report_tables_and_decision_as_prefect_artifacts(prefect_api_url, stages, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    model, evaluation = stages.weak
    dataset = DatasetConfig(name="Bars", class_names=BAR_NAMES)
    ref = report_results(stages.validation, stages.processed, model, evaluation, artifacts_dir=tmp_path / "artifacts",
                         decision=stages.rejected, dataset=dataset)
    # The UI artifacts are built from what the report recorded (a cached report is published again from its meta).
    assert (ref.meta["dataset"], ref.meta["class_names"]) == ("Bars", BAR_NAMES)
    assert ref.meta["promoted"] is False and ref.path(REPORT_HTML).is_relative_to(tmp_path / "artifacts" / "reports")
    metrics = metrics_of(evaluation)
    keys = ["mnist-report", "mnist-metrics", "mnist-confusion-matrix", PROMOTION_KEY]
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    by_key = {key: [a for a in found if a.key == key] for key in keys}

    summary = summary_markdown(metrics, {name: ref.path(name) for name in KEY_FIGURES}, ref.path(REPORT_HTML),
                               title="Bars", class_names=BAR_NAMES)
    assert "## Test results: Bars\n" in summary and "| bar 7 (7) |" in summary
    assert any(a.type == "markdown" and a.data == summary for a in by_key["mnist-report"])
    assert any(a.description == f"Bars: test accuracy {metrics['test_accuracy']:.4f}" for a in by_key["mnist-report"])
    table = [json.loads(a.data) for a in by_key["mnist-metrics"] if a.type == "table"]
    rows = metrics_table(metrics, BAR_NAMES)
    assert [r["name"] for r in rows] == BAR_NAMES and rows in table
    table = [json.loads(a.data) for a in by_key["mnist-confusion-matrix"] if a.type == "table"]
    rows = confusion_table(metrics, BAR_NAMES)
    assert [r["true"] for r in rows] == BAR_NAMES and "pred bar 9" in rows[0] and rows in table
    promotion = [a for a in by_key[PROMOTION_KEY] if a.data == promotion_markdown(stages.rejected)]
    assert promotion and promotion[-1].type == "markdown"
    assert promotion[-1].description == f"Not promoted: test accuracy {stages.rejected.test_accuracy:.4f}"


# --- What was run: the dataset's title and class names, the model's architecture, how training went, the source. ---

# User text in the names: HTML, a table pipe, Markdown emphasis, and mathtext that matplotlib would fail to parse.
SHAPES = ["circle", "$\\sq$uare", "<b>tri|angle</b>"]
SHAPES_TITLE = "Shapes <i>3</i> | *x*"
# The same as literal Markdown (backslash-escaped), as the report writes them.
SHAPES_MD = ["circle", "$\\\\sq$uare", r"\<b\>tri\|angle\</b\>"]
SHAPES_TITLE_MD = r"Shapes \<i\>3\</i\> \| \*x\*"
TINY_CNN = TrainConfig(model="cnn", epochs=1, batch_size=32, filters=4, dense_units=8)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Three named classes from a source nobody pinned, a tiny CNN trained on them, and its report."""
    root = tmp_path_factory.mktemp("shapes")
    validation, processed = data_chain(root, num_classes=3, pinned=False)
    model = fit_model(processed, root / "models", TINY_CNN, num_classes=3)
    evaluation = score_model(model, processed, root / "evaluations")
    dataset = DatasetConfig(name=SHAPES_TITLE, num_classes=3, class_names=SHAPES)
    inputs = (validation, processed, model, evaluation)
    return SimpleNamespace(root=root, inputs=inputs, dataset=dataset, metrics=metrics_of(evaluation),
                           report=write_report(*inputs, root / "reports", dataset=dataset))


def test_named_classes_and_title_in_the_markdown(shapes):
    markdown = shapes.report.path(REPORT_MD).read_text()
    m = shapes.metrics
    assert len(m["confusion_matrix"]) == 3 and m["misclassified"]["count"] > 0  # a weak model: a gallery to draw
    assert markdown.startswith(f"# Pipeline report: {SHAPES_TITLE_MD}\n")
    assert f"**Dataset:** {SHAPES_TITLE_MD}, 3 classes ({', '.join(SHAPES_MD)}); 200 training and 50 test images." in markdown

    evaluation = section(markdown, "Test-set evaluation")
    assert "| Label | Class | Precision | Recall | F1 | Support |" in evaluation
    for c, v in m["per_class"].items():
        assert f"| {c} | {SHAPES_MD[int(c)]} | {v['precision']:.4f} | {v['recall']:.4f} |" in evaluation
    assert f"| True ↓ predicted → | {' | '.join(SHAPES_MD)} | Total |" in evaluation
    for name, row in zip(SHAPES_MD, m["confusion_matrix"]):
        assert f"| **{name}** | {' | '.join(map(str, row))} | {sum(row)} |" in evaluation

    first = section(markdown, "First 20 test predictions")
    for i, (p, t) in enumerate(zip(m["first_20_predictions"], m["first_20_labels"])):
        correct = "yes" if p == t else "**no**"
        assert f"| {i} | {SHAPES_MD[p]} ({p}) | {SHAPES_MD[t]} ({t}) | {correct} |" in first

    data = section(markdown, "Data")
    counts = json.loads(shapes.inputs[0].path(VALIDATION_FILE).read_text())["splits"]
    for c, name in enumerate(SHAPES_MD):
        train, test = counts["train"]["class_counts"][str(c)], counts["test"]["class_counts"][str(c)]
        assert f"| {c} | {name} | {train} | {test} |" in data
    # Literal even for a renderer that passes raw HTML through.
    shown = permissive_html(markdown)
    assert "<b>" not in shown and "<i>" not in shown and "<em>x" not in shown and escaped(SHAPES[2]) in shown


def test_named_classes_and_title_are_escaped_in_html(shapes):
    page = shapes.report.path(REPORT_HTML).read_text()
    title = escaped(f"Pipeline report: {SHAPES_TITLE}")
    assert f"<title>{title}</title>" in page and f"<h1>{title}</h1>" in page
    assert "<b>" not in page and "<i>" not in page and "<em>x" not in page
    assert f'<th style="text-align:right">{escaped(SHAPES[2])}</th>' in page  # confusion matrix header
    assert f"<td>2</td>\n<td>{escaped(SHAPES[2])}</td>" in page  # per-class and per-image-count rows
    assert f"<td><strong>{escaped(SHAPES[1])}</strong></td>" in page  # confusion matrix row


def test_figures_show_the_class_names(shapes):
    m = shapes.metrics
    figures = draw_figures(load_context(*shapes.inputs, shapes.dataset))
    for name, fig in figures.items():  # drawn as plain text: mathtext could not parse "$\sq$"
        assert to_png(fig) == shapes.report.path(name).read_bytes()

    ax = figures[CONFUSION_PNG].axes[0]
    ticks = ["circle", "$\\sq$uare", "<b>tri|angle<…"]  # the long name cut
    assert [t.get_text() for t in ax.get_xticklabels()] == ticks == [t.get_text() for t in ax.get_yticklabels()]
    assert all(not t.get_parse_math() for t in ax.get_xticklabels())

    names = [short(n, 8) for n in SHAPES]
    assert names[2] == "<b>tri|…"
    captions = texts(figures[FIRST20_PNG].axes[0])
    assert captions == [f"pred {names[p]}\ntrue {names[t]}" for p, t in zip(m["first_20_predictions"], m["first_20_labels"])]

    wrong = predictions_of(shapes.inputs[3]).query("label != predicted").sort_values("index").head(30)
    names = [short(n, 11) for n in SHAPES]
    assert texts(figures[MISCLASSIFIED_PNG].axes[0]) == [
        f"true {names[t]}\npred {names[p]}\nconf {c:.2f}" for t, p, c in zip(wrong["label"], wrong["predicted"], wrong["confidence"])
    ]
    height, width, _ = imread(shapes.report.path(FIRST20_PNG)).shape
    assert width <= 2500 and width > 6 * height


def test_ui_payloads_name_the_classes(shapes):
    m = shapes.metrics
    rows = metrics_table(m, SHAPES)
    assert [(r["class"], r["name"]) for r in rows] == list(enumerate(SHAPES))
    assert [r["precision"] for r in rows] == [round(m["per_class"][str(c)]["precision"], 4) for c in range(3)]
    matrix = confusion_table(m, SHAPES)
    assert [(r["label"], r["true"]) for r in matrix] == list(enumerate(SHAPES))
    assert [[r[f"pred {name}"] for name in SHAPES] for r in matrix] == m["confusion_matrix"]
    for table in (rows, matrix):
        assert json.loads(json.dumps(table)) == table

    report = shapes.report
    text = summary_markdown(m, {name: report.path(name) for name in KEY_FIGURES}, title=SHAPES_TITLE, class_names=SHAPES)
    assert text.startswith(f"## Test results: {SHAPES_TITLE_MD}\n")
    p, t = m["first_20_predictions"][3], m["first_20_labels"][3]
    assert f"| 3 | {SHAPES_MD[p]} ({p}) | {SHAPES_MD[t]} ({t}) |" in text
    shown = permissive_html(text)
    assert "<b>" not in shown and "<i>" not in shown and escaped(SHAPES[2]) in shown
    # Without names, the labels.
    assert [r["name"] for r in metrics_table(m)] == ["0", "1", "2"]
    assert [r["true"] for r in confusion_table(m)] == ["0", "1", "2"] and "pred 2" in confusion_table(m)[0]
    with pytest.raises(PipelineError, match="expected 3 names"):
        metrics_table(m, ["a", "b"])


def test_model_section_lists_the_layers_keras_built(shapes):
    import keras

    model = shapes.inputs[2]
    net = keras.saving.load_model(model.path(MODEL_FILE), compile=False, safe_mode=True)
    count = net.count_params()
    layers = json.loads(model.path(CONFIG_FILE).read_text())["architecture"]["layers"]
    assert [layer["type"] for layer in layers] == [type(layer).__name__ for layer in net.layers]

    markdown = shapes.report.path(REPORT_MD).read_text()
    section_text = section(markdown, "Model")
    assert f"`cnn`: a Keras Sequential network of {len(net.layers)} layers, {count:,} parameters" in section_text
    assert "| Layer | Type | Output shape | Parameters |" in section_text
    for layer, built in zip(layers, net.layers):
        shape = ", ".join(str(d) for d in built.output.shape)
        assert f"| `{built.name}` | {type(built).__name__} | `({shape})` | {built.count_params():,} |" in section_text
        assert layer["name"] == built.name
    assert "| Conv2D |" in section_text and "| MaxPooling2D |" in section_text
    assert f"| **total** |  |  | **{count:,}** |" in section_text
    intro = markdown.split("\n## ", 1)[0]
    assert (f"**Model:** `cnn`, a Keras Sequential network of 9 layers and {count:,} parameters: Reshape (28 x 28 x 1) → "
            "Conv2D (26 x 26 x 4) → MaxPooling2D (13 x 13 x 4) → Conv2D (11 x 11 x 8) → ") in intro
    assert "Dense (8) → Dropout (8) → Dense (3)." in intro
    assert "**Build**: a Keras Sequential `cnn` network, Reshape (28 x 28 x 1) → " in markdown
    assert f"; {count:,} parameters." in section(markdown, "What the pipeline did")
    # The architecture has its own section, not JSON in the configuration table.
    assert "`architecture" not in section(markdown, "Training") and "| `filters` | `4` |" in markdown


def test_data_section_says_where_the_data_came_from_and_how_it_was_pinned(shapes, report, stages):
    for ref, root in ((shapes.report, shapes.root), (report, stages.root)):
        data = section(ref.path(REPORT_MD).read_text(), "Data")
        assert f"The raw files came from `{root / 'source'}`." in data
        source = json.loads((shapes.inputs[0] if ref is shapes.report else stages.validation).path(VALIDATION_FILE)
                            .read_text())["source"]
        assert len(source["payload_sha256"]) == 4
        for name, digest in source["payload_sha256"].items():
            assert f"| `{name}` | `{digest}` |" in data
    unpinned = section(shapes.report.path(REPORT_MD).read_text(), "Data")
    assert "**They were not pinned**: the source had no SHA256SUMS file and no digests were given" in unpinned
    pinned = section(report.path(REPORT_MD).read_text(), "Data")
    assert "pinned: each one's SHA-256 was checked against the SHA-256 digests given with --sha256 before use." in pinned
    assert "not pinned" not in pinned


def test_without_names_the_title_is_neutral_and_classes_are_labels(report, inputs, tmp_path):
    markdown = report.path(REPORT_MD).read_text()
    assert markdown.startswith("# Pipeline report: dataset\n")
    assert "**Dataset:** dataset, 10 classes (labels 0 to 9); 200 training and 50 test images." in markdown
    assert "| Class | Precision | Recall | F1 | Support |" in markdown and "| Label | Class |" not in markdown
    assert "| Test image | Predicted |" not in markdown  # the labels are the names: no second table of them
    assert "<title>Pipeline report: dataset</title>" in report.path(REPORT_HTML).read_text()
    assert (report.meta["dataset"], report.meta["class_names"]) == ("dataset", None)

    # MNIST's files get MNIST's title; a configured name wins over it.
    validation = republish(inputs[0], tmp_path / "mnist", VALIDATION_FILE, lambda path: write_json(
        path, {**(doc := json.loads(path.read_text())), "source": {**doc["source"], "mnist": True}}))
    mnist = write_report(validation, *inputs[1:], tmp_path / "reports")
    assert mnist.path(REPORT_MD).read_text().startswith("# Pipeline report: MNIST digits\n")
    named = write_report(validation, *inputs[1:], tmp_path / "named", dataset=DatasetConfig(name="Bars"))
    assert named.path(REPORT_MD).read_text().startswith("# Pipeline report: Bars\n")


def test_class_names_that_do_not_fit_the_data_are_refused(inputs, tmp_path):
    with pytest.raises(PipelineError, match="class_names: expected 10 names .* found 3"):
        write_report(*inputs, tmp_path / "reports", dataset=DatasetConfig(num_classes=3, class_names=["a", "b", "c"]))
    assert not (tmp_path / "reports").exists() or not any((tmp_path / "reports").iterdir())


@pytest.fixture(scope="module")
def early(tmp_path_factory):
    """A real early-stopped training, its evaluation and report.

    The validation rows (the last quarter of the training split) are labelled one class off, so the better the model
    learns the training rows, the worse its validation loss: it stops after its second epoch.
    """
    root = tmp_path_factory.mktemp("early")
    files = payloads()
    _, labels = make_split(200, 0)  # the training split of payloads()
    labels[150:] = (labels[150:] + 1) % 10
    files[NAMES["train"][1]] = idx_bytes(labels)
    validation, processed = data_chain(root, files)
    config = TrainConfig(epochs=8, hidden_units=32, batch_size=32, jit_compile=False, validation_split=0.25, patience=1)
    model = fit_model(processed, root / "models", config)
    evaluation = score_model(model, processed, root / "evaluations")
    report = write_report(validation, processed, model, evaluation, root / "reports")
    return SimpleNamespace(history=json.loads(model.path(HISTORY_FILE).read_text()), report=report,
                           inputs=(validation, processed, model, evaluation))


def test_early_stopping_is_reported_with_the_epoch_kept(early):
    h = early.history
    n, best = h["epochs_run"], h["best_epoch"]
    assert h["stopped_early"] and n < 8 and best == n - 1  # patience 1: the first epoch without improvement stops
    markdown = early.report.path(REPORT_MD).read_text()
    training = section(markdown, "Training")
    assert (f"Training stopped early, after {n} of 8 planned epochs: the validation loss had not improved for 1 epoch.\n"
            f"The model keeps the weights of epoch {best}, the one with the lowest validation loss, not those of the "
            f"last epoch ({n}).") in training
    rows = [line for line in training.splitlines() if re.match(r"\| (\*\*)?\d", line)]
    assert len(rows) == n
    assert [i + 1 for i, row in enumerate(rows) if "(kept)" in row] == [best]
    assert rows[best - 1].startswith(f"| **{best}** (kept) | {h['loss'][best - 1]:.4f} |")
    assert "resumed" not in training
    assert f"**Fit**: {n} of 8 planned epochs (stopped early), the weights of epoch {best} kept," in markdown

    fig = draw_figures(load_context(*early.inputs))[CURVES_PNG]
    for ax in fig.axes:
        kept = [line for line in ax.get_lines() if line.get_label() == f"kept (epoch {best})"]
        assert len(kept) == 1 and list(kept[0].get_xdata()) == [best, best]


class Interrupted(Exception):
    pass


def test_a_resumed_training_says_from_which_epoch(stages, tmp_path):
    def interrupt(done, _total, _logs):
        if done == 2:  # epoch 2 recorded, its backup not written: the training resumes from epoch 1
            raise Interrupted

    config, state = TrainConfig(epochs=3, hidden_units=32, batch_size=32, jit_compile=False), tmp_path / "state"
    with pytest.raises(Interrupted):
        fit_model(stages.processed, tmp_path / "models", config, progress=interrupt, state_dir=state)
    model = fit_model(stages.processed, tmp_path / "models", config, state_dir=state)
    history = json.loads(model.path(HISTORY_FILE).read_text())
    assert (model.meta["resumed_from_epoch"], history["epochs_run"], history["stopped_early"]) == (1, 3, False)
    evaluation = score_model(model, stages.processed, tmp_path / "evaluations")
    markdown = write_report(stages.validation, stages.processed, model, evaluation, tmp_path / "reports").path(REPORT_MD).read_text()
    training = section(markdown, "Training")
    assert ("Training ran all 3 planned epochs.\nThe model keeps the weights of the last epoch (3).\n"
            "It resumed an interrupted training from epoch 1: epoch 1 ran before the interruption and was restored "
            "from the backup.") in training
    assert f"Fitting took {model.meta['fit_seconds']:.1f} s for the 2 epochs after the resume of 7 steps each." in training
    assert "| **3** (kept) |" in training
    assert "**Fit**: 3 epochs, resumed from epoch 1, batch size 32," in markdown
