"""Benchmark two checkouts of the project side by side (before and after a change) on the real MNIST; print JSON.

For each repetition, in alternating order of the checkouts: a cold `mnist-pipeline run` on fresh roots, a no-op
rerun, `status`, a `predict` of the 10,000 test images (IDX) with the champion it promoted, and the same `predict`
again (all cached). Every command is a new process run from the checkout's own folder with the checkout first on
PYTHONPATH, against one running Prefect server; wall time from start to exit. Medians and ratios (head / base).

    git worktree add /tmp/base <commit> && python benchmarks/versions.py --base /tmp/base --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from run import base_env  # noqa: E402

from flows import server as local_server  # noqa: E402

STEPS = ("cold run", "no-op rerun", "status", "predict", "predict, cached")


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    """Run a command; return its wall seconds. Raise if it fails."""
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} in {cwd} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return wall


def one_repetition(checkout: Path, roots: Path, data: Path, env: dict[str, str]) -> dict[str, float]:
    """Time each step once for one checkout on fresh roots."""
    env = {**env, "PYTHONPATH": str(checkout)}
    cli = [sys.executable, "-m", "flows.cli"]
    flags = ["--source", str(data), "--data-dir", str(roots / "data"), "--artifacts-dir", str(roots / "artifacts")]
    images = data / "t10k-images-idx3-ubyte.gz"
    predict = [*cli, "predict", str(images), "--artifacts-dir", str(roots / "artifacts")]
    commands = {"cold run": [*cli, "run", *flags], "no-op rerun": [*cli, "run", *flags],
                "status": [*cli, "status", *flags], "predict": predict, "predict, cached": predict}
    times = {step: timed(commands[step], checkout, env) for step in STEPS}
    shutil.rmtree(roots, ignore_errors=True)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", type=Path, required=True, help="the checkout to compare with (e.g. a git worktree)")
    parser.add_argument("--head", type=Path, default=REPO, help="the checkout measured (default: this one)")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "snapshot" / "mnist")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    checkouts = {"base": args.base.resolve(), "head": args.head.resolve()}
    tmp = Path(tempfile.mkdtemp(prefix="mnist-bench-versions-"))
    home = tmp / "prefect-home"
    server, _ = local_server.ensure(home)
    samples: dict[str, dict[str, list[float]]] = {name: {step: [] for step in STEPS} for name in checkouts}
    try:
        local_server.wait_until_ready(server, timeout=180)
        env = {**base_env(), "PREFECT_HOME": str(home), "PREFECT_API_URL": server.api_url}
        env.pop("PYTHONPATH", None)
        for i in range(args.repeat):
            for name in (list(checkouts) if i % 2 == 0 else list(reversed(checkouts))):
                times = one_repetition(checkouts[name], tmp / f"{name}-{i}", args.data, env)
                for step, seconds in times.items():
                    samples[name][step].append(seconds)
            print(f"repetition {i + 1}/{args.repeat} done", file=sys.stderr)
    finally:
        local_server.stop(home)
        shutil.rmtree(tmp, ignore_errors=True)
    medians = {name: {step: statistics.median(v) for step, v in steps.items()} for name, steps in samples.items()}
    ratios = {step: medians["head"][step] / medians["base"][step] for step in STEPS}
    print(json.dumps({"checkouts": {k: str(v) for k, v in checkouts.items()}, "cpus": os.cpu_count(),
                      "medians": medians, "ratios": ratios, "samples": samples}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
