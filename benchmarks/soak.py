"""Soak: pairs of simultaneous cold runs on shared roots, each run's whole output kept; print JSON.

Three kinds of roots, fresh roots per pair of runs: local folders (two runs on one machine); `s3://` roots (moto's S3
API server on 127.0.0.1) without `--locks`, as two machines without a lock service; and `s3://` roots with Redis stage
locks (Debian's redis-server on 127.0.0.1). The two runs of a pair start together, on object storage each as its own
"machine" (its HOME, TMPDIR and PREFECT_HOME; one Prefect server for all), on the synthetic source of the tests with
tiny training. After each pair:

- both runs exited 0;
- every stage's result is intact: `mnist-pipeline status` with the same roots exits 0 (it checks each recorded
  result's files against their digests);
- the registry is consistent: one decision per model, and the champion is a promoted model whose latest decision
  promoted it.

Every run's stdout and stderr are kept under `--out` (default: a temp folder, named in the output), whatever the
outcome; the JSON names the failures with their files.

    python benchmarks/soak.py --local 20 --s3 20 --redis 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from run import base_env  # noqa: E402
from storage import S3_ENV, start_s3  # noqa: E402

from flows import server as local_server  # noqa: E402


def start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    """Start a redis-server on a free local port (own session, no persistence); return it and its URL."""
    port = local_server.free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(folder)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    import redis

    client, deadline = redis.Redis(port=port), time.monotonic() + 30
    while True:
        try:
            client.ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.05)


def registry_problems(registry: str) -> list[str]:
    """Return what is inconsistent in a registry: a model decided twice, a champion that no decision promoted."""
    from tasks.registry import read_champions, read_history

    history = read_history(registry)
    digests = [d.model_digest for d in history]
    problems = [f"model {d[:16]} decided {digests.count(d)} times" for d in sorted(set(digests)) if digests.count(d) > 1]
    champions = read_champions(registry)
    if history and not champions and any(d.promoted for d in history):
        problems.append("a model was promoted but there is no champion")
    for champion in champions:
        latest = next((d for d in reversed(history) if d.model_digest == champion.model_digest), None)
        if latest is None or not latest.promoted:
            problems.append(f"champion {champion.model_digest[:16]} has no decision that promoted it")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local", type=int, default=20, help="pairs on local roots (default: %(default)s)")
    parser.add_argument("--s3", type=int, default=20, help="pairs on s3:// roots without --locks (default: %(default)s)")
    parser.add_argument("--redis", type=int, default=10, help="pairs on s3:// roots with Redis locks "
                        "(default: %(default)s)")
    parser.add_argument("--out", type=Path, help="where every run's output is kept (default: a new temp folder)")
    args = parser.parse_args()
    from synthetic import write_source

    from helpers import synthetic_run

    tmp = Path(tempfile.mkdtemp(prefix="mnist-soak-"))
    out = args.out or Path(tempfile.mkdtemp(prefix="mnist-soak-output-"))
    out.mkdir(parents=True, exist_ok=True)
    home = tmp / "prefect-home"
    server, _ = local_server.ensure(home)
    s3, endpoint = start_s3(tmp / "s3.log")
    redis_proc, redis_url = start_redis(tmp)
    results: list[dict] = []
    try:
        local_server.wait_until_ready(server, timeout=180)
        os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": endpoint})
        from tasks.storage import filesystem

        filesystem().mkdir("soak")
        digests = write_source(tmp / "source")
        pairs = [("local", i) for i in range(args.local)] + [("s3", i) for i in range(args.s3)] + [
            ("redis", i) for i in range(args.redis)]
        for kind, i in pairs:
            root = str(tmp / f"local-{i}") if kind == "local" else f"s3://soak/{kind}-{i}"
            env, run_args = synthetic_run(tmp / "source", digests, f"{root}/data", f"{root}/artifacts")
            if kind == "redis":
                run_args += ["--locks", redis_url]
            procs = []
            for machine in ("a", "b"):
                # Local roots are one machine's: both runs share its temp folder (and so its stage locks).
                folder = tmp / "machines" / f"{kind}-{i}-{'a' if kind == 'local' else machine}"
                for sub in ("home", "tmp", "prefect"):
                    (folder / sub).mkdir(parents=True, exist_ok=True)
                machine_env = {**base_env(), **S3_ENV, "AWS_ENDPOINT_URL": endpoint, **env, "HOME": str(folder / "home"),
                               "TMPDIR": str(folder / "tmp"), "PREFECT_HOME": str(folder / "prefect"),
                               "PREFECT_API_URL": server.api_url}
                stdout = open(out / f"{kind}-{i}-{machine}.out", "w")
                stderr = open(out / f"{kind}-{i}-{machine}.err", "w")
                procs.append((subprocess.Popen([sys.executable, "-m", "flows.cli", *run_args], env=machine_env,
                                               cwd=REPO, stdout=stdout, stderr=stderr), stdout, stderr, machine_env))
            codes = []
            for proc, stdout, stderr, _ in procs:
                codes.append(proc.wait(timeout=900))
                stdout.close()
                stderr.close()
            status = subprocess.run([sys.executable, "-m", "flows.cli", "status", *run_args[1:]], env=procs[0][3],
                                    cwd=REPO, capture_output=True, text=True, timeout=300)
            (out / f"{kind}-{i}-status.out").write_text(status.stdout + status.stderr)
            problems = [f"run {m} exited {c}" for m, c in zip("ab", codes) if c != 0]
            if status.returncode != 0:
                problems.append(f"status exited {status.returncode}")
            problems += registry_problems(f"{root}/artifacts/registry")
            results.append({"kind": kind, "pair": i, "exit_codes": codes, "problems": problems,
                            "output": str(out / f"{kind}-{i}-*")})
            print(f"{kind} pair {i + 1}: {'ok' if not problems else '; '.join(problems)}", file=sys.stderr, flush=True)
            if kind == "local" and not problems:
                shutil.rmtree(root)
    finally:
        os.killpg(s3.pid, 15)
        os.killpg(redis_proc.pid, 15)
        s3.wait(timeout=60)
        redis_proc.wait(timeout=60)
        local_server.stop(home)
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {kind: {"pairs": sum(r["kind"] == kind for r in results),
                      "failed_runs": sum(c != 0 for r in results if r["kind"] == kind for c in r["exit_codes"]),
                      "pairs_with_problems": sum(bool(r["problems"]) for r in results if r["kind"] == kind)}
               for kind in ("local", "s3", "redis")}
    print(json.dumps({"summary": summary, "output": str(out),
                      "problems": [r for r in results if r["problems"]]}, indent=1))
    return 0 if not any(r["problems"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
