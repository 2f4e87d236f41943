"""The dataset's settings: where its files come from, how many rows each split has, its classes and their names.

Kept apart from the stages (no TensorFlow, no pyarrow), so that the config is read, and `mnist-pipeline status`
answers, without importing them.
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks import storage
from tasks.errors import PipelineError
from tasks.files import sha256_file, sha256_json
from tasks.idx import NUM_CLASSES
from tasks.layout import SNAPSHOT, SUCCESS_MARKER

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
SPLITS = {"train": FILES[:2], "test": FILES[2:]}
SUMS_FILE = "SHA256SUMS"
PUBLIC_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
SNAPSHOT_DIR = Path(__file__).resolve().parents[1].joinpath("data", *SNAPSHOT)
# What can pin a source's payloads (recorded in the download artifact's meta["pinned_by"] and in validation.json).
BY_MNIST, BY_SUMS, BY_USER = "MNIST digests", SUMS_FILE, "--sha256"
# How hard the download tries a source that does not answer: attempts after the first, the first wait (doubled each
# time), and the timeout of one request.
RETRIES, BACKOFF_S, TIMEOUT_S = 3, 1.0, 30.0


class DownloadConfig(BaseModel):
    """Where the raw files come from and how they are checked."""

    source: str = "auto"
    mirrors: list[str] = list(PUBLIC_MIRRORS)
    snapshot_dir: Path | None = SNAPSHOT_DIR
    # Explicit pins (`--sha256 FILE`, see read_sums): payload or served file name -> SHA-256. None: `auto` is pinned
    # to MNIST's digests, any other source only by a SHA256SUMS file it carries.
    sha256: dict[str, str] | None = None
    retries: int = RETRIES
    backoff_s: float = BACKOFF_S
    timeout_s: float = TIMEOUT_S
    test_fraction: float = Field(0.1, gt=0, lt=1, description="share of a source without a test split (class folders "
                                 "without test/, a manifest without a split column) that goes to test, each image by "
                                 "a hash of its pixels")


def source_fingerprint(source: str) -> str:
    """Return a digest of a local source (so a changed folder or file is downloaded again), or the source as is.

    MNIST's files and an .npz are hashed; a folder of image files (or an s3:// prefix) is known by the listing of its
    files with their size and change times (ETags), so that an unchanged folder is not read again.
    """
    if urllib.parse.urlparse(source).scheme == "s3":  # a prefix of objects: listed with their ETags
        return sha256_json({"source": source, "files": listing_digest(source)})
    folder = local_folder(source)
    if folder is None or not folder.exists():
        return source
    if folder.is_file():
        return sha256_json({"source": str(folder), "file": sha256_file(folder)})
    found = {}
    for name in (*[f + s for f in FILES for s in (".gz", "")], SUMS_FILE):
        path = folder / name
        if path.is_file():
            found[name] = sha256_file(path)  # in chunks: the folder is not trusted to hold small files
    if len(found) <= (SUMS_FILE in found):  # no IDX file: a folder of images
        found = listing_digest(folder)
    return sha256_json({"source": str(folder), "files": found})


def listing_digest(folder: object) -> str:
    """Return the SHA-256 of a folder's listing with each file's signature (tasks.storage.file_listing)."""
    digest = hashlib.sha256()
    for name, signature in storage.file_listing(folder).items():  # sorted by name; one line per file
        digest.update(f"{name}\0{signature}\n".encode())
    return digest.hexdigest()


def data_version(base: Any, batches: Sequence[Any]) -> dict[str, Any]:
    """Return what a model is trained and judged on: the digest of the base's processed artifact and those of the
    accepted batches, in order. The training rows and the holdout are both drawn from them, so this also names the
    holdout version."""
    return {"base": base.digest, "batches": [batch.digest for batch in batches]}


def version_label(version: dict[str, Any] | None) -> str:
    """Return a data version in a few characters: the base's digest prefix and the number of batches."""
    if not version:
        return "?"
    return version["base"][:8] + (f"+{len(version['batches'])}" if version["batches"] else "")


def local_folder(source: str) -> Path | None:
    """Return the folder a source names (a path or a file:// URL), or None for a remote URL."""
    if source.startswith("file://"):
        return Path(urllib.request.url2pathname(urllib.parse.urlparse(source).path))
    return None if "://" in source else Path(source)


class ValidateConfig(BaseModel):
    """Expected size of each split (None: MNIST's for MNIST's files, any size for other data), and how many test
    images may also be in the training split."""

    train_count: int | None = None
    test_count: int | None = None
    max_leakage: float = Field(0.01, ge=0, le=1, description="largest share of the test split whose images are also "
                               "in the training split (leakage); above it validation fails")


class BatchesConfig(BaseModel):
    """Labelled batches that land beside the base dataset (tasks.batches): where, the holdout share, the checks."""

    root: str | None = Field(None, description="batches root: one subfolder per batch, taken once its _SUCCESS "
                             "marker exists (a folder or s3:// prefix; default: no batches)")
    holdout_fraction: float = Field(0.1, gt=0, lt=1, description="share of each batch held out, each image by a hash "
                                    "of its pixels")
    max_label_shift: float = Field(0.3, ge=0, le=1, description="largest total variation distance between a batch's "
                                   "label distribution and the base training split's")
    max_pixel_shift: float = Field(0.3, ge=0, description="largest relative change of a batch's mean intensity or ink "
                                   "fraction against the base training split's")
    max_duplicates: float = Field(0.1, ge=0, le=1, description="largest share of a batch's images that are copies of "
                                  "training images or of earlier batches")
    accept: list[str] = Field(default_factory=list, description="batches taken even though a check failed")


def landed(root: object) -> tuple[list[str], list[str]]:
    """Return the complete batches under a batches root (their `_SUCCESS` marker exists), in name order, and the
    incomplete ones (still being copied, or abandoned)."""
    complete, incomplete = [], []
    for name in storage.list_names(root):
        if name.startswith((".", "_")):
            continue
        (complete if storage.exists(f"{root}/{name}/{SUCCESS_MARKER}") else incomplete).append(name)
    return complete, incomplete


MNIST_TITLE = "MNIST digits"
OTHER_TITLE = "dataset"


class DatasetConfig(BaseModel):
    """The classes of the dataset and what to call them; labels are 0..num_classes-1."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        None, description=f"title of the dataset in the report and the UI (default: {MNIST_TITLE!r} for MNIST, else {OTHER_TITLE!r})"
    )
    # Labels are stored as uint8.
    num_classes: int = Field(NUM_CLASSES, ge=2, le=256, description="number of classes; labels must be "
                             "0..num_classes-1 (class folders and a manifest's class names set it)")
    class_names: list[str] | None = Field(
        None, description="names of the classes in label order, comma-separated (default: the labels themselves; "
        "class folders and a manifest's class names: those names, sorted, which this list may order)"
    )

    @field_validator("class_names", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        # The command line and the environment give one comma-separated string.
        return [part.strip() for part in value.split(",")] if isinstance(value, str) else value

    @model_validator(mode="before")
    @classmethod
    def _as_many_classes_as_names(cls, data: object) -> object:
        # Names given without a number of classes: one class per name.
        if isinstance(data, dict) and data.get("class_names") and data.get("num_classes") is None:
            data = {**data, "num_classes": len(cls._split(data["class_names"]))}
        return data

    @field_validator("class_names")
    @classmethod
    def _distinct(cls, names: list[str] | None) -> list[str] | None:
        if names is not None:
            if any(not name for name in names):
                raise ValueError("expected non-empty names, found an empty one")
            repeated = sorted({name for name in names if names.count(name) > 1})
            if repeated:
                raise ValueError(f"expected distinct names, found {', '.join(map(repr, repeated))} more than once")
        return names

    @model_validator(mode="after")
    def _one_name_per_class(self) -> DatasetConfig:
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names: expected {self.num_classes} names (one per class, num_classes {self.num_classes}), "
                f"found {len(self.class_names)}"
            )
        return self

    def of_source(self, class_names: list[str] | None) -> DatasetConfig:
        """Return these settings with the classes a source names (class folders, a manifest's class names): their
        number and, in label order, their names. A source of integer labels (None) leaves them as configured."""
        if class_names is None:
            return self
        return self.model_copy(update={"num_classes": len(class_names), "class_names": list(class_names)})

    def names(self) -> list[str]:
        """Return the name of each class in label order (the labels themselves when no names are given)."""
        return list(self.class_names) if self.class_names else [str(c) for c in range(self.num_classes)]

    def key(self) -> str:
        """Return the dataset's identity in the registry, by its name and classes: each dataset has its own champion,
        and models of another dataset never compete (`10-classes-1a2b3c4d` for MNIST's digits)."""
        slug = re.sub(r"[^a-z0-9]+", "-", (self.name or "").lower()).strip("-")[:40] or f"{self.num_classes}-classes"
        return f"{slug}-{sha256_json([self.name, self.names()])[:8]}"

    def title(self, is_mnist: bool) -> str:
        """Return the dataset's title: its configured name, else MNIST's or a neutral one."""
        return self.name or (MNIST_TITLE if is_mnist else OTHER_TITLE)


# A `sha256sum` line: digest, a space, then a space (text mode) or `*` (binary mode), then the name.
_SUMS_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *]?(\S.*)")


def read_sums(path: Path) -> dict[str, str]:
    """Read a `sha256sum`-format file into {file name: SHA-256}; raise PipelineError naming a bad line."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: read: expected a readable sha256sum file, found {getattr(exc, 'strerror', None) or exc}") from None
    return parse_sums(text, str(path))


def parse_sums(text: str, where: str) -> dict[str, str]:
    """Parse `sha256sum` output (blank and # lines skipped) into {file name: lower-case SHA-256}."""
    sums: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = _SUMS_LINE.fullmatch(line.rstrip())
        if match is None:
            raise PipelineError(f"{where}: line {number}: expected '<64 hex digits>  <file name>', found {line[:100]!r}")
        digest, name = match[1].lower(), match[2]
        # Two different digests for one name cannot both hold; keeping either would hide the other.
        if sums.setdefault(name, digest) != digest:
            raise PipelineError(f"{where}: line {number}: expected one digest for {name}, found {sums[name]} and {digest}")
    return sums
