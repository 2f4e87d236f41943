"""Benchmark a sweep against the same trainings run one after another, side by side; print a markdown table.

A 4-trial MLP sweep (hidden_units 128, 512 x learning_rate 0.001, 0.003) on a LocalCluster of `--workers` workers,
against the same four configurations run by `mnist-pipeline run --until evaluate` one after another; both start
from roots where the data stages are already cached (a copy of one prepared pair of roots each), alternating over
`--repeat` repetitions; then the same sweep again, all cached. Every command runs against one running Prefect server
(the local server of a PREFECT_HOME made here), so no candidate pays a server start-up.
Engine overhead per trial: (the sweep's wall time from submitting the trials to their results, x workers, minus
the trials' fit and evaluate seconds) / trials: the time workers spend on anything but fitting and scoring.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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
    try:
        local_server.wait_until_ready(server, timeout=180)
        env = {**base_env(), "PREFECT_HOME": str(home), "PREFECT_API_URL": server.api_url}
        common = ["--source", str(args.data), "--epochs", str(args.epochs)]
        prepared = tmp / "prepared"
        cli(["run", "--until", "preprocess", "--data-dir", str(prepared / "data"), "--artifacts-dir",
             str(prepared / "artifacts"), *common], env)
        samples: dict[str, list[float]] = {"sequential": [], "sweep": [], "cached": [], "overhead": [], "work": []}
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
                    continue
                grid = [f"--grid=hidden_units={','.join(map(str, GRID['hidden_units']))}",
                        f"--grid=learning_rate={','.join(map(str, GRID['learning_rate']))}"]
                wall, summary = cli(["sweep", *grid, "--dask-workers", str(args.workers), *flags], env)
                assert {t["state"] for t in summary["trials"]} == {"trained"}, summary["trials"]
                work = sum(t["fit_seconds"] + t["evaluate_seconds"] for t in summary["trials"])
                samples["sweep"].append(wall)
                samples["work"].append(work)
                samples["overhead"].append((summary["wall_seconds"] * args.workers - work) / len(summary["trials"]))
                wall, summary = cli(["sweep", *grid, "--dask-workers", str(args.workers), *flags], env)
                assert {t["state"] for t in summary["trials"]} == {"cached"}, summary["trials"]
                samples["cached"].append(wall)
                shutil.rmtree(roots)
    finally:
        local_server.stop(home)
        shutil.rmtree(tmp, ignore_errors=True)
    m = {key: statistics.median(values) for key, values in samples.items() if values}
    print(json.dumps({"medians": m, "samples": samples, "workers": args.workers}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
