"""Content-addressed caching of stage results on top of Prefect's persisted task results."""

from __future__ import annotations

import fcntl
import importlib
import inspect
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.logging import get_run_logger
from prefect.serializers import JSONSerializer
from prefect.tasks import Task
from pydantic import BaseModel

from tasks.core import ArtifactRef, sha256_bytes, sha256_json

_SERIALIZER = JSONSerializer().model_dump(mode="json")
_REF_CLASS = f"{ArtifactRef.__module__}.{ArtifactRef.__qualname__}"


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


class FlockLockManager:
    """Prefect lock manager on `flock`: one lock file per cache key, released by the OS when its process dies.

    Prefect's FileSystemLockManager writes lock files without an expiry, so a run killed while holding one would make
    every later run wait forever; a flock cannot outlive its process. Locks held in this process are kept by key.
    """

    def __init__(self, lock_files_directory: Path) -> None:
        self.lock_files_directory = Path(lock_files_directory)
        self._held: dict[str, tuple[str, int]] = {}
        self._guard = threading.Lock()

    def __deepcopy__(self, memo: dict) -> FlockLockManager:
        # Prefect copies cache policies; a copy must still see (and release) the locks this one holds.
        return self

    def _open(self, key: str) -> int:
        self.lock_files_directory.mkdir(parents=True, exist_ok=True)
        return os.open(self.lock_files_directory / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None) -> bool:
        """Take the lock of `key` for `holder`, waiting up to `acquire_timeout` seconds (None: as long as it takes)."""
        if self.is_lock_holder(key, holder):
            return True
        fd = self._open(key)
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.05)
        with self._guard:
            self._held[key] = (holder, fd)
        return True

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None) -> bool:
        """Take the lock of `key` (blocking: the stages are synchronous)."""
        return self.acquire_lock(key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        """Release the lock of `key` held by `holder`."""
        with self._guard:
            if not self.is_lock_holder(key, holder):
                raise ValueError(f"No lock held by {holder} for transaction with key {key}")
            _, fd = self._held.pop(key)
        os.close(fd)  # closing the only descriptor releases the flock

    def is_locked(self, key: str) -> bool:
        """Return whether any process (this one included) holds the lock of `key`."""
        if key in self._held:
            return True
        fd = self._open(key)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def is_lock_holder(self, key: str, holder: str) -> bool:
        """Return whether `holder` holds the lock of `key` in this process."""
        return self._held.get(key, ("", -1))[0] == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """Wait until nobody holds the lock of `key`; False if `timeout` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """Wait until nobody holds the lock of `key` (blocking)."""
        return self.wait_for_lock(key, timeout)

    @contextmanager
    def locked(self, key: str) -> Iterator[None]:
        """Hold the lock of `key` for the duration of a block."""
        holder = f"check-{os.getpid()}-{threading.get_ident()}"
        self.acquire_lock(key, holder)
        try:
            yield
        finally:
            self.release_lock(key, holder)


@dataclass
class StageCache(CachePolicy):
    """Key a stage by content and distrust a cached result whose files are missing or changed.

    SERIALIZABLE: a run that finds another run computing the same stage waits for it and then uses its result, so
    concurrent runs on the same roots do each stage's work once.
    """

    cache_dir: str = ""
    modules: tuple[str, ...] = ()
    isolation_level: Any = "SERIALIZABLE"
    lock_manager: Any = field(default=None)

    def __post_init__(self) -> None:
        if self.lock_manager is None and self.cache_dir:
            self.lock_manager = FlockLockManager(lock_dir(self.cache_dir))

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        key = stage_key(task_ctx.task.name, inputs, self.modules)
        # Under the stage's lock: a record another run is writing right now is not half-read and thrown away.
        with self.lock_manager.locked(key) if self.lock_manager else nullcontext():
            self._drop_if_stale(key)
        return key

    def _drop_if_stale(self, key: str) -> None:
        record_path = Path(self.cache_dir) / key
        if not record_path.exists():
            return
        try:
            # Files untouched since they were published (same inode, size, mtime and ctime) are not re-hashed.
            problem = read_record(record_path).problem(trust_unchanged=True)
        except Exception as exc:  # an unreadable record is as good as none
            # Name the record: it is the file to look at (or delete) when this repeats.
            problem = f"unreadable cache record {record_path} ({exc})"
        if problem:
            get_run_logger().warning("Cached result of %s not trusted: %s; recomputing", key.split("-")[0], problem)
            record_path.unlink(missing_ok=True)


def lock_dir(cache_dir: str | Path) -> Path:
    """Return the folder of the stage locks of a cache: in the system temp folder, one per cache folder.

    Locks are this machine's run-time state (as flocks are), not artifacts: kept outside the roots, a failed run
    leaves the artifact tree exactly as it was.
    """
    return Path(tempfile.gettempdir()) / "mnist-pipeline-locks" / sha256_bytes(str(Path(cache_dir).resolve()).encode())[:16]


def lookup(stage: str, cache_dir: Path, modules: tuple[str, ...], inputs: dict[str, Any]) -> ArtifactRef | None:
    """Return the cached artifact of a stage for these inputs if it exists and its files are intact, else None."""
    key = stage_key(stage, inputs, modules)
    if not (Path(cache_dir) / key).exists():
        return None
    try:
        ref = read_record(Path(cache_dir) / key)
    except Exception:  # an unreadable record is as good as none
        return None
    return ref if ref.problem(trust_unchanged=True) is None else None


def read_record(path: Path) -> ArtifactRef:
    """Return the artifact reference in a result record, checked as plain JSON before Prefect decodes anything.

    Prefect's decoder imports and calls whatever a record names (its serializer, `__class__` values at any depth),
    so a record that differs from what this module writes is refused rather than decoded: a cache folder that someone
    else can write must not be a way to run code.
    """
    record = json.loads(Path(path).read_bytes())
    if record.get("metadata", {}).get("serializer") != _SERIALIZER:
        raise ValueError(f"expected the serializer {_SERIALIZER['type']!r} with Prefect's defaults, found another")
    value = json.loads(record["result"])
    if not (isinstance(value, dict) and set(value) == {"__class__", "data"} and value["__class__"] == _REF_CLASS):
        raise ValueError("expected an artifact reference, found another value")
    if _names_code(value["data"]):
        raise ValueError("expected plain data, found an object to decode inside the artifact reference")
    return ArtifactRef.model_validate(value["data"])


def _names_code(value: Any) -> bool:
    if isinstance(value, dict):
        return bool({"__class__", "__exc_type__"} & set(value)) or any(_names_code(v) for v in value.values())
    if isinstance(value, list):
        return any(_names_code(v) for v in value)
    return False


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
