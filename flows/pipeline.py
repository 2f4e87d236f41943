"""The mnist-pipeline flow: chain the six stages, each cached by the content of its inputs (flows/runner.py)."""

from __future__ import annotations

import json
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows import ui
from flows.config import STAGES, PipelineConfig, Stage
from flows.runner import TASKS, recorded, run_stage
from flows.stages import OTHER_STEPS, STEPS, batch_inputs, dataset
from tasks import keras_runtime, promote, storage
from tasks.artifacts import TRAINING_FACTS, ArtifactRef, published_ref
from tasks.dataset import data_version, landed, version_label
from tasks.errors import PipelineError
from tasks.layout import BATCH_FILE, BATCHES_DIR, QUARANTINE_DIR, REPORT_HTML, SUCCESS_MARKER
from tasks.locks import holding_run_lock
from tasks.registry import Champion, Scores, champion_path, read_history


@flow(name="mnist-pipeline")
def mnist_pipeline(
    config: PipelineConfig | None = None,
    until: Stage = "report",
    rerun: list[Stage] | None = None,
    only: Stage | None = None,
) -> dict[str, Any]:
    """Run the stages up to `until` (or just `only`), reusing every cached stage except those named in `rerun`."""
    config = config or PipelineConfig()
    config.check_services(log=get_run_logger().warning)
    with holding_run_lock(config.lock_manager()):  # gc removes nothing until the run ends
        last = only or until
        stages = STAGES[: STAGES.index(last) + 1]
        summary: dict[str, Any] = {"run_id": str(flow_run.get_id()), "stages": {}}
        results: dict[str, Any] = {}
        for name in stages:
            step = STEPS[name]
            inputs = step.inputs(config, results)
            if only and name != only:
                results[name] = _existing_artifact(name, inputs, config, only)
            else:
                refresh = name in (rerun or ()) or name == only
                results[name], computed = run_stage(TASKS[name], inputs, config, refresh)
                summary["stages"][name] = {
                    "state": "completed" if computed else "cached",
                    "artifacts": [f.path for f in results[name].files.values()],
                }
                if name == "train":  # how the model was trained (by the run that trained it): the timings, a resume
                    summary["stages"][name].update({key: results[name].meta.get(key) for key in TRAINING_FACTS})
                if computed and "train" in stages[stages.index(name) + 1 :]:
                    # Training likely follows (unless this stage's output is unchanged): import TensorFlow meanwhile.
                    keras_runtime.warm_up()
                if name == "report" and not computed:
                    # A cached stage publishes nothing; the run's page in the UI should still show its report.
                    ui.publish_report(results["report"], results["evaluate"], results["promotion"])
            if name == "preprocess" and config.batches.root:
                results["batches"] = check_batches(config, results, summary)
                _log_dropped(config, results)
            if name == "evaluate":
                results["promotion"] = _decide_promotion(config, results, summary)
        if "report" in results:
            summary["report"] = str(results["report"].path(REPORT_HTML))
        return summary


def check_batches(config: PipelineConfig, results: dict[str, Any], summary: dict[str, Any]) -> list[ArtifactRef]:
    """Check every landed batch in name order (each a cached stage, keyed by its files); record the quarantined ones
    in artifacts/quarantine/; return the accepted ones.

    A batch whose check is recorded and intact is looked up (under its stage lock), not run as a Prefect task: a task
    run, even a cached one, walks all its inputs, which hold the batches accepted before it, so with 100 batches
    taken a no-op run grew by seconds (BENCHMARKS.md, "Batches").
    """
    logger = get_run_logger()
    complete, incomplete = landed(str(config.batches.root).rstrip("/"))
    for name in incomplete:
        logger.warning("batch %s has no %s marker (still being copied, or abandoned): skipped", name, SUCCESS_MARKER)
    accepted: list[ArtifactRef] = []
    summary["batches"] = {}
    locks = config.lock_manager()
    for name in complete:
        inputs = batch_inputs(config, results, name, accepted)
        ref, computed = recorded(OTHER_STEPS["check_batch"], inputs, config, locks), False
        if ref is None:
            ref, computed = run_stage(TASKS["check_batch"], inputs, config)
        verdict = ref.meta["verdict"]
        summary["batches"][name] = {"state": "completed" if computed else "cached", "verdict": verdict,
                                    "reasons": ref.meta["reasons"], "images": ref.meta["images"], "digest": ref.digest}
        record = f"{config.artifacts_dir}/{QUARANTINE_DIR}/{name}.json"
        if verdict == "accepted":
            accepted.append(ref)
            storage.remove(record)
        elif not _holds(record, text := ref.path(BATCH_FILE).read_text()):  # a no-op run rewrites nothing
            storage.write_text(record, text)
    summary["data_version"] = data_version(results["preprocess"], accepted)
    return accepted


def _holds(path: str, text: str) -> bool:
    try:
        return storage.read_bytes(path) == text.encode()
    except FileNotFoundError:
        return False


def _log_dropped(config: PipelineConfig, results: dict[str, Any]) -> None:
    """Say which batches the dataset's last judged model was trained on that this run's data lacks: deleted, changed
    in place or quarantined since, so the data version changes."""
    key = dataset(config, results).key()
    last = next((d for d in reversed(read_history(config.registry_dir)) if d.dataset == key and d.data_version), None)
    if last is None:
        return
    now = {batch.digest for batch in results["batches"]}
    gone = [digest for digest in last.data_version["batches"] if digest not in now]
    if gone:
        names = []
        for digest in gone:  # by name while the checked batch is still in the data root
            checked = f"{config.data_dir}/{BATCHES_DIR}/{digest[:16]}/{BATCH_FILE}"
            try:
                names.append(json.loads(storage.read_bytes(checked))["name"])
            except (OSError, ValueError, KeyError):
                names.append(digest[:16])
        get_run_logger().warning(
            "batches that model %s was trained on are not in this run's data (deleted, changed in place or "
            "quarantined since): %s; data version %s, was %s", last.model_digest[:16], ", ".join(names),
            version_label(data_version(results["preprocess"], results["batches"])), version_label(last.data_version))


def _existing_artifact(name: Stage, inputs: dict[str, Any], config: PipelineConfig, only: str) -> ArtifactRef:
    """Return the cached artifact of a stage before `--only`'s, which is used as it is, not run."""
    ref = recorded(STEPS[name], inputs, config)
    if ref is None:
        raise PipelineError(
            f"--only {only}: stage {name}: expected artifacts of an earlier run with this configuration, "
            f"found none; run `mnist-pipeline run --until {name}` first"
        )
    return ref


def _decide_promotion(config: PipelineConfig, results: dict[str, Any], summary: dict[str, Any]) -> promote.Decision:
    """Decide (or look up) whether the evaluated model becomes the champion; record the headline in the summary.

    Not a stage: the decision depends on the registry's current champion, so it is made (or looked up) every run.
    """
    evaluation = results["evaluate"]
    summary["metrics"] = {key: evaluation.meta[key] for key in ("test_accuracy", "test_loss", "first_20_predictions")}
    decision = decide(config, results, summary["run_id"])
    summary["promotion"] = {"promoted": decision.promoted, "reason": decision.reason, "dataset": decision.dataset}
    return decision


def decide(config: PipelineConfig, results: dict[str, Any], run_id: str) -> promote.Decision:
    """Decide whether the model of `results["train"]`, scored by `results["evaluate"]`, becomes its dataset's
    champion; a champion scored on other data is first scored on the same data (an evaluate stage, cached)."""
    classes = dataset(config, results)

    def rescore(champion: Champion) -> Scores:
        folder = str(storage.as_root(champion.model_path).parent)
        model = published_ref(folder, "train", champion.model_digest)
        if model is None or model.problem() is not None:
            raise PipelineError(f"champion {champion.model_digest[:16]}: its model folder {folder} is "
                                f"{'gone' if model is None else 'damaged'}, so it cannot be scored on the challenger's "
                                f"data; restore it, or remove {champion_path(config.registry_dir, classes.key())} "
                                "to judge the next model without a champion")
        scored, _ = run_stage(TASKS["evaluate"], STEPS["evaluate"].inputs(config, {**results, "train": model}), config)
        return Scores(model_digest=champion.model_digest, test_accuracy=scored.meta["test_accuracy"],
                      test_loss=scored.meta["test_loss"])

    return promote.decide_promotion(results["train"], results["evaluate"], config.registry_dir, config.promotion,
                                    dataset=classes.key(), run_id=run_id, log=get_run_logger().info,
                                    class_names=classes.class_names, locks=config.lock_manager(), rescore=rescore)
