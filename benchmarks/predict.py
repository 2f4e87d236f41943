"""Benchmark batch prediction against plain loops, side by side in one process; print one JSON object.

`--model M --images IDX` times, alternating, over `--repeat` repetitions, with the model loaded once: scoring the test images from PNG files
(written here from the IDX file) with `predict_images`, against a plain loop of Pillow decoding plus `model.predict`
on the stacked array; and scoring the test parquet with `predict_images`, against `model.predict` on the array already
in memory. `--memory N` instead scores N PNG files once and reports this process's peak RSS (run it in a fresh
process per N). Used by benchmarks/run.py; runnable alone.
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def read_idx_images(path: Path, count: int) -> np.ndarray:
    """Return the first `count` images of an IDX images file (gzip or not), repeated if it holds fewer."""
    data = gzip.decompress(path.read_bytes()) if path.read_bytes()[:2] == b"\x1f\x8b" else path.read_bytes()
    images = np.frombuffer(data, np.uint8, offset=16).reshape(-1, 28, 28)
    return np.resize(images, (count, 28, 28))


def write_pngs(images: np.ndarray, folder: Path) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.png" for i in range(len(images))]
    for path, image in zip(paths, images):
        Image.fromarray(image).save(path)
    return paths


def plain_pngs(model, paths: list[Path]) -> np.ndarray:
    """The plain loop: decode each file with Pillow, stack, scale, `model.predict`."""
    from PIL import Image

    x = np.stack([np.asarray(Image.open(p).convert("L")) for p in paths]).reshape(len(paths), 784).astype("float32") / 255
    return model.predict(x, batch_size=1024, verbose=0).argmax(axis=1)


def timings(model_path: Path, images_path: Path, parquet: Path, count: int, repeat: int, tmp: Path) -> dict:
    from tasks.models import load_model
    from tasks.predict import predict_images
    from tasks.preprocess import load_split

    model = load_model(model_path)
    paths = write_pngs(read_idx_images(images_path, count), tmp / "pngs")
    x, _ = load_split(parquet)
    x = np.ascontiguousarray(x)
    samples: dict[str, list[float]] = {"png_plain": [], "png_pipeline": [], "parquet_plain": [], "parquet_pipeline": []}
    candidates = {
        "png_plain": lambda: plain_pngs(model, paths),
        # The model loaded once for every candidate: the rows compare decoding and scoring, not Keras's loading.
        "png_pipeline": lambda: predict_images(model, [tmp / "pngs"], model_digest="m")["predicted"].to_numpy(),
        "parquet_plain": lambda: model.predict(x, batch_size=1024, verbose=0).argmax(axis=1),
        "parquet_pipeline": lambda: predict_images(model, [parquet], model_digest="m")["predicted"].to_numpy(),
    }
    for fn in candidates.values():  # warm-up: the first predict traces the model
        fn()
    results = {}
    for i in range(repeat):
        order = list(candidates) if i % 2 == 0 else list(reversed(candidates))
        for key in order:
            started = time.perf_counter()
            results[key] = candidates[key]()
            samples[key].append(time.perf_counter() - started)
    assert np.array_equal(results["png_plain"], results["png_pipeline"]), "PNG paths disagree"
    assert np.array_equal(results["parquet_plain"], results["parquet_pipeline"]), "parquet paths disagree"
    return {"count": count, "parquet_rows": len(x), **{k: statistics.median(v) for k, v in samples.items()}}


def memory(model_path: Path, images_path: Path, count: int, tmp: Path) -> dict:
    folder = tmp / f"pngs-{count}"
    write_pngs(read_idx_images(images_path, count), folder)
    from tasks.keras_runtime import import_tensorflow
    from tasks.predict import predict_images

    import_tensorflow()  # its import is not part of the wall time
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    frame = predict_images(model_path, [folder])
    wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"count": count, "rows": len(frame), "wall": wall, "peak_rss_mb": peak, "rss_before_mb": before,
            "table_mb": frame.memory_usage(deep=True).sum() / 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="a model.keras file")
    parser.add_argument("--images", type=Path, required=True, help="an IDX images file (the test images)")
    parser.add_argument("--parquet", type=Path, help="a test.parquet written by the pipeline (timings)")
    parser.add_argument("--count", type=int, default=10_000, help="PNG files to score in the timings")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--memory", type=int, metavar="N", help="score N PNG files once and report the peak RSS")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mnist-bench-predict-"))
    try:
        if args.memory:
            result = memory(args.model, args.images, args.memory, tmp)
        else:
            result = timings(args.model, args.images, args.parquet, args.count, args.repeat, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
