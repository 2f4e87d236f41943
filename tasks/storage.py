"""Roots on S3-compatible object storage (`s3://BUCKET/PREFIX`) next to roots on this machine's disk, via fsspec.

Object storage has no rename, so no stage writes there directly: a stage computes and publishes on this machine's
disk exactly as it does for local roots (in a private temporary folder), then `Staged.publish` uploads the published
folder, its objects first and its manifest last. A folder without its manifest is never trusted, and publishing the
same content twice writes the same bytes. Input artifacts on object storage are copied into the temporary folder and
checked against their digests before the stage reads them (Keras, pyarrow and gzip read local files); the folder is
removed when the stage ends. The endpoint and credentials are the standard AWS variables (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`), read by botocore.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from functools import cache
from pathlib import Path
from typing import Any

from tasks.core import (
    MANIFEST,
    ArtifactRef,
    FileRef,
    PipelineError,
    atomic_write,
    intact_files,
    new_workdir,
    sha256_bytes,
    sha256_file,
)

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
def _explained() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        raise explained(exc) from exc


def read_bytes(location: Any) -> bytes:
    """Return the bytes of a local file or an object (FileNotFoundError if there is none)."""
    if not is_remote(location):
        return Path(location).read_bytes()
    with _explained():
        return filesystem().cat_file(str(location))


def exists(location: Any) -> bool:
    """Return whether a local file or an object exists."""
    if not is_remote(location):
        return Path(location).exists()
    with _explained():
        return filesystem().exists(str(location))


def write_text(location: Any, text: str) -> None:
    """Replace a local file (by one rename, its folder made if needed) or an object (by one PUT) with `text`."""
    if is_remote(location):
        with _explained():
            filesystem().pipe_file(str(location), text.encode())
    else:
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(location), text)


def remove(location: Any) -> None:
    """Delete a local file or an object, if it exists."""
    if is_remote(location):
        with _explained(), suppress(FileNotFoundError):
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


def result_storage(cache_dir: Any) -> Any:
    """Return what Prefect persists the cache records to: the folder itself, or a storage block for object storage.

    Prefect takes remote result storage only as a block saved on its server: one per cache root, named by the root.
    """
    if not is_remote(cache_dir):
        return Path(cache_dir)
    return _saved_block(str(cache_dir))


@cache
def _saved_block(url: str) -> str:
    from prefect.filesystems import RemoteFileSystem

    name = f"mnist-pipeline-cache-{sha256_bytes(url.encode())[:16]}"
    RemoteFileSystem(basepath=url, settings=OPTIONS).save(name, overwrite=True)
    return f"remote-file-system/{name}"


@_explained()
def remote_problem(files: dict[str, FileRef], trust_unchanged: bool) -> str | None:
    """Return why objects no longer match their references, or None if they do (see `ArtifactRef.problem`).

    One listing per folder gives each object's size and ETag; an object whose ETag is the one recorded when it was
    uploaded is trusted without reading it, any other is read back and hashed. A folder without its manifest (an
    upload that did not finish) is not trusted.
    """
    fs = filesystem()
    listings: dict[str, dict[str, dict]] = {}
    for ref in files.values():
        folder, _, name = ref.path.rpartition("/")
        if folder not in listings:
            try:
                listings[folder] = {entry["name"].rpartition("/")[2]: entry for entry in fs.ls(folder, detail=True)}
            except FileNotFoundError:
                listings[folder] = {}
            if MANIFEST not in listings[folder]:
                return f"{folder}: no {MANIFEST} (an unfinished upload, or the folder was deleted)"
        entry = listings[folder].get(name)
        if entry is None:
            return f"{ref.path}: missing"
        if entry["size"] != ref.size:
            return f"{ref.path}: size {entry['size']}, expected {ref.size}"
        if trust_unchanged and ref.etag is not None and entry.get("ETag") == ref.etag:
            continue
        if sha256_bytes(fs.cat_file(ref.path)) != ref.sha256:
            return f"{ref.path}: content digest differs from the recorded one"
    return None


def published_problem(folder: Any) -> str | None:
    """Return why a published folder no longer matches its manifest; None if it does or has no manifest (a folder
    that was not published by a stage)."""
    if not is_remote(folder):
        if not (Path(folder) / MANIFEST).exists() or intact_files(Path(folder)) is not None:
            return None
        return f"{folder}: its files differ from its {MANIFEST}"
    try:
        manifest = json.loads(read_bytes(f"{folder}/{MANIFEST}"))
    except FileNotFoundError:
        return None
    return remote_problem({name: FileRef(path=f"{folder}/{name}", **entry) for name, entry in manifest.items()}, False)


class Staged:
    """The local side of a stage whose root may be on object storage (see the module's docstring)."""

    def __init__(self, root: Any) -> None:
        self.remote_root = str(root) if is_remote(root) else None
        self._scratch: Path | None = None
        self.root = self.scratch / "root" if self.remote_root else Path(root)

    @property
    def scratch(self) -> Path:
        """This stage's private folder in the system temp folder: made on first use, removed when the stage ends, and
        if its process was killed, by the next stage on this machine."""
        if self._scratch is None:
            self._scratch = new_workdir(Path(tempfile.gettempdir()) / "mnist-pipeline-stages")
        return self._scratch

    @_explained()
    def local(self, ref: ArtifactRef, *names: str) -> ArtifactRef:
        """Return `ref` with its files (or just those named) on this machine's disk: copied from object storage and
        checked against their digests, if they are there."""
        wanted = {name: f for name, f in ref.files.items() if is_remote(f.path) and (not names or name in names)}
        if not wanted:
            return ref
        folder = self.scratch / "inputs" / f"{ref.stage}-{ref.digest[:16]}"
        folder.mkdir(parents=True, exist_ok=True)
        fs, files = filesystem(), dict(ref.files)
        for name, f in wanted.items():
            path = folder / name
            fs.get_file(f.path, str(path))
            if path.stat().st_size != f.size or sha256_file(path) != f.sha256:
                raise PipelineError(f"{f.path}: content digest differs from the recorded one (changed while this run "
                                    f"read it); run again to recompute it")
            files[name] = f.model_copy(update={"path": str(path), "etag": None, "stat": None})
        return ref.model_copy(update={"files": files})

    @_explained()
    def publish(self, ref: ArtifactRef) -> ArtifactRef:
        """Upload a folder that a stage published under `root`: objects first, manifest last; return its reference."""
        if self.remote_root is None:
            return ref
        folder = Path(next(iter(ref.files.values())).path).parent
        target = f"{self.remote_root}/{folder.relative_to(self.root).as_posix()}"
        fs = filesystem()
        for name, f in ref.files.items():
            fs.put_file(f.path, f"{target}/{name}")
        fs.put_file(str(folder / MANIFEST), f"{target}/{MANIFEST}")  # from now on the folder is trusted
        etags = {entry["name"].rpartition("/")[2]: entry.get("ETag") for entry in fs.ls(target, detail=True)}
        files = {name: f.model_copy(update={"path": f"{target}/{name}", "stat": None, "etag": etags.get(name)})
                 for name, f in ref.files.items()}
        return ref.model_copy(update={"files": files})

    def close(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)


@contextmanager
def staged(root: Any) -> Iterator[Staged]:
    """Yield the local side of a stage writing under `root`; nothing of it is left on this machine afterwards."""
    stage = Staged(root)
    try:
        yield stage
    finally:
        stage.close()
