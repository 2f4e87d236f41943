"""Content-addressed caching of stage results on top of Prefect's persisted task results."""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.filesystems import LocalFileSystem
from prefect.logging import get_run_logger
from prefect.results import ResultStore
from prefect.serializers import JSONSerializer
from prefect.tasks import Task
from pydantic import BaseModel

from tasks.core import ArtifactRef, sha256_bytes, sha256_json


def canonical(value: Any) -> Any:
    """Reduce a task input to plain JSON for a cache key; an artifact reference counts by its content digest."""
    if isinstance(value, ArtifactRef):
        return {"artifact": value.stage, "digest": value.digest}
    if isinstance(value, BaseModel):
        return canonical(value.model_dump(mode="json"))
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def code_version(module_names: tuple[str, ...]) -> str:
    """Return a digest of the source files of the modules a stage's result depends on."""
    sources = {}
    for name in module_names:
        path = inspect.getsourcefile(importlib.import_module(name))
        sources[name] = sha256_bytes(Path(path).read_bytes()) if path else name
    return sha256_json(sources)


def stage_key(stage: str, inputs: dict[str, Any], modules: tuple[str, ...]) -> str:
    """Return the cache key of a stage: its name, its inputs' content and its code version."""
    return f"{stage}-" + sha256_json({"inputs": canonical(inputs), "code": code_version(modules)})


@dataclass
class StageCache(CachePolicy):
    """Key a stage by content and distrust a cached result whose files are missing or changed."""

    cache_dir: str = ""
    modules: tuple[str, ...] = ()

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        key = stage_key(task_ctx.task.name, inputs, self.modules)
        self._drop_if_stale(key)
        return key

    def _drop_if_stale(self, key: str) -> None:
        record_path = Path(self.cache_dir) / key
        if not record_path.exists():
            return
        try:
            ref = result_store(self.cache_dir).read(key).result
            problem = ref.problem() if isinstance(ref, ArtifactRef) else "the record holds no artifact reference"
        except Exception as exc:  # an unreadable record is as good as none
            problem = f"unreadable cache record {record_path} ({exc})"
        if problem:
            get_run_logger().warning("Cached result of %s not trusted: %s; recomputing", key.split("-")[0], problem)
            record_path.unlink(missing_ok=True)


def lookup(stage: str, cache_dir: Path, modules: tuple[str, ...], inputs: dict[str, Any]) -> ArtifactRef | None:
    """Return the cached artifact of a stage for these inputs if it exists and its files are intact, else None."""
    key = stage_key(stage, inputs, modules)
    if not (Path(cache_dir) / key).exists():
        return None
    try:
        ref = result_store(cache_dir).read(key).result
    except Exception:  # an unreadable record is as good as none
        return None
    return ref if isinstance(ref, ArtifactRef) and ref.problem() is None else None


def result_store(cache_dir: str | Path) -> ResultStore:
    """Return the store that holds the stage results (JSON records, no pickles) under `cache_dir`."""
    return ResultStore(result_storage=LocalFileSystem(basepath=str(cache_dir)), serializer=JSONSerializer())


def cached(stage_task: Task, cache_dir: Path, modules: tuple[str, ...], refresh: bool = False) -> Task:
    """Return `stage_task` configured to persist its result under `cache_dir` and reuse it by content."""
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return stage_task.with_options(
        cache_policy=StageCache(cache_dir=str(cache_dir), modules=modules),
        persist_result=True,
        result_storage=Path(cache_dir),
        result_serializer=JSONSerializer(),
        refresh_cache=refresh,
    )
