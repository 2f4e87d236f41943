"""Download stage: fetch the four IDX files (MNIST's layout) from a source, verify them and store them by content."""

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
from tasks.files import sha256_bytes, sha256_json, workdir
from tasks.idx import MAX_PAYLOAD_BYTES, Checks, check_split, decode_payload

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
    log: Log = quiet,
) -> ArtifactRef:
    """Fetch the four IDX files from `source`, verify their payloads and publish them under `raw_dir`.

    `source` is `auto` (each mirror in turn, then the shipped snapshot), an http(s):// or file:// URL of a folder,
    or a local folder. Payloads are checked against `expected_sha256` when given, else (`auto` only) MNIST's digests,
    and against a SHA256SUMS file the source carries. Raises PipelineError for a bad source or bad content; nothing
    is left under a final name.
    """
    pins = {} if expected_sha256 is None else {BY_USER: expected_sha256}
    if source == "auto":
        # `auto` means MNIST: a mirror serving anything else is refused (and the next one tried).
        pins = pins or {BY_MNIST: MNIST_SHA256}
    fetch = partial(_download_from, raw_dir=raw_dir, pins=pins, retries=retries,
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
    pins: dict[str, dict[str, str]],
    give_up_on_dns: bool,
    retries: int,
    backoff_s: float,
    timeout_s: float,
    log: Log,
) -> ArtifactRef:
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
    for by, digests in pins.items():
        # A pin list may name the payloads or the files as served (`sha256sum *.gz`).
        _check_sums(digests, {**as_served, **payloads}, source, by)
    digests = {name: sha256_bytes(payloads[name]) for name in FILES}
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
    return payloads, as_served, get(SUMS_FILE)


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


def _check_sums(pins: dict[str, str], files: dict[str, bytes], source: str, by: str) -> None:
    """Verify files (by name) against the digests of one pin list; it must cover every payload, by any of its names.

    Entries for names not fetched are ignored (a SHA256SUMS file may list more than the four files).
    """
    for payload in FILES:
        names = [name for name in (payload, f"{payload}.gz") if name in files]
        if not any(name in pins for name in names):
            raise PipelineError(f"{by}: coverage: expected a digest for {' or '.join(names)}, found none (source {source})")
        for name in names:
            if name in pins and sha256_bytes(files[name]) != pins[name]:
                raise PipelineError(f"{name}: {PIN_CHECKS[by]}: expected {pins[name]}, found {sha256_bytes(files[name])} "
                                    f"(source {source})")


def _store(payloads: dict[str, bytes], digests: dict[str, str], raw_dir: Path, served: str, pinned_by: list[str]) -> ArtifactRef:
    """Write the payloads gzipped into a work folder and publish it under the digest of the payloads."""
    meta = {"source": served, "payload_sha256": digests, "pinned_by": pinned_by, "mnist": digests == MNIST_SHA256}
    with workdir(raw_dir) as work:
        for name in FILES:
            # mtime=0 keeps the bytes a function of the payload alone; level 1: much faster than the default level
            # for a few percent more bytes.
            (work / f"{name}.gz").write_bytes(gzip.compress(payloads[name], compresslevel=1, mtime=0))
        return publish("download", work, digest=sha256_json(digests), meta=meta)


def download_raw(config: DownloadConfig, out_dir: Path, log: Log = quiet) -> ArtifactRef:
    """Download and verify the raw IDX files that `config` names into `out_dir` (the download stage)."""
    return download_files(config.source, out_dir, mirrors=config.mirrors, snapshot_dir=config.snapshot_dir,
                          expected_sha256=config.sha256, retries=config.retries, backoff_s=config.backoff_s,
                          timeout_s=config.timeout_s, log=log)
