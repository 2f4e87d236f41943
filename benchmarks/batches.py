"""Benchmark what batches cost, side by side in one run; print JSON.

Default: what a landed batch costs against a cold run's data stages. Per repetition, alternating order, in this
process (imports done before timing):
- `cold`: the download, validate and preprocess stage functions on the shipped MNIST, into fresh roots;
- `batch`: `check_batch` on a batch of 1,000 PNG files (MNIST training images shifted by one pixel: new images), the
  only work before training when a batch lands (the base stages are cached).

`--noop`: what batches already taken cost a run with no new batch. One cold `mnist-pipeline run` fills fresh roots
per candidate (no batches root; a batches root with 0, 10 and 100 batches of `--batch-images` MNIST training images
each, written in turn as PNG class folders, an .npz and IDX files, every tenth one plain copies of training images,
which are quarantined, the others shifted by one pixel: new images, accepted); then, alternating per repetition, the
no-op rerun of each (every stage and every batch cached), each a new process timed from its start to its exit,
against one running Prefect server (the local server of a PREFECT_HOME made here).

`--smoke`: tiny inputs and one repetition (`--noop`: a synthetic base source, 1 epoch, 0, 2 and 3 batches of 20
images; the default: a batch of 50 images): it checks the command, its times mean nothing.
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

import numpy as np  # noqa: E402

from tasks.batches import check_batch  # noqa: E402
from tasks.dataset import FILES, SNAPSHOT_DIR, SPLITS, BatchesConfig, DownloadConfig  # noqa: E402
from tasks.download import download_raw  # noqa: E402
from tasks.idx import encode_idx, idx_array, read_payload  # noqa: E402
from tasks.layout import SUCCESS_MARKER  # noqa: E402
from tasks.preprocess import preprocess_files  # noqa: E402
from tasks.sources import write_class_folders, write_npz  # noqa: E402
from tasks.validate import validate_files  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--images", type=int, default=1000, help="images in the batch of the default benchmark")
    parser.add_argument("--noop", action="store_true", help="measure the no-op rerun with batches already taken")
    parser.add_argument("--counts", default="0,10,100", help="--noop: the numbers of batches taken, comma-separated")
    parser.add_argument("--batch-images", type=int, default=100, help="--noop: images per batch")
    parser.add_argument("--data", type=Path, default=SNAPSHOT_DIR, help="--noop: folder with the four MNIST IDX files")
    parser.add_argument("--smoke", action="store_true", help="tiny inputs, one repetition: checks the command")
    args = parser.parse_args()
    if args.smoke:
        args.repeat, args.images, args.counts, args.batch_images = 1, 50, "0,2,3", 20
    result = noop(args) if args.noop else check(args)
    print(json.dumps(result, indent=1))
    return 0


def check(args: argparse.Namespace) -> dict:
    """Time `check_batch` on one new batch against the cold data stages, alternating, in this process."""
    tmp = Path(tempfile.mkdtemp(prefix="mnist-bench-batches-"))
    try:
        x = idx_array(read_payload(SNAPSHOT_DIR / "train-images-idx3-ubyte.gz"))[: args.images]
        y = idx_array(read_payload(SNAPSHOT_DIR / "train-labels-idx1-ubyte.gz"))[: args.images]
        write_class_folders(tmp / "batch", {"": (np.roll(x, 1, axis=2), y)})
        base = tmp / "base"
        raw = download_raw(DownloadConfig(mirrors=[]), base / "raw")
        validation = validate_files(raw, base / "validation")

        def cold() -> None:
            out = tmp / "cold"
            shutil.rmtree(out, ignore_errors=True)
            fresh = download_raw(DownloadConfig(mirrors=[]), out / "raw")
            checked = validate_files(fresh, out / "validation")
            preprocess_files(fresh, checked, out / "processed")

        def batch() -> None:
            shutil.rmtree(tmp / "checked", ignore_errors=True)
            check_batch(str(tmp / "batch"), "week", validation, [], BatchesConfig(), None, 10, tmp / "checked")

        samples: dict[str, list[float]] = {"cold": [], "batch": []}
        for i in range(args.repeat):
            for name, run in ([("cold", cold), ("batch", batch)] if i % 2 == 0 else [("batch", batch), ("cold", cold)]):
                started = time.perf_counter()
                run()
                samples[name].append(round(time.perf_counter() - started, 3))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return {"medians": medians, "ratio batch / cold": medians["batch"] / medians["cold"], "samples": samples}


def write_batches(root: Path, count: int, source: Path, size: int) -> None:
    """Land `count` batches of `size` training images of `source` under `root` (files first, `_SUCCESS` last), in
    turn as PNG class folders, an .npz and IDX files; every tenth one plain copies of training images (quarantined),
    the others shifted by one pixel (new images, accepted)."""
    images = idx_array(read_payload(source / f"{FILES[0]}.gz"))[: count * size]
    labels = idx_array(read_payload(source / f"{FILES[1]}.gz"))[: count * size]
    root.mkdir(parents=True)
    for i in range(count):
        x, y = images[i * size : (i + 1) * size], labels[i * size : (i + 1) * size]
        x = x if i % 10 == 9 else np.roll(x, 1, axis=2)
        folder = root / f"batch-{i:03d}"
        folder.mkdir(parents=True)
        half = size // 2  # the npz and IDX formats have two splits; check_batch redraws them
        if i % 3 == 0:
            write_class_folders(folder, {"": (x, y)})
        elif i % 3 == 1:
            write_npz(folder / "batch.npz", {"train": (x[:half], y[:half]), "test": (x[half:], y[half:])})
        else:
            for (images_file, labels_file), rows in zip(SPLITS.values(), (slice(None, half), slice(half, None))):
                (folder / images_file).write_bytes(encode_idx(x[rows]))
                (folder / labels_file).write_bytes(encode_idx(y[rows]))
        (folder / SUCCESS_MARKER).write_text("")


def noop(args: argparse.Namespace) -> dict:
    """Time the no-op rerun without a batches root and with each count of batches taken, alternating, each command a
    new process against one running Prefect server."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from run import Bench, run_child

    from flows import server as local_server

    counts = [int(c) for c in args.counts.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="mnist-bench-batches-noop-"))
    home = tmp / "prefect-home"
    # The pipeline's environment and source arguments of benchmarks/run.py (--smoke: its synthetic source).
    bench = Bench(argparse.Namespace(smoke=args.smoke, data=args.data), tmp)
    source = Path(bench.pipeline_args[1])
    candidates: dict[str, tuple[list[str], int | None]] = {}
    for count in [None, *counts]:
        name = "no batches root" if count is None else f"{count} batches"
        root = tmp / ("plain" if count is None else f"batches-{count}")
        cmd = [sys.executable, "-m", "flows.cli", "run", "--json", "--data-dir", str(root / "data"), "--artifacts-dir",
               str(root / "artifacts"), *bench.pipeline_args]
        if count is not None:
            write_batches(root / "batches", count, source, args.batch_images)
            cmd += ["--batches", str(root / "batches")]
        candidates[name] = (cmd, count)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    peaks: dict[str, list[float]] = {name: [] for name in candidates}
    cold: dict[str, float] = {}
    verdicts: dict[str, dict[str, int]] = {}
    server, _ = local_server.ensure(home)
    try:
        local_server.wait_until_ready(server, timeout=180)
        env = {**bench.pipeline_env, "PREFECT_HOME": str(home), "PREFECT_API_URL": server.api_url}
        for name, (cmd, count) in candidates.items():  # the cold runs that fill the roots
            wall, _, out = run_child(cmd, env)
            summary = json.loads(out)
            assert {i["state"] for i in summary["stages"].values()} == {"completed"}, summary["stages"]
            batches = summary.get("batches", {})
            assert len(batches) == (count or 0), batches
            cold[name] = round(wall, 3)
            if count is not None:
                verdicts[name] = {v: sum(b["verdict"] == v for b in batches.values()) for v in ("accepted", "quarantined")}
            print(f"cold run, {name}: {wall:.1f} s", file=sys.stderr)
        for i in range(args.repeat):
            for name in candidates if i % 2 == 0 else reversed(candidates):
                cmd, count = candidates[name]
                wall, rss, out = run_child(cmd, env)
                summary = json.loads(out)
                states = {item["state"] for item in [*summary["stages"].values(), *summary.get("batches", {}).values()]}
                assert states == {"cached"} and len(summary.get("batches", {})) == (count or 0), summary
                samples[name].append(round(wall, 3))
                peaks[name].append(round(rss))
            print(f"repetition {i + 1}/{args.repeat} done", file=sys.stderr)
    finally:
        local_server.stop(home)
        shutil.rmtree(tmp, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    plain = medians["no batches root"]
    return {"cpus": os.cpu_count(), "batch_images": args.batch_images, "medians": medians,
            "ratios to no batches root": {name: value / plain for name, value in medians.items()},
            "peak_rss_mb": {name: max(values) for name, values in peaks.items()}, "cold_run_s": cold,
            "batches": verdicts, "samples": samples}


if __name__ == "__main__":
    sys.exit(main())
