"""The download stage against local folders, file:// URLs and a real HTTP server on 127.0.0.1."""

import gzip
import hashlib
import http.server
import json
import socket
import threading
from collections import Counter
from pathlib import Path

import pytest

from synthetic import (
    idx_bytes,
    make_split,
    payloads,
    sums_text,
    write_source,
    write_sums,
)
from tasks.dataset import FILES, SNAPSHOT_DIR, SUMS_FILE, DownloadConfig, read_sums, source_fingerprint
from tasks.download import MNIST_SHA256, download_files
from tasks.errors import PipelineError
from tasks.files import sha256_json

GOOD = payloads()
GOOD_SHA = {name: hashlib.sha256(data).hexdigest() for name, data in GOOD.items()}
GOOD_FOLDER = sha256_json(GOOD_SHA)[:16]
FAST = {"retries": 2, "backoff_s": 0.01, "timeout_s": 5.0}


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # urllib honours proxy variables even for 127.0.0.1; the tests only talk to servers they start themselves.
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")


def published(raw_dir: Path) -> list[str]:
    """Everything under raw_dir, temporary folders included."""
    return sorted(p.name for p in raw_dir.iterdir()) if raw_dir.exists() else []


def assert_stored(ref, raw_dir: Path, expected: dict[str, bytes] = GOOD) -> None:
    """The artifact holds the four files gzipped, named by the payload digests, and nothing else is left."""
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in expected.items()}
    assert ref.stage == "download"
    assert ref.digest == sha256_json(digests)
    assert published(raw_dir) == [ref.digest[:16]]
    assert sorted(ref.files) == sorted(f"{name}.gz" for name in FILES)
    for name in FILES:
        data = ref.path(f"{name}.gz").read_bytes()
        assert data[:2] == b"\x1f\x8b"
        assert hashlib.sha256(gzip.decompress(data)).hexdigest() == digests[name]
    assert ref.meta["payload_sha256"] == digests
    assert ref.meta["mnist"] is (digests == MNIST_SHA256)
    assert json.loads(json.dumps(ref.meta)) == ref.meta  # plain JSON: it travels in Prefect's result records
    assert ref.problem() is None


def not_pinned_lines(log: list[str]) -> list[str]:
    return [m for m in log if "is not pinned" in m]


# --- local sources ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "unpinned"])
def test_local_gz_folder(tmp_path, pinned):
    source = tmp_path / "src"
    write_source(source)
    log = []
    ref = download_files(str(source), tmp_path / "raw", expected_sha256=GOOD_SHA if pinned else None, log=log.append)
    assert_stored(ref, tmp_path / "raw")
    assert ref.path(f"{FILES[0]}.gz").parent.name == GOOD_FOLDER
    assert ref.meta["source"] == str(source)
    assert ref.meta["pinned_by"] == (["--sha256"] if pinned else [])
    assert len(not_pinned_lines(log)) == (0 if pinned else 1)
    assert f"served by {source}" in log


def test_an_unpinned_source_is_accepted_and_its_digests_logged(tmp_path):
    source = tmp_path / "src"
    write_source(source, payloads(n_train=90, n_test=30, num_classes=3))
    log = []
    ref = download_files(str(source), tmp_path / "raw", log=log.append)
    digests = ref.meta["payload_sha256"]
    assert ref.meta["pinned_by"] == [] and ref.meta["mnist"] is False
    assert sorted(digests) == sorted(FILES)
    assert not_pinned_lines(log) == [
        f"source {source} is not pinned (no {SUMS_FILE}, no --sha256): accepted on the IDX checks alone; "
        "payload SHA-256 recorded: " + ", ".join(f"{name} {digests[name]}" for name in FILES)
    ]


def test_nothing_is_pinned_by_default():
    assert DownloadConfig().sha256 is None


def test_plain_and_gz_folders_give_the_same_artifact(tmp_path):
    write_source(tmp_path / "gz", gz=True)
    write_source(tmp_path / "plain", gz=False)
    assert not list((tmp_path / "plain").glob("*.gz"))

    from_gz = download_files(str(tmp_path / "gz"), tmp_path / "raw-a", expected_sha256=GOOD_SHA)
    from_plain = download_files(str(tmp_path / "plain"), tmp_path / "raw-b", expected_sha256=GOOD_SHA)

    assert_stored(from_plain, tmp_path / "raw-b")
    assert from_gz.digest == from_plain.digest
    assert from_gz.path(f"{FILES[0]}.gz").parent.name == from_plain.path(f"{FILES[0]}.gz").parent.name == GOOD_FOLDER
    for name in FILES:  # gzip with mtime=0: the stored bytes depend on the payload alone
        assert from_gz.path(f"{name}.gz").read_bytes() == from_plain.path(f"{name}.gz").read_bytes()


def test_file_url(tmp_path):
    source = tmp_path / "src dir"
    write_source(source)
    ref = download_files(source.as_uri(), tmp_path / "raw", expected_sha256=GOOD_SHA)
    assert_stored(ref, tmp_path / "raw")
    assert ref.meta["source"] == source.as_uri()


def test_other_payloads_give_another_folder(tmp_path):
    other = payloads(n_train=120, n_test=30, seed=5)
    write_source(tmp_path / "a")
    write_source(tmp_path / "b", other)
    first = download_files(str(tmp_path / "a"), tmp_path / "raw", expected_sha256=None)
    second = download_files(str(tmp_path / "b"), tmp_path / "raw", expected_sha256=None)
    assert first.digest != second.digest
    assert published(tmp_path / "raw") == sorted([first.digest[:16], second.digest[:16]])
    assert first.problem() is None and second.problem() is None


def test_second_download_of_the_same_payloads_rewrites_nothing(tmp_path):
    write_source(tmp_path / "gz")
    write_source(tmp_path / "plain", gz=False)
    first = download_files(str(tmp_path / "gz"), tmp_path / "raw", expected_sha256=GOOD_SHA)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in first.path(f"{FILES[0]}.gz").parent.iterdir()}

    second = download_files(str(tmp_path / "plain"), tmp_path / "raw", expected_sha256=GOOD_SHA)

    assert second.digest == first.digest and second.files == first.files
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in second.path(f"{FILES[0]}.gz").parent.iterdir()}
    assert after == before
    assert published(tmp_path / "raw") == [GOOD_FOLDER]


# --- malformed sources: one clear message, nothing published ------------------------------------------------------


def _replace(name: str, data: bytes, gz: bool = True):
    def mutate(folder: Path) -> None:
        files = dict(GOOD)
        files[name] = data
        write_source(folder, files, gz=gz)

    return mutate


def _write_raw(file_name: str, data: bytes):
    def mutate(folder: Path) -> None:
        write_source(folder)
        (folder / file_name).write_bytes(data)

    return mutate


_train_images, _train_labels = make_split(200, 0)
_test_images, _test_labels = make_split(50, 1)
_label_10 = _train_labels.copy()
_label_10[3] = 10
_other_pixels = _test_images.copy()
_other_pixels[0, 0, 0] ^= 1
_truncated_gz = gzip.compress(GOOD["t10k-images-idx3-ubyte"], mtime=0)
_truncated_gz = _truncated_gz[: len(_truncated_gz) // 2]
_html = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Please sign in</body></html>\n"

MALFORMED = {
    "wrong-magic": (
        _replace("train-images-idx3-ubyte", b"\x00\x00\x08\x01" + GOOD["train-images-idx3-ubyte"][4:]),
        "train-images-idx3-ubyte: magic number: expected 0x00000803, found 0x00000801",
    ),
    "truncated-gzip": (
        _write_raw("t10k-images-idx3-ubyte.gz", _truncated_gz),
        f"t10k-images-idx3-ubyte.gz: gzip: expected a complete gzip stream, found it truncated after {len(_truncated_gz)} bytes",
    ),
    "fewer-labels": (
        _replace("t10k-labels-idx1-ubyte", idx_bytes(_test_labels[:-1])),
        "t10k-labels-idx1-ubyte: count match: expected 50 labels (one per image), found 49",
    ),
    "28x27": (
        _replace("train-images-idx3-ubyte", idx_bytes(_train_images[:, :, :27])),
        "train-images-idx3-ubyte: image size: expected 28x28, found 28x27",
    ),
    "lying-header-plain": (
        _replace("t10k-images-idx3-ubyte", GOOD["t10k-images-idx3-ubyte"][:-5], gz=False),
        f"t10k-images-idx3-ubyte: payload size: expected {50 * 784} bytes for shape (50, 28, 28), found {50 * 784 - 5} bytes",
    ),
    "html-page": (
        _write_raw("train-labels-idx1-ubyte.gz", _html),
        "train-labels-idx1-ubyte.gz: format: expected a gzip or IDX file, found an HTML/XML document",
    ),
}


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "unpinned"])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_source_fails_with_one_clear_message(tmp_path, case, pinned):
    mutate, message = MALFORMED[case]
    mutate(tmp_path / "src")
    raw_dir = tmp_path / "raw"

    with pytest.raises(PipelineError) as info:
        download_files(str(tmp_path / "src"), raw_dir, expected_sha256=GOOD_SHA if pinned else None, **FAST)

    assert str(info.value) == message
    assert published(raw_dir) == []


def test_payload_that_differs_from_the_pinned_digest(tmp_path):
    _replace("t10k-images-idx3-ubyte", idx_bytes(_other_pixels))(tmp_path / "src")
    found = hashlib.sha256(idx_bytes(_other_pixels)).hexdigest()

    with pytest.raises(PipelineError) as info:
        download_files(str(tmp_path / "src"), tmp_path / "raw", expected_sha256=GOOD_SHA)

    assert str(info.value) == (
        f"t10k-images-idx3-ubyte: --sha256 digest: expected {GOOD_SHA['t10k-images-idx3-ubyte']}, found {found} "
        f"(source {tmp_path / 'src'})"
    )
    assert published(tmp_path / "raw") == []


def test_labels_beyond_9_are_left_to_validate(tmp_path):
    # Download cannot know the number of classes: a dataset of 11 or more classes is structurally fine.
    files = {**GOOD, "train-labels-idx1-ubyte": idx_bytes(_label_10)}
    write_source(tmp_path / "src", files)
    ref = download_files(str(tmp_path / "src"), tmp_path / "raw")
    assert_stored(ref, tmp_path / "raw", files)


def test_without_pinned_digests_a_structurally_valid_payload_is_accepted(tmp_path):
    files = {**GOOD, "t10k-images-idx3-ubyte": idx_bytes(_other_pixels)}
    write_source(tmp_path / "src", files)
    ref = download_files(str(tmp_path / "src"), tmp_path / "raw", expected_sha256=None)
    assert_stored(ref, tmp_path / "raw", files)
    assert ref.digest != sha256_json(GOOD_SHA)


def test_a_failed_download_leaves_an_earlier_artifact_untouched(tmp_path):
    write_source(tmp_path / "good")
    good = download_files(str(tmp_path / "good"), tmp_path / "raw", expected_sha256=GOOD_SHA)
    folder = good.path(f"{FILES[0]}.gz").parent
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}
    MALFORMED["28x27"][0](tmp_path / "bad")

    with pytest.raises(PipelineError):
        download_files(str(tmp_path / "bad"), tmp_path / "raw", expected_sha256=GOOD_SHA)

    assert published(tmp_path / "raw") == [folder.name]
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()} == before
    assert good.problem() is None


def test_missing_file_is_named(tmp_path):
    write_source(tmp_path / "src")
    (tmp_path / "src" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(PipelineError) as info:
        download_files(str(tmp_path / "src"), tmp_path / "raw", expected_sha256=GOOD_SHA)
    assert str(info.value) == (
        f"source {tmp_path / 'src'}: missing file: expected t10k-labels-idx1-ubyte.gz (or t10k-labels-idx1-ubyte), found neither"
    )
    assert published(tmp_path / "raw") == []


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(PipelineError, match=r"no-such-dir: expected a folder holding the four MNIST files, found no such folder$"):
        download_files(str(tmp_path / "no-such-dir"), tmp_path / "raw")
    assert published(tmp_path / "raw") == []


@pytest.mark.parametrize("source", ["ftp://127.0.0.1/mnist/", "gs://bucket/mnist"])
def test_unsupported_scheme(tmp_path, source):
    scheme = source.split(":")[0]
    with pytest.raises(PipelineError) as info:
        download_files(source, tmp_path / "raw")
    assert str(info.value) == (
        f"source {source}: expected auto, an http://, https://, file:// or s3:// URL, a folder or an .npz file, found scheme '{scheme}'"
    )
    assert published(tmp_path / "raw") == []


# --- SHA256SUMS in the source -------------------------------------------------------------------------------------


def _sums(entries: dict[str, str], binary: bool = False) -> str:
    return "".join(f"{digest} {'*' if binary else ' '}{name}\n" for name, digest in entries.items())


@pytest.mark.parametrize("form", ["payload-names", "gz-names", "binary-marker", "upper-case"])
def test_matching_sha256sums_passes(tmp_path, form):
    source = tmp_path / "src"
    write_source(source)
    if form == "gz-names":
        entries = {f"{n}.gz": hashlib.sha256((source / f"{n}.gz").read_bytes()).hexdigest() for n in FILES}
    elif form == "upper-case":
        entries = {n: d.upper() for n, d in GOOD_SHA.items()}
    else:
        entries = dict(GOOD_SHA)
    (source / SUMS_FILE).write_text("# checksums\n" + _sums(entries, binary=form == "binary-marker"))
    log = []
    ref = download_files(str(source), tmp_path / "raw", expected_sha256=None, log=log.append)
    assert_stored(ref, tmp_path / "raw")
    assert ref.meta["pinned_by"] == ["SHA256SUMS"]
    assert not_pinned_lines(log) == []


@pytest.mark.parametrize("listed", ["train-labels-idx1-ubyte", "train-labels-idx1-ubyte.gz"])
def test_mismatching_sha256sums_fails_naming_the_file(tmp_path, listed):
    source = tmp_path / "src"
    write_source(source)
    found = hashlib.sha256(GOOD[listed] if listed in GOOD else (source / listed).read_bytes()).hexdigest()
    (source / SUMS_FILE).write_text(_sums({**GOOD_SHA, listed: "0" * 64}))

    with pytest.raises(PipelineError) as info:
        download_files(str(source), tmp_path / "raw", expected_sha256=None)

    assert str(info.value) == f"{listed}: {SUMS_FILE} digest: expected {'0' * 64}, found {found} (source {source})"
    assert published(tmp_path / "raw") == []


def test_sha256sums_entries_for_files_not_fetched_are_ignored(tmp_path):
    source = tmp_path / "src"
    write_source(source, gz=False)
    (source / SUMS_FILE).write_text(_sums({**GOOD_SHA, **{f"{n}.gz": "0" * 64 for n in FILES}, "README": "1" * 64}))
    ref = download_files(str(source), tmp_path / "raw", expected_sha256=GOOD_SHA)
    assert_stored(ref, tmp_path / "raw")


@pytest.mark.parametrize("served", [True, False], ids=["gz-digests", "payload-digests"])
def test_sha256sums_written_by_the_helper_pin_the_source(tmp_path, served):
    source = tmp_path / "src"
    write_source(source)
    entries = write_sums(source, served=served)
    assert sorted(entries) == sorted(f"{n}.gz" if served else n for n in FILES)
    ref = download_files(str(source), tmp_path / "raw")
    assert_stored(ref, tmp_path / "raw")
    assert ref.meta["pinned_by"] == ["SHA256SUMS"]


@pytest.mark.parametrize("gz", [True, False], ids=["gz-files", "plain-files"])
def test_sha256sums_missing_a_file_is_refused(tmp_path, gz):
    source = tmp_path / "src"
    write_source(source, gz=gz)
    entries = write_sums(source)
    del entries["t10k-labels-idx1-ubyte"]
    write_sums(source, entries)
    names = "t10k-labels-idx1-ubyte or t10k-labels-idx1-ubyte.gz" if gz else "t10k-labels-idx1-ubyte"

    with pytest.raises(PipelineError) as info:
        download_files(str(source), tmp_path / "raw")

    assert str(info.value) == f"SHA256SUMS: coverage: expected a digest for {names}, found none (source {source})"
    assert published(tmp_path / "raw") == []


def test_sha256sums_of_gz_names_does_not_cover_plain_files(tmp_path):
    # The .gz digests say nothing about plain files served in their place.
    source = tmp_path / "src"
    write_source(source, gz=False)
    write_sums(source, {f"{n}.gz": "0" * 64 for n in FILES})
    with pytest.raises(PipelineError, match=r"^SHA256SUMS: coverage: expected a digest for train-images-idx3-ubyte, found none"):
        download_files(str(source), tmp_path / "raw")
    assert published(tmp_path / "raw") == []


def test_malformed_sha256sums_in_the_source_names_the_line(tmp_path):
    source = tmp_path / "src"
    write_source(source)
    (source / SUMS_FILE).write_text(sums_text(GOOD_SHA) + "not a checksum line\n")
    with pytest.raises(PipelineError) as info:
        download_files(str(source), tmp_path / "raw")
    assert str(info.value) == (
        f"{source}/{SUMS_FILE}: line 5: expected '<64 hex digits>  <file name>', found 'not a checksum line'"
    )
    assert published(tmp_path / "raw") == []


# --- explicit pins (--sha256 FILE) --------------------------------------------------------------------------------


def test_read_sums_reads_sha256sum_output(tmp_path):
    path = tmp_path / "pins.sha256"
    path.write_text("# pins\n\n" + _sums({FILES[0]: GOOD_SHA[FILES[0]].upper()}) + _sums({"b.gz": "a" * 64}, binary=True))
    assert read_sums(path) == {FILES[0]: GOOD_SHA[FILES[0]], "b.gz": "a" * 64}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("abc123  train-images-idx3-ubyte\n", "line 1: expected '<64 hex digits>  <file name>', found 'abc123  train-images-idx3-ubyte'"),
        (f"{'a' * 64}\n", f"line 1: expected '<64 hex digits>  <file name>', found '{'a' * 64}'"),
        (f"{'a' * 64}  x\n{'b' * 64}  x\n", f"line 2: expected one digest for x, found {'a' * 64} and {'b' * 64}"),
    ],
    ids=["short-digest", "no-name", "two-digests"],
)
def test_read_sums_names_the_file_and_the_bad_line(tmp_path, text, problem):
    path = tmp_path / "pins.sha256"
    path.write_text(text)
    with pytest.raises(PipelineError) as info:
        read_sums(path)
    assert str(info.value) == f"{path}: {problem}"


def test_read_sums_of_a_missing_file(tmp_path):
    with pytest.raises(PipelineError) as info:
        read_sums(tmp_path / "absent")
    assert str(info.value) == f"{tmp_path / 'absent'}: read: expected a readable sha256sum file, found No such file or directory"


@pytest.mark.parametrize("served", [True, False], ids=["gz-digests", "payload-digests"])
def test_explicit_pins_from_a_sums_file_pin_a_folder(tmp_path, served):
    source = tmp_path / "src"
    write_source(source)
    pins_file = tmp_path / "pins.sha256"
    write_sums(source, served=served)
    (source / SUMS_FILE).rename(pins_file)  # the pins live outside the source
    log = []
    ref = download_files(str(source), tmp_path / "raw", expected_sha256=read_sums(pins_file), log=log.append)
    assert_stored(ref, tmp_path / "raw")
    assert ref.meta["pinned_by"] == ["--sha256"]
    assert not_pinned_lines(log) == []


def test_explicit_pins_and_sha256sums_both_check(tmp_path, http_source):
    url, _ = http_source({**gz_files(), SUMS_FILE: sums_text(GOOD_SHA).encode()})
    ref = download_files(url, tmp_path / "raw", expected_sha256=dict(GOOD_SHA), **FAST)
    assert_stored(ref, tmp_path / "raw")
    assert ref.meta["pinned_by"] == ["SHA256SUMS", "--sha256"]


def test_a_wrong_explicit_pin_is_refused_even_with_a_matching_sha256sums(tmp_path):
    source = tmp_path / "src"
    write_source(source)
    write_sums(source)
    pins = {**GOOD_SHA, "train-labels-idx1-ubyte": "e" * 64}
    with pytest.raises(PipelineError) as info:
        download_files(str(source), tmp_path / "raw", expected_sha256=pins)
    assert str(info.value) == (
        f"train-labels-idx1-ubyte: --sha256 digest: expected {'e' * 64}, found {GOOD_SHA['train-labels-idx1-ubyte']} "
        f"(source {source})"
    )
    assert published(tmp_path / "raw") == []


def test_explicit_pins_missing_a_file_are_refused(tmp_path):
    write_source(tmp_path / "src")
    pins = {n: d for n, d in GOOD_SHA.items() if n != "train-images-idx3-ubyte"}
    with pytest.raises(PipelineError) as info:
        download_files(str(tmp_path / "src"), tmp_path / "raw", expected_sha256=pins)
    assert str(info.value) == (
        "--sha256: coverage: expected a digest for train-images-idx3-ubyte or train-images-idx3-ubyte.gz, "
        f"found none (source {tmp_path / 'src'})"
    )
    assert published(tmp_path / "raw") == []


# --- source_fingerprint -------------------------------------------------------------------------------------------


def test_fingerprint_follows_the_files_of_a_local_folder(tmp_path):
    source = tmp_path / "src"
    write_source(source)
    first = source_fingerprint(str(source))
    assert source_fingerprint(str(source)) == first
    assert source_fingerprint(source.as_uri()) == first

    path = source / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    changed = source_fingerprint(str(source))
    assert changed != first

    (source / SUMS_FILE).write_text(_sums(GOOD_SHA))
    assert source_fingerprint(str(source)) not in (first, changed)


def test_fingerprint_of_a_remote_or_missing_source_is_the_source(tmp_path):
    assert source_fingerprint("https://example.invalid/mnist/") == "https://example.invalid/mnist/"
    assert source_fingerprint("http://127.0.0.1:1/x/") == "http://127.0.0.1:1/x/"
    assert source_fingerprint(str(tmp_path / "absent")) == str(tmp_path / "absent")


# --- HTTP ---------------------------------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serve `server.files` under any folder path; misbehave as `server.fail_first` / `server.always` say."""

    def do_GET(self):
        server = self.server
        name = self.path.rsplit("/", 1)[-1]
        with server.lock:
            server.requests[name] += 1
            attempt = server.requests[name]
        if server.always is not None:
            self.send_error(server.always)
            return
        mode = server.fail_first.get(name) if attempt == 1 else None
        if mode == "drop":
            self.close_connection = True  # no status line at all: the client sees the connection closed
            return
        if isinstance(mode, int):
            self.send_error(mode)
            return
        data = server.files.get(name)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if mode == "truncate" else data)
        if mode == "truncate":
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def http_source():
    """Start HTTP servers on 127.0.0.1 (port 0) in threads; return a factory giving (base URL, server)."""
    servers = []

    def start(files: dict[str, bytes], fail_first: dict | None = None, always: int | None = None):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.files, server.fail_first, server.always = files, fail_first or {}, always
        server.requests, server.lock = Counter(), threading.Lock()
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}/mnist/", server

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def gz_files(files: dict[str, bytes] = GOOD) -> dict[str, bytes]:
    return {f"{name}.gz": gzip.compress(data, mtime=0) for name, data in files.items()}


@pytest.fixture
def closed_port():
    """A 127.0.0.1 port nothing listens on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def test_http_source(tmp_path, http_source):
    url, server = http_source(gz_files())
    log = []
    ref = download_files(url, tmp_path / "raw", expected_sha256=GOOD_SHA, log=log.append, **FAST)
    assert_stored(ref, tmp_path / "raw")
    assert ref.meta["source"] == url
    assert all(server.requests[f"{n}.gz"] == 1 for n in FILES)
    assert server.requests[SUMS_FILE] == 1
    assert f"served by {url}" in log


def test_http_url_without_trailing_slash(tmp_path, http_source):
    url, _ = http_source(gz_files())
    ref = download_files(url.rstrip("/"), tmp_path / "raw", expected_sha256=GOOD_SHA, **FAST)
    assert_stored(ref, tmp_path / "raw")


@pytest.mark.parametrize("failure", [503, 500, 429, "drop", "truncate"])
def test_http_retries_a_failed_request(tmp_path, http_source, failure):
    flaky = "train-images-idx3-ubyte.gz"
    url, server = http_source(gz_files(), fail_first={flaky: failure})
    log = []

    ref = download_files(url, tmp_path / "raw", expected_sha256=GOOD_SHA, log=log.append, **FAST)

    assert_stored(ref, tmp_path / "raw")
    assert server.requests[flaky] == 2
    assert all(server.requests[f"{n}.gz"] == 1 for n in FILES if f"{n}.gz" != flaky)
    assert any(m.startswith(url + flaky) and "retrying in" in m and "(1/2)" in m for m in log)


def test_http_server_that_always_fails(tmp_path, http_source):
    url, server = http_source(gz_files(), always=503)

    with pytest.raises(PipelineError) as info:
        download_files(url, tmp_path / "raw", expected_sha256=GOOD_SHA, retries=3, backoff_s=0.01, timeout_s=5.0)

    message = str(info.value)
    assert "\n" not in message
    assert message == f"source {url}: unreachable: {url}{FILES[0]}.gz: HTTP 503 (after 4 attempts)"
    assert server.requests == Counter({f"{FILES[0]}.gz": 4})
    assert published(tmp_path / "raw") == []


def test_http_client_error_is_not_retried(tmp_path, http_source):
    url, server = http_source(gz_files(), always=403)
    with pytest.raises(PipelineError, match=r"train-images-idx3-ubyte\.gz: HTTP 403 "):
        download_files(url, tmp_path / "raw", expected_sha256=GOOD_SHA, **FAST)
    assert server.requests == Counter({f"{FILES[0]}.gz": 1})
    assert published(tmp_path / "raw") == []


def test_http_404_for_gz_falls_back_to_the_plain_name(tmp_path, http_source):
    url, server = http_source(dict(GOOD))
    ref = download_files(url, tmp_path / "raw", expected_sha256=GOOD_SHA, **FAST)
    assert_stored(ref, tmp_path / "raw")
    assert ref.path(f"{FILES[0]}.gz").parent.name == GOOD_FOLDER
    for name in FILES:
        assert server.requests[f"{name}.gz"] == 1 and server.requests[name] == 1


def test_http_missing_file_is_named(tmp_path, http_source):
    files = gz_files()
    del files["t10k-images-idx3-ubyte.gz"]
    url, _ = http_source(files)
    with pytest.raises(PipelineError, match=r"missing file: expected t10k-images-idx3-ubyte\.gz \(or t10k-images-idx3-ubyte\), found neither$"):
        download_files(url, tmp_path / "raw", expected_sha256=GOOD_SHA, **FAST)
    assert published(tmp_path / "raw") == []


def test_http_html_page_instead_of_gzip(tmp_path, http_source):
    url, _ = http_source({**gz_files(), "t10k-labels-idx1-ubyte.gz": _html})
    with pytest.raises(PipelineError) as info:
        download_files(url, tmp_path / "raw", expected_sha256=GOOD_SHA, **FAST)
    assert str(info.value) == "t10k-labels-idx1-ubyte.gz: format: expected a gzip or IDX file, found an HTML/XML document"
    assert published(tmp_path / "raw") == []


def test_http_sha256sums_mismatch(tmp_path, http_source):
    url, _ = http_source({**gz_files(), SUMS_FILE: _sums({**GOOD_SHA, "t10k-images-idx3-ubyte": "f" * 64}).encode()})
    with pytest.raises(PipelineError, match=rf"^t10k-images-idx3-ubyte: {SUMS_FILE} digest: expected f{{64}}, found "):
        download_files(url, tmp_path / "raw", expected_sha256=None, **FAST)
    assert published(tmp_path / "raw") == []


def test_http_unreachable_port(tmp_path, closed_port):
    url = f"http://127.0.0.1:{closed_port}/mnist/"
    with pytest.raises(PipelineError, match=rf"^source {url}: unreachable: .*\(after 2 attempts\)$"):
        download_files(url, tmp_path / "raw", retries=1, backoff_s=0.01, timeout_s=5.0)
    assert published(tmp_path / "raw") == []


# --- auto -----------------------------------------------------------------------------------------------------------


def test_auto_falls_back_to_the_snapshot(tmp_path, closed_port):
    snapshot = tmp_path / "snapshot"
    write_source(snapshot)
    mirrors = [f"http://127.0.0.1:{closed_port}/a/", f"http://127.0.0.1:{closed_port}/b/"]
    log = []

    ref = download_files("auto", tmp_path / "raw", mirrors=mirrors, snapshot_dir=snapshot, expected_sha256=GOOD_SHA,
                         log=log.append, retries=1, backoff_s=0.01, timeout_s=5.0)

    assert_stored(ref, tmp_path / "raw")
    assert ref.meta["source"] == str(snapshot)
    for mirror in mirrors:
        # A refused connection may be transient: each mirror is retried before the next is tried.
        assert any(m.startswith(f"{mirror}{FILES[0]}.gz: ") and "retrying in" in m for m in log)
        assert any(m.startswith(f"source {mirror} failed (") and m.endswith("trying the next") for m in log)
    assert log[-1] == f"served by {snapshot}"


def test_auto_retries_a_mirror_that_drops_a_connection(tmp_path, http_source):
    snapshot = tmp_path / "snapshot"
    write_source(snapshot)
    url, server = http_source(gz_files(), fail_first={"t10k-labels-idx1-ubyte.gz": "drop"})
    log = []
    ref = download_files("auto", tmp_path / "raw", mirrors=[url], snapshot_dir=snapshot, expected_sha256=GOOD_SHA,
                         log=log.append, **FAST)
    assert_stored(ref, tmp_path / "raw")
    assert ref.meta["source"] == url
    assert server.requests["t10k-labels-idx1-ubyte.gz"] == 2
    assert log[-1] == f"served by {url}"


def test_auto_uses_the_first_mirror_that_answers(tmp_path, http_source, closed_port):
    url, _ = http_source(gz_files())
    log = []
    ref = download_files("auto", tmp_path / "raw", mirrors=[f"http://127.0.0.1:{closed_port}/", url],
                         snapshot_dir=tmp_path / "never-read", expected_sha256=GOOD_SHA, log=log.append, **FAST)
    assert_stored(ref, tmp_path / "raw")
    assert ref.meta["source"] == url
    assert f"served by {url}" in log


def test_auto_with_nothing_reachable(tmp_path, closed_port):
    mirror = f"http://127.0.0.1:{closed_port}/"
    log = []
    with pytest.raises(PipelineError) as info:
        download_files("auto", tmp_path / "raw", mirrors=[mirror], snapshot_dir=None, log=log.append,
                       retries=0, backoff_s=0.01, timeout_s=5.0)
    assert str(info.value).startswith(f"source {mirror}: unreachable: ")
    assert published(tmp_path / "raw") == []


def test_auto_with_nothing_configured(tmp_path):
    with pytest.raises(PipelineError, match="source auto: expected mirrors or a snapshot folder, found neither"):
        download_files("auto", tmp_path / "raw", mirrors=[], snapshot_dir=None)


def test_auto_moves_on_from_a_mirror_that_serves_bad_content(tmp_path, http_source):
    snapshot = tmp_path / "snapshot"
    write_source(snapshot)
    url, _ = http_source({**gz_files(), "t10k-labels-idx1-ubyte.gz": b"<html>login</html>"})
    log = []
    ref = download_files("auto", tmp_path / "raw", mirrors=[url], snapshot_dir=snapshot, expected_sha256=GOOD_SHA,
                         log=log.append, **FAST)
    assert_stored(ref, tmp_path / "raw")
    assert ref.meta["source"] == str(snapshot)
    assert any(m.startswith(f"source {url} failed (t10k-labels-idx1-ubyte.gz: format:") for m in log)



def test_auto_without_pins_is_pinned_to_mnist(tmp_path):
    snapshot = tmp_path / "snapshot"
    write_source(snapshot)
    with pytest.raises(PipelineError) as info:
        download_files("auto", tmp_path / "raw", mirrors=[], snapshot_dir=snapshot)
    assert str(info.value) == (
        f"{FILES[0]}: MNIST SHA-256: expected {MNIST_SHA256[FILES[0]]}, found {GOOD_SHA[FILES[0]]} (source {snapshot})"
    )
    assert published(tmp_path / "raw") == []


def test_auto_moves_on_from_a_non_mnist_mirror_to_the_shipped_snapshot(tmp_path, http_source):
    # Real MNIST (11 MB): the one test that the shipped snapshot still passes MNIST's pins.
    url, _ = http_source(gz_files())  # valid IDX, but not MNIST
    log = []
    ref = download_files("auto", tmp_path / "raw", mirrors=[url], snapshot_dir=SNAPSHOT_DIR, log=log.append, **FAST)
    assert ref.meta["source"] == str(SNAPSHOT_DIR)
    assert ref.meta["payload_sha256"] == MNIST_SHA256
    assert "MNIST digests" in ref.meta["pinned_by"]
    assert ref.meta["mnist"] is True
    assert any(m.startswith(f"source {url} failed ({FILES[0]}: MNIST SHA-256: expected ") for m in log)


def test_mnist_is_recognised_whatever_the_source(tmp_path):
    ref = download_files(str(SNAPSHOT_DIR), tmp_path / "raw")
    assert ref.meta["pinned_by"] == ["SHA256SUMS"]  # the snapshot carries one
    assert ref.meta["mnist"] is True
