"""`mnist-pipeline gc`: the artifact folders and cache records that the configuration given no longer uses.

Kept: the results of the configuration's stages (the keys `status` computes: a run with it stays all cached), the
champion and every model of the registry with its evaluations, the cache records that reference only kept folders,
sweep reports, the shipped snapshot, and everything while any lock is held (a run in progress). Removed, with
`--yes`: the other published folders and the other records, each folder's manifest first so that a half-removed
folder is never trusted.

gc and runs exclude each other through the stage lock manager (flock on this machine, Redis with --locks). Each run
holds a lock of its own from its start to its end (`run-<random>`, tasks.locks.holding_run_lock), each stage its
stage lock, and gc one more lock, `gc` (`excluding_runs`), from before it looks at the others until it has removed
what it listed. A run or stage that takes its lock waits while `gc` is held (tasks.locks._Shared._after_gc). Each
side takes its lock first and looks at the other's second, so at least one sees the other: gc finds a lock held and
removes nothing, or the run starts once gc is done. So gc never removes what a run has published and reads next (even
between two of its stages) or is about to record. gc never waits for a run, so the two cannot deadlock; a killed
gc's lock goes as a stage's does.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from flows.config import PipelineConfig
from flows.history import evaluations
from flows.status import pipeline_status
from tasks import storage
from tasks.dataset import SNAPSHOT_DIR
from tasks.errors import PipelineError
from tasks.keys import components_path, read_records
from tasks.layout import MANIFEST, SWEEPS_DIR
from tasks.locks import GC_KEY
from tasks.registry import read_champions, read_history


@dataclass
class Plan:
    """What gc would remove (folders with their sizes, records by key) and what held it back."""

    folders: dict[str, int] = field(default_factory=dict)
    records: list[str] = field(default_factory=list)
    kept_folders: int = 0
    kept_records: int = 0
    held: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(self.folders.values())


def plan(config: PipelineConfig) -> Plan:
    """Return what gc would remove; nothing is changed. One line naming a record or registry file that is damaged."""
    # In this order: a folder listed here whose record is not written yet belongs to a stage whose lock is held now.
    published = _published(config)
    held = [key for key in config.lock_manager().held_keys() if key != GC_KEY]
    if held:
        return Plan(kept_folders=len(published), held=held)
    records = read_records(config.cache_dir)
    rows = pipeline_status(config)
    current = {row.key for row in rows if row.key} | {key for row in rows for key in row.checks}
    registry = [*read_champions(config.registry_dir), *read_history(config.registry_dir)]
    # The registry's models with their evaluations (`history` and `diff` read them).
    scored = evaluations(records)
    current |= {key for entry in registry for key, _ in scored.get(entry.model_digest, [])}
    kept = {_folder(entry.model_path) for entry in registry}
    kept |= {_folder(f.path) for key in current & set(records) for f in records[key].files.values()}
    kept_records = {key for key, ref in records.items()
                    if key in current or {_folder(f.path) for f in ref.files.values()} <= kept}
    return Plan(folders={folder: size for folder, size in published.items() if folder not in kept},
                records=sorted(set(records) - kept_records), kept_folders=len(set(published) & kept),
                kept_records=len(kept_records))


@contextmanager
def excluding_runs(config: PipelineConfig) -> Iterator[None]:
    """Hold gc's lock for the block: a stage that takes its lock meanwhile waits until the block ends."""
    locks, holder = config.lock_manager(), f"gc-{uuid.uuid4().hex}"
    if not locks.acquire_lock(GC_KEY, holder, acquire_timeout=0):
        raise PipelineError(f"gc of {storage.identity(config.artifacts_dir)}: expected no other gc at work there, found "
                            f"its lock {GC_KEY!r} held: nothing removed; run gc again when it has finished")
    try:
        yield
    finally:
        locks.release_lock(GC_KEY, holder)


def collect(config: PipelineConfig, planned: Plan) -> None:
    """Remove what `planned` lists: each folder's manifest first, then its files; each record, then its components."""
    for folder in planned.folders:
        storage.remove(f"{folder}/{MANIFEST}")
        storage.remove_tree(folder)
    for key in planned.records:
        storage.remove(f"{config.cache_dir}/{key}")
        storage.remove(components_path(config.cache_dir, key))


def _published(config: PipelineConfig) -> dict[str, int]:
    """Return every published artifact folder under the roots (a folder holding a manifest), with its size in bytes."""
    found = {}
    snapshot = f"{storage.identity(SNAPSHOT_DIR)}/"  # the copy shipped with the project: never collected
    for root in (config.data_dir, config.artifacts_dir):
        root = storage.as_root(root)
        if not storage.exists(root):
            continue
        for kind in root.iterdir():
            if kind.name == SWEEPS_DIR or not kind.is_dir():
                continue
            for folder in kind.iterdir():
                if not storage.exists(folder / MANIFEST) or f"{storage.identity(folder)}/".startswith(snapshot):
                    continue
                data = storage.read_bytes(folder / MANIFEST)
                try:
                    found[str(folder)] = len(data) + sum(entry["size"] for entry in json.loads(data).values())
                except (ValueError, KeyError, TypeError, AttributeError):
                    found[str(folder)] = len(data)  # a damaged manifest: no run trusts the folder; its size unknown
    return found


def _folder(path: Any) -> str:
    return str(storage.as_root(path).parent)


def summary(planned: Plan, removed: bool) -> str:
    """Return gc's report for people: what it removes (or would), and what it keeps."""
    if planned.held:
        return (f"a run is in progress (lock {planned.held[0]} held"
                + (f", and {len(planned.held) - 1} more" if len(planned.held) > 1 else "")
                + "): nothing removed; run gc again when it has finished")
    verb = "removed" if removed else "would remove"
    lines = [f"{size / 1e6:10.2f} MB  {folder}" for folder, size in sorted(planned.folders.items())]
    lines.append(f"{verb} {len(planned.folders)} folders ({planned.size / 1e6:.2f} MB) and {len(planned.records)} "
                 f"cache records; kept {planned.kept_folders} folders and {planned.kept_records} records"
                 + ("" if removed or not (planned.folders or planned.records) else " (--yes removes them)"))
    return "\n".join(lines)


def plan_json(planned: Plan, removed: bool) -> dict[str, Any]:
    return {"removed": removed, "folders": planned.folders, "bytes": planned.size, "records": planned.records,
            "kept_folders": planned.kept_folders, "kept_records": planned.kept_records, "locks_held": planned.held}
