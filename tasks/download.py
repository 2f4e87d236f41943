"""Download stage: fetch a dataset from a source, verify it and store it by content as the four IDX files of MNIST's
layout (what validate and preprocess read), whatever the source's format (tasks.sources)."""

from __future__ import annotations

import gzip
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from tasks import storage
from tasks.artifacts import ArtifactRef, publish
from tasks.dataset import (
    BACKOFF_S,
    BY_MNIST,
    BY_SUMS,
    BY_USER,
    FILES,
    RETRIES,
    SPLITS,
    SUMS_FILE,
    TIMEOUT_S,
    DownloadConfig,
    local_folder,
    parse_sums,
)
from tasks.errors import Log, PipelineError, quiet
from tasks.files import sha256_bytes, sha256_file, sha256_json, workdir, write_json
from tasks.idx import MAX_IMAGES, MAX_PAYLOAD_BYTES, PIXELS, Checks, check_split, decode_payload, encode_idx
from tasks.layout import SOURCES_FILE
from tasks.sources import MAX_SOURCE_BYTES, MAX_SOURCE_FILES, Dataset, format_of, read_folder, read_npz

# Payload digests of the original MNIST files (SHA-256 of the uncompressed IDX bytes).
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# The check that each kind of pin names.
PIN_CHECKS = {BY_MNIST: "MNIST SHA-256", BY_SUMS: f"{SUMS_FILE} digest", BY_USER: "--sha256 digest"}
# A gzip of the largest payload is about 10 MB; a plain file at most the payload limit.
MAX_FILE_BYTES = MAX_PAYLOAD_BYTES + 4096
# An .npz holds up to MAX_IMAGES images (compressed or not).
MAX_NPZ_BYTES = MAX_IMAGES * (PIXELS + 8) + (1 << 20)

class Unreachable(Exception):
    """A source did not answer (after retries); another source may be tried."""


def download_files(
    source: str,
    raw_dir: Path,
    *,
    mirrors: Sequence[str] = (),
    snapshot_dir: Path | None = None,
    expected_sha256: dict[str, str] | None = None,
    retries: int = RETRIES,
    backoff_s: float = BACKOFF_S,
    timeout_s: float = TIMEOUT_S,
    class_names: Sequence[str] | None = None,
    test_fraction: float = 0.1,
    log: Log = quiet,
) -> ArtifactRef:
    """Fetch a dataset from `source`, verify it and publish it under `raw_dir` as four IDX files.

    `source` is `auto` (Keras's own copy of MNIST if there is one, then each mirror in turn, then the shipped
    snapshot), an http(s):// or file:// URL of a folder of IDX files or of an .npz, or a local folder (IDX files,
    class folders or a manifest with its images) or .npz file. IDX payloads are checked against `expected_sha256`
    when given, else (`auto` only) MNIST's digests, and against a SHA256SUMS file the source carries; the files of
    other formats against the same lists, by their names. `class_names` orders the classes of class folders and
    manifests (default: sorted); `test_fraction` is the share of a source without a test split that goes to test.
    Raises PipelineError for a bad source or bad content; nothing is left under a final name.
    """
    if urllib.parse.urlparse(source).scheme == "s3":  # a prefix of objects: read from a local copy of them
        with storage.local_copy(source, MAX_SOURCE_FILES, MAX_SOURCE_BYTES) as copy:
            ref = download_files(copy, raw_dir, expected_sha256=expected_sha256, class_names=class_names,
                                 test_fraction=test_fraction, log=log)
        return ref.model_copy(update={"meta": {**ref.meta, "source": source}})
    pins = {} if expected_sha256 is None else {BY_USER: expected_sha256}
    if source == "auto":
        # `auto` means MNIST: a mirror serving anything else is refused (and the next one tried).
        pins = pins or {BY_MNIST: MNIST_SHA256}
    fetch = partial(_download_from, raw_dir=raw_dir, pins=pins, retries=retries, backoff_s=backoff_s,
                    timeout_s=timeout_s, class_names=class_names, test_fraction=test_fraction, log=log)
    if source == "auto":
        keras = keras_mnist()
        if keras.is_file():
            try:
                return fetch(str(keras), give_up_on_dns=True)
            except PipelineError as exc:  # not MNIST's arrays, or damaged: the mirrors have it
                log(f"{keras} is not taken ({exc}); trying the mirrors")
        candidates = [*mirrors, *([str(snapshot_dir)] if snapshot_dir else [])]
        if not candidates:
            raise PipelineError("source auto: expected mirrors or a snapshot folder, found neither configured")
        # Any failure of a mirror (no answer, missing or bad files) moves on; the last candidate's error is final.
        for candidate in candidates[:-1]:
            try:
                return fetch(candidate, give_up_on_dns=True)
            except (Unreachable, PipelineError) as exc:
                log(f"source {candidate} failed ({exc}); trying the next")
        source = candidates[-1]
    try:
        return fetch(source, give_up_on_dns=False)
    except Unreachable as exc:
        raise PipelineError(f"source {source}: unreachable: {exc}") from None


def _download_from(
    source: str,
    *,
    raw_dir: Path,
    pins: dict[str, dict[str, str]],
    give_up_on_dns: bool,
    retries: int,
    backoff_s: float,
    timeout_s: float,
    class_names: Sequence[str] | None,
    test_fraction: float,
    log: Log,
) -> ArtifactRef:
    folder = local_folder(source)
    if source.lower().endswith(".npz") or (folder is not None and folder.is_dir() and format_of(folder) != "idx"):
        return _download_dataset(source, folder, raw_dir, pins, class_names, test_fraction,
                                 partial(_http_get, retries=retries, backoff_s=backoff_s, timeout_s=timeout_s, log=log,
                                         give_up_on_dns=give_up_on_dns), log)
    payloads, as_served, sums = _fetch_all(source, retries, backoff_s, timeout_s, log, give_up_on_dns)
    # The structure first: a file that is not IDX is named as such, not as a digest mismatch.
    checks = Checks()
    for images, labels in SPLITS.values():
        # The label range depends on the dataset's classes: the validate stage checks it.
        check_split(payloads[images], payloads[labels], images, labels, checks, num_classes=None)
    checks.raise_first()
    if sums is not None:
        # The source's own list first: a mismatch there is damage on the way, not another dataset.
        pins = {BY_SUMS: parse_sums(sums.decode(errors="replace"), f"{source.rstrip('/')}/{SUMS_FILE}"), **pins}
    # A pin list may name the payloads or the files as served (`sha256sum *.gz`).
    served = {name: sha256_bytes(data) for name, data in {**as_served, **payloads}.items()}
    for by, digests in pins.items():
        _check_sums(digests, served, [[n for n in (p, f"{p}.gz") if n in served] for p in FILES], source, by)
    digests = {name: served[name] for name in FILES}
    if not pins:
        log(f"source {source} is not pinned (no {SUMS_FILE}, no --sha256): accepted on the IDX checks alone; "
            f"payload SHA-256 recorded: " + ", ".join(f"{name} {digests[name]}" for name in FILES))
    log(f"served by {source}")
    return _store(payloads, digests, raw_dir, source, list(pins))


def _fetch_all(
    source: str, retries: int, backoff_s: float, timeout_s: float, log: Log, give_up_on_dns: bool
) -> tuple[dict[str, bytes], dict[str, bytes], bytes | None]:
    """Return the four payloads from one source, the files as served (by name) and its SHA256SUMS file (or None)."""
    parsed = urllib.parse.urlparse(source)
    folder = local_folder(source)
    if folder is not None:
        if not folder.is_dir():
            raise PipelineError(f"source {source}: expected a folder holding the four MNIST files, found no such folder")
        get = lambda name: _read_local(folder / name, folder)
    elif parsed.scheme in ("http", "https"):
        base = source if source.endswith("/") else source + "/"
        get = lambda name: _http_get(base + name, retries, backoff_s, timeout_s, log, give_up_on_dns)
    else:
        raise PipelineError(
            f"source {source}: expected auto, an http://, https://, file:// or s3:// URL, a folder or an .npz file, "
            f"found scheme {parsed.scheme!r}"
        )
    payloads: dict[str, bytes] = {}
    as_served: dict[str, bytes] = {}
    for name in FILES:
        for candidate in (name + ".gz", name):
            data = get(candidate)
            if data is not None:
                payloads[name] = decode_payload(data, candidate)
                as_served[candidate] = data
                log(f"fetched {candidate} ({len(data)} bytes) from {source}")
                break
        else:
            raise PipelineError(f"source {source}: missing file: expected {name}.gz (or {name}), found neither")
    return payloads, as_served, get(SUMS_FILE)


def local_payloads(folder: Path) -> dict[str, bytes]:
    """Return the four IDX payloads of a local folder, read as a source folder is (bounded, no link out of it)."""
    return _fetch_all(str(folder), 0, 0.0, 0.0, quiet, give_up_on_dns=False)[0]


def _read_local(path: Path, folder: Path) -> bytes | None:
    if not path.is_file():
        return None
    # A link out of the source folder could make the pipeline read (and store) any file the job can read.
    target = path.resolve()
    if not target.is_relative_to(folder.resolve()):
        raise PipelineError(f"{path}: location: expected a file inside the source folder {folder}, found a link to {target}")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise PipelineError(f"{path.name}: size: expected at most {MAX_FILE_BYTES} bytes, found {path.stat().st_size}")
    return path.read_bytes()


def _http_get(url: str, retries: int, backoff_s: float, timeout_s: float, log: Log, give_up_on_dns: bool) -> bytes | None:
    """GET a URL with retries and exponential backoff; None if the server says it has no such file."""
    attempt = 0
    while True:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                data = response.read(MAX_FILE_BYTES + 1)
                announced = response.headers.get("Content-Length")
            if len(data) > MAX_FILE_BYTES:
                raise PipelineError(f"{url.rsplit('/', 1)[-1]}: size: expected at most {MAX_FILE_BYTES} bytes, found more")
            # A read with a size limit returns short data, not an error, when the server closes early: retry it.
            if announced is not None and announced.isdigit() and len(data) < int(announced):
                raise ConnectionError(f"connection closed after {len(data)} of {announced} bytes")
            return data
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 410):
                return None
            if exc.code < 500 and exc.code not in (408, 429):
                raise PipelineError(f"{url}: HTTP {exc.code} {exc.reason}") from None
            reason = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            cause = getattr(exc, "reason", exc)
            if give_up_on_dns and isinstance(cause, socket.gaierror):
                raise Unreachable(f"{url}: {cause}") from None
            reason = str(cause)
        if attempt >= retries:
            raise Unreachable(f"{url}: {reason} (after {attempt + 1} attempts)")
        delay = backoff_s * 2**attempt
        log(f"{url}: {reason}; retrying in {delay:.1f} s ({attempt + 1}/{retries})")
        time.sleep(delay)
        attempt += 1


def _check_sums(pins: dict[str, str], digests: dict[str, str], covered: list[list[str]], source: str, by: str) -> None:
    """Verify files (their digests by name) against one pin list; it must cover each group of `covered` (the names one
    file may go by) by one of its names.

    Entries for names not fetched are ignored (a SHA256SUMS file may list more than the files of the dataset).
    """
    for names in covered:
        if not any(name in pins for name in names):
            raise PipelineError(f"{by}: coverage: expected a digest for {' or '.join(names)}, found none (source {source})")
        for name in names:
            if name in pins and digests[name] != pins[name]:
                raise PipelineError(f"{name}: {PIN_CHECKS[by]}: expected {pins[name]}, found {digests[name]} "
                                    f"(source {source})")


def _download_dataset(source: str, folder: Path | None, raw_dir: Path, pins: dict[str, dict[str, str]],
                      class_names: Sequence[str] | None, test_fraction: float, http_get: partial,
                      log: Log) -> ArtifactRef:
    """Read a source of another format (an .npz, class folders, a manifest), check its files against the pins, and
    store it in the raw form."""
    if folder is None:  # an .npz by URL
        data = http_get(source)
        if data is None:
            raise PipelineError(f"source {source}: missing file: expected an .npz there, found none")
        name, files = source.rsplit("/", 1)[-1], {source.rsplit("/", 1)[-1]: sha256_bytes(data)}
        dataset, sums = read_npz(data, name), http_get(f"{source.rsplit('/', 1)[0]}/{SUMS_FILE}")
    elif folder.is_file():
        if folder.stat().st_size > MAX_NPZ_BYTES:
            raise PipelineError(f"{folder}: size: expected at most {MAX_NPZ_BYTES} bytes, "
                                f"found {folder.stat().st_size}")
        files = {folder.name: sha256_file(folder)} if pins or (folder.parent / SUMS_FILE).is_file() else {}
        dataset = read_npz(folder, str(folder))
        sums = (folder.parent / SUMS_FILE).read_bytes() if (folder.parent / SUMS_FILE).is_file() else None
    else:
        log(f"reading {format_of(folder).replace('-', ' ')} from {folder}")
        dataset = read_folder(folder, class_names, test_fraction, log)
        sums = (folder / SUMS_FILE).read_bytes() if (folder / SUMS_FILE).is_file() else None
        listed = [path for split in dataset.files.values() for path in split]
        files = {path: sha256_file(folder / path) for path in listed} if pins or sums is not None else {}
    payloads = {}
    for split, (images_name, labels_name) in SPLITS.items():
        payloads[images_name] = encode_idx(dataset.images[split])
        payloads[labels_name] = encode_idx(dataset.labels[split])
    digests = {name: sha256_bytes(payloads[name]) for name in FILES}
    if sums is not None:
        pins = {BY_SUMS: parse_sums(sums.decode(errors="replace"), f"{source.rstrip('/')}/{SUMS_FILE}"), **pins}
    for by, listed in pins.items():
        # `sha256sum` run in the folder names files ./train/0/1.png or train/0/1.png alike.
        listed = {name.removeprefix("./"): digest for name, digest in listed.items()}
        if all(name in listed for name in FILES):  # a list of the four payloads pins the content, whatever the format
            _check_sums(listed, digests, [[name] for name in FILES], source, by)
        else:
            _check_sums(listed, files, [[name] for name in files], source, by)
    log(f"read {len(dataset.labels['train'])} train and {len(dataset.labels['test'])} test images from {source}; "
        + ", ".join(f"{n} {kind}" for kind, n in dataset.changes.items()))
    return _store(payloads, digests, raw_dir, source, list(pins), dataset)


def _store(payloads: dict[str, bytes], digests: dict[str, str], raw_dir: Path, served: str, pinned_by: list[str],
           dataset: Dataset | None = None) -> ArtifactRef:
    """Write the payloads gzipped into a work folder and publish it under the digest of the payloads (and, for a
    source of another format, of its classes and the file each image came from)."""
    meta = {"source": served, "payload_sha256": digests, "pinned_by": pinned_by, "mnist": digests == MNIST_SHA256,
            "format": "idx"}
    key: dict = digests
    with workdir(raw_dir) as work:
        for name in FILES:
            # mtime=0 keeps the bytes a function of the payload alone; level 1: much faster than the default level
            # for a few percent more bytes.
            (work / f"{name}.gz").write_bytes(gzip.compress(payloads[name], compresslevel=1, mtime=0))
        if dataset is not None:
            meta.update(format=dataset.format, class_names=dataset.class_names, changes=dataset.changes)
            if any(dataset.files.values()):
                write_json(work / SOURCES_FILE, dataset.files)
            if dataset.class_names is not None or any(dataset.files.values()):
                # The same pixels under other class names, or from other files, are another dataset (an .npz of
                # MNIST's arrays is MNIST's raw artifact).
                key = {"payloads": digests, "class_names": dataset.class_names, "files": sha256_json(dataset.files)}
        return publish("download", work, digest=sha256_json(key), meta=meta)


def keras_mnist() -> Path:
    """Return where `keras.datasets.mnist.load_data()` keeps MNIST: $KERAS_HOME or ~/.keras, then datasets/mnist.npz."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "datasets" / "mnist.npz"


def download_raw(config: DownloadConfig, out_dir: Path, class_names: list[str] | None = None,
                 log: Log = quiet) -> ArtifactRef:
    """Download and verify the dataset that `config` names into `out_dir` (the download stage); `class_names` (the
    dataset's, when configured) orders the classes of class folders and manifests."""
    return download_files(config.source, out_dir, mirrors=config.mirrors, snapshot_dir=config.snapshot_dir,
                          expected_sha256=config.sha256, retries=config.retries, backoff_s=config.backoff_s,
                          timeout_s=config.timeout_s, class_names=class_names, test_fraction=config.test_fraction,
                          log=log)
