"""Promote stage: decide whether an evaluated model becomes the champion, and keep a registry of every decision.

The registry (read by tasks/registry.py) is a folder holding `champions/<dataset>.json` (each dataset's champion)
and `history.jsonl` (one decision per line, appended). Deciding is idempotent: a rerun on the same model with nothing changed returns the recorded decision and
writes nothing, so the flow can call it on every run and hand the result to cached stages.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Callable
from typing import Any

from tasks.artifacts import ArtifactRef
from tasks.errors import Log, PipelineError, quiet
from tasks.files import flocked
from tasks.dataset import version_label
from tasks.layout import DECISIONS_FILE, METRICS_FILE, MODEL_FILE, REGISTRY_LOCK
from tasks.locks import RedisLockManager
from tasks.registry import (Champion, Decision, PromotionConfig, Scores, champion_path, champion_record,
                            promotion_in_flight, read_champion, read_history, recorded_decision)
from tasks.storage import append_line, as_root, lock_file, make_folder, version, write_text

# Keras reports accuracy as float32, so 9700 of 10000 may arrive as 0.96999997: compare with a slack far below one
# image in ten thousand, so that a model exactly at the gate or exactly at the tolerance passes as the rules say.
SLACK = 1e-6


def decide_promotion(model: ArtifactRef, evaluation: ArtifactRef, registry_dir: Path, config: PromotionConfig,
                     dataset: str, run_id: str | None = None, log: Log = quiet, class_names: list[str] | None = None,
                     locks: Any = None, rescore: Callable[[Champion], Scores] | None = None) -> Decision:
    """Decide whether the evaluated model becomes its dataset's champion, record the decision, and return it.

    Both are judged on the same data: a champion whose scores were measured on another data version than the
    challenger's evaluation is scored on the challenger's first, by `rescore` (an evaluation of the champion's model,
    cached). The registry is locked for the decision by its lock file, or with Redis stage locks (`locks`, roots that
    several machines share) by its key in Redis. On object storage without Redis the lock file is this machine's
    alone: the decision is then written only if no other machine wrote the history since it was read here (a
    conditional write), else the history is read again and the model judged again.
    """
    registry_dir = as_root(registry_dir)
    scores = _scores(model, evaluation)
    make_folder(registry_dir)
    redis = isinstance(locks, RedisLockManager)
    with locks.held("registry") if redis else flocked(lock_file(registry_dir, REGISTRY_LOCK)):
        while True:
            unchanged = None if redis else version(registry_dir / DECISIONS_FILE)
            champion, history = read_champion(registry_dir, dataset), read_history(registry_dir)
            pending = promotion_in_flight(history, champion, dataset)
            if pending is not None:  # judged against the champion on record, whose record is completed here
                write_text(champion_path(registry_dir, dataset), pending.model_dump_json(indent=2) + "\n")
                champion = pending
            decision = recorded_decision(model.digest, history, champion, config)
            if decision is not None:
                log(f"model {model.digest[:16]}: decision of {decision.decided_at} still holds: {decision.verdict}")
                break
            decision = _judged(model, scores, champion, config, dataset, run_id, log, class_names, rescore)
            # History first: a crash before the champion is replaced leaves a promotion on record that the next
            # decision on the model completes (its champion_before still the champion) or that was overtaken.
            if append_line(registry_dir / DECISIONS_FILE, decision.model_dump_json() + "\n", unchanged):
                log(f"model {model.digest[:16]}: {decision.verdict}")
                break
            log(f"model {model.digest[:16]}: another machine wrote the registry while this one judged the model; "
                "judging it again")
        if decision.promoted and (champion is None or champion.model_digest != model.digest):
            write_text(champion_path(registry_dir, dataset), champion_record(decision).model_dump_json(indent=2) + "\n")
    return decision


def _judged(model: ArtifactRef, scores: tuple[float, float, dict[str, Any] | None], champion: Champion | None,
            config: PromotionConfig, dataset: str, run_id: str | None, log: Log, class_names: list[str] | None,
            rescore: Callable[[Champion], Scores] | None) -> Decision:
    """Return the decision on a model with these scores against the champion, scored on the same data first."""
    test_accuracy, test_loss, version = scores
    before: Scores | None = champion
    if champion is not None and champion.model_digest != model.digest and champion.data_version != version:
        if rescore is None:
            raise PipelineError(f"the champion {champion.model_digest[:16]} was scored on other data than model "
                                f"{model.digest[:16]}: expected a way to score it on the same data")
        before = rescore(champion)
        log(f"champion {champion.model_digest[:16]} scored on data version {version_label(version)}: test "
            f"accuracy {before.test_accuracy:.4f} (was {champion.test_accuracy:.4f} on "
            f"{version_label(champion.data_version)})")
    promoted, reason = judge(test_accuracy, before, config)
    if champion is not None and champion.model_digest == model.digest:
        # Only when the history has no valid decision for the champion (history deleted, champion.json set by
        # hand): judging a model against itself means nothing, and it stays champion.
        promoted, reason = True, f"already the champion (test accuracy {test_accuracy:.4f}), no decision on record"
    return Decision(
        model_digest=model.digest,
        model_path=str(model.path(MODEL_FILE)),
        test_accuracy=test_accuracy,
        test_loss=test_loss,
        promoted=promoted,
        reason=reason,
        champion_before=None if before is None else Scores(**before.model_dump(include=set(Scores.model_fields))),
        gate=config.min_test_accuracy,
        tolerance=config.tolerance,
        decided_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        run_id=run_id,
        class_names=class_names,
        dataset=dataset,
        data_version=version,
    )


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


def _scores(model: ArtifactRef, evaluation: ArtifactRef) -> tuple[float, float, dict[str, Any] | None]:
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
    return (*scores, metrics.get("data_version"))
