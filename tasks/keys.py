"""Cache keys and result records, without Prefect: what a stage's key covers (its inputs, by content, and its code),
and the artifact reference a record holds. flows/runner.py keys Prefect's task runs with them; `mnist-pipeline status`
reads them to say what is up to date and why, without importing Prefect or the stages.

A result record is Prefect's (JSON: the artifact reference a cache hit returns); `status`, `gc` and `history` read it
here as plain JSON, never through Prefect's decoder, and Prefect itself reads only records this check accepted. The
project's own record of a key (`cache/keys/<key>.json`) holds what the key covers, to say why a stage is stale; it
does not repeat the reference, so that no second copy can disagree with what a cache hit returns.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import sys
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tasks import storage
from tasks.artifacts import ArtifactRef
from tasks.errors import PipelineError
from tasks.files import sha256_bytes, sha256_json
from tasks.layout import KEYS_DIR

# Libraries that orchestrate the stages without shaping their outputs: a new release of them reruns nothing.
NOT_IN_KEY = {"prefect"}
_distributions = cache(importlib.metadata.packages_distributions)
# How Prefect's JSONSerializer with its defaults describes itself in a result record (flows/runner.py checks that it
# still does): a record naming anything else is refused.
SERIALIZER = {"type": "json", "jsonlib": "json", "object_encoder": "prefect.serializers.prefect_json_object_encoder",
              "object_decoder": "prefect.serializers.prefect_json_object_decoder", "dumps_kwargs": {}, "loads_kwargs": {}}
# The class a record names for its artifact reference; records written before the reference moved out of tasks.core
# name that module (their keys are of the earlier code, so they are never a cache hit; `history` and `gc` read them).
_REF_CLASSES = {f"{ArtifactRef.__module__}.{ArtifactRef.__qualname__}", "tasks.core.ArtifactRef"}


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
    # Anything else that is not plain JSON (a Path, an s3:// UPath) counts by its text, as sha256_json's default.
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def code_version(module_name: str) -> str:
    """Return a digest of the code a stage runs (see `code_components`)."""
    return sha256_json(code_components(module_name))


@cache
def code_components(module_name: str) -> dict[str, dict[str, str]]:
    """Return what a stage's code version covers: the project modules in its import closure and library versions.

    The closure follows every import statement (those inside functions too) of the module and, recursively, of each
    project module it reaches; a module is the project's when its top-level package belongs to the distribution that
    holds the stage's own package (mnist-pipeline: `tasks` and `flows`). A package's data files (the report's
    templates) count with each of its modules in the closure. Libraries count by their installed version, except orchestration that shapes no output.
    """
    modules = project_modules(module_name)
    sources = {name: sha256_bytes(Path(source_file(name)).read_bytes()) for name in modules}
    packages = {name if Path(source_file(name)).name == "__init__.py" else name.rpartition(".")[0] for name in modules}
    sources.update({f"{name}:{data}": sha256_bytes(data_path.read_bytes())
                    for name in sorted(packages) for data, data_path in _package_data(name).items()})
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
    init = Path(source_file(name))
    if init.name != "__init__.py":
        return {}
    found = {}
    for folder, subfolders, files in os.walk(init.parent):
        subfolders[:] = sorted(d for d in subfolders if d != "__pycache__" and not Path(folder, d, "__init__.py").exists())
        for file in sorted(f for f in files if not f.endswith((".py", ".pyc"))):
            found[str(Path(folder, file).relative_to(init.parent))] = Path(folder, file)
    return found


def source_file(name: str) -> str:
    spec = _spec(name)
    if spec is None or not spec.origin:
        raise ModuleNotFoundError(f"no source for module {name!r}")
    return spec.origin


def _spec(name: str) -> importlib.machinery.ModuleSpec | None:
    """Find a module without importing anything: `importlib.util.find_spec("a.b")` imports `a` (and, for a name
    inside a module such as `tasks.train.fit_model`, the module with its libraries), so walk the packages' search
    paths instead. None for a name inside a module and for no module at all."""
    top, *parts = name.split(".")
    spec = importlib.util.find_spec(top)
    for depth in range(1, len(parts) + 1):
        if spec is None or spec.submodule_search_locations is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(".".join([top, *parts[:depth]]), spec.submodule_search_locations)
    return spec


def _is_module(name: str) -> bool:
    try:
        return _spec(name) is not None
    except ModuleNotFoundError:
        return False


@cache
def _imports(name: str) -> tuple[str, ...]:
    """Return what a module's source imports, as dotted names; `from a import b` gives both `a` and `a.b`."""
    path = source_file(name)
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


def key_components(stage: str, module: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """Return what the cache key of a stage covers: its name, its inputs (by content) and its code (`code_components`
    of the module that defines it)."""
    return {"stage": stage, "inputs": canonical(inputs), "code": code_components(module)}


def key_of(components: dict[str, Any]) -> str:
    """Return the cache key that `key_components` describe."""
    return f"{components['stage']}-" + sha256_json({"inputs": components["inputs"], "code": sha256_json(components["code"])})


def components_path(cache_dir: Any, key: str) -> str:
    """Return where the components of a key are recorded (beside the result records, in `keys/`)."""
    return f"{cache_dir}/{KEYS_DIR}/{key}.json"


def read_records(cache_dir: Any) -> dict[str, ArtifactRef]:
    """Return every cache record of a cache folder by key; one line naming a record that cannot be read."""
    root = storage.as_root(cache_dir)
    if not storage.exists(root):
        return {}
    records = {}
    for path in sorted(p for p in root.iterdir() if p.is_file()):
        try:
            records[path.name] = read_record(path)
        except (ValueError, KeyError, TypeError) as exc:
            raise PipelineError(f"{path}: expected a cache record holding an artifact reference, found {exc} (remove "
                                "that file, or rerun its stage with --rerun)") from None
    return records


def check_record(cache_dir: Any, key: str) -> tuple[ArtifactRef | None, str | None]:
    """Return the artifact recorded under `key` and why it is not to be trusted (None: it is): its files missing or
    changed, or the record unreadable. (None, None) when there is no record.

    Files untouched since they were published (same inode, size, mtime and ctime; on object storage, the same ETag)
    are not re-hashed.
    """
    path = f"{cache_dir}/{key}"
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        return None, None
    try:
        ref = parse_record(data)
    except Exception as exc:  # any damage of a record: as good as none
        # Name the record: it is the file to look at (or delete) when this repeats.
        return None, f"unreadable cache record {path} ({exc})"
    return ref, ref.problem(trust_unchanged=True)


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
    if record.get("metadata", {}).get("serializer") != SERIALIZER:
        raise ValueError(f"expected the serializer {SERIALIZER['type']!r} with Prefect's defaults, found another")
    value = json.loads(record["result"])
    if not (isinstance(value, dict) and set(value) == {"__class__", "data"} and value["__class__"] in _REF_CLASSES):
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
