"""The stage runner: each step of the stage table (flows/stages.py) as a cached Prefect task.

A stage task stages its artifact inputs on this machine's disk (copied from object storage where the roots are
there), calls the stage's plain function with a private output folder under its root, publishes the result (uploading
it, manifest last, to object storage), logs through the run logger, and is cached by content: its key covers its
inputs (artifacts by their digests), its parameters and the import closure of its function's module (tasks.keys). A
cached result whose files are missing or changed is not trusted: the stage runs again. Runs on the same roots
exclude each other per stage through the lock managers of tasks.locks.
"""

from __future__ import annotations

import errno
import importlib
import inspect
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.serializers import JSONSerializer
from prefect.states import State
from prefect.tasks import Task

from flows import ui
from flows.config import PipelineConfig
from flows.stages import OTHER_STEPS, STEPS, Step
from tasks import storage
from tasks.artifacts import ArtifactRef, staged
from tasks.errors import PipelineError
from tasks.files import atomic_write
from tasks.keys import SERIALIZER, check_record, components_path, key_components, key_of, read_record
from tasks.layout import TRAIN_STATE_FILE
from tasks.locks import FlockLockManager

assert JSONSerializer().model_dump(mode="json") == SERIALIZER, "Prefect's JSONSerializer describes itself differently"
# What the runner gives a stage function besides the task's inputs.
SUPPLIED = ("out_dir", "log", "progress", "state_dir", "on_backup")


def stage_components(step: Step, inputs: dict[str, Any]) -> dict[str, Any]:
    """Return what the cache key of a stage covers: its name, its inputs' content and the code it runs."""
    return key_components(step.task, step.module, inputs)


def stage_key(step: Step, inputs: dict[str, Any]) -> str:
    """Return the cache key of a stage (see `stage_components`)."""
    return key_of(stage_components(step, inputs))


@dataclass
class StageCache(CachePolicy):
    """Key a stage by content and distrust a cached result whose files are missing or changed.

    SERIALIZABLE: a run that finds another run computing the same stage waits for it and then uses its result, so
    concurrent runs on the same roots do each stage's work once.
    """

    module: str = ""  # the module of the stage's function: its import closure is in the key
    cache_dir: str = ""
    isolation_level: Any = "SERIALIZABLE"
    lock_manager: Any = field(default=None)

    def __post_init__(self) -> None:
        if self.lock_manager is None and self.cache_dir:
            self.lock_manager = FlockLockManager(storage.lock_dir(self.cache_dir))

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        key = key_of(key_components(task_ctx.task.name, self.module, inputs))
        try:
            # Under the stage's lock: a record another run is writing right now is not half-read and thrown away.
            with self.lock_manager.held(key) if self.lock_manager else nullcontext():
                if self.cache_dir:
                    trusted_result(self.cache_dir, key)
        except PipelineError as exc:  # the lock server or the object storage stopped answering
            # Raised here, Prefect would log it and run the stage unlocked and uncached: the stage raises it instead.
            _KEY_ERRORS[task_ctx.task_run.id] = exc
            return None
        return key


# The error that stopped a task run's cache key, by task run id: its task raises it (see `StageCache.compute_key`).
_KEY_ERRORS: dict[Any, PipelineError] = {}


def trusted_result(cache_dir: str | Path, key: str) -> ArtifactRef | None:
    """Return the artifact recorded under `key` if it is to be trusted (tasks.keys.check_record); otherwise drop the
    record, with a warning, so that the stage runs again."""
    ref, problem = check_record(cache_dir, key)
    if problem is None:
        return ref
    get_run_logger().warning("Cached result of %s not trusted: %s; recomputing", key.split("-")[0], problem)
    storage.remove(f"{cache_dir}/{key}")
    return None


def recorded(step: Step, inputs: dict[str, Any], config: PipelineConfig, locks: Any = None) -> ArtifactRef | None:
    """Return the recorded, intact result of a stage for these inputs, if there is one (nothing runs)."""
    key = stage_key(step, inputs)
    with (locks or config.lock_manager()).held(key):  # as in StageCache: a record being written is not half-read
        return trusted_result(config.cache_dir, key)


def record_components(components: dict[str, Any], cache_dir: str | Path) -> None:
    """Record what the key of a stage whose result is recorded covers (`stage_components`), once: `status` compares a
    configuration's keys with these to say why a stage is stale."""
    path = components_path(cache_dir, key_of(components))
    if not storage.exists(path):
        text = json.dumps({**components, "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds")},
                          indent=1, sort_keys=True)
        try:
            storage.write_text(path, text)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise PipelineError(f"{cache_dir}: disk space: expected room for the cache records, found the disk full "
                                f"({exc.strerror or exc}); the stage's output is published, and the next run with room "
                                "records it") from None


def cached(stage_task: Task, config: PipelineConfig, refresh: bool = False, locks: Any = None) -> Task:
    """Return a stage task configured to persist its result in the config's cache and reuse it by content, with its
    stage locks from `locks` (default: the config's)."""
    storage.make_folder(config.cache_dir)
    return stage_task.with_options(
        cache_policy=StageCache(module=TASK_STEPS[stage_task.name].module, cache_dir=str(config.cache_dir),
                                lock_manager=locks or config.lock_manager()),
        persist_result=True,
        result_storage=result_storage(config.cache_dir),
        result_serializer=JSONSerializer(),
        refresh_cache=refresh,
    )


def run_stage(stage_task: Task, inputs: dict[str, Any], config: PipelineConfig, refresh: bool = False) -> tuple[ArtifactRef, bool]:
    """Run a stage through its cache; return its artifact and whether it was computed (not found in the cache)."""
    state = cached(stage_task, config, refresh)(**inputs, return_state=True)
    if state.is_failed():
        discard_failure_record(state, config.cache_dir)
    result = state.result()  # re-raises the stage's error
    step = TASK_STEPS[stage_task.name]
    components = stage_components(step, inputs)
    key = key_of(components)
    recorded = state.name == "Cached" or was_recorded(key, config)
    record_components(components, config.cache_dir)  # on a full disk: one line that says so
    if not recorded:
        raise PipelineError(f"{config.cache_dir}/{key}: cache record of {step.task}: expected it "
                            "written, found none (the error logged above says why); the stage's output is published, "
                            "and the next run records it")
    return result, state.name != "Cached"


def was_recorded(key: str, config: PipelineConfig) -> bool:
    """Return whether Prefect wrote the record of a stage it computed. It logs an error writing it (a full disk, a lock
    server gone, a lost lock) and goes on as if it had, leaving none or, on disk, part of one: that part is removed."""
    record = f"{config.cache_dir}/{key}"
    with config.lock_manager().held(key):  # another run may be writing it now; a lock server gone: its one line
        try:
            read_record(record)
            return True
        except FileNotFoundError:
            return False
        except (ValueError, KeyError, TypeError):
            storage.remove(record)
            return False


def discard_failure_record(state: State, cache_dir: Path) -> None:
    """Delete the exception record Prefect persists for a failed task, so a failed stage leaves no file behind."""
    key = getattr(getattr(state.data, "metadata", None), "storage_key", None)
    path = f"{cache_dir}/{key}" if key and "/" not in key else key  # a bare key: one in the cache's storage block
    if path and path.rpartition("/")[0] == str(cache_dir):
        storage.remove(path)


def result_storage(cache_dir: Any) -> Any:
    """Return what Prefect persists the cache records to: the folder itself, or a storage block for object storage.

    Prefect takes remote result storage only as a block saved on its server: one per cache root, named by the root.
    """
    return _saved_block(str(cache_dir)) if storage.is_remote(cache_dir) else Path(cache_dir)


@cache
def _saved_block(url: str) -> str:
    from prefect.filesystems import RemoteFileSystem

    from tasks.files import sha256_bytes

    name = f"mnist-pipeline-cache-{sha256_bytes(url.encode())[:16]}"
    RemoteFileSystem(basepath=url, settings=storage.OPTIONS).save(name, overwrite=True)
    return f"remote-file-system/{name}"


def execute(step: Step, inputs: dict[str, Any]) -> ArtifactRef:
    """Compute a stage: stage its artifact inputs locally, call its function, publish the output under its root."""
    logger = get_run_logger()
    function = _function(step.function)
    arguments = {name: value for name, value in inputs.items() if name != step.root and name not in step.key_only}
    with staged(inputs[step.root]) as stage:
        for name, value in arguments.items():
            files = step.files.get(name)  # absent: all of them; (): none
            if isinstance(value, ArtifactRef) and files != ():
                arguments[name] = stage.local(value, *(files or ()))
            elif isinstance(value, list) and files:  # a list of artifacts (the accepted batches), those files of each
                arguments[name] = [stage.local(ref, *files) for ref in value]
        supplied = {"out_dir": stage.root / step.folder, "log": logger.info}
        with _training_extras(stage.root, inputs, logger) if step.task == "train_model" else nullcontext({}) as extras:
            ref = stage.publish(function(**arguments, **supplied, **extras))
    logger.info("output: %s", ref.path(next(iter(ref.files))).parent)
    if step.task == "validate_mnist" and not ref.meta["source"]["pinned_by"]:
        logger.warning("source %s was not pinned (no SHA256SUMS, no --sha256): its files are trusted on the IDX "
                       "checks alone", ref.meta["source"]["location"])
    if step.task == "report_results":
        ui.publish_report(ref, inputs["evaluation"], inputs.get("decision"))
    return ref


@contextmanager
def _training_extras(root: Path, inputs: dict[str, Any], logger: Any) -> Iterator[dict[str, Any]]:
    """Yield the training's per-epoch progress artifact in the UI and its resume folder (see tasks.train.fit_model).

    On object storage the stage's folder is temporary: each epoch's backup is also kept under the artifacts root (its
    `train-state/`), fetched from there before training on whichever machine runs it next, and removed once the model
    is published."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    from tasks.callbacks import format_metrics
    from tasks.train import state_folder

    epochs = inputs["config"].resolved().epochs
    artifact_id = create_progress_artifact(progress=0.0, key=ui.PROGRESS_KEY, description=f"Training: 0/{epochs} epochs")

    def progress(done: int, total: int, logs: dict[str, float]) -> None:
        try:
            update_progress_artifact(artifact_id, progress=100.0 * done / total,
                                     description=f"Training: {done}/{total} epochs, {format_metrics(logs)}")
        except Exception as exc:  # a lost progress update must not abort a long training run
            logger.warning("could not update the progress artifact: %s", exc)

    state_dir = state_folder(root, inputs["processed"], inputs["config"], inputs["num_classes"], inputs["batches"])
    artifacts_dir = inputs["artifacts_dir"]
    if not storage.is_remote(artifacts_dir):
        yield {"progress": progress, "state_dir": state_dir}
        return
    kept = f"{str(artifacts_dir).rstrip('/')}/{state_dir.relative_to(root).as_posix()}"
    problem = fetch_state(kept, state_dir)
    if problem:
        logger.warning("training from epoch 1: %s", problem)
    elif state_dir.is_dir():
        logger.info("fetched the state of an interrupted training kept in %s", kept)
    yield {"progress": progress, "state_dir": state_dir, "on_backup": lambda folder: keep_state(folder, kept)}
    with suppress(FileNotFoundError):
        storage.remove_tree(kept)


WEIGHTS_NAME = re.compile(r"epoch-(\d{4,})\.weights\.h5")
MAX_STATE_BYTES = 1 << 20  # a state file: the epoch, a name and the per-epoch metrics


def keep_state(folder: Path, location: str) -> None:
    """Copy the backup in `folder` to `location` on object storage: the weights it names first, then its state file
    (one PUT, so the state kept there always names weights that are there), then delete the weights of earlier epochs
    kept there (never later ones: another machine training the same model may have written them)."""
    state = json.loads((folder / TRAIN_STATE_FILE).read_text())
    storage.copy_file(folder / state["weights"], f"{location}/{state['weights']}")
    storage.copy_file(folder / TRAIN_STATE_FILE, f"{location}/{TRAIN_STATE_FILE}")
    for name in storage.list_names(location):
        match = WEIGHTS_NAME.fullmatch(name)
        if match and int(match[1]) < state["epoch"]:
            storage.remove(f"{location}/{name}")


def fetch_state(location: str, folder: Path) -> str | None:
    """Copy the backup kept at `location` on object storage (see `keep_state`) into `folder`, for EpochBackup.restore.
    Return why none was copied when a state file is there but unusable (the training then starts over), else None."""
    where = f"{location}/{TRAIN_STATE_FILE}"
    try:
        raw = storage.read_bytes(where)
    except FileNotFoundError:
        return None
    if len(raw) > MAX_STATE_BYTES:
        return f"{where}: expected a state file of at most {MAX_STATE_BYTES:,} bytes, found {len(raw):,}"
    try:
        state = json.loads(raw)
    except ValueError as exc:
        return f"{where} is not a state file this project wrote ({exc})"
    weights = state.get("weights") if isinstance(state, dict) and isinstance(state.get("epoch"), int) else None
    if not (isinstance(weights, str) and WEIGHTS_NAME.fullmatch(weights)):
        return f"{where} is not a state file this project wrote"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        storage.fetch_file(f"{location}/{weights}", folder / weights)
    except FileNotFoundError:
        return f"{where} names {weights}, which is not there"
    atomic_write(folder / TRAIN_STATE_FILE, json.dumps(state))
    return None


@cache
def _function(path: str) -> Any:
    """Return the function that `module:name` names."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def stage_task(step: Step) -> Task:
    """Return the Prefect task of a step: its parameters are the step's inputs (the function's own, less what the
    runner supplies, then the root and what only keys the cache, by keyword)."""
    function = _function(step.function)
    own = [p for name, p in inspect.signature(function).parameters.items() if name not in SUPPLIED]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None if name in step.key_only else
                               inspect.Parameter.empty) for name in (step.root, *step.key_only)]
    signature = inspect.Signature(own + extra, return_annotation=ArtifactRef)

    def run(*args: Any, **kwargs: Any) -> ArtifactRef:
        context = TaskRunContext.get()
        if context is not None and context.task_run.id in _KEY_ERRORS:
            raise _KEY_ERRORS.pop(context.task_run.id)
        inputs = signature.bind(*args, **kwargs)
        inputs.apply_defaults()
        return execute(step, inputs.arguments)

    run.__signature__ = signature
    run.__name__ = run.__qualname__ = step.task
    run.__doc__ = (function.__doc__ or "").splitlines()[0]
    return Task(run, name=step.task)


# Every stage's task (the pipeline's by stage, the others by name), and each task's step by the task's name.
TASK_STEPS: dict[str, Step] = {step.task: step for step in (*STEPS.values(), *OTHER_STEPS.values())}
TASKS: dict[str, Task] = {name: stage_task(step) for name, step in {**STEPS, **OTHER_STEPS}.items()}
download_mnist, validate_mnist, preprocess_mnist, train_model, evaluate_model, report_results = (
    TASKS[name] for name in STEPS)
