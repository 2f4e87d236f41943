"""Time reading the train split from parquet against np.load of the same array (medians, alternating runs)."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.dataset import SNAPSHOT_DIR  # noqa: E402
from tasks.download import download_files  # noqa: E402
from tasks.layout import SPLIT_FILES  # noqa: E402
from tasks.preprocess import load_split, preprocess_files  # noqa: E402
from tasks.validate import validate_files  # noqa: E402


def main() -> None:
    """Prepare the real split once, then time both readers alternately and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", default=str(SNAPSHOT_DIR), help="folder with the four MNIST IDX files")
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        raw = download_files(args.source, root / "raw")
        validation = validate_files(raw, root / "validation")
        started = time.perf_counter()
        processed = preprocess_files(raw, validation, root / "processed")
        preprocess_s = time.perf_counter() - started
        parquet = processed.path(SPLIT_FILES["train"])
        pixels, _ = load_split(parquet)
        npy = root / "train.npy"
        np.save(npy, np.ascontiguousarray(pixels))
        timings: dict[str, list[float]] = {"np.load": [], "load_split (parquet)": []}
        for _ in range(args.repeat):
            for name, read in (("np.load", lambda: np.load(npy)), ("load_split (parquet)", lambda: load_split(parquet))):
                started = time.perf_counter()
                read()
                timings[name].append(time.perf_counter() - started)
        base = statistics.median(timings["np.load"])
        print(f"train split {pixels.shape} float32, {parquet.stat().st_size / 1e6:.0f} MB parquet; preprocess (both splits) {preprocess_s:.2f} s")
        print("| reader | median (ms) | ratio to np.load |\n|---|---|---|")
        for name, values in timings.items():
            median = statistics.median(values)
            print(f"| {name} | {median * 1000:.1f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
