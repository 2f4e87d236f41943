"""Report stage: turn validation, training and evaluation artifacts into a Markdown and HTML report with figures.

`context` reads the inputs, `figures` draws them, the templates in `templates/` write the Markdown (`render` turns it
into HTML), and `ui` writes the summary and tables that flows/ui.py publishes in the Prefect UI.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tasks.artifacts import ArtifactRef, publish
from tasks.dataset import DatasetConfig
from tasks.errors import Log, quiet
from tasks.files import workdir
from tasks.layout import REPORT_HTML, REPORT_MD
from tasks.registry import Decision
from tasks.report.context import load_context
from tasks.report.figures import draw_figures, to_png
from tasks.report.render import data_uri, markdown_page, render


def write_report(validation: ArtifactRef, processed: ArtifactRef, model: ArtifactRef, evaluation: ArtifactRef,
                 out_dir: Path, decision: Decision | None = None, dataset: DatasetConfig | None = None,
                 batches: Sequence[ArtifactRef] = (), log: Log = quiet) -> ArtifactRef:
    """Write `report.md`, a self-contained `report.html` and the PNG figures, and publish them under `out_dir`.

    `decision` (from `tasks.promote.decide_promotion`) adds a "Model promotion" section; `dataset` gives the title and
    the class names. The artifact's meta records the title and names, so its UI artifacts can be published again.
    """
    ctx = load_context(validation, processed, model, evaluation, dataset or DatasetConfig(), batches)
    pngs = {name: to_png(fig) for name, fig in draw_figures(ctx).items()}
    m = ctx.metrics
    headline = {
        "test_accuracy": float(m["test_accuracy"]),
        "test_loss": float(m["test_loss"]),
        "train_accuracy": float(m["train_accuracy"]),
        "accuracy_gap": float(m["accuracy_gap"]),
        "overfitting": str(m["overfitting"]),
        "misclassified": int(m["misclassified"]["count"]),
        # None: no promotion decision was made for this report.
        "promoted": None if decision is None else bool(decision.promoted),
        "model": str(ctx.config["model"]),
        "dataset": ctx.classes.title,
        "class_names": list(ctx.classes.names) if ctx.classes.named else None,
    }
    with workdir(out_dir) as work:
        # No timestamp anywhere: the same inputs give byte-identical files.
        for name, png in pngs.items():
            (work / name).write_bytes(png)
        (work / REPORT_MD).write_text(render("report.md.j2", ctx=ctx, decision=decision, src=str))
        embedded = render("report.md.j2", ctx=ctx, decision=decision, src=lambda name: data_uri(pngs[name]))
        (work / REPORT_HTML).write_text(markdown_page(embedded, f"Pipeline report: {ctx.classes.title}"))
        ref = publish("report", work, meta=headline)
    log(f"report written (test accuracy {headline['test_accuracy']:.4f})")
    return ref
