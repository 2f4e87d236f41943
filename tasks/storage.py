"""Roots on S3-compatible object storage (`s3://BUCKET/PREFIX`) next to roots on this machine's disk, via fsspec.

Every place where a root on object storage and a folder on disk differ is here (and, for publishing and staging
artifacts, in tasks/artifacts.py): the rest of the project reads, writes, lists and removes through these functions.
Object storage has no rename and no append: a file is replaced by one PUT, a history rewritten whole under its lock.
The endpoint and credentials are the standard AWS variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`), read by botocore.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from tasks.errors import Log, PipelineError
from tasks.files import atomic_file, atomic_write, fsync_path, remove_folder, sha256_bytes
from tasks.layout import LOCKS_DIR

SCHEME = "s3://"
# No listings cache: another machine may publish or delete between two looks. Few, quick retries: an endpoint that
# does not answer fails the run within seconds, not minutes.
OPTIONS: dict[str, Any] = {
    "use_listings_cache": False,
    "config_kwargs": {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"}},
}


def is_remote(location: Any) -> bool:
    """Return whether a root or a file is on object storage (an s3:// URL)."""
    return str(location).startswith(SCHEME)


def as_root(location: Any) -> Any:
    """Return a root as a path: an absolute local `Path`, or a `UPath` for an s3:// URL (same `/` and `read_text`)."""
    if is_remote(location):
        from upath import UPath

        return UPath(str(location).rstrip("/"), **OPTIONS)
    return Path(location).expanduser().absolute()


def filesystem() -> Any:
    """Return the process's S3 filesystem (fsspec keeps one instance per set of options)."""
    import fsspec

    return fsspec.filesystem("s3", **OPTIONS)


def endpoint() -> str:
    """Return the S3 endpoint the AWS variables name, for messages."""
    return os.environ.get("AWS_ENDPOINT_URL", "AWS's default endpoint")


def explained(error: BaseException) -> BaseException:
    """Return an error of object storage (botocore's, which are no OSError) as a one-line PipelineError."""
    if type(error).__module__.startswith(("botocore", "aiobotocore")):
        return PipelineError(f"object storage at {endpoint()}: {str(error).splitlines()[0]} (after retries); nothing "
                             "half-written is trusted: run again when it answers")
    return error


@contextmanager
def explaining() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        raise explained(exc) from exc


def read_bytes(location: Any) -> bytes:
    """Return the bytes of a local file or an object (FileNotFoundError if there is none)."""
    if not is_remote(location):
        return Path(location).read_bytes()
    with explaining():
        return filesystem().cat_file(str(location))


def exists(location: Any) -> bool:
    """Return whether a local file or an object exists."""
    if not is_remote(location):
        return Path(location).exists()
    with explaining():
        return filesystem().exists(str(location))


def write_text(location: Any, text: str) -> None:
    """Replace a local file (by one rename, its folder made if needed) or an object (by one PUT) with `text`."""
    if is_remote(location):
        with explaining():
            filesystem().pipe_file(str(location), text.encode())
    else:
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(location), text)


def copy_file(path: Path, location: Any) -> None:
    """Copy a local file to a path (its folder made if needed) or to an object."""
    if is_remote(location):
        with explaining():
            filesystem().put_file(str(path), str(location))
    else:
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, location)


def fetch_file(location: Any, path: Path) -> None:
    """Copy a local file or an object to `path` on this disk, replacing it by one rename (FileNotFoundError if there
    is none)."""
    with atomic_file(path) as temp:
        if is_remote(location):
            with explaining():
                filesystem().get_file(str(location), str(temp))
        else:
            shutil.copyfile(location, temp)


def remove(location: Any) -> None:
    """Delete a local file or an object, if it exists."""
    if is_remote(location):
        with explaining(), suppress(FileNotFoundError):
            filesystem().rm_file(str(location))
    else:
        Path(location).unlink(missing_ok=True)


def check(location: Any, what: str) -> None:
    """Fail with one line unless the bucket of an s3:// root answers (nothing to check for a local root)."""
    if not is_remote(location):
        return
    bucket = str(location)[len(SCHEME):].partition("/")[0]
    try:
        filesystem().ls(bucket, refresh=True)
    except FileNotFoundError:
        raise PipelineError(f"{what} {location}: expected the bucket {bucket!r} at {endpoint()}, found no such bucket") from None
    except Exception as exc:  # botocore's errors (no connection, refused credentials) are no OSError
        raise PipelineError(f"{what} {location}: expected an S3 API answering at {endpoint()}, found none "
                            f"({str(exc).splitlines()[0]})") from None


def remove_tree(folder: Any) -> None:
    """Delete a folder (or every object under a prefix) and what it holds."""
    if is_remote(folder):
        with explaining():
            filesystem().rm(str(folder), recursive=True)
    else:
        remove_folder(Path(folder))


def list_names(folder: Any) -> list[str]:
    """Return the names of the entries of a folder (or prefix), sorted; none if it does not exist."""
    if not is_remote(folder):
        return sorted(p.name for p in Path(folder).iterdir()) if Path(folder).is_dir() else []
    with explaining():
        try:
            return sorted(name.rpartition("/")[2] for name in filesystem().ls(str(folder), refresh=True))
        except FileNotFoundError:
            return []


def file_listing(folder: Any) -> dict[str, list]:
    """Return every file under a folder or prefix (recursive; names relative to it, sorted) with what changes when it
    is rewritten: inode, size, modification and change times on disk; size and ETag on object storage."""
    if not is_remote(folder):
        return dict(sorted(_stat_tree(str(folder), "")))
    prefix = str(folder).rstrip("/")[len(SCHEME):]
    with explaining():
        found = filesystem().find(prefix, detail=True)
    return {name[len(prefix) + 1 :]: [entry["size"], entry.get("ETag")] for name, entry in sorted(found.items())}


def _stat_tree(folder: str, prefix: str) -> Iterator[tuple[str, list[int]]]:
    """Yield (relative name, stat signature) of every file under a folder (as `stat_signature`; links not followed)."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield from _stat_tree(entry.path, f"{prefix}{entry.name}/")
            else:
                st = entry.stat()
                yield prefix + entry.name, [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


@contextmanager
def local_copy(source: str, max_files: int, max_bytes: int) -> Iterator[str]:
    """Yield a source as a local folder: itself, or for an s3:// prefix a temporary copy of its objects (at most
    `max_files` of at most `max_bytes` in all, checked from the listing before anything is copied). An error about
    a file of the copy names its object."""
    if not is_remote(source):
        yield source
        return
    listing = file_listing(source)
    size = sum(entry[0] for entry in listing.values())
    if len(listing) > max_files or size > max_bytes:
        raise PipelineError(f"source {source}: size: expected at most {max_files:,} objects and {max_bytes:,} bytes, "
                            f"found {len(listing):,} objects and {size:,} bytes")
    if not listing:
        raise PipelineError(f"source {source}: expected objects under this prefix, found none")
    with tempfile.TemporaryDirectory(prefix="mnist-pipeline-source-") as tmp, explaining():
        filesystem().get([f"{source.rstrip('/')}/{name}" for name in listing], [f"{tmp}/{name}" for name in listing])
        try:
            yield tmp
        except PipelineError as exc:
            raise PipelineError(str(exc).replace(tmp, source.rstrip("/"))) from None


def make_folder(folder: Any) -> None:
    """Make a folder with its parents (nothing to make on object storage: prefixes exist with their objects)."""
    if not is_remote(folder):
        Path(folder).mkdir(parents=True, exist_ok=True)


def version(path: Any) -> str | None:
    """Return the version of an object to write it conditionally (`append_line`): its ETag, "" while there is none;
    None for a local file (appended to under a lock)."""
    if not is_remote(path):
        return None
    with explaining():
        try:
            return filesystem().info(str(path), refresh=True)["ETag"]
        except FileNotFoundError:
            return ""


def append_line(path: Any, line: str, unchanged: str | None = None) -> bool:
    """Append one line to a file in one write (no line is interleaved with another or split) and sync it.

    Objects cannot be appended to: on object storage the whole object is written again, and only if it is still the
    version `unchanged` (from `version`; a conditional write, If-Match or If-None-Match); False when another writer
    changed it in between (the caller reads it again). Without `unchanged` the caller holds a lock.
    """
    if is_remote(path):
        try:
            old = read_bytes(path).decode()
        except FileNotFoundError:
            old = ""
        condition = {} if unchanged is None else {"IfMatch": unchanged} if unchanged else {"IfNoneMatch": "*"}
        try:
            with explaining():
                filesystem().pipe_file(str(path), (old + line).encode(), **condition)
        except (OSError, PipelineError) as exc:
            code = getattr(exc.__cause__, "response", {}).get("Error", {}).get("Code")
            if condition and (isinstance(exc, FileExistsError) or code in ("PreconditionFailed",
                                                                            "ConditionalRequestConflict")):
                return False
            raise
        return True
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        data = line.encode()
        if os.write(fd, data) != len(data):
            raise PipelineError(f"{path}: short write while appending a line")
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_path(Path(path).parent)
    return True


def identity(location: Any) -> str:
    """Return the text that names a root wherever it is used: the URL, or the resolved path on this machine."""
    return str(location) if is_remote(location) else str(Path(location).resolve())


def root_id(location: Any) -> str:
    """Return a short name of a root (or folder) that every machine and process derives alike from `identity`."""
    return sha256_bytes(identity(location).encode())[:16]


def lock_dir(location: Any) -> Path:
    """Return this machine's folder of flock lock files for a root (or folder): in the system temp folder.

    Locks are this machine's run-time state (as flocks are), not artifacts: kept outside the roots, a failed run
    leaves the artifact tree exactly as it was.
    """
    return Path(tempfile.gettempdir()) / LOCKS_DIR / root_id(location)


def lock_file(folder: Any, name: str) -> Path:
    """Return the file to flock for a folder: inside it on disk; for object storage, which has no locks, one in
    `lock_dir` (it excludes the runs of this machine only; Redis locks exclude other machines')."""
    if not is_remote(folder):
        return Path(folder) / name
    lock_dir(folder).mkdir(parents=True, exist_ok=True)
    return lock_dir(folder) / name


def check_roots(roots: dict[str, Any], shared_locks: bool, log: Log) -> None:
    """Check each root (`check`); warn through `log` when roots on object storage have no lock server to share."""
    for what, root in roots.items():
        check(root, what)
    if not shared_locks and any(map(is_remote, roots.values())):
        log("roots on object storage without --locks: stage locks hold on this machine only, so runs on other "
            "machines at the same time may compute the same stages again")
