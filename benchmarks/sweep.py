"""Benchmark a sweep against the same trainings run one after another, side by side; print a markdown table.

A 4-trial MLP sweep (hidden_units 128, 512 x learning_rate 0.001, 0.003) on a LocalCluster of `--workers` workers,
against the same four configurations run by `mnist-pipeline run --until evaluate` one after another; both start
from roots where the data stages are already cached (a copy of one prepared pair of roots each), alternating over
`--repeat` repetitions; then the same sweep again, all cached; then the sweep on an existing cluster whose workers
are warm (a `dask scheduler` and `--workers` `dask worker --preload tasks.keras_runtime` processes started here, each
of which has run a trial before), with a seed of its own per repetition so that it trains. Every command runs against
one running Prefect server (the local server of a PREFECT_HOME made here), so no candidate pays a server start-up.
Engine overhead per trial: (the sweep's wall time from the cluster's start to the trials' results, x workers, minus
the trials' fit and evaluate seconds) / trials: the time workers spend on anything but fitting and scoring (their
start-up and imports included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from run import base_env, run_child  # noqa: E402

from flows import server as local_server  # noqa: E402

GRID = {"hidden_units": [128, 512], "learning_rate": [0.001, 0.003]}


def cli(args: list[str], env: dict[str, str]) -> tuple[float, dict]:
    wall, _, out = run_child([sys.executable, "-m", "flows.cli", *args, "--json"], env)
    return wall, json.loads(out)


def sweep(grid: list[str], flags: list[str], env: dict[str, str], samples: dict[str, list[float]], kind: str,
          workers: int, state: str) -> None:
    wall, summary = cli(["sweep", *grid, *flags], env)
    assert {t["state"] for t in summary["trials"]} == {state}, summary["trials"]
    samples[kind].append(wall)
    if state == "trained":
        work = sum(t["fit_seconds"] + t["evaluate_seconds"] for t in summary["trials"])
        samples[f"{kind} overhead"].append((summary["wall_seconds"] * workers - work) / len(summary["trials"]))


def start_cluster(workers: int, env: dict[str, str], logs: Path, procs: list[subprocess.Popen]) -> str:
    """Start a `dask scheduler` and `workers` single-threaded `dask worker` processes (own sessions) on 127.0.0.1;
    return the scheduler's address. The processes go to `procs` as they start, for the caller to stop."""
    dask = str(Path(sys.executable).with_name("dask"))
    port = local_server.free_port()
    address = f"tcp://127.0.0.1:{port}"
    commands = [[dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"]] + [
        [dask, "worker", address, "--nthreads", "1", "--preload", "tasks.keras_runtime", "--no-dashboard",
         "--host", "127.0.0.1"] for _ in range(workers)]
    for i, command in enumerate(commands):
        with open(logs / f"dask-{i}.log", "wb") as log:
            procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                          start_new_session=True))
    from distributed import Client

    with Client(address, timeout=120) as client:
        client.wait_for_workers(workers, timeout=180)
    return address


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "snapshot" / "mnist")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mnist-bench-sweep-"))
    home = tmp / "prefect-home"
    server, _ = local_server.ensure(home)
    procs: list[subprocess.Popen] = []
    try:
        local_server.wait_until_ready(server, timeout=180)
        env = {**base_env(), "PREFECT_HOME": str(home), "PREFECT_API_URL": server.api_url}
        common = ["--source", str(args.data), "--epochs", str(args.epochs)]
        prepared = tmp / "prepared"
        cli(["run", "--until", "preprocess", "--data-dir", str(prepared / "data"), "--artifacts-dir",
             str(prepared / "artifacts"), *common], env)
        samples: dict[str, list[float]] = {k: [] for k in ("sequential", "sweep", "sweep overhead", "cached",
                                                            "warm cluster", "warm cluster overhead")}
        grid = [f"--grid=hidden_units={','.join(map(str, GRID['hidden_units']))}",
                f"--grid=learning_rate={','.join(map(str, GRID['learning_rate']))}"]
        address = start_cluster(args.workers, env, tmp, procs)
        on_cluster = ["--dask-address", address]
        warm = tmp / "warm"
        shutil.copytree(prepared, warm)
        warm_flags = ["--data-dir", str(warm / "data"), "--artifacts-dir", str(warm / "artifacts"), *common]
        cli(["sweep", *grid, *on_cluster, "--seed", "1000", *warm_flags], env)  # each worker imports and runs a trial
        for i in range(args.repeat):
            order = ["sequential", "sweep"] if i % 2 == 0 else ["sweep", "sequential"]
            for kind in order:
                roots = tmp / f"{kind}-{i}"
                shutil.copytree(prepared, roots)
                flags = ["--data-dir", str(roots / "data"), "--artifacts-dir", str(roots / "artifacts"), *common]
                if kind == "sequential":
                    started = time.perf_counter()
                    for h in GRID["hidden_units"]:
                        for lr in GRID["learning_rate"]:
                            cli(["run", "--until", "evaluate", "--hidden-units", str(h), "--learning-rate", str(lr), *flags], env)
                    samples["sequential"].append(time.perf_counter() - started)
                else:
                    local = ["--dask-workers", str(args.workers), *flags]
                    sweep(grid, local, env, samples, "sweep", args.workers, "trained")
                    sweep(grid, local, env, samples, "cached", args.workers, "cached")
                shutil.rmtree(roots)
            sweep(grid, [*on_cluster, "--seed", str(1001 + i), *warm_flags], env, samples, "warm cluster",
                  args.workers, "trained")
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        local_server.stop(home)
        shutil.rmtree(tmp, ignore_errors=True)
    m = {key: statistics.median(values) for key, values in samples.items() if values}
    print(json.dumps({"medians": m, "samples": samples, "workers": args.workers}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
