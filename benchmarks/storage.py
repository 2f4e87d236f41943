"""Benchmark runs on s3:// roots (moto's S3 API server on 127.0.0.1) against local roots, side by side; print JSON.

Per repetition, in alternating order: a cold run on fresh roots and its no-op rerun, on local roots and on roots in a
bucket of the local S3 server. The cold runs' fit times show what keeping each epoch's training state in the bucket
costs (on s3:// roots every epoch's backup is uploaded, so a killed training resumes on another machine). Every command runs against one running Prefect server (the local server of a
PREFECT_HOME made here), so no candidate pays a server start-up. The S3 server's request log gives the number of
requests each command made; an in-process probe times one listing and one small read.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from run import base_env, run_child  # noqa: E402

from flows import server as local_server  # noqa: E402

S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def start_s3(log: Path) -> tuple[subprocess.Popen, str]:
    """Start moto's S3 API server on a free local port (own session); return it and its URL once it answers."""
    port = local_server.free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the S3 server did not start: {log.read_text()[-2000:]}") from None
            time.sleep(0.1)


def requests(log: Path) -> int:
    """Return the number of requests in the S3 server's log so far."""
    return len(re.findall(r'HTTP/1\.1" \d{3} ', log.read_text()))


def probe(bucket: str, n: int = 50) -> dict[str, float]:
    """Median seconds of one listing and one small read from this process (the costs a cached stage pays)."""
    from tasks.storage import filesystem

    fs = filesystem()
    fs.pipe_file(f"{bucket}/probe/x.json", b"{}")
    timings: dict[str, list[float]] = {"ls": [], "cat": []}
    for _ in range(n):
        for name, call in (("ls", lambda: fs.ls(f"{bucket}/probe", detail=True)), ("cat", lambda: fs.cat_file(f"{bucket}/probe/x.json"))):
            started = time.perf_counter()
            call()
            timings[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in timings.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "snapshot" / "mnist")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mnist-bench-storage-"))
    home = tmp / "prefect-home"
    server, _ = local_server.ensure(home)
    s3_log = tmp / "s3.log"
    s3, endpoint = start_s3(s3_log)
    try:
        local_server.wait_until_ready(server, timeout=180)
        os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": endpoint})
        env = {**base_env(), **S3_ENV, "AWS_ENDPOINT_URL": endpoint, "PREFECT_HOME": str(home),
               "PREFECT_API_URL": server.api_url}
        from tasks.storage import filesystem

        filesystem().mkdir("bench")
        samples: dict[str, list[float]] = {f"{kind} {run}": [] for kind in ("local", "s3") for run in ("cold", "noop")}
        counts: dict[str, list[int]] = {"s3 cold": [], "s3 noop": []}
        fits: dict[str, list[float]] = {"local": [], "s3": []}
        for i in range(args.repeat):
            for kind in (["local", "s3"] if i % 2 == 0 else ["s3", "local"]):
                root = f"s3://bench/r{i}" if kind == "s3" else str(tmp / f"local-{i}")
                cmd = [sys.executable, "-m", "flows.cli", "run", "--json", "--source", str(args.data), "--epochs",
                       str(args.epochs), "--data-dir", f"{root}/data", "--artifacts-dir", f"{root}/artifacts"]
                for run, state in (("cold", "completed"), ("noop", "cached")):
                    before = requests(s3_log)
                    wall, _, out = run_child(cmd, env)
                    summary = json.loads(out)
                    states = {info["state"] for info in summary["stages"].values()}
                    assert states == {state}, states
                    samples[f"{kind} {run}"].append(wall)
                    if run == "cold":
                        fits[kind].append(summary["stages"]["train"]["fit_seconds"])
                    if kind == "s3":
                        counts[f"s3 {run}"].append(requests(s3_log) - before)
                if kind == "local":
                    shutil.rmtree(tmp / f"local-{i}")
            print(f"repetition {i + 1}/{args.repeat} done", file=sys.stderr)
        probes = probe("bench")
    finally:
        os.killpg(s3.pid, 15)
        s3.wait(timeout=60)
        local_server.stop(home)
        shutil.rmtree(tmp, ignore_errors=True)
    medians = {key: statistics.median(values) for key, values in samples.items()}
    fit = {kind: statistics.median(values) for kind, values in fits.items()}
    print(json.dumps({"medians": medians, "samples": samples, "s3_requests": counts, "probe_s": probes,
                      "fit_seconds": fits, "fit_ratio": fit["s3"] / fit["local"],
                      "noop_ratio": medians["s3 noop"] / medians["local noop"],
                      "cold_ratio": medians["s3 cold"] / medians["local cold"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
