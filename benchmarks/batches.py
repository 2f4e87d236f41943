"""Benchmark what a landed batch costs against a cold run's data stages, side by side in one run; print JSON.

Per repetition, alternating order, in this process (imports done before timing):
- `cold`: the download, validate and preprocess stage functions on the shipped MNIST, into fresh roots;
- `batch`: `check_batch` on a batch of 1,000 PNG files (MNIST training images shifted by one pixel: new images), the
  only work before training when a batch lands (the base stages are cached).
"""

from __future__ import annotations

import argparse
import json
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
from tasks.dataset import SNAPSHOT_DIR, BatchesConfig, DownloadConfig  # noqa: E402
from tasks.download import download_raw  # noqa: E402
from tasks.idx import idx_array, read_payload  # noqa: E402
from tasks.preprocess import preprocess_files  # noqa: E402
from tasks.sources import write_class_folders  # noqa: E402
from tasks.validate import validate_files  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args()
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
    print(json.dumps({"medians": medians, "ratio batch / cold": medians["batch"] / medians["cold"],
                      "samples": samples}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
