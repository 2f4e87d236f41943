"""Artifact references, content hashing and atomic publishing shared by every stage."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

_CHUNK = 1 << 20
# Scratch folders carry the id of the process that made them, so a later run can tell abandoned ones.
_SCRATCH = re.compile(r"\.(?:tmp|trash)-(\d+)-[0-9a-f]+")


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


class ArtifactRef(BaseModel):
    """What a stage hands to the next: the files it wrote, a content digest and a little metadata."""

    stage: str
    digest: str = Field(description="Identity of the content; downstream cache keys are built from it.")
    files: dict[str, FileRef]
    meta: dict[str, Any] = Field(default_factory=dict)

    def path(self, name: str) -> Path:
        """Return the path of one named file of this artifact."""
        return Path(self.files[name].path)

    def problem(self, trust_unchanged: bool = False) -> str | None:
        """Return why the files on disk no longer match this reference, or None if they do.

        `trust_unchanged`: a file whose stat signature is still the one recorded at publishing is not re-hashed.
        """
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
    work = parent / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    return work


def remove_stale_workdirs(parent: Path) -> list[Path]:
    """Remove the `.tmp-<pid>-*` and `.trash-<pid>-*` folders in `parent` whose process is gone; return them.

    A process killed mid-stage (SIGKILL, power loss) cannot clean up after itself; folders of live processes,
    such as a concurrent run on the same roots, are left alone.
    """
    removed = []
    for entry in parent.iterdir():
        match = _SCRATCH.fullmatch(entry.name)
        if match and not pid_alive(int(match.group(1))):
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

    The final folder is named by `digest` (default: the digest of the files' names and contents). If a folder
    with that name already holds the same bytes it is kept untouched and the work folder is dropped, so reruns that
    produce identical output rewrite nothing. Every file is synced to disk before the rename exposes it.
    """
    files = {}
    for p in sorted(workdir.iterdir()):
        if p.is_file():
            fsync_path(p)
            files[p.name] = FileRef(path=p.name, sha256=sha256_file(p), size=p.stat().st_size)
    if digest is None:
        digest = sha256_json({name: ref.sha256 for name, ref in files.items()})
    final = workdir.parent / digest[:16]
    existing = _relocate(stage, digest, files, final, meta)
    if final.exists():
        if existing.problem() is None and set(p.name for p in final.iterdir()) == set(files):
            shutil.rmtree(workdir)
            return _signed(existing)
        trash = workdir.parent / f".trash-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        final.rename(trash)
        shutil.rmtree(trash)
    try:
        workdir.rename(final)
    except OSError:
        # Another process published the same content in the meantime.
        if existing.problem() is not None:
            raise
        shutil.rmtree(workdir)
    fsync_path(final.parent)
    return _signed(existing)


def _signed(ref: ArtifactRef) -> ArtifactRef:
    """Return `ref` with the stat signature of each of its files as they are now."""
    files = {name: f.model_copy(update={"stat": stat_signature(Path(f.path))}) for name, f in ref.files.items()}
    return ref.model_copy(update={"files": files})


def _relocate(stage: str, digest: str, files: dict[str, FileRef], folder: Path, meta: dict[str, Any] | None) -> ArtifactRef:
    placed = {name: ref.model_copy(update={"path": str(folder / name)}) for name, ref in files.items()}
    return ArtifactRef(stage=stage, digest=digest, files=placed, meta=meta or {})


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's content (a folder: its entries, i.e. renames) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
