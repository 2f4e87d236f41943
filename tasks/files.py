"""Small helpers for files on this machine's disk: content digests, atomic writes, flock, fsync, scratch folders."""

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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.errors import PipelineError

# Scratch folders carry the host and the id of the process that made them, so a later run can tell abandoned ones;
# on roots that several machines share, each host sweeps only its own (folders of earlier versions have no host).
_SCRATCH = re.compile(r"\.(?:tmp|trash)-(?:(?P<host>.+)-)?(?P<pid>\d+)-[0-9a-f]+")
_HOST = socket.gethostname()


def sha256_bytes(data: bytes) -> str:
    """Return the hex SHA-256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Return the hex SHA-256 of a file, read in chunks."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def sha256_json(value: Any) -> str:
    """Return the SHA-256 of a JSON value in canonical form (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return sha256_bytes(text.encode())


def stat_signature(path: Path) -> list[int]:
    """Return [inode, size, mtime_ns, ctime_ns] of a file: what changes when anything rewrites or replaces it."""
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def write_json(path: Path, value: Any) -> None:
    """Write a JSON document (sorted keys, indented)."""
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


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


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's content (a folder: its entries, i.e. renames) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def take_flock(path: Path, timeout: float | None = None, create: bool = True) -> int | None:
    """Take an exclusive flock on `path` (created if missing, unless not `create`: FileNotFoundError); return its
    descriptor, or None if `timeout` passed.

    The lock lasts until the descriptor is closed. flock belongs to the open file, so it excludes other threads (each
    opens its own) as well as other processes, and the kernel drops it when its holder dies.
    """
    fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
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


def scratch_name(kind: str) -> str:
    """Return a new name for a scratch folder (`kind`: tmp or trash): `.<kind>-<host>-<pid>-<random>`."""
    return f".{kind}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def pid_alive(pid: int) -> bool:
    """Return whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


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


def new_workdir(parent: Path) -> Path:
    """Create a private temporary folder inside `parent`, so that publishing it is one rename."""
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_workdirs(parent)
    work = parent / scratch_name("tmp")
    work.mkdir()
    return work


def remove_folder(folder: Path) -> None:
    """Remove a folder by first renaming it to a scratch name: no reader ever sees it half-removed under its name."""
    trash = folder.parent / scratch_name("trash")
    folder.rename(trash)
    shutil.rmtree(trash)


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
