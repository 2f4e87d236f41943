"""Promote stage: decide whether an evaluated model becomes the champion, and keep a registry of every decision.

The registry is a folder holding `champion.json` (the current champion) and `history.jsonl` (one decision per line,
appended). Deciding is idempotent: a rerun on the same model with nothing changed returns the recorded decision and
writes nothing, so the flow can call it on every run and hand the result to cached stages.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tasks.core import ArtifactRef, PipelineError, fsync_path

SCHEMA_VERSION = 1
CHAMPION = "champion.json"
HISTORY = "history.jsonl"
LOCK = ".lock"
MODEL_FILE = "model.keras"
METRICS_FILE = "metrics.json"
# Keras reports accuracy as float32, so 9700 of 10000 may arrive as 0.96999997: compare with a slack far below one
# image in ten thousand, so that a model exactly at the gate or exactly at the tolerance passes as the rules say.
SLACK = 1e-6

DECISION_KEYS = ("model_digest", "model_path", "test_accuracy", "test_loss", "promoted", "reason", "champion_before",
                 "gate", "tolerance", "decided_at", "run_id")
CHAMPION_KEYS = ("model_digest", "model_path", "test_accuracy", "test_loss", "promoted_at", "run_id")

Log = Callable[[str], None]


class PromotionConfig(BaseModel):
    """When a newly evaluated model replaces the champion."""

    model_config = ConfigDict(extra="forbid")

    min_test_accuracy: float = Field(0.97, ge=0, le=1, description="Absolute gate: no model below it is promoted.")
    tolerance: float = Field(
        0.002, ge=0, le=1, description="How much lower than the champion's a new model's test accuracy may be."
    )


def _quiet(_: str) -> None:
    pass


def decide_promotion(
    model: ArtifactRef,
    evaluation: ArtifactRef,
    registry_dir: Path,
    config: PromotionConfig,
    run_id: str | None = None,
    log: Log = _quiet,
) -> dict:
    """Decide whether the evaluated model becomes the champion, record the decision, and return it."""
    registry_dir = Path(registry_dir)
    test_accuracy, test_loss = _scores(model, evaluation)
    with _locked(registry_dir):
        champion = read_champion(registry_dir)
        history = read_history(registry_dir)
        recorded = _recorded_decision(model.digest, history, champion, config)
        if recorded is not None:
            log(f"model {model.digest[:16]}: decision of {recorded['decided_at']} still holds: {_verdict(recorded)}")
            return recorded

        promoted, reason = judge(test_accuracy, champion, config)
        if champion is not None and champion["model_digest"] == model.digest:
            # Only when the history has no valid decision for the champion (history deleted, champion.json set by
            # hand): judging a model against itself means nothing, and it stays champion.
            promoted, reason = True, f"already the champion (test accuracy {test_accuracy:.4f}), no decision on record"
        decision = {
            "schema_version": SCHEMA_VERSION,
            "model_digest": model.digest,
            "model_path": str(model.path(MODEL_FILE)),
            "test_accuracy": test_accuracy,
            "test_loss": test_loss,
            "promoted": promoted,
            "reason": reason,
            "champion_before": None if champion is None else {
                key: champion[key] for key in ("model_digest", "test_accuracy", "test_loss")
            },
            "gate": config.min_test_accuracy,
            "tolerance": config.tolerance,
            "decided_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "run_id": run_id,
        }
        line = json.dumps(decision, sort_keys=True, separators=(",", ":")) + "\n"
        # History first: a crash before the champion is replaced leaves a promotion on record that did not take effect,
        # and the next run decides again against the real champion; the other order would lose the previous champion.
        _append_line(registry_dir / HISTORY, line)
        if promoted and (champion is None or champion["model_digest"] != model.digest):
            _write_champion(registry_dir / CHAMPION, decision)
    log(f"model {model.digest[:16]}: {_verdict(decision)}")
    # What a rerun reads back from the history, so the first call and every later one return equal dicts.
    return json.loads(line)


def judge(test_accuracy: float, champion: dict | None, config: PromotionConfig) -> tuple[bool, str]:
    """Return whether a model with this test accuracy beats the champion under the config, and why, with numbers."""
    acc, gate, tolerance = test_accuracy, config.min_test_accuracy, config.tolerance
    below_gate = acc < gate - SLACK
    if champion is None:
        if below_gate:
            return False, f"no champion yet, but test accuracy {acc:.4f} is below the gate {gate:.4f}"
        return True, f"first model: no champion yet and test accuracy {acc:.4f} passes the gate {gate:.4f}"
    if below_gate:
        return False, f"test accuracy {acc:.4f} is below the gate {gate:.4f}"
    best = float(champion["test_accuracy"])
    drop = best - acc
    if drop > tolerance + SLACK:
        return False, (f"test accuracy {acc:.4f} is {drop:.4f} below the champion's {best:.4f}, "
                       f"more than the tolerance {tolerance:.4f}")
    if drop > 0:
        return True, (f"test accuracy {acc:.4f} is {drop:.4f} below the champion's {best:.4f}, "
                      f"within the tolerance {tolerance:.4f}")
    if drop == 0:
        return True, f"test accuracy {acc:.4f} equals the champion's {best:.4f}"
    return True, f"test accuracy {acc:.4f} beats the champion's {best:.4f} by {-drop:.4f}"


def read_champion(registry_dir: Path) -> dict | None:
    """Return the current champion record, or None if there is none yet."""
    path = Path(registry_dir) / CHAMPION
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: cannot read the champion record ({exc})") from None
    return _checked(path, text, CHAMPION_KEYS, "the champion record")


def read_history(registry_dir: Path) -> list[dict]:
    """Return every recorded decision, oldest first."""
    path = Path(registry_dir) / HISTORY
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: cannot read the decision history ({exc})") from None
    if text and not text.endswith("\n"):
        raise PipelineError(f"{path}: line {text.count(chr(10)) + 1}: incomplete (no line end); the history is damaged")
    lines = enumerate(text.splitlines(), 1)
    return [_checked(path, line, DECISION_KEYS, "a decision", number) for number, line in lines]


def _checked(path: Path, text: str, keys: tuple[str, ...], what: str, line: int | None = None) -> dict:
    where = f"{path}: line {line}" if line is not None else str(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{where}: expected {what} in JSON, found invalid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise PipelineError(f"{where}: expected {what} (a JSON object), found {type(value).__name__}")
    missing = [key for key in keys if key not in value]
    if missing:
        raise PipelineError(f"{where}: expected {what}, missing {', '.join(missing)}")
    wrong = [key for key in ("test_accuracy", "test_loss") if not _is_number(value[key])]
    if not isinstance(value["model_digest"], str):
        wrong.insert(0, "model_digest")
    if wrong:
        raise PipelineError(f"{where}: expected {what}, found a wrong type in {', '.join(wrong)}")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scores(model: ArtifactRef, evaluation: ArtifactRef) -> tuple[float, float]:
    path = evaluation.path(METRICS_FILE)
    try:
        metrics = json.loads(path.read_text())
        scores = float(metrics["test_accuracy"]), float(metrics["test_loss"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PipelineError(f"{path}: expected test_accuracy and test_loss, could not read them ({exc!r})") from None
    if not all(math.isfinite(v) for v in scores):
        raise PipelineError(f"{path}: expected finite test_accuracy and test_loss, found {scores[0]} and {scores[1]}")
    # Promoting a model on another model's scores would go unnoticed later: refuse the mix-up here.
    evaluated = metrics.get("model_digest")
    if evaluated is not None and evaluated != model.digest:
        raise PipelineError(f"{path}: evaluates model {evaluated}, expected the model to promote, {model.digest}")
    return scores


def _recorded_decision(digest: str, history: list[dict], champion: dict | None, config: PromotionConfig) -> dict | None:
    # Only the latest decision on this model counts; an earlier one was overtaken by events.
    latest = next((d for d in reversed(history) if d["model_digest"] == digest), None)
    if latest is None:
        return None
    champion_digest = None if champion is None else champion["model_digest"]
    if latest["promoted"]:
        return latest if champion_digest == digest else None
    before = latest["champion_before"]
    before_digest = before.get("model_digest") if isinstance(before, dict) else None
    same_rules = latest["gate"] == config.min_test_accuracy and latest["tolerance"] == config.tolerance
    return latest if before_digest == champion_digest and same_rules else None


def _verdict(decision: dict) -> str:
    return ("promoted" if decision["promoted"] else "not promoted") + f": {decision['reason']}"


@contextmanager
def _locked(registry_dir: Path) -> Iterator[None]:
    registry_dir.mkdir(parents=True, exist_ok=True)
    # flock belongs to the open file, so it excludes other threads (each opens its own) as well as other processes,
    # and the kernel drops it if the holder dies.
    fd = os.open(registry_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _append_line(path: Path, line: str) -> None:
    # One write of the whole line to a file opened for appending: no line is interleaved with another or split.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        data = line.encode()
        if os.write(fd, data) != len(data):
            raise PipelineError(f"{path}: short write while appending a decision")
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_path(path.parent)


def _write_champion(path: Path, decision: dict) -> None:
    record = {
        "schema_version": SCHEMA_VERSION,
        "model_digest": decision["model_digest"],
        "model_path": decision["model_path"],
        "test_accuracy": decision["test_accuracy"],
        "test_loss": decision["test_loss"],
        "promoted_at": decision["decided_at"],
        "run_id": decision["run_id"],
    }
    temp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(temp, "w") as fh:
            fh.write(json.dumps(record, indent=2, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)

