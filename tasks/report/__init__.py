"""Report stage: turn validation, training and evaluation artifacts into a Markdown and HTML report with figures.

`context` reads the inputs, `figures` draws them, the templates in `templates/` write the Markdown (`render` turns it
into HTML), and `ui` publishes the summary in the Prefect UI.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from tasks.core import ArtifactRef, publish, workdir
from tasks.dataset import DatasetConfig
from tasks.preprocess import SPLIT_FILES
from tasks.registry import Decision
from tasks.report.context import load_context
from tasks.report.figures import draw_figures, to_png
from tasks.report.render import (
    REPORT_HTML,
    REPORT_MD,
    data_uri,
    markdown_page,
    page_title,
    render,
)
from tasks.report.ui import publish_ui_artifacts
from tasks.storage import staged
from tasks.train import CONFIG_FILE, HISTORY_FILE

__all__ = ["REPORT_HTML", "REPORT_MD", "publish_ui_artifacts", "report_results", "write_report"]


def write_report(
    validation: ArtifactRef,
    processed: ArtifactRef,
    model: ArtifactRef,
    evaluation: ArtifactRef,
    out_dir: Path,
    decision: Decision | None = None,
    dataset: DatasetConfig = DatasetConfig(),  # noqa: B008 (never mutated)
) -> ArtifactRef:
    """Write `report.md`, a self-contained `report.html` and the PNG figures, and publish them under `out_dir`.

    `decision` (from `tasks.promote.decide_promotion`) adds a "Model promotion" section; `dataset` gives the title and
    the class names. The artifact's meta records the title and names, so its UI artifacts can be published again.
    """
    ctx = load_context(validation, processed, model, evaluation, dataset)
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
        (work / REPORT_HTML).write_text(markdown_page(embedded, page_title(ctx.classes.title)))
        return located(publish("report", work, meta=headline))


def located(ref: ArtifactRef) -> ArtifactRef:
    """Return a report's reference with the paths of its pages in its metadata (known once published, not part of
    the content digest)."""
    paths = {"report_md": str(ref.path(REPORT_MD)), "report_html": str(ref.path(REPORT_HTML))}
    return ref.model_copy(update={"meta": {**ref.meta, **paths}})


@task(name="report_results")
def report_results(
    validation: ArtifactRef,
    processed: ArtifactRef,
    model: ArtifactRef,
    evaluation: ArtifactRef,
    artifacts_dir: Path,
    decision: Decision | None = None,
    dataset: DatasetConfig = DatasetConfig(),  # noqa: B008 (never mutated)
) -> ArtifactRef:
    """Write the report under `artifacts_dir/reports`; publish its summary, tables and decision as Prefect artifacts."""
    with staged(artifacts_dir) as stage:
        inputs = (stage.local(validation), stage.local(processed, SPLIT_FILES["test"]),
                  stage.local(model, HISTORY_FILE, CONFIG_FILE), stage.local(evaluation))
        ref = located(stage.publish(write_report(*inputs, stage.root / "reports", decision, dataset)))
    publish_ui_artifacts(ref, evaluation, decision)
    get_run_logger().info("report %s (test accuracy %.4f)", ref.path(REPORT_HTML), ref.meta["test_accuracy"])
    return ref
