"""The report in the Prefect UI: a summary with the key figures, the per-class and confusion tables, the decision
(flows/ui.py publishes them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.dataset import OTHER_TITLE
from tasks.registry import Decision
from tasks.report.context import Classes, per_class_frame
from tasks.report.render import data_uri, render
from tasks.storage import read_bytes


def classes_of(metrics: dict[str, Any], title: str = OTHER_TITLE, class_names: Sequence[str] | None = None) -> Classes:
    """Return the title and class names for the classes of a metrics document (default names: the labels)."""
    return Classes.of(title, class_names, len(metrics["confusion_matrix"]))


def summary_markdown(metrics: dict[str, Any], figures: Mapping[str, Path], report_path: Path | None = None, *,
                     title: str = OTHER_TITLE, class_names: Sequence[str] | None = None) -> str:
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
    return [{"class": int(row.Index), "name": classes.name(row.Index), "precision": round(float(row.precision), 4),
             "recall": round(float(row.recall), 4), "f1": round(float(row.f1), 4), "support": int(row.support)}
            for row in per_class_frame(metrics).itertuples()]


def confusion_table(metrics: dict[str, Any], class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Return the confusion matrix as rows of plain JSON values: the true class (label and name), one count per
    predicted class (`pred <name>`), the row's total."""
    names = classes_of(metrics, class_names=class_names).names
    return [{"label": i, "true": names[i], **{f"pred {names[j]}": int(n) for j, n in enumerate(row)},
             "total": int(sum(row))} for i, row in enumerate(metrics["confusion_matrix"])]
