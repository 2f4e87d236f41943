"""The Keras tutorial's MNIST program as one plain script, timed: the reference the pipeline is measured against.

Loads the four gzipped IDX files with numpy, trains Dense(512, relu) + Dense(10, softmax) with Adam for 5 epochs at
batch 128 (verbose=0), evaluates on the test split and prints one JSON line:
{"load_s", "fit_s", "evaluate_s", "total_s", "test_accuracy", "test_loss", "train_rows", "test_rows", "epochs"}.
`total_s` runs from the start of this script (imports of TensorFlow included) to the end of evaluation.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

SNAPSHOT = Path(__file__).resolve().parents[1] / "data" / "snapshot" / "mnist"


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped (or plain) IDX file of unsigned bytes into an array of its declared shape."""
    data = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find(folder: Path, name: str) -> Path:
    gz = folder / f"{name}.gz"
    return gz if gz.exists() else folder / name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(SNAPSHOT), help="folder with the four MNIST IDX files (default: the snapshot)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--limit", type=int, help="use only the first N train and N test rows (smoke runs)")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    folder = Path(args.data)

    started = time.perf_counter()
    x_train = read_idx(find(folder, "train-images-idx3-ubyte"))
    y_train = read_idx(find(folder, "train-labels-idx1-ubyte"))
    x_test = read_idx(find(folder, "t10k-images-idx3-ubyte"))
    y_test = read_idx(find(folder, "t10k-labels-idx1-ubyte"))
    if args.limit:
        x_train, y_train, x_test, y_test = x_train[: args.limit], y_train[: args.limit], x_test[: args.limit], y_test[: args.limit]
    x_train = x_train.reshape(len(x_train), 784).astype("float32") / 255
    x_test = x_test.reshape(len(x_test), 784).astype("float32") / 255
    load_s = time.perf_counter() - started

    import keras  # the tutorial's import; TensorFlow comes with it

    model = keras.Sequential([keras.Input(shape=(784,)), keras.layers.Dense(512, activation="relu"), keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    started = time.perf_counter()
    model.fit(x_train, y_train, epochs=args.epochs, batch_size=128, verbose=0)
    fit_s = time.perf_counter() - started
    started = time.perf_counter()
    test_loss, test_accuracy = model.evaluate(x_test, y_test, verbose=0)
    evaluate_s = time.perf_counter() - started
    print(json.dumps({
        "load_s": round(load_s, 3), "fit_s": round(fit_s, 3), "evaluate_s": round(evaluate_s, 3),
        "total_s": round(time.perf_counter() - STARTED, 3), "test_accuracy": float(test_accuracy),
        "test_loss": float(test_loss), "train_rows": len(x_train), "test_rows": len(x_test), "epochs": args.epochs,
    }))


if __name__ == "__main__":
    main()
