"""`mnist-pipeline status`: for a configuration, which stages have an intact cached result and why the others do not,
without a run: no Prefect, no TensorFlow. A stage's key is computed as the flow computes it (flows/stages.py); a
result recorded under it whose files are intact is up to date. Otherwise the key's components are compared with those
recorded for the closest earlier key of the same stage (flows/runner.py records them), which says what changed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.config import PROJECT_ROOT, STAGES, PipelineConfig, Stage
from flows.stages import OTHER_STEPS, STEPS, batch_inputs, dataset
from tasks import storage
from tasks.errors import PipelineError
from tasks.artifacts import ArtifactRef
from tasks.keys import check_record, components_path, key_components, key_of, source_file
from tasks.dataset import data_version, landed, version_label
from tasks.layout import KEYS_DIR, SUCCESS_MARKER
from tasks.registry import read_champion, read_history, recorded_decision

UP_TO_DATE, STALE, MISSING = "up to date", "stale", "missing"
# Differences named per stage; the rest are counted.
SHOWN = 4


@dataclass
class StageStatus:
    stage: Stage
    state: str
    why: list[str] = field(default_factory=list)
    key: str | None = None
    artifacts: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)  # the batches row: the key of each batch's recorded check


def pipeline_status(config: PipelineConfig, until: Stage = STAGES[-1]) -> list[StageStatus]:
    """Return the status of each stage up to `until`, in order; nothing is written."""
    results: dict[str, Any] = {}
    rows = []
    for name in STAGES[: STAGES.index(until) + 1]:
        step = STEPS[name]
        try:
            inputs = step.inputs(config, results)
        except KeyError as absent:  # an input that is not up to date: this stage's key is not known yet
            rows.append(_after(name, absent.args[0], {row.stage: row for row in rows}))
            continue
        components = key_components(step.task, step.module, inputs)
        row, ref = _stage_status(name, config.cache_dir, components)
        if ref is not None:
            results[name] = ref
            row.artifacts = [f.path for f in ref.files.values()]
        if name == "preprocess" and config.batches.root:
            rows.append(row)
            row = _batches_status(config, results)  # sets results["batches"] when every landed batch is checked
        if name == "evaluate" and "evaluate" in results:
            decision = recorded_decision(results["train"].digest, read_history(config.registry_dir),
                                         read_champion(config.registry_dir, dataset(config, results).key()),
                                         config.promotion)
            if decision is not None:
                results["promotion"] = decision
        rows.append(row)
    return rows


def _batches_status(config: PipelineConfig, results: dict[str, Any]) -> StageStatus:
    """Return the status of the landed batches: up to date when each one's check is recorded (then the accepted ones
    are what train, evaluate and report take), stale when one is not checked yet."""
    if "preprocess" not in results:
        return StageStatus("batches", STALE, ["after preprocess, which is not up to date"])
    complete, incomplete = landed(str(config.batches.root).rstrip("/"))
    step, accepted, keys, quarantined = OTHER_STEPS["check_batch"], [], [], []
    for name in complete:
        keys.append(key_of(key_components(step.task, step.module, batch_inputs(config, results, name, accepted))))
        ref, problem = check_record(config.cache_dir, keys[-1])
        if ref is None:
            return StageStatus("batches", STALE, [problem or f"batch {name} not checked yet (a run checks it)"],
                               checks=keys[:-1])
        if ref.meta["verdict"] == "accepted":
            accepted.append(ref)
        else:
            quarantined.append(f"{name} quarantined: {'; '.join(ref.meta['reasons'])}")
    results["batches"] = accepted
    skipped = f"; {len(incomplete)} without their {SUCCESS_MARKER} marker" if incomplete else ""
    version = version_label(data_version(results["preprocess"], accepted))
    return StageStatus("batches", UP_TO_DATE, [f"{len(complete)} batches checked, {len(accepted)} accepted (data "
                                               f"version {version}){skipped}", *quarantined], checks=keys)


def _after(stage: Stage, result: str, rows: dict[str, StageStatus]) -> StageStatus:
    """Return the status of a stage whose input `result` is not up to date (its key is not known before that runs)."""
    if result == "promotion":
        return StageStatus(stage, STALE, ["no promotion decision for this model against the current champion (a run decides it)"])
    upstream = rows[result]
    return StageStatus(stage, MISSING if upstream.state == MISSING else STALE, [f"after {result}, which is {upstream.state}"])


def _stage_status(name: Stage, cache_dir: Any, components: dict[str, Any]) -> tuple[StageStatus, ArtifactRef | None]:
    """Return a stage's status and, when it is up to date, its recorded artifact."""
    key = key_of(components)
    ref, problem = check_record(cache_dir, key)
    if problem is not None:
        return StageStatus(name, STALE, [problem], key), None
    if ref is not None:
        return StageStatus(name, UP_TO_DATE, [], key), ref
    earlier = _closest_earlier(name, cache_dir, components)
    if earlier is None:
        return StageStatus(name, MISSING, ["no result for this stage yet"], key), None
    why = differences(name, earlier, components)
    return StageStatus(name, STALE, why or [f"no result under its key {key} (its record was removed)"], key), None


def _closest_earlier(name: Stage, cache_dir: Any, components: dict[str, Any]) -> dict[str, Any] | None:
    """Return the recorded components of this stage's key that differ least from `components` (ties: the newest)."""
    prefix = components["stage"] + "-"
    candidates = []
    for file in storage.list_names(f"{cache_dir}/{KEYS_DIR}"):
        if not file.startswith(prefix) or not file.endswith(".json"):
            continue
        path = components_path(cache_dir, file.removesuffix(".json"))
        try:
            recorded = json.loads(storage.read_bytes(path))
        except (OSError, ValueError) as exc:
            raise PipelineError(f"{path}: expected the recorded components of a cache key, found unreadable JSON ({exc})") from None
        if not isinstance(recorded, dict) or not {"inputs", "code"} <= set(recorded):
            raise PipelineError(f"{path}: expected the recorded components of a cache key (inputs, code), found others")
        candidates.append(recorded)
    if not candidates:
        return None
    return max(candidates, key=lambda r: (-len(differences(name, r, components)), r.get("recorded_at", "")))


def differences(stage: str, earlier: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Return what changed from the earlier components of a stage's key to these, in words: inputs (upstream digests,
    parameters by their config name), then code (project files, library versions)."""
    found = []
    for name in sorted(set(earlier["inputs"]) | set(now["inputs"])):
        before, after = earlier["inputs"].get(name), now["inputs"].get(name)
        found += _value_differences(stage if name == "config" else name, before, after)
    code_before, code_now = earlier["code"], now["code"]
    for module in sorted(set(code_before["sources"]) | set(code_now["sources"])):
        before, after = code_before["sources"].get(module), code_now["sources"].get(module)
        if before != after:
            where = _source_name(module)
            found.append(f"{where} changed" if before and after else f"{where} {'added' if after else 'removed'}")
    for library in sorted(set(code_before["libraries"]) | set(code_now["libraries"])):
        before, after = code_before["libraries"].get(library), code_now["libraries"].get(library)
        if before != after:
            found.append(f"library {before or library + ' (none)'} -> {after or '(none)'}")
    return found


def _value_differences(path: str, before: Any, after: Any) -> list[str]:
    if before == after:
        return []
    if _is_artifact(before) or _is_artifact(after):
        stage = (after or before)["artifact"]
        return [f"the output of {stage} changed: {_digest(before)} -> {_digest(after)}"]
    if isinstance(before, dict) and isinstance(after, dict):
        if path == "decision":
            return [f"the promotion decision changed: {before.get('reason')!r} -> {after.get('reason')!r}"]
        return [line for key in sorted(set(before) | set(after))
                for line in _value_differences(f"{path}.{key}", before.get(key), after.get(key))]
    return [f"{path}: {_short(before)} -> {_short(after)}"]


def _is_artifact(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"artifact", "digest"}


def _digest(value: Any) -> str:
    return value["digest"][:16] if _is_artifact(value) else "(none)"


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def _source_name(module: str) -> str:
    """Return a project module's file (or a package's data file, `tasks.report:templates/x.j2`) relative to the
    checkout."""
    name, _, data = module.partition(":")
    path = Path(source_file(name))
    if data:
        path = path.parent / data
    try:
        return str(path.relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


def status_summary(rows: list[StageStatus]) -> str:
    """Return one line per stage for people, each reason indented below its stage."""
    lines = []
    for row in rows:
        where = row.artifacts[0].rpartition("/")[0] if row.artifacts else ""
        lines.append(f"{row.stage:<11} {row.state:<11} {where}".rstrip())
        shown = row.why[:SHOWN] + ([f"and {len(row.why) - SHOWN} more"] if len(row.why) > SHOWN else [])
        lines += [f"    {line}" for line in shown]
    return "\n".join(lines)


def status_json(rows: list[StageStatus]) -> dict[str, Any]:
    return {"up_to_date": all(r.state == UP_TO_DATE for r in rows),
            "stages": {r.stage: {"state": r.state, "why": r.why, "key": r.key, "artifacts": r.artifacts} for r in rows}}

