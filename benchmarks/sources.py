"""Benchmark a dataset kept as PNG class folders against a plain Pillow loop, side by side in one run; print JSON.

MNIST (the shipped IDX files) is written out once as PNG class folders (`train/<digit>/*.png`, `test/<digit>/*.png`:
70,000 files; `--double` also writes a copy with every image twice: 140,000 files). Then, alternating per repetition,
each in a new process timed from its start to its exit:
- `plain`: a Pillow loop that lists the files and decodes them into one uint8 array (one process, as people write it);
- `stages`: the download, validate and preprocess stage functions on the folder, into fresh roots (every core);
- `noop_png` and `noop_idx`: `mnist-pipeline run --until preprocess` with everything cached, on the PNG folder and on
  the IDX files, against one running Prefect server.
Peak RSS is each child's `ru_maxrss` (the largest resident set among it and the processes it waited for).
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

PLAIN = """
import os, sys
import numpy as np
from PIL import Image
paths = sorted(os.path.join(d, n) for d, _, names in os.walk(sys.argv[1]) for n in names if n.endswith(".png"))
images = np.empty((len(paths), 28, 28), np.uint8)
for i, path in enumerate(paths):
    with Image.open(path) as image:
        images[i] = np.asarray(image.convert("L"))
print(len(paths))
"""
STAGES = """
import sys
from pathlib import Path
from tasks.dataset import DownloadConfig
from tasks.download import download_raw
from tasks.preprocess import preprocess_files
from tasks.validate import validate_files
out = Path(sys.argv[2])
raw = download_raw(DownloadConfig(source=sys.argv[1], mirrors=[]), out / "raw")
validation = validate_files(raw, out / "validation", num_classes=10)
processed = preprocess_files(raw, validation, out / "processed")
print(processed.meta["rows"])
"""


def write_pngs(root: Path, copies: int) -> None:
    """Write MNIST's IDX files from the shipped snapshot as PNG class folders, each image `copies` times."""
    from tasks.dataset import SNAPSHOT_DIR
    from tasks.idx import idx_array, read_payload
    from tasks.sources import write_class_folders

    def split(prefix: str):
        return tuple(idx_array(read_payload(SNAPSHOT_DIR / f"{prefix}-{kind}-idx{n}-ubyte.gz"))
                     for kind, n in (("images", 3), ("labels", 1)))

    splits = {"train": split("train"), "test": split("t10k")}
    for copy in range(copies):
        write_class_folders(root / f"copy{copy}", splits)
        for path in (root / f"copy{copy}").rglob("*.png"):  # train/<digit>/<copy>-<n>.png
            target = root / path.relative_to(root / f"copy{copy}")
            target.parent.mkdir(parents=True, exist_ok=True)
            path.rename(target.with_name(f"{copy}-{path.name}"))
        shutil.rmtree(root / f"copy{copy}")


def child(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Run a command; return its wall seconds and peak RSS in bytes; raise if it fails."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    out, err = proc.communicate()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return wall, usage.ru_maxrss * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--double", action="store_true", help="also measure the stages on 140,000 files")
    parser.add_argument("--work", type=Path, help="keep the PNG folders here between invocations (default: a temp dir)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mnist-bench-sources-"))
    work = args.work or tmp
    folders = {"70k": work / "png-70k", **({"140k": work / "png-140k"} if args.double else {})}
    for (name, folder), copies in zip(folders.items(), (1, 2)):
        if not folder.is_dir():
            started = time.perf_counter()
            write_pngs(folder, copies)
            print(f"wrote {name} PNGs in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    home = tmp / "prefect-home"
    server, _ = local_server.ensure(home)
    samples: dict[str, list[float]] = {}
    peaks: dict[str, list[int]] = {}
    try:
        local_server.wait_until_ready(server, timeout=180)
        env = {**base_env(), "PREFECT_HOME": str(home), "PREFECT_API_URL": server.api_url}
        py = [sys.executable, "-c"]
        run = [sys.executable, "-m", "flows.cli", "run", "--until", "preprocess"]
        noop = {"noop_png": [*run, "--source", str(folders["70k"]), "--data-dir", str(tmp / "png" / "data"),
                             "--artifacts-dir", str(tmp / "png" / "artifacts")],
                "noop_idx": [*run, "--source", str(REPO / "data" / "snapshot" / "mnist"), "--data-dir",
                             str(tmp / "idx" / "data"), "--artifacts-dir", str(tmp / "idx" / "artifacts")]}
        for cmd in noop.values():
            child(cmd, env)  # the cold run that fills the roots
        candidates = {"plain_70k": [*py, PLAIN, str(folders["70k"])], **noop}
        for name, folder in folders.items():
            candidates[f"stages_{name}"] = [*py, STAGES, str(folder), str(tmp / "out")]
        for i in range(args.repeat):
            for name in candidates if i % 2 == 0 else reversed(candidates):
                shutil.rmtree(tmp / "out", ignore_errors=True)
                wall, peak = child(candidates[name], env)
                samples.setdefault(name, []).append(round(wall, 3))
                peaks.setdefault(name, []).append(peak)
            print(f"repetition {i + 1}/{args.repeat} done", file=sys.stderr)
    finally:
        local_server.stop(home)
        shutil.rmtree(tmp, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    print(json.dumps({"cpus": os.cpu_count(), "medians": medians,
                      "ratios": {"stages_70k / plain_70k": medians["stages_70k"] / medians["plain_70k"],
                                 "noop_png / noop_idx": medians["noop_png"] / medians["noop_idx"]},
                      "peak_rss_mib": {name: max(values) / 2**20 for name, values in peaks.items()},
                      "samples": samples}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
