"""Promote stage: decide whether an evaluated model becomes the champion, and keep a registry of every decision.

The registry is a folder holding `champion.json` (the current champion) and `history.jsonl` (one decision per line,
appended). Deciding is idempotent: a rerun on the same model with nothing changed returns the recorded decision and
writes nothing, so the flow can call it on every run and hand the result to cached stages.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.core import ArtifactRef, Log, PipelineError, atomic_write, flocked, fsync_path, quiet, validation_problems
from tasks.evaluate import METRICS_FILE
from tasks.locks import FlockLockManager, RedisLockManager, lock_dir
from tasks.storage import as_root, is_remote
from tasks.train import MODEL_FILE

SCHEMA_VERSION = 1
CHAMPION_FILE = "champion.json"
HISTORY_FILE = "history.jsonl"
LOCK_FILE = ".lock"
# Keras reports accuracy as float32, so 9700 of 10000 may arrive as 0.96999997: compare with a slack far below one
# image in ten thousand, so that a model exactly at the gate or exactly at the tolerance passes as the rules say.
SLACK = 1e-6


class PromotionConfig(BaseModel):
    """When a newly evaluated model replaces the champion."""

    model_config = ConfigDict(extra="forbid")

    min_test_accuracy: float = Field(0.97, ge=0, le=1, description="Absolute gate: no model below it is promoted.")
    tolerance: float = Field(
        0.002, ge=0, le=1, description="How much lower than the champion's a new model's test accuracy may be."
    )


class Scores(BaseModel):
    """A model (by digest) and its test scores."""

    # Strict: a registry file with a string or a boolean where a number belongs is damaged, not converted.
    model_config = ConfigDict(strict=True, frozen=True)

    model_digest: str
    test_accuracy: float
    test_loss: float


class Champion(Scores):
    """The record in `champion.json`: the model currently promoted."""

    schema_version: int = SCHEMA_VERSION
    model_path: str
    promoted_at: str
    run_id: str | None
    # The names of the model's classes (label order) when its dataset has them; predictions name their classes.
    class_names: list[str] | None = None


class Decision(Scores):
    """One line of `history.jsonl`: whether a model was promoted, why, and against which champion."""

    schema_version: int = SCHEMA_VERSION
    model_path: str
    promoted: bool
    reason: str
    champion_before: Scores | None
    gate: float
    tolerance: float
    decided_at: str
    run_id: str | None
    class_names: list[str] | None = None

    @property
    def verdict(self) -> str:
        """Return the decision in words: promoted or not, and why."""
        return ("promoted" if self.promoted else "not promoted") + f": {self.reason}"


Record = TypeVar("Record", bound=BaseModel)


def decide_promotion(
    model: ArtifactRef,
    evaluation: ArtifactRef,
    registry_dir: Path,
    config: PromotionConfig,
    run_id: str | None = None,
    log: Log = quiet,
    class_names: list[str] | None = None,
    locks: Any = None,
) -> Decision:
    """Decide whether the evaluated model becomes the champion, record the decision, and return it.

    The registry is locked for the decision by its lock file, or with Redis stage locks (`locks`, roots that several
    machines share) by its key in Redis.
    """
    registry_dir = as_root(registry_dir)
    test_accuracy, test_loss = _scores(model, evaluation)
    if not is_remote(registry_dir):
        registry_dir.mkdir(parents=True, exist_ok=True)
    with _registry_lock(registry_dir, locks):
        champion = read_champion(registry_dir)
        recorded = _recorded_decision(model.digest, read_history(registry_dir), champion, config)
        if recorded is not None:
            log(f"model {model.digest[:16]}: decision of {recorded.decided_at} still holds: {recorded.verdict}")
            return recorded

        promoted, reason = judge(test_accuracy, champion, config)
        if champion is not None and champion.model_digest == model.digest:
            # Only when the history has no valid decision for the champion (history deleted, champion.json set by
            # hand): judging a model against itself means nothing, and it stays champion.
            promoted, reason = True, f"already the champion (test accuracy {test_accuracy:.4f}), no decision on record"
        decision = Decision(
            model_digest=model.digest,
            model_path=str(model.path(MODEL_FILE)),
            test_accuracy=test_accuracy,
            test_loss=test_loss,
            promoted=promoted,
            reason=reason,
            champion_before=None if champion is None else Scores(**champion.model_dump(include=set(Scores.model_fields))),
            gate=config.min_test_accuracy,
            tolerance=config.tolerance,
            decided_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            run_id=run_id,
            class_names=class_names,
        )
        # History first: a crash before the champion is replaced leaves a promotion on record that did not take effect,
        # and the next run decides again against the real champion; the other order would lose the previous champion.
        _append_line(registry_dir / HISTORY_FILE, decision.model_dump_json() + "\n")
        if promoted and (champion is None or champion.model_digest != model.digest):
            record = Champion(**decision.model_dump(include=set(Scores.model_fields) | {"model_path", "run_id", "class_names"}),
                              promoted_at=decision.decided_at)
            _replace(registry_dir / CHAMPION_FILE, record.model_dump_json(indent=2) + "\n")
    log(f"model {model.digest[:16]}: {decision.verdict}")
    return decision


def _registry_lock(registry_dir: Any, locks: Any) -> Any:
    """Lock the registry: in Redis with Redis stage locks (roots that several machines share), else by a flock on this
    machine: on the registry's lock file, or for a registry on object storage on a lock file in the temp folder."""
    if isinstance(locks, RedisLockManager):
        return locks.held("registry")
    if is_remote(registry_dir):
        return FlockLockManager(lock_dir(registry_dir)).held("registry")
    return flocked(registry_dir / LOCK_FILE)


def _replace(path: Any, text: str) -> None:
    # An object is replaced whole by one PUT; a file by a rename.
    if is_remote(path):
        path.write_text(text)
    else:
        atomic_write(path, text)


def judge(test_accuracy: float, champion: Scores | None, config: PromotionConfig) -> tuple[bool, str]:
    """Return whether a model with this test accuracy beats the champion under the config, and why, with numbers."""
    acc, gate, tolerance = test_accuracy, config.min_test_accuracy, config.tolerance
    below_gate = acc < gate - SLACK
    if champion is None:
        if below_gate:
            return False, f"no champion yet, but test accuracy {acc:.4f} is below the gate {gate:.4f}"
        return True, f"first model: no champion yet and test accuracy {acc:.4f} passes the gate {gate:.4f}"
    if below_gate:
        return False, f"test accuracy {acc:.4f} is below the gate {gate:.4f}"
    best = champion.test_accuracy
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


def read_champion(registry_dir: Path) -> Champion | None:
    """Return the current champion record, or None if there is none yet."""
    path = as_root(registry_dir) / CHAMPION_FILE
    text = _read_text(path, "the champion record")
    return None if text is None else _parse(Champion, text, str(path), "the champion record")


def read_history(registry_dir: Path) -> list[Decision]:
    """Return every recorded decision, oldest first."""
    path = as_root(registry_dir) / HISTORY_FILE
    text = _read_text(path, "the decision history") or ""
    if text and not text.endswith("\n"):
        raise PipelineError(f"{path}: line {text.count(chr(10)) + 1}: incomplete (no line end); the history is damaged")
    return [_parse(Decision, line, f"{path}: line {n}", "a decision") for n, line in enumerate(text.splitlines(), 1)]


def _read_text(path: Path, what: str) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: cannot read {what} ({exc})") from None


def _parse(kind: type[Record], text: str, where: str, what: str) -> Record:
    try:
        return kind.model_validate_json(text)
    except ValidationError as exc:
        raise PipelineError(f"{where}: expected {what}, found {validation_problems(exc)}") from None


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


def _recorded_decision(digest: str, history: list[Decision], champion: Champion | None,
                       config: PromotionConfig) -> Decision | None:
    # Only the latest decision on this model counts; an earlier one was overtaken by events.
    latest = next((d for d in reversed(history) if d.model_digest == digest), None)
    if latest is None:
        return None
    champion_digest = None if champion is None else champion.model_digest
    if latest.promoted:
        return latest if champion_digest == digest else None
    before_digest = None if latest.champion_before is None else latest.champion_before.model_digest
    same_rules = latest.gate == config.min_test_accuracy and latest.tolerance == config.tolerance
    return latest if before_digest == champion_digest and same_rules else None


def _append_line(path: Any, line: str) -> None:
    if is_remote(path):  # objects cannot be appended to: the whole history again, under the registry's lock
        path.write_text((_read_text(path, "the decision history") or "") + line)
        return
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


@dataclass(frozen=True)
class KnownModel:
    """A model the registry or the models folder knows: its digest, its file and its class names if recorded."""

    digest: str
    path: Path
    class_names: list[str] | None = None


def find_model(registry_dir: Path, models_dir: Path, spec: str) -> KnownModel:
    """Return the model that `spec` names: `champion`, a digest or a unique prefix of one (at least 4 hex digits).

    Digests are those of the registry's decisions and of the published folders in `models_dir` (named by their
    first 16 hex digits).
    """
    registry_dir, models_dir = as_root(registry_dir), as_root(models_dir)
    if spec == "champion":
        champion = read_champion(registry_dir)
        if champion is None:
            raise PipelineError(f"{registry_dir / CHAMPION_FILE}: no champion yet: run `mnist-pipeline run` first "
                                "(a model that passes the promotion gate becomes the champion), or name a model by "
                                "digest or path")
        return KnownModel(champion.model_digest, as_root(champion.model_path), champion.class_names)
    prefix = spec.lower()
    if len(prefix) < 4 or any(c not in "0123456789abcdef" for c in prefix):
        raise PipelineError(f"model {spec!r}: expected `champion`, a model digest (at least 4 hex digits) or a path "
                            "to a model.keras file")
    known: dict[str, KnownModel] = {}
    for decision in read_history(registry_dir):  # later decisions (and their class names) win
        known[decision.model_digest] = KnownModel(decision.model_digest, as_root(decision.model_path), decision.class_names)
    folders = sorted(p for p in models_dir.iterdir() if p.is_dir()) if models_dir.is_dir() else []
    for folder in folders:
        if not any(d.startswith(folder.name) for d in known) and (folder / MODEL_FILE).is_file():
            known[folder.name] = KnownModel(folder.name, folder / MODEL_FILE)
    matches = sorted(d for d in known if d.startswith(prefix))
    if not matches:
        raise PipelineError(f"model {spec}: no model with this digest in {registry_dir / HISTORY_FILE} or {models_dir}")
    if len(matches) > 1:
        raise PipelineError(f"model {spec}: ambiguous prefix, matches {len(matches)} models: "
                            + ", ".join(d[:16] for d in matches[:5]) + "; give more digits")
    return known[matches[0]]
