"""Content-addressed caching of stage results on top of Prefect's persisted task results."""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.logging import get_run_logger
from prefect.serializers import JSONSerializer
from prefect.tasks import Task

from tasks import storage
from tasks.core import ArtifactRef
from tasks.keys import SERIALIZER, components_path, key_components, key_of, parse_record
from tasks.locks import FlockLockManager, lock_dir

assert JSONSerializer().model_dump(mode="json") == SERIALIZER, "Prefect's JSONSerializer describes itself differently"


def stage_key(stage_task: Task, inputs: dict[str, Any]) -> str:
    """Return the cache key of a stage: its name, its inputs' content and the code it runs."""
    return key_of(key_components(stage_task.name, stage_task.fn.__module__, inputs))


@dataclass
class StageCache(CachePolicy):
    """Key a stage by content and distrust a cached result whose files are missing or changed.

    SERIALIZABLE: a run that finds another run computing the same stage waits for it and then uses its result, so
    concurrent runs on the same roots do each stage's work once.
    """

    cache_dir: str = ""
    isolation_level: Any = "SERIALIZABLE"
    lock_manager: Any = field(default=None)

    def __post_init__(self) -> None:
        if self.lock_manager is None and self.cache_dir:
            self.lock_manager = FlockLockManager(lock_dir(self.cache_dir))

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        key = stage_key(task_ctx.task, inputs)
        # Under the stage's lock: a record another run is writing right now is not half-read and thrown away.
        with self.lock_manager.held(key) if self.lock_manager else nullcontext():
            if self.cache_dir:
                trusted_result(self.cache_dir, key)
        return key


def trusted_result(cache_dir: str | Path, key: str) -> ArtifactRef | None:
    """Return the artifact recorded under `key` if its files are intact; otherwise drop the record (with a warning).

    Files untouched since they were published (same inode, size, mtime and ctime; on object storage, the same ETag)
    are not re-hashed.
    """
    record_path = f"{cache_dir}/{key}"
    try:
        data = storage.read_bytes(record_path)
    except FileNotFoundError:
        return None
    try:
        ref = parse_record(data)
        problem = ref.problem(trust_unchanged=True)
    except Exception as exc:  # an unreadable record is as good as none
        # Name the record: it is the file to look at (or delete) when this repeats.
        problem = f"unreadable cache record {record_path} ({exc})"
    if problem is None:
        return ref
    get_run_logger().warning("Cached result of %s not trusted: %s; recomputing", key.split("-")[0], problem)
    storage.remove(record_path)
    return None


def record_components(stage_task: Task, inputs: dict[str, Any], cache_dir: str | Path) -> None:
    """Record what the key of a stage whose result is recorded covers, once: `status` compares a configuration's
    keys with these to say why a stage is stale."""
    components = key_components(stage_task.name, stage_task.fn.__module__, inputs)
    path = components_path(cache_dir, key_of(components))
    if not storage.exists(path):
        storage.write_text(path, json.dumps({**components, "recorded_at": datetime.now(timezone.utc).isoformat(
            timespec="seconds")}, indent=1, sort_keys=True))


def cached(stage_task: Task, cache_dir: str | Path, refresh: bool = False, locks: Any = None) -> Task:
    """Return `stage_task` configured to persist its result under `cache_dir` and reuse it by content, its stage
    locks from `locks` (a manager of tasks.locks; default: flock on this machine)."""
    if not storage.is_remote(cache_dir):
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return stage_task.with_options(
        cache_policy=StageCache(cache_dir=str(cache_dir), lock_manager=locks),
        persist_result=True,
        result_storage=storage.result_storage(cache_dir),
        result_serializer=JSONSerializer(),
        refresh_cache=refresh,
    )
