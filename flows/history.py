"""`mnist-pipeline history` and `diff A B`: the models the registry knows, and two models side by side.

Read from the registry (tasks/registry.py), each model's config.json and its evaluation's metrics.json (found through
the evaluate stage's cache records); nothing is written, no run is made, TensorFlow is not imported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flows.config import PipelineConfig
from tasks import storage
from tasks.artifacts import ArtifactRef
from tasks.dataset import version_label
from tasks.errors import PipelineError
from tasks.keys import read_records
from tasks.layout import CONFIG_FILE, METRICS_FILE, MODELS_DIR
from tasks.models import TrainConfig
from tasks.registry import find_model, read_champion, read_history

# The settings of a trained model that config.json records and TrainConfig defines (architecture and versions aside).
SETTINGS = tuple(TrainConfig.model_fields)


def history(config: PipelineConfig, dataset: str) -> list[dict[str, Any]]:
    """Return one row per model of a dataset in the registry with its latest decision, in the order of those
    decisions; the dataset's champion marked."""
    champion = read_champion(config.registry_dir, dataset)
    # Later decisions win.
    latest = {d.model_digest: d for d in read_history(config.registry_dir) if d.dataset == dataset}
    rows = []
    for digest, decision in sorted(latest.items(), key=lambda item: item[1].decided_at):
        settings = model_settings(decision.model_path)
        rows.append({
            "model_digest": digest,
            "champion": champion is not None and champion.model_digest == digest,
            "decided_at": decision.decided_at,
            "data_version": decision.data_version,
            "model": None if settings is None else settings["model"],
            "changed": None if settings is None else changed_settings(settings),
            "test_accuracy": decision.test_accuracy,
            "test_loss": decision.test_loss,
            "promoted": decision.promoted,
            "reason": decision.reason,
        })
    return rows


def model_settings(model_path: str | Path) -> dict[str, Any] | None:
    """Return the training settings in a model's config.json, None if its folder is gone."""
    path = storage.as_root(model_path).parent / CONFIG_FILE
    try:
        recorded = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise PipelineError(f"{path}: expected the JSON training config of a model, found unreadable JSON ({exc})") from None
    return {name: recorded.get(name) for name in SETTINGS}


def changed_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Return the settings that differ from the defaults of the model's kind (knobs of other kinds left out)."""
    defaults = TrainConfig(model=settings["model"]).resolved().model_dump()
    return {name: value for name, value in settings.items()
            if name != "model" and value is not None and value != defaults[name]}


def history_table(rows: list[dict[str, Any]], dataset: str) -> Any:
    """Return a rich Table of `history` rows for people."""
    from rich.table import Table

    table = Table(title=f"models of dataset {dataset} in the registry (* its champion)", title_justify="left")
    for name in ("", "model", "decided (UTC)", "data", "kind", "changed from the defaults", "test acc", "test loss",
                 "promoted", "why"):
        table.add_column(name, justify="right" if name.startswith("test ") else "left", overflow="fold")
    for row in rows:
        changed = "(model folder gone)" if row["changed"] is None else (
            ", ".join(f"{k}={v}" for k, v in row["changed"].items()) or "-")
        table.add_row("*" if row["champion"] else "", row["model_digest"][:16], row["decided_at"][:16].replace("T", " "),
                      version_label(row["data_version"]), row["model"] or "?", changed, f"{row['test_accuracy']:.4f}",
                      f"{row['test_loss']:.4f}", "yes" if row["promoted"] else "no", row["reason"])
    return table


def evaluations(records: dict[str, ArtifactRef]) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Return the evaluate stage's cache records by the digest of the model they scored: (key, metrics), newest
    first. A metrics file that is gone is left out (its record is stale)."""
    found: dict[str, list[tuple[int, str, dict[str, Any]]]] = {}
    for key, record in records.items():
        if record.stage != "evaluate" or METRICS_FILE not in record.files:
            continue
        file = record.files[METRICS_FILE]
        try:
            metrics = json.loads(storage.read_bytes(file.path))
        except FileNotFoundError:
            continue
        except ValueError as exc:
            raise PipelineError(f"{file.path}: expected evaluation metrics, found unreadable JSON ({exc})") from None
        published = (file.stat or [0, 0, 0])[2]  # its mtime when published
        found.setdefault(metrics.get("model_digest"), []).append((published, key, metrics))
    return {digest: [(key, metrics) for _, key, metrics in sorted(rows, key=lambda r: -r[0])] for digest, rows in found.items()}


def diff(config: PipelineConfig, a: str, b: str, dataset: str) -> dict[str, Any]:
    """Return two models' settings and metrics side by side, with the deltas of the metrics (B - A): from their
    evaluations on the same data version where there are such (the newest), else from each one's newest."""
    scored_by_model = evaluations(read_records(config.cache_dir))
    sides = []
    for spec in (a, b):
        known = find_model(config.registry_dir, config.artifacts_dir / MODELS_DIR, spec, dataset)
        settings = model_settings(known.path)
        if settings is None:
            raise PipelineError(f"model {spec}: its folder {storage.as_root(known.path).parent} is gone")
        scored = scored_by_model.get(known.digest)
        if not scored:
            raise PipelineError(f"model {spec} ({known.digest[:16]}): no evaluation of it in {config.cache_dir} "
                                "(`mnist-pipeline run` evaluates the models it trains)")
        sides.append({"spec": spec, "model_digest": known.digest, "settings": settings,
                      "metrics": [metrics for _, metrics in scored]})
    common = [m for m in sides[0]["metrics"] if any(_version(m) == _version(n) for n in sides[1]["metrics"])]
    sides[0]["metrics"] = (common or sides[0]["metrics"])[0]
    sides[1]["metrics"] = next((n for n in sides[1]["metrics"] if _version(n) == _version(sides[0]["metrics"])),
                               sides[1]["metrics"][0])
    params = [{"name": name, "a": sides[0]["settings"][name], "b": sides[1]["settings"][name]} for name in SETTINGS
              if sides[0]["settings"][name] != sides[1]["settings"][name]]
    if _version(sides[0]["metrics"]) != _version(sides[1]["metrics"]):
        params.append({"name": "evaluated on (data version)", "a": version_label(_version(sides[0]["metrics"])),
                       "b": version_label(_version(sides[1]["metrics"]))})
    metrics = [_metric(name, sides, lambda m, n=name: m[n])
               for name in ("test_accuracy", "test_loss", "train_accuracy", "train_loss")]
    classes = sorted(set(sides[0]["metrics"]["per_class"]) | set(sides[1]["metrics"]["per_class"]), key=_class_order)
    metrics += [_metric(f"recall {c}", sides, lambda m, c=c: m["per_class"].get(c, {}).get("recall")) for c in classes]
    return {"dataset": dataset, **{side: {"spec": sides[i]["spec"], "model_digest": sides[i]["model_digest"],
                                          "data_version": _version(sides[i]["metrics"])} for i, side in enumerate("ab")},
            "params": params, "metrics": metrics}


def _version(metrics: dict[str, Any]) -> dict[str, Any]:
    """Return the data version an evaluation scored (before batches: the processed data's digest alone)."""
    return metrics.get("data_version") or {"base": metrics["data_digest"], "batches": []}


def _class_order(name: str) -> tuple[int, Any]:
    return (0, int(name)) if name.isdigit() else (1, name)


def _metric(name: str, sides: list[dict[str, Any]], get: Any) -> dict[str, Any]:
    a, b = get(sides[0]["metrics"]), get(sides[1]["metrics"])
    return {"name": name, "a": a, "b": b, "delta": None if a is None or b is None else b - a}


def diff_tables(result: dict[str, Any]) -> list[Any]:
    """Return rich Tables of a `diff` for people: the settings that differ, then the metrics with their deltas."""
    from rich.table import Table

    specs = {s: f"champion of {result['dataset']}" if result[s]["spec"] == "champion" else result[s]["spec"]
             for s in ("a", "b")}
    a, b = ((f"{specs[s]} ({result[s]['model_digest'][:16]})" if result[s]["spec"] != result[s]["model_digest"][:16]
             else result[s]["model_digest"][:16]) + f", scored on data {version_label(result[s]['data_version'])}"
            for s in ("a", "b"))
    params = Table(title="settings", title_justify="left")
    for name in ("setting", "A: " + a, "B: " + b):
        params.add_column(name)
    for row in result["params"]:
        params.add_row(row["name"], _text(row["a"]), _text(row["b"]))
    if not result["params"]:
        params.add_row("(the same)", "", "")
    metrics = Table(title="metrics (delta: B - A)", title_justify="left")
    for name, justify in (("metric", "left"), ("A", "right"), ("B", "right"), ("delta", "right")):
        metrics.add_column(name, justify=justify)
    for row in result["metrics"]:
        metrics.add_row(row["name"], _number(row["a"]), _number(row["b"]),
                        "" if row["delta"] is None else f"{row['delta']:+.4f}")
    return [params, metrics]


def _text(value: Any) -> str:
    return "-" if value is None else str(value)


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"
