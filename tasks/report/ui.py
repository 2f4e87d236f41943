"""The report in the Prefect UI: a summary with the key figures, the per-class and confusion tables, the decision."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.core import ArtifactRef
from tasks.dataset import OTHER_TITLE
from tasks.evaluate import METRICS_FILE
from tasks.registry import Decision
from tasks.report.context import Classes, per_class_frame, read_json
from tasks.report.figures import KEY_FIGURES
from tasks.report.render import REPORT_HTML, data_uri, render
from tasks.storage import read_bytes

REPORT_KEY = "mnist-report"
METRICS_KEY = "mnist-metrics"
CONFUSION_KEY = "mnist-confusion-matrix"
PROMOTION_KEY = "mnist-promotion"


def classes_of(metrics: dict[str, Any], title: str = OTHER_TITLE, class_names: Sequence[str] | None = None) -> Classes:
    """Return the title and class names for the classes of a metrics document (default names: the labels)."""
    return Classes.of(title, class_names, len(metrics["confusion_matrix"]))


def summary_markdown(
    metrics: dict[str, Any],
    figures: Mapping[str, Path],
    report_path: Path | None = None,
    *,
    title: str = OTHER_TITLE,
    class_names: Sequence[str] | None = None,
) -> str:
    """Return a Markdown summary for the Prefect UI with the given figures embedded as data URIs."""
    return render("summary.md.j2", metrics=metrics, figures=list(figures), report_path=report_path,
                  classes=classes_of(metrics, title, class_names),
                  src=lambda name: data_uri(read_bytes(figures[name])))


def promotion_markdown(decision: Decision) -> str:
    """Return the promotion decision as a short Markdown document for the Prefect UI."""
    return render("promotion.md.j2", decision=decision)


def metrics_table(metrics: dict[str, Any], class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Return per-class label, name, precision, recall, F1 and support as rows of plain JSON values."""
    classes = classes_of(metrics, class_names=class_names)
    return [
        {"class": int(row.Index), "name": classes.name(row.Index), "precision": round(float(row.precision), 4),
         "recall": round(float(row.recall), 4), "f1": round(float(row.f1), 4), "support": int(row.support)}
        for row in per_class_frame(metrics).itertuples()
    ]


def confusion_table(metrics: dict[str, Any], class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Return the confusion matrix as rows of plain JSON values: the true class (label and name), one count per
    predicted class (`pred <name>`), the row's total."""
    names = classes_of(metrics, class_names=class_names).names
    return [
        {"label": i, "true": names[i], **{f"pred {names[j]}": int(n) for j, n in enumerate(row)}, "total": int(sum(row))}
        for i, row in enumerate(metrics["confusion_matrix"])
    ]


def publish_ui_artifacts(report: ArtifactRef, evaluation: ArtifactRef, decision: Decision | None = None) -> None:
    """Publish the report's summary, tables and decision as Prefect artifacts of the current run.

    The dataset's title and class names are those the report was written with (recorded in its meta).
    """
    metrics = read_json(evaluation.path(METRICS_FILE))
    title, names = report.meta.get("dataset", OTHER_TITLE), report.meta.get("class_names")
    create_markdown_artifact(
        markdown=summary_markdown(metrics, {name: report.path(name) for name in KEY_FIGURES}, report.path(REPORT_HTML),
                                  title=title, class_names=names),
        key=REPORT_KEY,
        description=f"{title}: test accuracy {float(metrics['test_accuracy']):.4f}",
    )
    create_table_artifact(
        table=metrics_table(metrics, names), key=METRICS_KEY,
        description=f"{title}: per-class precision, recall, F1 and support (test set)",
    )
    create_table_artifact(
        table=confusion_table(metrics, names), key=CONFUSION_KEY,
        description=f"{title}: confusion matrix, rows true class, columns predicted class",
    )
    if decision is not None:
        verdict = "Promoted" if decision.promoted else "Not promoted"
        create_markdown_artifact(markdown=promotion_markdown(decision), key=PROMOTION_KEY,
                                 description=f"{verdict}: test accuracy {decision.test_accuracy:.4f}")
