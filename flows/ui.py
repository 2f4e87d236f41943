"""What runs publish in the Prefect UI as artifacts: the report's summary, tables and decision, the predictions, the
sweep. The documents themselves are written by Prefect-free code (tasks/report/ui.py, the templates)."""

from __future__ import annotations

from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.artifacts import ArtifactRef
from tasks.dataset import OTHER_TITLE
from tasks.layout import METRICS_FILE, REPORT_HTML, SWEEP_HTML, SWEEP_PNG
from tasks.registry import Decision
from tasks.report.context import read_json
from tasks.report.figures import KEY_FIGURES
from tasks.report.render import data_uri
from tasks.report.ui import confusion_table, metrics_table, promotion_markdown, summary_markdown
from tasks.storage import read_bytes

PROGRESS_KEY = "mnist-training-progress"
REPORT_KEY = "mnist-report"
METRICS_KEY = "mnist-metrics"
CONFUSION_KEY = "mnist-confusion-matrix"
PROMOTION_KEY = "mnist-promotion"
PREDICTIONS_KEY = "mnist-predictions"
PREDICTIONS_STRIP_KEY = "mnist-predictions-strip"
PREDICTIONS_ROWS = 50
SWEEP_KEY = "mnist-sweep"
SWEEP_FIGURE_KEY = "mnist-sweep-figure"


def publish_report(report: ArtifactRef, evaluation: ArtifactRef, decision: Decision | None = None) -> None:
    """Publish the report's summary, tables and decision as Prefect artifacts of the current run.

    The dataset's title and class names are those the report was written with (recorded in its meta).
    """
    metrics = read_json(evaluation.path(METRICS_FILE))
    title, names = report.meta.get("dataset", OTHER_TITLE), report.meta.get("class_names")
    create_markdown_artifact(
        markdown=summary_markdown(metrics, {name: report.path(name) for name in KEY_FIGURES}, report.path(REPORT_HTML),
                                  title=title, class_names=names),
        key=REPORT_KEY, description=f"{title}: test accuracy {float(metrics['test_accuracy']):.4f}")
    create_table_artifact(table=metrics_table(metrics, names), key=METRICS_KEY,
                          description=f"{title}: per-class precision, recall, F1 and support (test set)")
    create_table_artifact(table=confusion_table(metrics, names), key=CONFUSION_KEY,
                          description=f"{title}: confusion matrix, rows true class, columns predicted class")
    if decision is not None:
        verdict = "Promoted" if decision.promoted else "Not promoted"
        create_markdown_artifact(markdown=promotion_markdown(decision), key=PROMOTION_KEY,
                                 description=f"{verdict}: test accuracy {decision.test_accuracy:.4f}")


def publish_predictions(frame: Any, decoded: ArtifactRef) -> None:
    """Publish the first predictions as a table and the first input images, titled, as a markdown strip."""
    from tasks.predict import strip_images
    from tasks.report.figures import predictions_figure, to_png

    head = frame.head(PREDICTIONS_ROWS).astype(object).where(frame.head(PREDICTIONS_ROWS).notna(), None)
    rows = [{key: (round(value, 4) if isinstance(value, float) else value) for key, value in row.items()}
            for row in head.to_dict(orient="records")]
    create_table_artifact(rows, key=PREDICTIONS_KEY, description=f"First {len(rows)} of {len(frame)} predictions")
    images = strip_images(decoded)
    label = frame["name"] if "name" in frame else frame["predicted"]
    captions = [f"{name}\n{p:.2f}" for name, p in zip(label.astype(str), frame["probability"])]
    png = to_png(predictions_figure(images, captions[: len(images)]))
    create_markdown_artifact(f"## Predictions\n\n![First inputs with their predictions]({data_uri(png)})\n",
                             key=PREDICTIONS_STRIP_KEY, description="First inputs titled with their predicted class")


def publish_sweep(rows: list[dict[str, Any]], columns: list[str], report: ArtifactRef) -> None:
    """Publish the trials as a table artifact and the sweep figure as a markdown artifact."""
    create_table_artifact([{k: v for k, v in row.items() if k != "error"} for row in rows], key=SWEEP_KEY,
                          description=f"{len(rows)} trials, swept: {', '.join(columns)}")
    png = read_bytes(report.path(SWEEP_PNG))
    create_markdown_artifact(f"## Sweep\n\n![Test accuracy per trial]({data_uri(png)})\n\nReport: "
                             f"`{report.path(SWEEP_HTML)}`\n", key=SWEEP_FIGURE_KEY,
                             description="Test accuracy per trial, grouped by the swept parameters")
