"""The mnist-pipeline flow: chain the stages, each cached by the content of its inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run
from prefect.states import State
from prefect.tasks import Task

from flows.config import STAGES, PipelineConfig, Stage
from tasks import download, preprocess, validate
from tasks.caching import cached
from tasks.core import ArtifactRef


def _discard_failure_record(state: State, cache_dir: Path) -> None:
    """Delete the exception record Prefect persists for a failed task, so a failed stage leaves no file behind."""
    key = getattr(getattr(state.data, "metadata", None), "storage_key", None)
    if key and Path(key).parent == cache_dir:
        Path(key).unlink(missing_ok=True)


@flow(name="mnist-pipeline")
def mnist_pipeline(config: PipelineConfig | None = None, until: Stage = STAGES[-1], rerun: list[Stage] | None = None) -> dict[str, Any]:
    """Run the stages up to `until`, reusing every cached stage except those named in `rerun`."""
    config = config or PipelineConfig()
    rerun = set(rerun or ())
    summary: dict[str, Any] = {"run_id": str(flow_run.get_id()), "stages": {}}

    def run(stage: str, stage_task: Task, modules: tuple[str, ...], **inputs: Any) -> ArtifactRef:
        configured = cached(stage_task, config.cache_dir, modules, refresh=stage in rerun)
        state = configured(**inputs, return_state=True)
        if state.is_failed():
            _discard_failure_record(state, config.cache_dir)
        ref = state.result()  # re-raises the stage's error
        summary["stages"][stage] = {
            "state": "cached" if state.name == "Cached" else "completed",
            "artifacts": [f.path for f in ref.files.values()],
        }
        return ref

    raw = run(
        "download",
        download.download_mnist,
        download.MODULES,
        config=config.download,
        data_dir=config.data_dir,
        fingerprint=download.source_fingerprint(config.download.source),
    )
    if until == "download":
        return summary
    report = run("validate", validate.validate_mnist, validate.MODULES, raw=raw, config=config.validation, artifacts_dir=config.artifacts_dir)
    if until == "validate":
        return summary
    run("preprocess", preprocess.preprocess_mnist, preprocess.MODULES, raw=raw, validation=report, data_dir=config.data_dir)
    return summary
