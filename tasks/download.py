"""Download stage: fetch the four MNIST IDX files from a source, verify them and store them by content."""

from __future__ import annotations

import gzip
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from prefect import get_run_logger, task
from pydantic import BaseModel

from tasks.core import ArtifactRef, Log, PipelineError, publish, quiet, sha256_bytes, sha256_file, sha256_json, workdir
from tasks.idx import MAX_PAYLOAD_BYTES, Checks, check_split, decode_payload

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
SPLITS = {"train": FILES[:2], "test": FILES[2:]}
# Payload digests of the original MNIST files (SHA-256 of the uncompressed IDX bytes).
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
SUMS_FILE = "SHA256SUMS"
# A gzip of the largest payload is about 10 MB; a plain file at most the payload limit.
MAX_FILE_BYTES = MAX_PAYLOAD_BYTES + 4096

PUBLIC_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
SNAPSHOT_DIR = Path(__file__).resolve().parents[1] / "data" / "snapshot" / "mnist"



class DownloadConfig(BaseModel):
    """Where the raw files come from and how they are checked."""

    source: str = "auto"
    mirrors: list[str] = list(PUBLIC_MIRRORS)
    snapshot_dir: Path | None = SNAPSHOT_DIR
    sha256: dict[str, str] | None = MNIST_SHA256
    retries: int = 3
    backoff_s: float = 1.0
    timeout_s: float = 30.0


class Unreachable(Exception):
    """A source did not answer (after retries); another source may be tried."""


def download_files(
    source: str,
    raw_dir: Path,
    *,
    mirrors: Sequence[str] = (),
    snapshot_dir: Path | None = None,
    expected_sha256: dict[str, str] | None = MNIST_SHA256,
    retries: int = 3,
    backoff_s: float = 1.0,
    timeout_s: float = 30.0,
    log: Log = quiet,
) -> ArtifactRef:
    """Fetch the four IDX files from `source`, verify their payloads and publish them under `raw_dir`.

    `source` is `auto` (each mirror in turn, then the shipped snapshot), an http(s):// or file:// URL of a folder,
    or a local folder. Raises PipelineError for a bad source or bad content; nothing is left under a final name.
    """
    fetch = partial(_download_from, raw_dir=raw_dir, expected_sha256=expected_sha256, retries=retries,
                    backoff_s=backoff_s, timeout_s=timeout_s, log=log)
    if source == "auto":
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
    expected_sha256: dict[str, str] | None,
    give_up_on_dns: bool,
    retries: int,
    backoff_s: float,
    timeout_s: float,
    log: Log,
) -> ArtifactRef:
    payloads, served = _fetch_all(source, retries, backoff_s, timeout_s, log, give_up_on_dns)
    _verify(payloads, expected_sha256)
    log(f"served by {served}")
    return _store(payloads, raw_dir, served)


def source_fingerprint(source: str) -> str:
    """Return a digest of a local source's files (so a changed folder is downloaded again), or the source as is."""
    folder = _local_folder(source)
    if folder is None or not folder.is_dir():
        return source
    found = {}
    for name in (*[f + s for f in FILES for s in (".gz", "")], SUMS_FILE):
        path = folder / name
        if path.is_file():
            found[name] = sha256_file(path)  # in chunks: the folder is not trusted to hold small files
    return sha256_json({"source": str(folder), "files": found})


def _local_folder(source: str) -> Path | None:
    if source.startswith("file://"):
        return Path(urllib.request.url2pathname(urllib.parse.urlparse(source).path))
    return None if "://" in source else Path(source)


def _fetch_all(
    source: str, retries: int, backoff_s: float, timeout_s: float, log: Log, give_up_on_dns: bool
) -> tuple[dict[str, bytes], str]:
    """Return the four payloads from one source, and a description of it."""
    parsed = urllib.parse.urlparse(source)
    folder = _local_folder(source)
    if folder is not None:
        if not folder.is_dir():
            raise PipelineError(f"source {source}: expected a folder holding the four MNIST files, found no such folder")
        get = lambda name: _read_local(folder / name, folder)  # noqa: E731
    elif parsed.scheme in ("http", "https"):
        base = source if source.endswith("/") else source + "/"
        get = lambda name: _http_get(base + name, retries, backoff_s, timeout_s, log, give_up_on_dns)  # noqa: E731
    else:
        raise PipelineError(
            f"source {source}: expected auto, an http://, https:// or file:// URL, or a folder, found scheme {parsed.scheme!r}"
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
    sums = get(SUMS_FILE)
    if sums is not None:
        # A SHA256SUMS file may list the payloads or the files as served (`sha256sum *.gz`): check both.
        _check_sums(sums, {**as_served, **payloads}, source)
    return payloads, source


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


def _check_sums(sums: bytes, files: dict[str, bytes], source: str) -> None:
    """Verify files (by name) against a SHA256SUMS file; entries for names not fetched are ignored."""
    for line in sums.decode(errors="replace").splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        digest, name = parts[0].lower(), parts[1].lstrip("*")
        if name in files:
            found = sha256_bytes(files[name])
            if found != digest:
                raise PipelineError(f"{name}: {SUMS_FILE} digest: expected {digest}, found {found} (source {source})")


def _verify(payloads: dict[str, bytes], expected: dict[str, str] | None) -> None:
    """Check payload digests against the pinned ones; name the structural problem first if there is one.

    Without pinned digests the structural checks are all there is, so they always run then.
    """
    wrong = [name for name in FILES if sha256_bytes(payloads[name]) != expected[name]] if expected else []
    if expected and not wrong:
        return
    checks = Checks()
    for images, labels in SPLITS.values():
        check_split(payloads[images], payloads[labels], images, labels, checks)
    checks.raise_first()
    if not wrong:
        return
    name = wrong[0]
    raise PipelineError(f"{name}: pinned SHA-256: expected {expected[name]}, found {sha256_bytes(payloads[name])}")


def _store(payloads: dict[str, bytes], raw_dir: Path, served: str) -> ArtifactRef:
    """Write the payloads gzipped into a work folder and publish it under the digest of the payloads."""
    digests = {name: sha256_bytes(payloads[name]) for name in FILES}
    with workdir(raw_dir) as work:
        for name in FILES:
            # mtime=0 keeps the bytes a function of the payload alone; level 1: much faster than the default level
            # for a few percent more bytes.
            (work / f"{name}.gz").write_bytes(gzip.compress(payloads[name], compresslevel=1, mtime=0))
        return publish("download", work, digest=sha256_json(digests), meta={"source": served, "payload_sha256": digests})


@task(name="download_mnist")
def download_mnist(config: DownloadConfig, data_dir: Path, fingerprint: str = "") -> ArtifactRef:
    """Download and verify the raw MNIST files into `data_dir/raw` (`fingerprint` keys the cache on local sources)."""
    return download_files(
        config.source,
        Path(data_dir) / "raw",
        mirrors=config.mirrors,
        snapshot_dir=config.snapshot_dir,
        expected_sha256=config.sha256,
        retries=config.retries,
        backoff_s=config.backoff_s,
        timeout_s=config.timeout_s,
        log=get_run_logger().info,
    )
