"""Benchmark `mnist-pipeline status` on the real MNIST with the default training config; print JSON.

One cold `mnist-pipeline run` fills fresh roots (against the running local server of a PREFECT_HOME made here); then,
alternating per repetition: `status` with everything up to date, `status --epochs 3` (train stale: the recorded
components of the closest earlier key are compared), `status` on empty roots, and the no-op `run` for comparison.
Every command is a new process, timed from its start to its exit.
"""

from __future__ import annotations

import argparse
import json
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

from run import base_env, run_child  # noqa: E402

from flows import server as local_server  # noqa: E402


def timed(cmd: list[str], env: dict[str, str], expected: int) -> float:
    """Run a command; return its wall seconds. Raise if it exits with another code than `expected`."""
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - started
    if proc.returncode != expected:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode} (expected {expected}):\n{proc.stderr[-3000:]}")
    return wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "snapshot" / "mnist")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mnist-bench-status-"))
    home = tmp / "prefect-home"
    server, _ = local_server.ensure(home)
    try:
        local_server.wait_until_ready(server, timeout=180)
        env = {**base_env(), "PREFECT_HOME": str(home), "PREFECT_API_URL": server.api_url}
        roots = ["--source", str(args.data), "--data-dir", str(tmp / "data"), "--artifacts-dir", str(tmp / "artifacts")]
        empty = ["--source", str(args.data), "--data-dir", str(tmp / "empty" / "data"),
                 "--artifacts-dir", str(tmp / "empty" / "artifacts")]
        cli = [sys.executable, "-m", "flows.cli"]
        cold, _, _ = run_child([*cli, "run", "--json", *roots], env)
        candidates = {
            "status, all up to date": ([*cli, "status", *roots], 0),
            "status, train stale (--epochs 3)": ([*cli, "status", *roots, "--epochs", "3"], 1),
            "status, empty roots": ([*cli, "status", *empty], 1),
            "no-op run": ([*cli, "run", "--json", *roots], 0),
        }
        samples: dict[str, list[float]] = {name: [] for name in candidates}
        for i in range(args.repeat):
            order = list(candidates) if i % 2 == 0 else list(reversed(candidates))
            for name in order:
                cmd, code = candidates[name]
                samples[name].append(timed(cmd, env, code))
            print(f"repetition {i + 1}/{args.repeat} done", file=sys.stderr)
    finally:
        local_server.stop(home)
        shutil.rmtree(tmp, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    print(json.dumps({"cold_run_s": cold, "medians": medians, "samples": samples}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
