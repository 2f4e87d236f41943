"""Content-addressed caching of stage results on top of Prefect's persisted task results."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.logging import get_run_logger
from prefect.serializers import JSONSerializer
from prefect.tasks import Task
from pydantic import BaseModel

from tasks import storage
from tasks.core import ArtifactRef, sha256_bytes, sha256_json
from tasks.locks import FlockLockManager, lock_dir

# Libraries that orchestrate the stages without shaping their outputs: a new release of them reruns nothing.
NOT_IN_KEY = {"prefect"}
_distributions = cache(importlib.metadata.packages_distributions)
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


def code_version(module_name: str) -> str:
    """Return a digest of the code a stage runs (see `code_components`)."""
    return sha256_json(code_components(module_name))


@cache
def code_components(module_name: str) -> dict[str, dict[str, str]]:
    """Return what a stage's code version covers: the project modules in its import closure and library versions.

    The closure follows every import statement (those inside functions too) of the module and, recursively, of each
    project module it reaches; a module is the project's when its top-level package belongs to the distribution that
    holds the stage's own package (mnist-pipeline: `tasks` and `flows`). A package's data files (the report's
    templates) count with it. Libraries count by their installed version, except orchestration that shapes no output.
    """
    modules = project_modules(module_name)
    sources = {name: sha256_bytes(Path(_source_file(name)).read_bytes()) for name in modules}
    sources.update({f"{name}:{data}": sha256_bytes(data_path.read_bytes())
                    for name in modules for data, data_path in _package_data(name).items()})
    libraries = {name.partition(".")[0] for module in modules for name in _imports(module)}
    libraries -= _project_packages(module_name) | set(sys.stdlib_module_names) | NOT_IN_KEY
    return {"sources": sources, "libraries": {top: _library_version(top) for top in sorted(libraries)}}


@cache
def project_modules(module_name: str) -> tuple[str, ...]:
    """Return the project modules in the import closure of a module (itself included), sorted."""
    ours = _project_packages(module_name)
    seen, todo = set(), [module_name]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += [dep for dep in _imports(name) if dep.partition(".")[0] in ours and _is_module(dep)]
    return tuple(sorted(seen))


def _project_packages(module_name: str) -> set[str]:
    """Return the top-level packages of the distribution that holds the module (just its own package if none)."""
    top = module_name.partition(".")[0]
    ours = set(_distributions().get(top, ()))
    return {top} | {name for name, dists in _distributions().items() if ours & set(dists)}


def _package_data(name: str) -> dict[str, Path]:
    """Return the data files of a package (not its Python files, nor those of its subpackages), by relative path."""
    init = Path(_source_file(name))
    if init.name != "__init__.py":
        return {}
    found = {}
    for folder, subfolders, files in os.walk(init.parent):
        subfolders[:] = sorted(d for d in subfolders if d != "__pycache__" and not Path(folder, d, "__init__.py").exists())
        for file in sorted(f for f in files if not f.endswith((".py", ".pyc"))):
            found[str(Path(folder, file).relative_to(init.parent))] = Path(folder, file)
    return found


def _source_file(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:
        raise ModuleNotFoundError(f"no source for module {name!r}")
    return spec.origin


def _is_module(name: str) -> bool:
    # `tasks.core.ArtifactRef` is a name inside a module. Asked about it, find_spec would import `tasks.core` (and
    # whatever that imports: TensorFlow, for some): only ask once the parent is known to be a package.
    parent = name.rpartition(".")[0]
    try:
        if parent and getattr(importlib.util.find_spec(parent), "submodule_search_locations", None) is None:
            return False
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


@cache
def _imports(name: str) -> tuple[str, ...]:
    """Return what a module's source imports, as dotted names; `from a import b` gives both `a` and `a.b`."""
    path = _source_file(name)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(Path(path).read_bytes())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            found.update([base, *(f"{base}.{alias.name}" for alias in node.names)])
    return tuple(sorted(found))


@cache
def _library_version(top: str) -> str:
    dist = _distributions().get(top, [top])[0]
    try:
        return f"{dist} {importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{dist} (no version)"


def stage_key(stage_task: Task, inputs: dict[str, Any]) -> str:
    """Return the cache key of a stage: its name, its inputs' content and the code it runs."""
    code = code_version(stage_task.fn.__module__)
    return f"{stage_task.name}-" + sha256_json({"inputs": canonical(inputs), "code": code})


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


def read_record(path: str | Path) -> ArtifactRef:
    """Return the artifact reference in the result record at `path` (see `parse_record`)."""
    return parse_record(storage.read_bytes(path))


def parse_record(data: bytes) -> ArtifactRef:
    """Return the artifact reference in a result record, checked as plain JSON before Prefect decodes anything.

    Prefect's decoder imports and calls whatever a record names (its serializer, `__class__` values at any depth),
    so a record that differs from what this module writes is refused rather than decoded: a cache folder that someone
    else can write must not be a way to run code.
    """
    record = json.loads(data)
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
