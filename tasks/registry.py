"""The promotion registry, read: the champion (`champion.json`) and every decision (`history.jsonl`), and which
recorded decision still holds. Writing it is the promote stage's (tasks/promote.py); this module imports no stage, so
`mnist-pipeline status`, `history` and `diff` read the registry without Prefect or TensorFlow.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.core import PipelineError, validation_problems
from tasks.storage import as_root

SCHEMA_VERSION = 1
CHAMPION_FILE = "champion.json"
HISTORY_FILE = "history.jsonl"


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


def read_champion(registry_dir: Path) -> Champion | None:
    """Return the current champion record, or None if there is none yet."""
    path = as_root(registry_dir) / CHAMPION_FILE
    text = read_text(path, "the champion record")
    return None if text is None else _parse(Champion, text, str(path), "the champion record")


def read_history(registry_dir: Path) -> list[Decision]:
    """Return every recorded decision, oldest first."""
    path = as_root(registry_dir) / HISTORY_FILE
    text = read_text(path, "the decision history") or ""
    if text and not text.endswith("\n"):
        raise PipelineError(f"{path}: line {text.count(chr(10)) + 1}: incomplete (no line end); the history is damaged")
    return [_parse(Decision, line, f"{path}: line {n}", "a decision") for n, line in enumerate(text.splitlines(), 1)]


def read_text(path: Path, what: str) -> str | None:
    """Return a registry file's text, None if it does not exist; one line naming it if it cannot be read."""
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


def recorded_decision(digest: str, history: list[Decision], champion: Champion | None,
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
