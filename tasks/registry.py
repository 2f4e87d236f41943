"""The promotion registry, read: the champion (`champion.json`) and every decision (`history.jsonl`), which recorded
decision still holds, and which model a name (`champion`, a digest prefix) means. Writing it is the promote stage's
(tasks/promote.py); this module imports no stage, so `status`, `history`, `diff` and `predict` read the registry
without TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.dataset import DatasetConfig
from tasks.errors import PipelineError, validation_problems
from tasks.layout import CHAMPION_FILE, CHAMPIONS_DIR, DECISIONS_FILE, MODEL_FILE
from tasks.storage import as_root, list_names

SCHEMA_VERSION = 1


class PromotionConfig(BaseModel):
    """When a newly evaluated model replaces the champion."""

    model_config = ConfigDict(extra="forbid")

    min_test_accuracy: float = Field(0.97, ge=0, le=1, description="Absolute gate: no model below it is promoted.")
    tolerance: float = Field(0.002, ge=0, le=1,
                             description="How much lower than the champion's a new model's test accuracy may be.")


class Scores(BaseModel):
    """A model (by digest) and its test scores."""

    # Strict: a registry file with a string or a boolean where a number belongs is damaged, not converted.
    model_config = ConfigDict(strict=True, frozen=True)

    model_digest: str
    test_accuracy: float
    test_loss: float


class Registered(Scores):
    """What the registry records of a model besides its scores: its dataset and the data it was judged on."""

    schema_version: int = SCHEMA_VERSION
    model_path: str
    run_id: str | None
    # The names of the model's classes (label order) when its dataset has them; predictions name their classes.
    class_names: list[str] | None = None
    # The dataset's identity (DatasetConfig.key): models of another dataset never compete.
    dataset: str
    # The data the model was trained and its scores measured on (tasks.dataset.data_version); None before batches.
    data_version: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _dataset_of_earlier_records(cls, data: Any) -> Any:
        # Records written before datasets had their own champions: the unnamed dataset of their classes.
        if isinstance(data, dict) and "dataset" not in data:
            names = data.get("class_names")
            data = {**data, "dataset": DatasetConfig(num_classes=len(names) if names else DatasetConfig().num_classes,
                                                     class_names=names).key()}
        return data


class Champion(Registered):
    """The record of a dataset's champion (`champions/<dataset>.json`): the model currently promoted."""

    promoted_at: str


class Decision(Registered):
    """One line of `history.jsonl`: whether a model was promoted, why, and against which champion (its scores on the
    same data version)."""

    promoted: bool
    reason: str
    champion_before: Scores | None
    gate: float
    tolerance: float
    decided_at: str

    @property
    def verdict(self) -> str:
        """Return the decision in words: promoted or not, and why."""
        return ("promoted" if self.promoted else "not promoted") + f": {self.reason}"


Record = TypeVar("Record", bound=BaseModel)


def champion_path(registry_dir: Path, dataset: str) -> Path:
    """Return where the record of a dataset's champion lives."""
    return as_root(registry_dir) / CHAMPIONS_DIR / f"{dataset}.json"


def read_champion(registry_dir: Path, dataset: str) -> Champion | None:
    """Return the record of a dataset's champion, or None if it has none yet."""
    path = champion_path(registry_dir, dataset)
    text = read_text(path, "the champion record")
    if text is not None:
        return _parse(Champion, text, str(path), "the champion record")
    earlier = _earlier_champion(registry_dir)  # a registry from before datasets had their own champions
    return earlier if earlier is not None and earlier.dataset == dataset else None


def read_champions(registry_dir: Path) -> list[Champion]:
    """Return the champion of every dataset in the registry."""
    folder = as_root(registry_dir) / CHAMPIONS_DIR
    champions = [read_champion(registry_dir, name[: -len(".json")])
                 for name in list_names(folder) if name.endswith(".json")]
    earlier = _earlier_champion(registry_dir)
    if earlier is not None and earlier.dataset not in {c.dataset for c in champions if c}:
        champions.append(earlier)
    return [c for c in champions if c is not None]


def _earlier_champion(registry_dir: Path) -> Champion | None:
    path = as_root(registry_dir) / CHAMPION_FILE
    text = read_text(path, "the champion record")
    return None if text is None else _parse(Champion, text, str(path), "the champion record")


def read_history(registry_dir: Path) -> list[Decision]:
    """Return every recorded decision, oldest first."""
    path = as_root(registry_dir) / DECISIONS_FILE
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
    before_digest = None if latest.champion_before is None else latest.champion_before.model_digest
    same_rules = latest.gate == config.min_test_accuracy and latest.tolerance == config.tolerance
    if latest.promoted and champion_digest == digest:
        return latest
    # A promotion whose champion record is not written yet (by another machine right now, or cut short by a crash)
    # holds while the champion it beat is still the champion: the caller completes it.
    return latest if before_digest == champion_digest and same_rules else None


def promotion_in_flight(history: list[Decision], champion: Champion | None, dataset: str) -> Champion | None:
    """Return the champion record that the dataset's latest promotion on record makes, if that record is not written
    yet (another machine writes it right now, or a crash cut it short): the champion it beat is still the champion.
    Without a champion record there is none: a removed record means "judge the next model without a champion"."""
    latest = next((d for d in reversed(history) if d.promoted and d.dataset == dataset), None)
    if champion is None or latest is None or latest.champion_before is None:
        return None
    if latest.model_digest == champion.model_digest or latest.champion_before.model_digest != champion.model_digest:
        return None
    return champion_record(latest)


def champion_record(decision: Decision) -> Champion:
    """Return the champion record that a promotion makes."""
    return Champion(**decision.model_dump(include=set(Registered.model_fields) - {"schema_version"}),
                    promoted_at=decision.decided_at)


@dataclass(frozen=True)
class KnownModel:
    """A model the registry or the models folder knows: its digest, its file and its class names if recorded."""

    digest: str
    path: Path
    class_names: list[str] | None = None


def find_model(registry_dir: Path, models_dir: Path, spec: str, dataset: str) -> KnownModel:
    """Return the model that `spec` names: `champion` (the dataset's), a digest or a unique prefix of one (at least 4
    hex digits).

    Digests are those of the registry's decisions and of the published folders in `models_dir` (named by their
    first 16 hex digits).
    """
    registry_dir, models_dir = as_root(registry_dir), as_root(models_dir)
    if spec == "champion":
        champion = read_champion(registry_dir, dataset)
        if champion is None:
            others = ", ".join(c.dataset for c in read_champions(registry_dir))
            raise PipelineError(f"{champion_path(registry_dir, dataset)}: dataset {dataset} has no champion yet: run "
                                "`mnist-pipeline run` first (a model that passes the promotion gate becomes the "
                                "champion), or name a model by digest or path"
                                + (f"; champions of other datasets: {others} (--dataset)" if others else ""))
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
        raise PipelineError(f"model {spec}: no model with this digest in {registry_dir / DECISIONS_FILE} or {models_dir}")
    if len(matches) > 1:
        raise PipelineError(f"model {spec}: ambiguous prefix, matches {len(matches)} models: "
                            + ", ".join(d[:16] for d in matches[:5]) + "; give more digits")
    return known[matches[0]]
