"""Small synthetic MNIST-like IDX data for fast tests: each class is a learnable pattern plus noise."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np

from tasks.idx import encode_idx

NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


idx_bytes = encode_idx


def make_split(n: int, seed: int, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Return n images (uint8, 28x28) and labels; class c is a bright bar at rows 2c+4..2c+5 plus noise.

    The bars fit 28 rows for up to 12 classes.
    """
    assert 1 <= num_classes <= 12, num_classes
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % num_classes).astype(np.uint8)
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
    for i, c in enumerate(labels):
        images[i, 2 * c + 4 : 2 * c + 6, 4:24] = 255
    return images, labels


def payloads(n_train: int = 200, n_test: int = 50, seed: int = 0, num_classes: int = 10) -> dict[str, bytes]:
    """Return the four IDX payloads by their MNIST file names."""
    out = {}
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        images, labels = make_split(n, s, num_classes)
        out[NAMES[split][0]] = idx_bytes(images)
        out[NAMES[split][1]] = idx_bytes(labels)
    return out


def write_source(
    folder: Path,
    files: dict[str, bytes] | None = None,
    gz: bool = True,
    *,
    n_train: int = 200,
    n_test: int = 50,
    num_classes: int = 10,
) -> dict[str, str]:
    """Write payloads (default: `payloads(n_train, n_test, num_classes=...)`) into `folder` as .gz (or plain) files.

    Return the SHA-256 of each payload.
    """
    files = payloads(n_train, n_test, num_classes=num_classes) if files is None else files
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0))
        else:
            (folder / name).write_bytes(data)
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def sums_text(entries: dict[str, str]) -> str:
    """Return `sha256sum` output for {file name: digest}."""
    return "".join(f"{digest}  {name}\n" for name, digest in entries.items())


def write_sums(folder: Path, entries: dict[str, str] | None = None, served: bool = False) -> dict[str, str]:
    """Write `folder/SHA256SUMS`; default entries: the payload digests of the IDX files there, or (served) the files'.

    Return the entries written.
    """
    if entries is None:
        entries = {}
        for path in sorted(folder.glob("*-ubyte*")):
            data = path.read_bytes()
            if served:
                entries[path.name] = hashlib.sha256(data).hexdigest()
            else:
                payload = gzip.decompress(data) if path.suffix == ".gz" else data
                entries[path.name.removesuffix(".gz")] = hashlib.sha256(payload).hexdigest()
    (folder / "SHA256SUMS").write_text(sums_text(entries))
    return entries


def processed_ref(root: Path, n_train: int = 200, n_test: int = 50):
    """Publish synthetic train/test parquet splits as the preprocess stage would; return the ArtifactRef."""
    import pyarrow.parquet as pq

    from tasks.artifacts import publish
    from tasks.files import new_workdir
    from tasks.preprocess import to_table

    work = new_workdir(root)
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        images, labels = make_split(n, seed)
        pq.write_table(to_table(images, labels, {"split": split}), work / f"{split}.parquet", compression="none")
    return publish("preprocess", work)
