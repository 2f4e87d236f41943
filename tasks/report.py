"""Report stage: turn validation, training and evaluation artifacts into a Markdown and HTML report with figures."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.core import ArtifactRef, PipelineError, publish, workdir
from tasks.preprocess import load_split

MODULES = ("tasks.core", "tasks.preprocess", "tasks.report")

# Names of the input files, as the upstream stages write them.
VALIDATION_JSON = "validation.json"
TEST_PARQUET = "test.parquet"
HISTORY_JSON = "history.json"
CONFIG_JSON = "config.json"
METRICS_JSON = "metrics.json"
PREDICTIONS_PARQUET = "predictions.parquet"

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
FIRST20_PNG = "first20.png"
CURVES_PNG = "training_curves.png"
CONFUSION_PNG = "confusion_matrix.png"
MISCLASSIFIED_PNG = "misclassified.png"
FIGURES = {
    FIRST20_PNG: "The first 20 test digits, titled with predicted and true label (wrong ones in red)",
    CURVES_PNG: "Loss and accuracy per training epoch",
    CONFUSION_PNG: "Confusion matrix of the test set (rows: true label, columns: predicted label)",
    MISCLASSIFIED_PNG: "Misclassified test digits with true label, predicted label and confidence",
}
# The figures worth the space in the Prefect UI; the full report has all of them.
KEY_FIGURES = (FIRST20_PNG, CURVES_PNG, CONFUSION_PNG)
PROMOTION_KEY = "mnist-promotion"

NUM_CLASSES = 10
DPI = 120
GALLERY_MAX = 30
GALLERY_COLUMNS = 10
WRONG = "#c62828"


# ---------------------------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class ReportInputs:
    """Everything the report shows, read from the input artifacts."""

    validation: dict
    history: dict
    config: dict
    metrics: dict
    test_images: np.ndarray  # (n, 784) float32 in [0, 1]
    test_labels: np.ndarray
    predictions: dict[str, np.ndarray]  # columns of predictions.parquet
    digests: dict[str, str]


def read_inputs(validation: ArtifactRef, processed: ArtifactRef, model: ArtifactRef, evaluation: ArtifactRef) -> ReportInputs:
    """Read the report's inputs from the upstream artifacts and check that they describe the same test set."""
    images, labels = load_split(processed.path(TEST_PARQUET))
    table = pq.read_table(evaluation.path(PREDICTIONS_PARQUET), columns=["index", "label", "predicted", "confidence"])
    inputs = ReportInputs(
        validation=_read_json(validation.path(VALIDATION_JSON)),
        history=_read_json(model.path(HISTORY_JSON)),
        config=_read_json(model.path(CONFIG_JSON)),
        metrics=_read_json(evaluation.path(METRICS_JSON)),
        test_images=images,
        test_labels=labels,
        predictions={name: table.column(name).to_numpy() for name in table.column_names},
        digests={
            "validation": validation.digest,
            "processed": processed.digest,
            "model": model.digest,
            "evaluation": evaluation.digest,
        },
    )
    _check_consistent(inputs, evaluation.path(METRICS_JSON), processed.path(TEST_PARQUET))
    return inputs


def _read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def _check_consistent(inputs: ReportInputs, metrics_path: Path, test_path: Path) -> None:
    # The figures pair images from the processed split with labels from the evaluation: a mix-up of artifacts would
    # draw digits under the wrong labels without any error, so refuse it here.
    labels = inputs.test_labels
    first = [int(v) for v in inputs.metrics["first_20_labels"]]
    if first != [int(v) for v in labels[:20]]:
        raise PipelineError(
            f"{metrics_path}: first_20_labels {first} do not match the labels of {test_path} "
            f"{[int(v) for v in labels[:20]]}; the evaluation was made on other data"
        )
    index, label = inputs.predictions["index"], inputs.predictions["label"]
    if len(index) and (index.max() >= len(labels) or not np.array_equal(labels[index], label)):
        raise PipelineError(f"{metrics_path.parent / PREDICTIONS_PARQUET}: labels do not match {test_path}")


# ---------------------------------------------------------------------------------------------------------------------
# The document: one list of blocks rendered to Markdown and to HTML, so the two never drift apart.


@dataclass(frozen=True)
class Code:
    """Inline monospace text (identifiers, digests)."""

    text: str


@dataclass(frozen=True)
class Strong:
    """Inline emphasised text."""

    text: str


Inline = str | Code | Strong
Line = tuple[Inline, ...]


@dataclass(frozen=True)
class Heading:
    """A section title (level 1 to 3)."""

    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    """A paragraph of inline pieces."""

    parts: Line


@dataclass(frozen=True)
class Items:
    """A bulleted or numbered list; each item a line of inline pieces."""

    items: tuple[Line, ...]
    ordered: bool = False


@dataclass(frozen=True)
class Table:
    """A table of cells; numeric columns are right-aligned."""

    header: tuple[str, ...]
    rows: tuple[tuple[Inline, ...], ...]
    numeric: tuple[bool, ...]  # right-aligned columns


@dataclass(frozen=True)
class Preformatted:
    """Monospace text kept as is (aligned columns)."""

    text: str


@dataclass(frozen=True)
class Image:
    """A figure by file name, with its caption (also the alt text)."""

    name: str
    caption: str


Block = Heading | Paragraph | Items | Table | Preformatted | Image


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]], numeric: Iterable[bool]) -> Table:
    cells = tuple(tuple(c if isinstance(c, (Code, Strong)) else str(c) for c in row) for row in rows)
    return Table(tuple(header), cells, tuple(numeric))


def _f4(value: Any) -> str:
    return f"{float(value):.4f}"


def _pct(value: Any) -> str:
    return f"{100 * float(value):.2f}%"


def _digits(values: Iterable[Any]) -> str:
    return " ".join(str(int(v)) for v in values)


def headline_blocks(metrics: dict) -> list[Block]:
    """Return the headline: test and train accuracy and loss, their gap and the overfitting remark."""
    m = metrics
    rows = [
        ("Test accuracy", Strong(f"{_f4(m['test_accuracy'])} ({_pct(m['test_accuracy'])})")),
        ("Test loss", _f4(m["test_loss"])),
        ("Train accuracy", f"{_f4(m['train_accuracy'])} ({_pct(m['train_accuracy'])})"),
        ("Train loss", _f4(m["train_loss"])),
        ("Accuracy gap (train - test)", f"{_f4(m['accuracy_gap'])} ({100 * float(m['accuracy_gap']):+.2f} points)"),
        ("Test images", str(int(m["num_test"]))),
        ("Misclassified", str(int(m["misclassified"]["count"]))),
    ]
    return [
        _table(("Metric", "Value"), rows, (False, True)),
        Paragraph((Strong("Overfitting:"), " " + str(m["overfitting"]))),
    ]


def promotion_blocks(decision: dict) -> list[Block]:
    """Return the promotion decision: the verdict with its reason, and the model against the champion before it."""
    d, before = decision, decision.get("champion_before")
    verdict = "Promoted" if d["promoted"] else "Not promoted"
    rows = [("this model", Code(str(d["model_digest"])[:16]), _f4(d["test_accuracy"]), _f4(d["test_loss"]))]
    if before:
        rows.append(("champion before", Code(str(before["model_digest"])[:16]), _f4(before["test_accuracy"]),
                     _f4(before["test_loss"])))
        rows.append(("difference", "", f"{float(d['test_accuracy']) - float(before['test_accuracy']):+.4f}",
                     f"{float(d['test_loss']) - float(before['test_loss']):+.4f}"))
    rule = (f"Rule: promoted if the test accuracy is at least {_f4(d['gate'])} and at most {_f4(d['tolerance'])} "
            "below the champion's.")
    return [
        Paragraph((Strong(verdict), f" ({d['reason']}).")),
        _table(("Model", "Digest", "Test accuracy", "Test loss"), rows, (False, False, True, True)),
        Paragraph(((rule if before else "No champion before. " + rule),)),
    ]


def promotion_markdown(decision: dict) -> str:
    """Return the promotion decision as a short Markdown document for the Prefect UI."""
    return render_markdown([Heading(2, "MNIST model promotion"), *promotion_blocks(decision)], image_src=str)


def first20_blocks(metrics: dict) -> list[Block]:
    """Return the first 20 test predictions next to their true labels, as in the tutorial."""
    predicted = [int(v) for v in metrics["first_20_predictions"]]
    labels = [int(v) for v in metrics["first_20_labels"]]
    marks = " ".join("^" if p != t else " " for p, t in zip(predicted, labels)).rstrip()
    text = f"predicted: {_digits(predicted)}\ntrue:      {_digits(labels)}"
    if marks:
        text += f"\nwrong:     {marks}"
    correct = sum(p == t for p, t in zip(predicted, labels))
    return [
        Preformatted(text),
        Paragraph((f"{correct} of {len(labels)} correct.",)),
    ]


def build_document(inputs: ReportInputs, decision: dict | None = None) -> list[Block]:
    """Return the report as blocks: headline, promotion, predictions, evaluation, training, data, pipeline steps."""
    m = inputs.metrics
    promotion = [Heading(2, "Model promotion"), *promotion_blocks(decision)] if decision is not None else []
    return [
        Heading(1, "MNIST pipeline report"),
        Paragraph((f"{_model_text(inputs.config)} trained on the MNIST handwritten digits and evaluated on the "
                   f"{int(m['num_test'])} test images. Every number below is read from the pipeline's artifacts.",)),
        Heading(2, "Headline"),
        *headline_blocks(m),
        *promotion,
        Heading(2, "First 20 test predictions"),
        *first20_blocks(m),
        Image(FIRST20_PNG, FIGURES[FIRST20_PNG]),
        *_evaluation_blocks(inputs),
        *_training_blocks(inputs),
        *_data_blocks(inputs),
        *_pipeline_blocks(inputs),
    ]


def _evaluation_blocks(inputs: ReportInputs) -> list[Block]:
    m = inputs.metrics
    per_class = metrics_table(m)
    rows = [(r["class"], _f4(r["precision"]), _f4(r["recall"]), _f4(r["f1"]), r["support"]) for r in per_class]
    if per_class:
        mean = {k: sum(r[k] for r in per_class) / len(per_class) for k in ("precision", "recall", "f1")}
        rows.append((Strong("macro average"), _f4(mean["precision"]), _f4(mean["recall"]), _f4(mean["f1"]),
                     sum(r["support"] for r in per_class)))
    count = int(m["misclassified"]["count"])
    shown = min(count, GALLERY_MAX)
    return [
        Heading(2, "Test-set evaluation"),
        Image(CONFUSION_PNG, FIGURES[CONFUSION_PNG]),
        Heading(3, "Per-class precision and recall"),
        _table(("Class", "Precision", "Recall", "F1", "Support"), rows, (False, True, True, True, True)),
        Heading(3, "Misclassified digits"),
        Paragraph((f"{count} of {int(m['num_test'])} test images are misclassified"
                   + (f"; the first {shown} by test index are shown." if count else "."),)),
        Image(MISCLASSIFIED_PNG, FIGURES[MISCLASSIFIED_PNG]),
    ]


def _training_blocks(inputs: ReportInputs) -> list[Block]:
    h = inputs.history
    has_val = bool(h.get("val_loss"))
    header = ["Epoch", "Loss", "Accuracy"] + (["Val loss", "Val accuracy"] if has_val else []) + ["Seconds"]
    seconds = h.get("epoch_seconds", [])
    rows = []
    for i, loss in enumerate(h["loss"]):
        row = [i + 1, _f4(loss), _f4(h["accuracy"][i])]
        if has_val:
            row += [_f4(h["val_loss"][i]), _f4(h["val_accuracy"][i])]
        row.append(f"{float(seconds[i]):.1f}" if i < len(seconds) else "")
        rows.append(row)
    config_rows = [(Code(key), value) for key, value in _flatten(inputs.config)]
    fit = f"Fitting took {float(h['fit_seconds']):.1f} s for {len(h['loss'])} epochs" if "fit_seconds" in h else ""
    steps = _steps_per_epoch(inputs)
    if fit and steps:
        fit += f" of {steps} steps each"
    return [
        Heading(2, "Training"),
        Image(CURVES_PNG, FIGURES[CURVES_PNG]),
        *([Paragraph((fit + ".",))] if fit else []),
        _table(header, rows, [False] + [True] * (len(header) - 1)),
        Heading(3, "Configuration"),
        _table(("Parameter", "Value"), config_rows, (False, False)),
    ]


def _data_blocks(inputs: ReportInputs) -> list[Block]:
    v = inputs.validation
    splits = _ordered_splits(v)
    checks = v.get("checks", [])
    split_rows = [
        (name, s["count"], " x ".join(str(d) for d in s["shape"]), Code(str(s["dtype"])),
         f"{s['label_range'][0]}..{s['label_range'][1]}", f"{float(s['pixel_mean']):.4f}", f"{float(s['pixel_std']):.4f}")
        for name, s in splits.items()
    ]
    names = list(splits)
    classes = sorted({c for s in splits.values() for c in s["class_counts"]}, key=lambda c: (len(c), c))
    count_rows = [[c] + [splits[n]["class_counts"].get(c, 0) for n in names] for c in classes]
    count_rows.append([Strong("total")] + [sum(splits[n]["class_counts"].values()) for n in names])
    status = "passed" if v.get("passed") else "did not pass"
    return [
        Heading(2, "Data"),
        Paragraph((f"Validation of the raw IDX files {status}: {sum(bool(c.get('passed')) for c in checks)} of "
                   f"{len(checks)} checks passed (raw data digest ", Code(str(v.get("raw_digest", ""))), ")."),),
        _table(("Split", "Images", "Shape", "Dtype", "Labels", "Pixel mean", "Pixel std"), split_rows,
               (False, True, False, False, False, True, True)),
        Paragraph(("Pixel statistics are of the raw uint8 values (0..255).",)),
        Heading(3, "Images per class"),
        _table(["Class"] + names, count_rows, [False] + [True] * len(names)),
    ]


def _pipeline_blocks(inputs: ReportInputs) -> list[Block]:
    m, c, h = inputs.metrics, inputs.config, inputs.history
    splits = _ordered_splits(inputs.validation)
    shapes = ", ".join(f"{name} {tuple(s['shape'])} {s['dtype']}" for name, s in splits.items())
    lr = f" (learning rate {c['learning_rate']})" if "learning_rate" in c else ""
    metric_names = c.get("metrics", ["accuracy"])
    metric_names = [metric_names] if isinstance(metric_names, str) else metric_names
    fit = [f"{len(h['loss'])} epochs"]
    if "batch_size" in c:
        fit.append(f"batch size {c['batch_size']}")
    if _steps_per_epoch(inputs):
        fit.append(f"{_steps_per_epoch(inputs)} steps per epoch")
    if c.get("validation_split"):
        fit.append(f"{100 * float(c['validation_split']):g}% of the training images held out for validation")
    if "fit_seconds" in h:
        fit.append(f"{float(h['fit_seconds']):.1f} s")
    steps: list[Line] = [
        (Strong("Load"), f": read the MNIST IDX files and validated them ({shapes}; labels 0..9)."),
        (Strong("Build"), ": ", Code(_model_code(c)), "."),
        (Strong("Compile"), ": optimizer ", Code(str(c.get("optimizer", "adam"))), lr, ", loss ",
         Code(str(c.get("loss", "sparse_categorical_crossentropy"))), ", metric ",
         Code(", ".join(str(x) for x in metric_names)), "."),
        (Strong("Preprocess"), ": flattened each image to 784 values and scaled them to float32 between 0 and 1 (x / 255)."),
        (Strong("Fit"), ": " + ", ".join(fit) + "."),
        (Strong("Predict"), f": the first 20 test images are predicted as {_digits(m['first_20_predictions'])}."),
        (Strong("Evaluate"), f": test accuracy {_f4(m['test_accuracy'])}, test loss {_f4(m['test_loss'])} on "
         f"{int(m['num_test'])} images; train accuracy {_f4(m['train_accuracy'])}, a gap of {_f4(m['accuracy_gap'])}."),
    ]
    digest_rows = [(name, Code(d)) for name, d in inputs.digests.items()]
    for key, label in (("raw_digest", "raw data"),):
        if key in inputs.validation:
            digest_rows.append((label, Code(str(inputs.validation[key]))))
    for key in ("model_digest", "data_digest"):
        if key in m:
            digest_rows.append((f"evaluation {key.replace('_', ' ')}", Code(str(m[key]))))
    return [
        Heading(2, "What the pipeline did"),
        Items(tuple(steps), ordered=True),
        Heading(3, "Input digests"),
        _table(("Input", "Digest"), digest_rows, (False, False)),
    ]


def _ordered_splits(validation: dict) -> dict[str, dict]:
    # validation.json is written with sorted keys; the report reads better train first, as in the tutorial.
    splits = validation.get("splits", {})
    return {name: splits[name] for name in sorted(splits, key=lambda s: (s != "train", s != "test", s))}


def _hidden_layers(config: dict) -> list[Any]:
    units = config.get("hidden_units", 512)
    return list(units) if isinstance(units, (list, tuple)) else [units]


def _model_text(config: dict) -> str:
    layers = " and ".join(f"{u}" for u in _hidden_layers(config))
    return f"A dense network ({layers} ReLU units, then 10 softmax outputs)"


def _model_code(config: dict) -> str:
    hidden = ", ".join(f'Dense({u}, activation="relu")' for u in _hidden_layers(config))
    return f'Sequential([{hidden}, Dense(10, activation="softmax")])'


def _steps_per_epoch(inputs: ReportInputs) -> int | None:
    batch = inputs.config.get("batch_size")
    count = inputs.config.get("train_rows") or inputs.validation.get("splits", {}).get("train", {}).get("count")
    if not batch or not count:
        return None
    # Keras keeps ceil(n * (1 - validation_split)) samples for fitting.
    fitted = math.ceil(count * (1 - float(inputs.config.get("validation_split") or 0)))
    return math.ceil(fitted / int(batch))


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        out = []
        for key, item in value.items():
            out += _flatten(item, f"{prefix}.{key}" if prefix else str(key))
        return out
    return [(prefix, value if isinstance(value, str) else json.dumps(value))]


# ---------------------------------------------------------------------------------------------------------------------
# Rendering

ImageSource = Callable[[str], str]

# Characters that Markdown or inline HTML would interpret; a backslash makes each literal (CommonMark).
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>&|~#!])")


# An underscore inside a word never starts emphasis (CommonMark), so snake_case stays readable unescaped.
_MD_INTRAWORD_UNDERSCORE = re.compile(r"(?<=[0-9A-Za-z])\\_(?=[0-9A-Za-z])")


def md_escape(text: str) -> str:
    """Return `text` as literal Markdown: special characters backslash-escaped, line breaks folded."""
    escaped = _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).splitlines()))
    return _MD_INTRAWORD_UNDERSCORE.sub("_", escaped)


def _md_code(text: str, in_table: bool) -> str:
    text = " ".join(str(text).splitlines())
    fence = "`" * (max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    if in_table:
        # A pipe ends a table cell even inside a code span (GFM), so it is escaped there too.
        text = text.replace("|", "\\|")
    return f"{fence}{pad}{text}{pad}{fence}"


def _md_inline(part: Inline, in_table: bool = False) -> str:
    if isinstance(part, Code):
        return _md_code(part.text, in_table)
    if isinstance(part, Strong):
        return f"**{md_escape(part.text)}**"
    return md_escape(part)


def _md_line(parts: Line) -> str:
    return "".join(_md_inline(p) for p in parts)


def render_markdown(blocks: list[Block], image_src: ImageSource) -> str:
    """Render blocks as Markdown; `image_src` maps a figure file name to the link written for it."""
    out = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {md_escape(block.text)}")
        elif isinstance(block, Paragraph):
            out.append(_md_line(block.parts))
        elif isinstance(block, Items):
            marks = [f"{i}." if block.ordered else "-" for i in range(1, len(block.items) + 1)]
            out.append("\n".join(f"{mark} {_md_line(item)}" for mark, item in zip(marks, block.items)))
        elif isinstance(block, Table):
            align = ["---:" if n else "---" for n in block.numeric]
            lines = ["| " + " | ".join(md_escape(h) for h in block.header) + " |", "| " + " | ".join(align) + " |"]
            lines += ["| " + " | ".join(_md_inline(c, in_table=True) for c in row) + " |" for row in block.rows]
            out.append("\n".join(lines))
        elif isinstance(block, Preformatted):
            fence = "`" * max(3, max((len(r) for r in re.findall(r"`+", block.text)), default=0) + 1)
            out.append(f"{fence}text\n{block.text}\n{fence}")
        elif isinstance(block, Image):
            out.append(f"![{md_escape(block.caption)}]({image_src(block.name)})")
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #1f2328;
       max-width: 1100px; margin: 2rem auto; padding: 0 1.25rem; line-height: 1.5; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3rem; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; margin-top: 2.2rem; }
table { border-collapse: collapse; margin: .8rem 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d7de; padding: .25rem .7rem; text-align: left; vertical-align: top; overflow-wrap: anywhere; }
th { background: #f6f8fa; }
td.num, th.num { text-align: right; }
tbody tr:nth-child(even) { background: #fafbfc; }
.scroll { overflow-x: auto; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .9em; }
code { background: #f6f8fa; padding: .1em .3em; border-radius: 4px; word-break: break-all; }
pre { background: #f6f8fa; padding: .8rem 1rem; border-radius: 6px; overflow-x: auto; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption { color: #57606a; font-size: .9em; margin-top: .3rem; }
"""


def _html_inline(part: Inline) -> str:
    if isinstance(part, Code):
        return f"<code>{html.escape(part.text)}</code>"
    if isinstance(part, Strong):
        return f"<strong>{html.escape(part.text)}</strong>"
    return html.escape(part)


def _html_line(parts: Line) -> str:
    return "".join(_html_inline(p) for p in parts)


def render_html(blocks: list[Block], image_src: ImageSource, title: str = "MNIST pipeline report") -> str:
    """Render blocks as one self-contained HTML page; `image_src` maps a figure file name to its (data) URL."""
    body = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            body.append(f"<p>{_html_line(block.parts)}</p>")
        elif isinstance(block, Items):
            tag = "ol" if block.ordered else "ul"
            body.append(f"<{tag}>" + "".join(f"<li>{_html_line(item)}</li>" for item in block.items) + f"</{tag}>")
        elif isinstance(block, Table):
            cls = [' class="num"' if n else "" for n in block.numeric]
            head = "".join(f"<th{c}>{html.escape(h)}</th>" for c, h in zip(cls, block.header))
            rows = "".join(
                "<tr>" + "".join(f"<td{c}>{_html_inline(v)}</td>" for c, v in zip(cls, row)) + "</tr>" for row in block.rows
            )
            body.append(f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>')
        elif isinstance(block, Preformatted):
            body.append(f"<pre>{html.escape(block.text)}</pre>")
        elif isinstance(block, Image):
            caption = html.escape(block.caption)
            body.append(f'<figure><img src="{html.escape(image_src(block.name))}" alt="{caption}">'
                        f"<figcaption>{caption}</figcaption></figure>")
    # The policy forbids scripts and any fetch except the embedded images: the page stays inert and self-contained
    # even if a value slipped through unescaped.
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta http-equiv=\"Content-Security-Policy\"\n"
        "      content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def data_uri(png: bytes) -> str:
    """Return a PNG as a base64 data URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ---------------------------------------------------------------------------------------------------------------------
# Figures (matplotlib is imported here only, so importing the module stays cheap and touches no global pyplot state)


def _figure(width: float, height: float, layout: str | None = "constrained") -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any, tight: bool = True) -> bytes:
    buffer = io.BytesIO()
    # A tight bounding box costs one more drawing pass; figures laid out by hand do without it.
    extra = {"bbox_inches": "tight", "pad_inches": 0.08} if tight else {}
    fig.savefig(buffer, format="png", dpi=DPI, facecolor="white", **extra)
    return buffer.getvalue()


def _digit_grid(
    images: np.ndarray, captions: list[str], wrong: list[bool], *, columns: int, cell_width: float, fontsize: float, title: str
) -> bytes:
    """Draw digits in a grid, each under a two-line caption, framed in red when `wrong`, with a title on top.

    The digits are pasted into one image shown by a single Axes: a matplotlib Axes per digit made these figures
    take most of the report's time.
    """
    from matplotlib.patches import Rectangle

    n = len(images)
    rows = math.ceil(n / columns)
    scale = 0.5 / 28  # inches per pixel: a digit is half an inch tall
    cell_w, caption, gap = round(cell_width / scale), 24, 6  # in pixels
    cell_h = 28 + caption + gap
    canvas = np.zeros((rows * cell_h, columns * cell_w), dtype=np.float32)
    corners = []
    for k, pixels in enumerate(images):
        row, column = divmod(k, columns)
        y, x = row * cell_h + caption, column * cell_w + (cell_w - 28) // 2
        canvas[y : y + 28, x : x + 28] = pixels.reshape(28, 28)
        corners.append((x, y))
    title_h = 0.4
    width, height = canvas.shape[1] * scale, canvas.shape[0] * scale
    fig = _figure(width, height + title_h, layout=None)
    ax = fig.add_axes((0, 0, 1, height / (height + title_h)))
    ax.imshow(canvas, cmap="binary", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    for (x, y), text, bad in zip(corners, captions, wrong):
        ax.text(x + 13.5, y - 3, text, ha="center", va="bottom", fontsize=fontsize, linespacing=1.1,
                color=WRONG if bad else "#1f2328", fontweight="bold" if bad else "normal")
        if bad:
            ax.add_patch(Rectangle((x - 1.5, y - 1.5), 30, 30, fill=False, edgecolor=WRONG, linewidth=2.0))
    fig.text(0.5, 1 - 0.5 * title_h / (height + title_h), title, ha="center", va="center", fontsize=11)
    return _png(fig, tight=False)


def plot_first20(images: np.ndarray, predicted: list[int], labels: list[int]) -> bytes:
    """Draw the first test digits in one row, each titled with predicted and true label; wrong ones in red."""
    n = len(predicted)
    return _digit_grid(
        images[:n], [f"pred {p}\ntrue {t}" for p, t in zip(predicted, labels)], [p != t for p, t in zip(predicted, labels)],
        columns=n, cell_width=0.66, fontsize=9, title=f"First {n} test digits: predicted vs true label",
    )


def plot_training_curves(history: dict) -> bytes:
    """Draw loss and accuracy per epoch, for training and (when present) validation data."""
    from matplotlib.ticker import MaxNLocator

    epochs = np.arange(1, len(history["loss"]) + 1)
    fig = _figure(10, 3.8)
    for ax, key, title in zip(fig.subplots(1, 2), ("loss", "accuracy"), ("Loss", "Accuracy")):
        ax.plot(epochs, history[key], marker="o", color="#1f77b4", label="train")
        if history.get(f"val_{key}"):
            ax.plot(epochs, history[f"val_{key}"], marker="s", linestyle="--", color="#ff7f0e", label="validation")
        ax.set_title(title, fontsize=12)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        if len(epochs) <= 20:
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(0.7, len(epochs) + 0.3)
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
    return _png(fig)


def plot_confusion_matrix(matrix: list[list[int]]) -> bytes:
    """Draw the confusion matrix as a heatmap with the count in every cell."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap, LogNorm

    counts = np.asarray(matrix, dtype=np.int64)
    k = counts.shape[0]
    fig = _figure(6.6, 5.6)
    ax = fig.subplots()
    # A log scale: the diagonal is a hundred times the errors, and on a linear scale every error would look empty.
    # The palette starts above white so that a single error stands out from the empty (white) cells.
    vmax = max(int(counts.max()), 2)
    cmap = ListedColormap(colormaps["Blues"](np.linspace(0.15, 1.0, 256))).with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_equal(counts, 0), cmap=cmap, norm=LogNorm(vmin=1, vmax=vmax))
    dark = np.log(np.maximum(counts, 1)) > 0.5 * np.log(vmax)
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center", fontsize=8 if n < 1000 else 7,
                color="white" if dark[i, j] else ("#b0b7bf" if n == 0 else "#1f2328"))
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(f"Confusion matrix ({int(counts.sum())} test images)", fontsize=12)
    bar = fig.colorbar(image, ax=ax, shrink=0.85, label="images (log scale)")
    steps = (1,) if vmax >= 100 else (1, 2, 5)
    ticks = [m * 10**e for e in range(len(str(vmax))) for m in steps if m * 10**e <= vmax]
    bar.set_ticks(ticks, labels=[str(t) for t in ticks])
    bar.minorticks_off()
    return _png(fig)


def plot_misclassified(
    images: np.ndarray, labels: list[int], predicted: list[int], confidence: list[float], total: int
) -> bytes:
    """Draw a grid of misclassified digits with true label, prediction and confidence (or say there are none)."""
    n = len(labels)
    if n == 0:
        fig = _figure(6, 1.4)
        fig.text(0.5, 0.5, "No misclassified test digits", ha="center", va="center", fontsize=14, color="#2e7d32")
        return _png(fig)
    if total > n:
        title = f"Misclassified test digits: first {n} of {total}, by test index"
    else:
        title = f"All {n} misclassified test digits"
    captions = [f"true {t}, pred {p}\nconf {c:.2f}" for t, p, c in zip(labels, predicted, confidence)]
    return _digit_grid(images, captions, [True] * n, columns=min(GALLERY_COLUMNS, n), cell_width=1.15, fontsize=8, title=title)


def draw_figures(inputs: ReportInputs) -> dict[str, bytes]:
    """Return the PNG bytes of every figure, by file name."""
    m, p = inputs.metrics, inputs.predictions
    first = [int(v) for v in m["first_20_predictions"]]
    wrong = np.flatnonzero(p["label"] != p["predicted"])
    wrong = wrong[np.argsort(p["index"][wrong], kind="stable")][:GALLERY_MAX]
    index = p["index"][wrong].astype(np.int64)
    return {
        FIRST20_PNG: plot_first20(inputs.test_images[: len(first)], first, [int(v) for v in m["first_20_labels"]]),
        CURVES_PNG: plot_training_curves(inputs.history),
        CONFUSION_PNG: plot_confusion_matrix(m["confusion_matrix"]),
        MISCLASSIFIED_PNG: plot_misclassified(
            inputs.test_images[index],
            [int(v) for v in p["label"][wrong]],
            [int(v) for v in p["predicted"][wrong]],
            [float(v) for v in p["confidence"][wrong]],
            int(m["misclassified"]["count"]),
        ),
    }


# ---------------------------------------------------------------------------------------------------------------------
# The stage


def write_report(
    validation: ArtifactRef,
    processed: ArtifactRef,
    model: ArtifactRef,
    evaluation: ArtifactRef,
    out_dir: Path,
    decision: dict | None = None,
) -> ArtifactRef:
    """Write `report.md`, a self-contained `report.html` and the PNG figures, and publish them under `out_dir`.

    `decision` (from `tasks.promote.decide_promotion`) adds a "Model promotion" section.
    """
    inputs = read_inputs(validation, processed, model, evaluation)
    pngs = draw_figures(inputs)
    blocks = build_document(inputs, decision)
    m = inputs.metrics
    headline = {
        "test_accuracy": float(m["test_accuracy"]),
        "test_loss": float(m["test_loss"]),
        "train_accuracy": float(m["train_accuracy"]),
        "accuracy_gap": float(m["accuracy_gap"]),
        "overfitting": str(m["overfitting"]),
        "misclassified": int(m["misclassified"]["count"]),
        # None: no promotion decision was made for this report.
        "promoted": None if decision is None else bool(decision["promoted"]),
    }
    with workdir(out_dir) as work:
        # No timestamp anywhere: the same inputs give byte-identical files.
        for name, png in pngs.items():
            (work / name).write_bytes(png)
        (work / REPORT_MD).write_text(render_markdown(blocks, image_src=lambda name: name))
        (work / REPORT_HTML).write_text(render_html(blocks, image_src=lambda name: data_uri(pngs[name])))
        ref = publish("report", work, meta=headline)
    # The final folder is known only once published; its paths are not part of the content digest.
    paths = {"report_md": str(ref.path(REPORT_MD)), "report_html": str(ref.path(REPORT_HTML))}
    return ref.model_copy(update={"meta": {**ref.meta, **paths}})


# ---------------------------------------------------------------------------------------------------------------------
# Prefect UI


def summary_markdown(metrics: dict, figures: Mapping[str, Path], report_path: Path | None = None) -> str:
    """Return a Markdown summary for the Prefect UI with the given figures embedded as data URIs."""
    blocks: list[Block] = [Heading(2, "MNIST pipeline: test results"), *headline_blocks(metrics),
                           Heading(3, "First 20 test predictions"), *first20_blocks(metrics)]
    blocks += [Image(name, FIGURES.get(name, name)) for name in figures]
    if report_path is not None:
        blocks.append(Paragraph(("Full report: ", Code(str(report_path)))))
    return render_markdown(blocks, image_src=lambda name: data_uri(Path(figures[name]).read_bytes()))


def metrics_table(metrics: dict) -> list[dict]:
    """Return per-class precision, recall, F1 and support as rows of plain JSON values."""
    per_class = metrics.get("per_class", {})
    return [
        {
            "class": int(c),
            "precision": round(float(v["precision"]), 4),
            "recall": round(float(v["recall"]), 4),
            "f1": round(float(v["f1"]), 4),
            "support": int(v["support"]),
        }
        for c, v in sorted(per_class.items(), key=lambda item: int(item[0]))
    ]


def confusion_table(metrics: dict) -> list[dict]:
    """Return the confusion matrix as rows of plain JSON values: the true label, then one count per predicted label."""
    return [
        {"true": i, **{f"pred {j}": int(n) for j, n in enumerate(row)}, "total": int(sum(row))}
        for i, row in enumerate(metrics["confusion_matrix"])
    ]


def publish_ui_artifacts(report: ArtifactRef, evaluation: ArtifactRef, decision: dict | None = None) -> None:
    """Publish the report's summary, tables and decision as Prefect artifacts of the current run."""
    metrics = _read_json(evaluation.path(METRICS_JSON))
    figures = {name: report.path(name) for name in KEY_FIGURES}
    create_markdown_artifact(
        markdown=summary_markdown(metrics, figures, report.path(REPORT_HTML)),
        key="mnist-report",
        description=f"MNIST test accuracy {float(metrics['test_accuracy']):.4f}",
    )
    create_table_artifact(
        table=metrics_table(metrics), key="mnist-metrics", description="Per-class precision, recall, F1 and support (test set)"
    )
    create_table_artifact(
        table=confusion_table(metrics), key="mnist-confusion-matrix", description="Confusion matrix: rows true, columns predicted"
    )
    if decision is not None:
        create_markdown_artifact(
            markdown=promotion_markdown(decision),
            key=PROMOTION_KEY,
            description=("Promoted" if decision["promoted"] else "Not promoted")
            + f": test accuracy {float(decision['test_accuracy']):.4f}",
        )


@task(name="report_results")
def report_results(
    validation: ArtifactRef,
    processed: ArtifactRef,
    model: ArtifactRef,
    evaluation: ArtifactRef,
    artifacts_dir: Path,
    decision: dict | None = None,
) -> ArtifactRef:
    """Write the report under `artifacts_dir/reports`; publish its summary, tables and decision as Prefect artifacts."""
    ref = write_report(validation, processed, model, evaluation, Path(artifacts_dir) / "reports", decision)
    publish_ui_artifacts(ref, evaluation, decision)
    get_run_logger().info("report %s (test accuracy %.4f)", ref.path(REPORT_HTML), ref.meta["test_accuracy"])
    return ref
