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
from synthetic import payloads, write_source

from tasks.core import MANIFEST, ArtifactRef, PipelineError, new_workdir, publish, write_json
from tasks.download import download_files
from tasks.evaluate import METRICS_FILE, PREDICTIONS_FILE, score_model
from tasks.preprocess import SPLIT_FILES, load_split, preprocess_files
from tasks.promote import PromotionConfig, decide_promotion
from tasks.report import REPORT_HTML, REPORT_MD, report_results, write_report
from tasks.report.context import load_context
from tasks.report.figures import (
    CONFUSION_PNG,
    CURVES_PNG,
    FIGURES,
    FIRST20_PNG,
    KEY_FIGURES,
    MISCLASSIFIED_PNG,
    WRONG,
    draw_figures,
    to_png,
)
from tasks.report.ui import PROMOTION_KEY, confusion_table, metrics_table, promotion_markdown, summary_markdown
from tasks.train import CONFIG_FILE, HISTORY_FILE, TrainConfig, fit_model
from tasks.validate import VALIDATION_FILE, ValidateConfig, validate_files

REPO = Path(__file__).resolve().parents[1]
N_TEST = 50
EVIL = '<script>alert("x")</script> & <b>bold</b>'
MARKUP = "*em* _u_ [link](http://x.test) | # h `tick`"  # Markdown metacharacters, a pipe and a backtick
# A model that learns the synthetic data perfectly (validation split on), and one that stays weak (no split).
GOOD = TrainConfig(epochs=2, hidden_units=32, batch_size=32, jit_compile=False, validation_split=0.1)
WEAK = TrainConfig(epochs=1, hidden_units=32, batch_size=32, jit_compile=False, learning_rate=0.0003)


def data_chain(root: Path, files=None):
    """Run download, validate and preprocess on synthetic IDX files; return (validation, processed)."""
    digests = write_source(root / "source", files)
    raw = download_files(str(root / "source"), root / "data" / "raw", expected_sha256=digests)
    validation = validate_files(raw, root / "validation", ValidateConfig(train_count=200, test_count=50))
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
    promoted = decide_promotion(*runs["good"], root / "registry", PromotionConfig(), run_id="run-1")
    rejected = decide_promotion(*runs["weak"], root / "registry", PromotionConfig(), run_id="run-2")
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


def test_meta_holds_headline_numbers_and_final_paths(report, inputs):
    metrics = metrics_of(inputs[3])
    assert report.meta["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert report.meta["misclassified"] == metrics["misclassified"]["count"] > 0
    assert report.meta["overfitting"] == metrics["overfitting"]
    assert Path(report.meta["report_md"]) == report.path(REPORT_MD)
    assert Path(report.meta["report_html"]) == report.path(REPORT_HTML) and report.path(REPORT_HTML).is_file()


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
    for i in range(2):
        assert (f"| {i + 1} | {history['loss'][i]:.4f} | {history['accuracy'][i]:.4f} | {history['val_loss'][i]:.4f} "
                f"| {history['val_accuracy'][i]:.4f} | {history['epoch_seconds'][i]:.1f} |") in training
    assert f"Fitting took {history['fit_seconds']:.1f} s for 2 epochs of 6 steps each." in training  # ceil(180 / 32)


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
    assert '`Sequential([Dense(32, activation="relu"), Dense(10, activation="softmax")])`' in summary
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
        f"true {t}, pred {p}\nconf {c:.2f}" for t, p, c in zip(shown["label"], shown["predicted"], shown["confidence"])
    ]
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
    assert text.startswith("## MNIST model promotion\n")
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
    ref = report_results(stages.validation, stages.processed, model, evaluation, tmp_path / "artifacts",
                         decision=stages.rejected)
    assert ref.meta["promoted"] is False and ref.path(REPORT_HTML).is_relative_to(tmp_path / "artifacts" / "reports")
    metrics = metrics_of(evaluation)
    keys = ["mnist-report", "mnist-metrics", "mnist-confusion-matrix", PROMOTION_KEY]
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    by_key = {key: [a for a in found if a.key == key] for key in keys}

    summary = summary_markdown(metrics, {name: ref.path(name) for name in KEY_FIGURES}, ref.path(REPORT_HTML))
    assert any(a.type == "markdown" and a.data == summary for a in by_key["mnist-report"])
    assert any(a.description == f"MNIST test accuracy {metrics['test_accuracy']:.4f}" for a in by_key["mnist-report"])
    table = [a for a in by_key["mnist-metrics"] if a.type == "table"]
    assert any(json.loads(a.data) == metrics_table(metrics) for a in table)
    table = [a for a in by_key["mnist-confusion-matrix"] if a.type == "table"]
    assert any(json.loads(a.data) == confusion_table(metrics) for a in table)
    promotion = [a for a in by_key[PROMOTION_KEY] if a.data == promotion_markdown(stages.rejected)]
    assert promotion and promotion[-1].type == "markdown"
    assert promotion[-1].description == f"Not promoted: test accuracy {stages.rejected.test_accuracy:.4f}"
