"""Report figures: pure functions from data to matplotlib Figures, and from a Figure to PNG bytes.

matplotlib is imported inside the functions only, so importing the report stays cheap and no global pyplot state is
touched; building a Figure apart from saving it lets tests read the texts a figure shows.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from tasks.report.context import ReportContext

FIRST20_PNG = "first20.png"
CURVES_PNG = "training_curves.png"
CONFUSION_PNG = "confusion_matrix.png"
MISCLASSIFIED_PNG = "misclassified.png"
# File name -> caption (also the alt text).
FIGURES = {
    FIRST20_PNG: "The first 20 test digits, titled with predicted and true label (wrong ones in red)",
    CURVES_PNG: "Loss and accuracy per training epoch",
    CONFUSION_PNG: "Confusion matrix of the test set (rows: true label, columns: predicted label)",
    MISCLASSIFIED_PNG: "Misclassified test digits with true label, predicted label and confidence",
}
# The figures worth the space in the Prefect UI; the full report has all of them.
KEY_FIGURES = (FIRST20_PNG, CURVES_PNG, CONFUSION_PNG)

DPI = 120
GALLERY_COLUMNS = 10
WRONG = "#c62828"


def draw_figures(ctx: ReportContext) -> dict[str, Figure]:
    """Return every figure of the report, by file name."""
    m, wrong = ctx.metrics, ctx.gallery
    first = m["first_20_predictions"]
    return {
        FIRST20_PNG: first20_figure(ctx.test_images[: len(first)], first, m["first_20_labels"]),
        CURVES_PNG: training_curves_figure(ctx.history),
        CONFUSION_PNG: confusion_figure(m["confusion_matrix"]),
        MISCLASSIFIED_PNG: misclassified_figure(
            ctx.test_images[wrong["index"].to_numpy()], wrong["label"].tolist(), wrong["predicted"].tolist(),
            wrong["confidence"].tolist(), int(m["misclassified"]["count"]),
        ),
    }


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


def _digit_grid(
    images: np.ndarray, captions: list[str], wrong: list[bool], *, columns: int, cell_width: float, fontsize: float, title: str
) -> Figure:
    """Draw digits in a grid, each under a two-line caption, framed in red when `wrong`, with a title on top.

    The digits are pasted into one image shown by a single Axes: a matplotlib Axes per digit made these figures
    take most of the report's time.
    """
    from matplotlib.patches import Rectangle

    rows = math.ceil(len(images) / columns)
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
    return fig


def first20_figure(images: np.ndarray, predicted: list[int], labels: list[int]) -> Figure:
    """Draw the first test digits in one row, each titled with predicted and true label; wrong ones in red."""
    n = len(predicted)
    return _digit_grid(
        images[:n], [f"pred {p}\ntrue {t}" for p, t in zip(predicted, labels)], [p != t for p, t in zip(predicted, labels)],
        columns=n, cell_width=0.66, fontsize=9, title=f"First {n} test digits: predicted vs true label",
    )


def training_curves_figure(history: dict[str, Any]) -> Figure:
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
    return fig


def confusion_figure(matrix: list[list[int]]) -> Figure:
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
    return fig


def misclassified_figure(
    images: np.ndarray, labels: list[int], predicted: list[int], confidence: list[float], total: int
) -> Figure:
    """Draw a grid of misclassified digits with true label, prediction and confidence (or say there are none)."""
    n = len(labels)
    if n == 0:
        fig = _figure(6, 1.4)
        fig.text(0.5, 0.5, "No misclassified test digits", ha="center", va="center", fontsize=14, color="#2e7d32")
        return fig
    if total > n:
        title = f"Misclassified test digits: first {n} of {total}, by test index"
    else:
        title = f"All {n} misclassified test digits"
    captions = [f"true {t}, pred {p}\nconf {c:.2f}" for t, p, c in zip(labels, predicted, confidence)]
    return _digit_grid(images, captions, [True] * n, columns=min(GALLERY_COLUMNS, n), cell_width=1.15, fontsize=8, title=title)
