"""Artifact references, and publishing and verifying artifacts on this machine's disk or on object storage.

A stage writes its files into a private work folder and `publish` moves it to its content-addressed name in one
rename, with a manifest (names, sizes, SHA-256) inside. Object storage has no rename, so no stage writes there
directly: `Staged` gives a stage a local root to publish under, then uploads the published folder, its objects first
and its manifest last. A folder without its manifest is never trusted, and publishing the same content twice writes
the same bytes. Input artifacts on object storage are copied into the stage's temporary folder and checked against
their digests before the stage reads them (Keras, pyarrow and gzip read local files); the folder is removed when the
stage ends.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from tasks import storage
from tasks.errors import PipelineError
from tasks.files import (
    fsync_path,
    new_workdir,
    remove_folder,
    sha256_bytes,
    sha256_file,
    sha256_json,
    stat_signature,
    write_json,
)
from tasks.layout import MANIFEST, STAGE_SCRATCH_DIR

# What a trained model's reference meta holds about the run that trained it, outside its digest (tasks.train.fit_model):
# the run summary and the report show them.
TRAINING_FACTS = ("fit_seconds", "epoch_seconds", "resumed_from_epoch")


class FileRef(BaseModel):
    """One file of an artifact: absolute path (or URL), SHA-256 of its bytes and its size."""

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
        return storage.as_root(self.files[name].path)

    def problem(self, trust_unchanged: bool = False) -> str | None:
        """Return why the files no longer match this reference, or None if they do.

        `trust_unchanged`: a file whose stat signature (on object storage: ETag) is still the one recorded at
        publishing is not re-hashed.
        """
        if any(storage.is_remote(ref.path) for ref in self.files.values()):
            return _remote_problem(self.files, trust_unchanged)
        for ref in self.files.values():
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


def file_ref(location: Any) -> FileRef:
    """Return a reference to one existing file or object, hashed as it is now (FileNotFoundError if there is none)."""
    if storage.is_remote(location):
        data = storage.read_bytes(location)
        return FileRef(path=str(location), sha256=sha256_bytes(data), size=len(data))
    path = Path(location)
    if not path.is_file():
        raise FileNotFoundError(location)
    return FileRef(path=str(path), sha256=sha256_file(path), size=path.stat().st_size)


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
            remove_folder(final)
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


def published_ref(folder: Any, stage: str = "", digest: str = "") -> ArtifactRef | None:
    """Return a reference to the files of a published folder as its manifest lists them (not checked); None if it has
    no manifest (a folder that was not published by a stage, or is gone)."""
    try:
        manifest = json.loads(storage.read_bytes(f"{folder}/{MANIFEST}"))
    except FileNotFoundError:
        return None
    files = {name: FileRef(path=f"{folder}/{name}", **entry) for name, entry in manifest.items()}
    return ArtifactRef(stage=stage, digest=digest, files=files)


def published_problem(folder: Any) -> str | None:
    """Return why a published folder no longer matches its manifest; None if it does or has no manifest."""
    try:
        ref = published_ref(folder)
    except (ValueError, TypeError, AttributeError) as exc:
        return f"{folder}: unreadable {MANIFEST} ({exc})"
    return None if ref is None else ref.problem()


def _placed(files: dict[str, FileRef], folder: Path) -> dict[str, FileRef]:
    return {name: ref.model_copy(update={"path": str(folder / name)}) for name, ref in files.items()}


def _signed(ref: ArtifactRef) -> ArtifactRef:
    """Return `ref` with the stat signature of each of its files as they are now."""
    files = {name: f.model_copy(update={"stat": stat_signature(Path(f.path))}) for name, f in ref.files.items()}
    return ref.model_copy(update={"files": files})


@storage.explaining()
def _remote_problem(files: dict[str, FileRef], trust_unchanged: bool) -> str | None:
    """Return why objects no longer match their references, or None if they do (see `ArtifactRef.problem`).

    One listing per folder gives each object's size and ETag; an object whose ETag is the one recorded when it was
    uploaded is trusted without reading it, any other is read back and hashed. A folder without its manifest (an
    upload that did not finish) is not trusted.
    """
    fs = storage.filesystem()
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


class Staged:
    """The local side of a stage whose root may be on object storage (see the module's docstring)."""

    def __init__(self, root: Any) -> None:
        self.remote_root = str(root) if storage.is_remote(root) else None
        self._scratch: Path | None = None
        self.root = self.scratch / "root" if self.remote_root else Path(root)

    @property
    def scratch(self) -> Path:
        """This stage's private folder in the system temp folder: made on first use, removed when the stage ends, and
        if its process was killed, by the next stage on this machine."""
        if self._scratch is None:
            self._scratch = new_workdir(Path(tempfile.gettempdir()) / STAGE_SCRATCH_DIR)
        return self._scratch

    @storage.explaining()
    def local(self, ref: ArtifactRef, *names: str) -> ArtifactRef:
        """Return `ref` with its files (or just those named) on this machine's disk: copied from object storage and
        checked against their digests, if they are there."""
        wanted = {name: f for name, f in ref.files.items() if storage.is_remote(f.path) and (not names or name in names)}
        if not wanted:
            return ref
        folder = self.scratch / "inputs" / f"{ref.stage}-{ref.digest[:16]}"
        folder.mkdir(parents=True, exist_ok=True)
        fs, files = storage.filesystem(), dict(ref.files)
        for name, f in wanted.items():
            path = folder / name
            fs.get_file(f.path, str(path))
            if path.stat().st_size != f.size or sha256_file(path) != f.sha256:
                raise PipelineError(f"{f.path}: content digest differs from the recorded one (changed while this run "
                                    f"read it); run again to recompute it")
            files[name] = f.model_copy(update={"path": str(path), "etag": None, "stat": None})
        return ref.model_copy(update={"files": files})

    @storage.explaining()
    def publish(self, ref: ArtifactRef) -> ArtifactRef:
        """Upload a folder that a stage published under `root`: objects first, manifest last; return its reference."""
        if self.remote_root is None:
            return ref
        folder = Path(next(iter(ref.files.values())).path).parent
        target = f"{self.remote_root}/{folder.relative_to(self.root).as_posix()}"
        fs = storage.filesystem()
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
