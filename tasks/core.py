"""Artifact references, content hashing and atomic publishing shared by every stage."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

_CHUNK = 1 << 20
# Inside every published folder: the names, sizes and SHA-256 of its files, written with them.
MANIFEST = ".manifest.json"
# Scratch folders carry the host and the id of the process that made them, so a later run can tell abandoned ones;
# on roots that several machines share, each host sweeps only its own (folders of earlier versions have no host).
_SCRATCH = re.compile(r"\.(?:tmp|trash)-(?:(?P<host>.+)-)?(?P<pid>\d+)-[0-9a-f]+")
_HOST = socket.gethostname()


# Where a stage function sends its progress lines: the Prefect run logger in a task, nothing by default.
Log = Callable[[str], None]


def quiet(_message: str) -> None:
    """Discard a log line (the default `log` of the stage functions)."""


class PipelineError(Exception):
    """An expected failure (bad input, failed check) whose message is meant for the user as is."""


class FileRef(BaseModel):
    """One file of an artifact: absolute path, SHA-256 of its bytes and its size."""

    path: str
    sha256: str
    size: int
    # Inode, size, modification and change times (ns) when the file was published. While they are unchanged the file
    # is trusted without re-hashing (ctime cannot be set back from user space: any write, chmod or utime moves it).
    stat: list[int] | None = None
    # On object storage (the path an s3:// URL): the object's ETag when it was uploaded, trusted the same way.
    etag: str | None = None


class ArtifactRef(BaseModel):
    """What a stage hands to the next: the files it wrote, a content digest and a little metadata."""

    stage: str
    digest: str = Field(description="Identity of the content; downstream cache keys are built from it.")
    files: dict[str, FileRef]
    meta: dict[str, Any] = Field(default_factory=dict)

    def path(self, name: str) -> Path:
        """Return the path of one named file of this artifact (a `UPath` for an object on object storage)."""
        from tasks.storage import as_root

        return as_root(self.files[name].path)

    def problem(self, trust_unchanged: bool = False) -> str | None:
        """Return why the files on disk no longer match this reference, or None if they do.

        `trust_unchanged`: a file whose stat signature is still the one recorded at publishing is not re-hashed.
        """
        from tasks.storage import is_remote, remote_problem

        if any(is_remote(ref.path) for ref in self.files.values()):
            return remote_problem(self.files, trust_unchanged)
        for name, ref in self.files.items():
            path = Path(ref.path)
            if not path.is_file():
                return f"{path}: missing"
            if path.stat().st_size != ref.size:
                return f"{path}: size {path.stat().st_size}, expected {ref.size}"
            if trust_unchanged and ref.stat is not None and stat_signature(path) == ref.stat:
                continue
            if sha256_file(path) != ref.sha256:
                return f"{path}: content digest differs from the recorded one"
        return None


def stat_signature(path: Path) -> list[int]:
    """Return [inode, size, mtime_ns, ctime_ns] of a file: what changes when anything rewrites or replaces it."""
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def sha256_bytes(data: bytes) -> str:
    """Return the hex SHA-256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Return the hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(value: Any) -> str:
    """Return the SHA-256 of a JSON value in canonical form (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return sha256_bytes(text.encode())


def new_workdir(parent: Path) -> Path:
    """Create a private temporary folder inside `parent`, so that publishing it is one rename."""
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_workdirs(parent)
    work = parent / scratch_name("tmp")
    work.mkdir()
    return work


def scratch_name(kind: str) -> str:
    """Return a new name for a scratch folder (`kind`: tmp or trash): `.<kind>-<host>-<pid>-<random>`."""
    return f".{kind}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale_workdirs(parent: Path) -> list[Path]:
    """Remove the scratch folders in `parent` (see `scratch_name`) of this host whose process is gone; return them.

    A process killed mid-stage (SIGKILL, power loss) cannot clean up after itself; folders of live processes,
    such as a concurrent run on the same roots, are left alone, and so are those of other hosts.
    """
    removed = []
    for entry in parent.iterdir():
        match = _SCRATCH.fullmatch(entry.name)
        if match and match["host"] in (None, _HOST) and not pid_alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def pid_alive(pid: int) -> bool:
    """Return whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


@contextmanager
def workdir(parent: Path) -> Iterator[Path]:
    """Yield a new work folder inside `parent`; remove it if the block fails before publishing it."""
    work = new_workdir(parent)
    try:
        yield work
    except OSError as exc:
        shutil.rmtree(work, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            # Expected on an unattended machine: one line naming where, not a traceback (writers such as pyarrow
            # do not say which file they were writing).
            raise PipelineError(f"{parent}: disk space: expected room for the new artifact, found the disk full "
                                f"({exc.strerror or exc})") from None
        raise
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def write_json(path: Path, value: Any) -> None:
    """Write a JSON document (sorted keys, indented)."""
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def publish(stage: str, workdir: Path, digest: str | None = None, meta: dict[str, Any] | None = None) -> ArtifactRef:
    """Move a finished work folder to its content-addressed name next to it and return its reference.

    The final folder is named by `digest` (default: the digest of the files' names and contents). A digest is the
    artifact's identity: if an intact folder of that name exists (its manifest matches its files), it is kept as it is
    and the work folder is dropped, so a rerun that reproduces an artifact rewrites nothing, even where bytes outside
    the digest (timings, a save date) differ. A damaged folder of that name is replaced. Every file is synced to disk
    before the rename exposes it.
    """
    files = {}
    for p in sorted(workdir.iterdir()):
        if p.is_file():
            fsync_path(p)
            files[p.name] = FileRef(path=p.name, sha256=sha256_file(p), size=p.stat().st_size)
    if digest is None:
        digest = sha256_json({name: ref.sha256 for name, ref in files.items()})
    final = workdir.parent / digest[:16]
    kept = intact_files(final)
    if kept is None:
        # The manifest travels inside the folder, so it appears with the files in the same rename.
        write_json(workdir / MANIFEST, {name: ref.model_dump(include={"sha256", "size"}) for name, ref in files.items()})
        fsync_path(workdir / MANIFEST)
        if final.exists():
            trash = workdir.parent / scratch_name("trash")
            final.rename(trash)
            shutil.rmtree(trash)
        try:
            workdir.rename(final)
            kept = files
        except OSError:
            # Another process published the same digest in the meantime.
            kept = intact_files(final)
            if kept is None:
                raise
    if workdir.exists():
        shutil.rmtree(workdir)
    fsync_path(final.parent)
    return _signed(ArtifactRef(stage=stage, digest=digest, files=_placed(kept, final), meta=meta or {}))


def intact_files(folder: Path) -> dict[str, FileRef] | None:
    """Return the files of a published folder (relative paths) if they match its manifest, else None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = {name: FileRef(path=name, **entry) for name, entry in manifest.items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    present = {p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST}
    if present != set(files) or ArtifactRef(stage="", digest="", files=_placed(files, folder)).problem() is not None:
        return None
    return files


def _placed(files: dict[str, FileRef], folder: Path) -> dict[str, FileRef]:
    return {name: ref.model_copy(update={"path": str(folder / name)}) for name, ref in files.items()}


def _signed(ref: ArtifactRef) -> ArtifactRef:
    """Return `ref` with the stat signature of each of its files as they are now."""
    files = {name: f.model_copy(update={"stat": stat_signature(Path(f.path))}) for name, f in ref.files.items()}
    return ref.model_copy(update={"files": files})


def atomic_write(path: Path, text: str) -> None:
    """Replace a file by one rename: write a temporary file beside it, sync it, then move it over `path`."""
    with atomic_file(path) as temp:
        temp.write_text(text)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; then sync it and rename it over `path` (removed on failure)."""
    temp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield temp
        fsync_path(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def take_flock(path: Path, timeout: float | None = None) -> int | None:
    """Take an exclusive flock on `path` (created if missing); return its descriptor, or None if `timeout` passed.

    The lock lasts until the descriptor is closed. flock belongs to the open file, so it excludes other threads (each
    opens its own) as well as other processes, and the kernel drops it when its holder dies.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(0.05)


@contextmanager
def flocked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` for the duration of a block."""
    fd = take_flock(path)
    try:
        yield
    finally:
        os.close(fd)


def validation_problems(error: ValidationError) -> str:
    """Return a pydantic validation error as one line: each field, what is wrong, what was found."""
    def problem(e: Any) -> str:
        # A check across fields (a model validator) gets the whole section as input: its message names what it found.
        found = "" if e["type"] == "missing" or isinstance(e["input"], dict) else f" (found {repr(e['input'])[:80]})"
        return f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg'].removeprefix('Value error, ')}{found}"

    return "; ".join(problem(e) for e in error.errors())


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's content (a folder: its entries, i.e. renames) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
