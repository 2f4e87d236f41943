"""The mnist-sweep flow: the data stages once, then one train + evaluate per trial on Dask, the best one promoted.

Trials run through prefect-dask's DaskTaskRunner: on a LocalCluster started for the sweep (one single-threaded
worker process per core) or on an existing cluster (`sweep.dask_address`). Every trial is the same cached train and
evaluate stage as in `mnist-pipeline run`, so a trial that any run or sweep trained before is reused, and identical
trials in one sweep are submitted once. Trials found in the cache are looked up in the flow's process: a sweep with
nothing to compute starts no cluster.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import State

from flows import ui
from flows.config import PipelineConfig
from flows.pipeline import check_batches, decide
from flows.runner import (TASKS, cached, discard_failure_record, execute, record_components, recorded, run_stage,
                          stage_components)
from flows.stages import OTHER_STEPS, STEPS, dataset
from tasks import sweep
from tasks.errors import PipelineError
from tasks.layout import SWEEP_HTML
from tasks.locks import holding_run_lock


# Where a sweep's client finds its TLS certificate for a scheduler at a tls:// address (Dask's own configuration).
TLS_SETTINGS = {"DASK_DISTRIBUTED__COMM__TLS__CA_FILE": "distributed.comm.tls.ca-file",
                "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": "distributed.comm.tls.client.cert",
                "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": "distributed.comm.tls.client.key"}


def task_runner(config: PipelineConfig) -> Any:
    """Return the Dask task runner of a sweep: the configured cluster's address, or a LocalCluster of single-threaded
    worker processes (TensorFlow in each sized to its one thread: see tasks.keras_runtime)."""
    from prefect_dask import DaskTaskRunner

    if config.sweep.dask_address:
        check_scheduler(config.sweep.dask_address, config.sweep.dask_timeout_s)
        return DaskTaskRunner(address=config.sweep.dask_address)
    workers = config.sweep.dask_workers or os.cpu_count() or 1
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None, "preload": ["tasks.keras_runtime"]})


def check_scheduler(address: str, timeout_s: float) -> None:
    """Fail with one line if no Dask scheduler answers at `address` within `timeout_s` seconds, with Dask's TLS
    settings (its configuration: `DASK_DISTRIBUTED__COMM__TLS__*`) for a `tls://` address, as the sweep's client."""
    import asyncio

    from distributed.comm import connect
    from distributed.security import Security

    async def probe() -> None:
        comm = await connect(address, timeout=timeout_s, **Security().get_connection_args("client"))
        await comm.close()

    try:
        asyncio.run(probe())
    except TypeError:  # distributed's word for a tls:// address without a certificate to connect with
        import dask

        given = [name for name, key in TLS_SETTINGS.items() if dask.config.get(key, None)]
        raise PipelineError(f"dask scheduler {address}: expected Dask's TLS settings for a tls:// address (the CA, "
                            f"this client's certificate and key: {', '.join(TLS_SETTINGS)}), found "
                            f"{'only ' + ', '.join(given) if given else 'none'}") from None
    except (OSError, TimeoutError, ValueError) as exc:
        if "SSL" in str(exc):  # it answered, but one side refused the other's certificate
            raise PipelineError(f"dask scheduler {address}: expected a TLS handshake with the certificate of Dask's "
                                f"TLS settings, found it refused ({exc})") from None
        raise PipelineError(f"dask scheduler {address}: expected a Dask scheduler answering there, found none within "
                            f"{timeout_s:g} s ({exc})") from None


@flow(name="mnist-sweep")
def mnist_sweep(space: dict[str, Any], config: PipelineConfig | None = None) -> dict[str, Any]:
    """Train and evaluate every trial of `space` (see tasks.sweep) on Dask; promote the best; write a sweep report."""
    config = config or PipelineConfig()
    logger = get_run_logger()
    checked = sweep.build_space(space, "space")
    trials = sweep.expand(checked, config.train.model_dump(exclude_none=True, exclude_unset=True), "space")
    locks = config.lock_manager()
    config.check_services(log=logger.warning)
    runner = task_runner(config)  # first: a scheduler or lock server that does not answer fails before any work
    with holding_run_lock(locks):  # gc removes nothing until the run ends
        results: dict[str, Any] = {}
        for name in ("download", "validate", "preprocess"):
            results[name], _ = run_stage(TASKS[name], STEPS[name].inputs(config, results), config)
        summary: dict[str, Any] = {"run_id": str(flow_run.get_id())}
        # As in `run`: the landed batches checked, the accepted ones trained on and scored on by every trial.
        results["batches"] = check_batches(config, results, summary) if config.batches.root else []

        unique = {sweep.trial_id(t): t for t in trials}
        stages = {name: cached(TASKS[name], config, locks=locks) for name in ("train", "evaluate")}
        classes = dataset(config, results)
        data = {"processed": results["preprocess"], "batches": results["batches"], "artifacts_dir": config.artifacts_dir}
        train_inputs = {key: {**data, "config": trial, "num_classes": classes.num_classes}
                        for key, trial in unique.items()}
        evaluate_inputs = data
        # A trial whose train and evaluate results are both recorded is looked up here: no cluster starts for it.
        outcomes: dict[str, dict[str, Any]] = {}
        for key in unique:
            model = recorded(STEPS["train"], train_inputs[key], config, locks)
            if model is not None and recorded(STEPS["evaluate"], {"model": model, **evaluate_inputs}, config,
                                              locks) is not None:
                trained = _Here(stages["train"](**train_inputs[key], return_state=True))
                scored = _Here(stages["evaluate"](model=trained.result(), **evaluate_inputs, return_state=True))
                outcomes[key] = _outcome(trained, scored, train_inputs[key], evaluate_inputs, config.cache_dir)
        pending = [key for key in unique if key not in outcomes]
        logger.info("sweep of %d trials (%d distinct, %d to compute on %s)", len(trials), len(unique), len(pending),
                    config.sweep.dask_address or "a local Dask cluster")
        started = time.perf_counter()
        if pending:
            with runner:
                futures = {}
                for key in pending:
                    trained = runner.submit(stages["train"], parameters=train_inputs[key])
                    futures[key] = (trained, runner.submit(stages["evaluate"], parameters={"model": trained, **evaluate_inputs}))
                for key, (trained, scored) in futures.items():
                    outcomes[key] = _outcome(trained, scored, train_inputs[key], evaluate_inputs, config.cache_dir)
        wall = time.perf_counter() - started

        columns = [name for name in sweep.PARAMETERS if name in checked.grid or name in checked.random]
        rows = [{"trial": i + 1, "id": sweep.trial_id(t), **{name: getattr(t, name) for name in columns},
                 **outcomes[sweep.trial_id(t)]["row"]} for i, t in enumerate(trials)]
        done = [key for key in unique if outcomes[key]["evaluation"] is not None]
        if not done:
            raise PipelineError("sweep: every trial failed: " + "; ".join(o["error"] for o in outcomes.values()))
        best = min(done, key=lambda k: (-outcomes[k]["evaluation"].meta["test_accuracy"], outcomes[k]["evaluation"].meta["test_loss"]))
        decision = decide(config, {**results, "train": outcomes[best]["model"], "evaluate": outcomes[best]["evaluation"]},
                          summary["run_id"])
        report = execute(OTHER_STEPS["write_sweep_report"], {"rows": rows, "columns": columns, "best_id": best,
                                                             "decision": decision, "artifacts_dir": config.artifacts_dir})
        ui.publish_sweep(rows, columns, report)
        return {
            **summary,
            "trials": rows,
            "best": next(r for r in rows if r["id"] == best),
            "promotion": {"promoted": decision.promoted, "reason": decision.reason},
            "report": str(report.path(SWEEP_HTML)),
            "wall_seconds": round(wall, 3),
        }


@dataclass(frozen=True)
class _Here:
    """A trial stage run in the flow's process (found in the cache), with what `_outcome` reads of a Dask future."""

    state: State

    def wait(self) -> None:
        pass

    def result(self) -> Any:
        return self.state.result()


def _outcome(trained: Any, scored: Any, train_inputs: dict[str, Any], evaluate_inputs: dict[str, Any],
             cache_dir: Path) -> dict[str, Any]:
    """Wait for one trial's futures; return its row for the table, and its artifacts (None where it failed)."""
    scored.wait()
    states = {"train": trained.state, "evaluate": scored.state}
    for state in states.values():
        if state.is_failed():
            discard_failure_record(state, cache_dir)
    parameters = {}
    if states["train"].is_completed():
        model = trained.result()
        parameters = {"model_digest": model.digest, "fit_seconds": model.meta["fit_seconds"]}
    failed = next((s for s in states.values() if not s.is_completed()), None)
    if failed is not None:
        error = str(failed.result(raise_on_failure=False))
        return {"row": {"state": "failed", "error": error, **parameters}, "model": None, "evaluation": None, "error": error}
    evaluation = scored.result()
    record_components(stage_components(STEPS["train"], train_inputs), cache_dir)
    record_components(stage_components(STEPS["evaluate"], {"model": model, **evaluate_inputs}), cache_dir)
    state = "cached" if states["train"].name == "Cached" else "trained"
    row = {"state": state, "test_accuracy": evaluation.meta["test_accuracy"], "test_loss": evaluation.meta["test_loss"],
           **parameters, "evaluate_seconds": evaluation.meta.get("seconds")}
    return {"row": row, "model": model, "evaluation": evaluation, "error": None}
