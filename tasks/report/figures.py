"""Report figures: pure functions from data to matplotlib Figures, and from a Figure to PNG bytes.

matplotlib is imported inside the functions only, so importing the report stays cheap and no global pyplot state is
touched; building a Figure apart from saving it lets tests read the texts a figure shows.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.idx import IMAGE_SHAPE
from tasks.layout import CONFUSION_PNG, CURVES_PNG, FIRST20_PNG, MISCLASSIFIED_PNG

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from tasks.report.context import ReportContext

# File name -> caption (also the alt text).
FIGURES = {
    FIRST20_PNG: "The first 20 test images, titled with predicted and true class (wrong ones in red)",
    CURVES_PNG: "Loss and accuracy per training epoch",
    CONFUSION_PNG: "Confusion matrix of the test set (rows: true class, columns: predicted class)",
    MISCLASSIFIED_PNG: "Misclassified test images with true class, predicted class and confidence",
}
# The figures worth the space in the Prefect UI; the full report has all of them.
KEY_FIGURES = (FIRST20_PNG, CURVES_PNG, CONFUSION_PNG)

DPI = 120
GALLERY_COLUMNS = 10
WRONG = "#c62828"
# Longest class name shown in full in a figure (longer ones are cut, ending in SHORTENED); the tables have them all.
FIRST20_NAME_MAX = 8
GALLERY_NAME_MAX = 11
TICK_NAME_MAX = 14
SHORTENED = "…"
# Beyond this many classes the confusion matrix has no count in its cells and fewer tick labels: they would overlap.
CONFUSION_ANNOTATED_MAX = 25
CHAR_INCHES = 0.58 / 72  # about the mean glyph width of DejaVu Sans, per point of font size


def draw_figures(ctx: ReportContext) -> dict[str, Figure]:
    """Return every figure of the report, by file name."""
    m, wrong, names = ctx.metrics, ctx.gallery, list(ctx.classes.names)
    first = m["first_20_predictions"]
    return {
        FIRST20_PNG: first20_figure(ctx.test_images[: len(first)], first, m["first_20_labels"], names),
        CURVES_PNG: training_curves_figure(ctx.history),
        CONFUSION_PNG: confusion_figure(m["confusion_matrix"], names),
        MISCLASSIFIED_PNG: misclassified_figure(ctx.test_images[wrong["index"].to_numpy()], wrong["label"].tolist(),
                                                wrong["predicted"].tolist(), wrong["confidence"].tolist(),
                                                int(m["misclassified"]["count"]), names),
    }


def short(name: str, limit: int) -> str:
    """Return a class name on one line, cut to `limit` characters (the last one SHORTENED) if longer."""
    text = " ".join(str(name).split())
    return text if len(text) <= limit else text[: limit - 1] + SHORTENED


def _names(names: list[str] | None, count: int) -> list[str]:
    return [str(c) for c in range(count)] if names is None else list(names)


def to_png(fig: Figure) -> bytes:
    """Return a figure as PNG bytes (no timestamp: the same figure gives the same bytes)."""
    buffer = io.BytesIO()
    # A tight bounding box costs one more drawing pass; the digit grids, laid out by hand (no layout engine), do without.
    extra = {"bbox_inches": "tight", "pad_inches": 0.08} if fig.get_layout_engine() is not None else {}
    fig.savefig(buffer, format="png", dpi=DPI, facecolor="white", **extra)
    return buffer.getvalue()


def _figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _digit_grid(images: np.ndarray, captions: list[str], wrong: list[bool], *, columns: int, cell_width: float,
                fontsize: float, title: str) -> Figure:
    """Draw images in a grid, each under its caption, framed in red when `wrong`, with a title on top.

    Captions are plain text (class names are user text: no mathtext); the caption band fits the longest caption.

    The digits are pasted into one image shown by a single Axes: a matplotlib Axes per digit made these figures
    take most of the report's time.
    """
    from matplotlib.patches import Rectangle

    rows = math.ceil(len(images) / columns)
    side = IMAGE_SHAPE[0]
    scale = 0.5 / side  # inches per pixel: a digit is half an inch tall
    lines = max((caption.count("\n") + 1 for caption in captions), default=1)
    # A line of text is about 1.1 font sizes tall (in points).
    cell_w, caption, gap = round(cell_width / scale), max(24, math.ceil(lines * fontsize * 1.15 / (72 * scale)) + 4), 6
    cell_h = side + caption + gap
    canvas = np.zeros((rows * cell_h, columns * cell_w), dtype=np.float32)
    corners = []
    for k, pixels in enumerate(images):
        row, column = divmod(k, columns)
        y, x = row * cell_h + caption, column * cell_w + (cell_w - side) // 2
        canvas[y : y + side, x : x + side] = pixels.reshape(IMAGE_SHAPE)
        corners.append((x, y))
    title_h = 0.4
    width, height = canvas.shape[1] * scale, canvas.shape[0] * scale
    fig = _figure(width, height + title_h, layout=None)
    ax = fig.add_axes((0, 0, 1, height / (height + title_h)))
    ax.imshow(canvas, cmap="binary", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    for (x, y), text, bad in zip(corners, captions, wrong):
        ax.text(x + (side - 1) / 2, y - 3, text, ha="center", va="bottom", fontsize=fontsize, linespacing=1.1,
                color=WRONG if bad else "#1f2328", fontweight="bold" if bad else "normal", parse_math=False)
        if bad:
            ax.add_patch(Rectangle((x - 1.5, y - 1.5), side + 2, side + 2, fill=False, edgecolor=WRONG, linewidth=2.0))
    fig.text(0.5, 1 - 0.5 * title_h / (height + title_h), title, ha="center", va="center", fontsize=11, parse_math=False)
    return fig


def first20_figure(images: np.ndarray, predicted: list[int], labels: list[int], names: list[str] | None = None) -> Figure:
    """Draw the first test images in one row, each titled with predicted and true class; wrong ones in red.

    `names` gives each class's name (default: its label); long ones are cut and the cells widen to fit them.
    """
    n = len(predicted)
    names = [short(name, FIRST20_NAME_MAX) for name in _names(names, max([*predicted, *labels], default=0) + 1)]
    captions = [f"pred {names[p]}\ntrue {names[t]}" for p, t in zip(predicted, labels)]
    longest = max((len(line) for caption in captions for line in caption.splitlines()), default=0)
    # Longer names: a smaller font and wider cells (20 cells of "pred " and 8 characters fit 2,300 pixels).
    fontsize = 9 if longest <= 9 else 8
    return _digit_grid(images[:n], captions, [p != t for p, t in zip(predicted, labels)], columns=max(n, 1),
                       cell_width=max(0.66, longest * fontsize * CHAR_INCHES + 0.1), fontsize=fontsize,
                       title=f"First {n} test images: predicted vs true class")


def training_curves_figure(history: dict[str, Any]) -> Figure:
    """Draw loss and accuracy per epoch, for training and (when present) validation data.

    When the weights kept are not the last epoch's (early stopping), a dotted line marks the epoch kept.
    """
    from matplotlib.ticker import MaxNLocator

    epochs = np.arange(1, len(history["loss"]) + 1)
    fig = _figure(10, 3.8)
    for ax, key, title in zip(fig.subplots(1, 2), ("loss", "accuracy"), ("Loss", "Accuracy")):
        ax.plot(epochs, history[key], marker="o", color="#1f77b4", label="train")
        if history.get(f"val_{key}"):
            ax.plot(epochs, history[f"val_{key}"], marker="s", linestyle="--", color="#ff7f0e", label="validation")
        best = history.get("best_epoch")
        if best is not None and best != len(epochs):
            ax.axvline(best, color="#2e7d32", linestyle=":", linewidth=1.5, label=f"kept (epoch {best})")
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
    return fig


def confusion_figure(matrix: list[list[int]], names: list[str] | None = None) -> Figure:
    """Draw the confusion matrix as a heatmap with the count in every cell, the axes ticked with the class names."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap, LogNorm

    counts = np.asarray(matrix, dtype=np.int64).reshape(len(matrix), -1)
    k = counts.shape[0]
    names = [short(name, TICK_NAME_MAX) for name in _names(names, k)]
    wide = max((len(name) for name in names), default=0) > 3
    fig = _figure(6.6 + (0.8 if wide else 0), 5.6 + (0.6 if wide else 0))
    ax = fig.subplots()
    # A log scale: the diagonal is a hundred times the errors, and on a linear scale every error would look empty.
    # The palette starts above white so that a single error stands out from the empty (white) cells.
    vmax = max(int(counts.max()) if counts.size else 0, 2)
    cmap = ListedColormap(colormaps["Blues"](np.linspace(0.15, 1.0, 256))).with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_equal(counts, 0), cmap=cmap, norm=LogNorm(vmin=1, vmax=vmax))
    if k <= CONFUSION_ANNOTATED_MAX:
        dark = np.log(np.maximum(counts, 1)) > 0.5 * np.log(vmax)
        for (i, j), n in np.ndenumerate(counts):
            ax.text(j, i, str(n), ha="center", va="center", fontsize=8 if n < 1000 else 7,
                    color="white" if dark[i, j] else ("#b0b7bf" if n == 0 else "#1f2328"))
    ticks = range(0, k, max(1, math.ceil(k / CONFUSION_ANNOTATED_MAX)))
    fontsize = 9 if k <= 12 else 7
    # Class names are user text: drawn as they are, never as mathtext.
    ax.set_xticks(ticks, labels=[names[i] for i in ticks], fontsize=fontsize, parse_math=False,
                  rotation=45 if wide else 0, ha="right" if wide else "center", rotation_mode="anchor")
    ax.set_yticks(ticks, labels=[names[i] for i in ticks], fontsize=fontsize, parse_math=False)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix ({int(counts.sum())} test images)", fontsize=12)
    bar = fig.colorbar(image, ax=ax, shrink=0.85, label="images (log scale)")
    steps = (1,) if vmax >= 100 else (1, 2, 5)
    ticks = [m * 10**e for e in range(len(str(vmax))) for m in steps if m * 10**e <= vmax]
    bar.set_ticks(ticks, labels=[str(t) for t in ticks])
    bar.minorticks_off()
    return fig


def misclassified_figure(images: np.ndarray, labels: list[int], predicted: list[int], confidence: list[float],
                         total: int, names: list[str] | None = None) -> Figure:
    """Draw a grid of misclassified images with true class, prediction and confidence (or say there are none)."""
    n = len(labels)
    if n == 0:
        fig = _figure(6, 1.4)
        fig.text(0.5, 0.5, "No misclassified test images", ha="center", va="center", fontsize=14, color="#2e7d32")
        return fig
    title = (f"Misclassified test images: first {n} of {total}, by test index" if total > n
             else f"All {n} misclassified test images")
    names = [short(name, GALLERY_NAME_MAX) for name in _names(names, max([*labels, *predicted]) + 1)]
    captions = [f"true {names[t]}\npred {names[p]}\nconf {c:.2f}" for t, p, c in zip(labels, predicted, confidence)]
    return _digit_grid(images, captions, [True] * n, columns=min(GALLERY_COLUMNS, n), cell_width=1.15, fontsize=8, title=title)


def predictions_figure(images: np.ndarray, captions: list[str]) -> Figure:
    """Draw input images in one row (wrapping after 10), each titled with its prediction."""
    fontsize = 8
    longest = max((len(line) for caption in captions for line in caption.splitlines()), default=0)
    return _digit_grid(images, captions, [False] * len(images), columns=max(1, min(len(images), 10)),
                       cell_width=max(0.66, longest * fontsize * CHAR_INCHES + 0.1), fontsize=fontsize,
                       title=f"First {len(images)} inputs: predicted class and probability")


def sweep_figure(labels: list[str], accuracies: list[float | None], best: int) -> Figure:
    """Draw the test accuracy of each trial as a bar, labelled with its swept values; the best one highlighted."""
    fig = _figure(max(4.0, 0.9 * len(labels) + 1.5), 3.6)
    ax = fig.add_subplot()
    values = [a if a is not None else 0.0 for a in accuracies]
    colours = ["#2da44e" if i == best else ("#cf222e" if a is None else "#57606a") for i, a in enumerate(accuracies)]
    ax.bar(range(len(values)), values, color=colours)
    known = [a for a in accuracies if a is not None]
    low = min(known, default=0.0)
    ax.set_ylim(max(0.0, low - 0.25 * (max(known, default=1.0) - low) - 0.005), min(1.0, max(known, default=1.0) + 0.005))
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("test accuracy")
    ax.set_title("Test accuracy per trial (best in green, failed in red)", fontsize=10)
    for i, a in enumerate(accuracies):
        if a is not None:
            ax.text(i, a, f"{a:.4f}", ha="center", va="bottom", fontsize=7)
    return fig
