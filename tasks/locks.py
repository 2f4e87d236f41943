"""Stage locks for Prefect's SERIALIZABLE caching: flock on this machine's disk, or Redis for several machines.

A stage's lock is held while one run computes it, so concurrent runs on the same roots compute each stage once (the
others wait, then use its result). A lock must never outlive its holder: a flock is dropped by the kernel when its
process dies; a Redis lock expires `expiry_s` seconds after its holder stops renewing it (a thread renews it every
third of that while the holder lives), and a holder that lost its lock does not record its result.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tasks.errors import PipelineError
from tasks.files import flocked, take_flock
from tasks.storage import lock_dir, root_id

# How long a Redis lock outlives its holder's last renewal (PipelineConfig.lock_expiry_s).
LOCK_EXPIRY_S = 15.0
# A child of Prefect's logger: its handlers show the line in the run log (where Prefect's own lines go).
_log = logging.getLogger("prefect.mnist_pipeline.locks")
# The lock `gc` holds while it plans and removes (flows/gc.py); every other lock, once taken, waits until it is free.
GC_KEY = "gc"
# The lock each run holds from its start to its end (`holding_run_lock`), one key per run: `run-<random>`.
RUN_KEY_PREFIX = "run-"


@contextmanager
def holding_run_lock(locks: FlockLockManager | RedisLockManager) -> Iterator[None]:
    """Hold a lock of this run's own for the block (a whole flow run): gc removes nothing while any lock is held, and
    the run starts only once a gc at work has finished (flows/gc.py), so gc never removes what a run published and
    reads next, even between two of its stages."""
    key = f"{RUN_KEY_PREFIX}{uuid.uuid4().hex}"
    locks.acquire_lock(key, key)
    try:
        yield
    finally:
        locks.release_lock(key, key)


def redacted(url: str) -> str:
    """Return a Redis URL with its password replaced by *** (for messages and anything stored)."""
    userinfo, at, host = urlsplit(url).netloc.rpartition("@")
    if ":" not in userinfo:
        return url
    return urlunsplit(urlsplit(url)._replace(netloc=f"{userinfo.partition(':')[0]}:***{at}{host}"))


def stage_locks(url: str | None, cache_dir: str | Path, expiry_s: float) -> FlockLockManager | RedisLockManager:
    """Return the lock manager of a cache: Redis at `url` (redis://HOST:PORT/DB), else flock on this machine."""
    if url:
        return RedisLockManager(url, namespace=root_id(cache_dir), expiry_s=expiry_s)
    return FlockLockManager(lock_dir(cache_dir))


class _Shared:
    """What both lock managers do alike: they are shared by copies, pickled without their locks, and synchronous."""

    def __deepcopy__(self, memo: dict) -> _Shared:
        # Prefect copies cache policies; a copy must still see (and release) the locks this one holds.
        return self

    # The constructor's arguments, by name: all a copy in another process is made from.
    _arguments: tuple[str, ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        # A task travels to Dask workers by pickle with its cache policy: open descriptors, clients and thread locks
        # cannot, and locks are held by the process that takes them. A copy in another process starts holding none.
        return {name: getattr(self, name) for name in self._arguments}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def _after_gc(self, key: str, holder: str) -> None:
        """Wait, holding the stage lock of `key` just taken, until gc does not hold its lock (flows/gc.py): gc takes
        its lock before it looks at the stage locks, so either gc sees this lock held and removes nothing, or this
        stage reads and records its result only after gc is done."""
        if key == GC_KEY:
            return
        try:
            self.wait_for_lock(GC_KEY)
        except BaseException:
            self.release_lock(key, holder)
            raise

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None) -> bool:
        """Take the lock of `key` (blocking: the stages are synchronous)."""
        return self.acquire_lock(key, holder, acquire_timeout, hold_timeout)

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """Wait until nobody holds the lock of `key` (blocking)."""
        return self.wait_for_lock(key, timeout)


class FlockLockManager(_Shared):
    """Prefect lock manager on `flock`: one lock file per cache key, released by the OS when its process dies.

    Prefect's FileSystemLockManager writes lock files without an expiry, so a run killed while holding one would make
    every later run wait forever; a flock cannot outlive its process. Locks held in this process are kept by key.
    """

    _arguments = ("lock_files_directory",)

    def __init__(self, lock_files_directory: Path) -> None:
        self.lock_files_directory = Path(lock_files_directory)
        self._held: dict[str, tuple[str, int]] = {}
        self._guard = threading.Lock()

    def check(self) -> None:
        """Nothing to check: the lock files are made when first taken."""

    def lock_path(self, key: str) -> Path:
        self.lock_files_directory.mkdir(parents=True, exist_ok=True)
        return self.lock_files_directory / f"{key}.lock"

    @contextmanager
    def held(self, key: str) -> Iterator[None]:
        """Hold the lock of `key` for the duration of a block."""
        with flocked(self.lock_path(key)):
            yield

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None) -> bool:
        """Take the lock of `key` for `holder`, waiting up to `acquire_timeout` seconds (None: as long as it takes)."""
        if self.is_lock_holder(key, holder):
            return True
        fd = take_flock(self.lock_path(key), acquire_timeout)
        if fd is None:
            return False
        with self._guard:
            self._held[key] = (holder, fd)
        self._after_gc(key, holder)
        return True

    def release_lock(self, key: str, holder: str) -> None:
        with self._guard:
            if not self.is_lock_holder(key, holder):
                raise ValueError(f"No lock held by {holder} for transaction with key {key}")
            _, fd = self._held.pop(key)
        if key.startswith(RUN_KEY_PREFIX):  # a file per run: removed while locked (no other holder uses its key)
            self.lock_path(key).unlink(missing_ok=True)
        os.close(fd)  # closing the only descriptor releases the flock

    def is_locked(self, key: str) -> bool:
        """Return whether any process (this one included) holds the lock of `key`."""
        if key in self._held:
            return True
        try:  # a lock file that is not there is not made (a run's is removed when it is released)
            fd = take_flock(self.lock_path(key), timeout=0, create=False)
        except FileNotFoundError:
            return False
        if fd is not None:
            os.close(fd)
        return fd is None

    def is_lock_holder(self, key: str, holder: str) -> bool:
        """Return whether `holder` holds the lock of `key` in this process."""
        return self._held.get(key, ("", -1))[0] == holder

    def held_keys(self) -> list[str]:
        """Return the keys whose lock some process holds now."""
        if not self.lock_files_directory.is_dir():
            return []
        return [p.stem for p in sorted(self.lock_files_directory.glob("*.lock")) if self.is_locked(p.stem)]

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """Wait until nobody holds the lock of `key`; False if `timeout` passed first."""
        return _wait(lambda: self.is_locked(key), timeout)


@contextmanager
def _answering(url: str) -> Iterator[None]:
    """Turn a Redis server that stops answering (during a run, after its check) into one line naming it: a stage
    fails instead of running unlocked. A lost lock (LockError) stays what it is."""
    import redis

    try:
        yield
    except redis.exceptions.LockError:
        raise
    except redis.RedisError as exc:
        raise PipelineError(f"locks {redacted(url)}: expected a Redis server answering there, found none ({exc}); no "
                            "stage result is recorded without its lock: run again when it answers") from None


def _answers(method: Any) -> Any:
    """Run a method of RedisLockManager under `_answering`."""

    @functools.wraps(method)
    def call(self: RedisLockManager, *args: Any, **kwargs: Any) -> Any:
        with _answering(self.url):
            return method(self, *args, **kwargs)

    return call


class RedisLockManager(_Shared):
    """Prefect lock manager on Redis (redis-py's Lock: SET NX with an expiry, compare-and-delete to release).

    Prefect takes stage locks without an expiry; here every lock expires `expiry_s` after it was last renewed, and a
    thread renews the locks this process holds every `expiry_s / 3`. A holder that dies (or stops: a paused process)
    loses its lock within `expiry_s`; a holder that lost its lock is no holder any more, so Prefect does not write
    its cache record over the result of whoever took the lock next.
    """

    _arguments = ("url", "namespace", "expiry_s")

    def __init__(self, url: str, namespace: str, expiry_s: float = LOCK_EXPIRY_S) -> None:
        self.url, self.namespace, self.expiry_s = url, namespace, expiry_s
        self._client: Any = None
        self._held: dict[str, tuple[str, Any, threading.Event]] = {}
        self._guard = threading.Lock()

    @property
    def client(self) -> Any:
        """The Redis client (made on first use; a URL's client fails at once when nothing answers)."""
        if self._client is None:
            import redis

            self._client = redis.Redis.from_url(self.url, socket_connect_timeout=5, socket_timeout=max(5.0, self.expiry_s / 3))
        return self._client

    def check(self) -> None:
        """Fail with one line unless a Redis server answers at the URL."""
        import redis

        try:
            self.client.ping()
        except redis.AuthenticationError as exc:
            found = "a password it refuses" if urlsplit(self.url).password else "none"
            raise PipelineError(f"locks {redacted(self.url)}: expected the Redis server's password in the URL "
                                f"(redis://:PASSWORD@HOST:PORT/DB), found {found} ({exc})") from None
        except redis.RedisError as exc:
            raise PipelineError(f"locks {redacted(self.url)}: expected a Redis server answering there, found none "
                                f"({exc})") from None

    def _name(self, key: str) -> str:
        return f"mnist-pipeline:{self.namespace}:lock:{key}"

    @_answers
    def held_keys(self) -> list[str]:
        """Return the keys whose lock some holder has now (and has not let expire)."""
        prefix = self._name("")
        return sorted(name.decode().removeprefix(prefix) for name in self.client.scan_iter(match=prefix + "*"))

    def _lock(self, key: str, acquire_timeout: float | None) -> Any:
        return self.client.lock(self._name(key), timeout=self.expiry_s, sleep=0.05, blocking_timeout=acquire_timeout,
                                thread_local=False)  # the renewal thread uses the token of the acquiring thread

    @contextmanager
    def held(self, key: str) -> Iterator[None]:
        """Hold the lock of `key` for the duration of a short block (not renewed)."""
        lock = self._lock(key, None)
        with _answering(self.url):
            lock.acquire(token=f"check-{uuid.uuid4().hex}")
        try:
            yield
        finally:
            with _answering(self.url):
                _release(lock)

    @_answers
    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None) -> bool:
        """Take the lock of `key` for `holder`, waiting up to `acquire_timeout` seconds (None: as long as it takes),
        and keep renewing it until it is released."""
        if self.is_lock_holder(key, holder):
            return True
        lock = self._lock(key, acquire_timeout)
        if not lock.acquire(token=holder):
            return False
        stop = threading.Event()
        with self._guard:
            self._held[key] = (holder, lock, stop)
        threading.Thread(target=self._renew, args=(key, lock, stop), name=f"renew-{key}", daemon=True).start()
        self._after_gc(key, holder)
        return True

    def _renew(self, key: str, lock: Any, stop: threading.Event) -> None:
        import redis
        from redis.exceptions import LockError

        while not stop.wait(self.expiry_s / 3):
            try:
                lock.reacquire()
            except LockError:  # released meanwhile, or expired: then is_lock_holder says so from now on
                if self._first_to_stop(stop):
                    self._warn_lost(key)
                return
            except redis.RedisError:
                continue  # the server did not answer this time: try again until the lock expires

    def release_lock(self, key: str, holder: str) -> None:
        """Release the lock of `key` taken by `holder` (nothing to do if it expired meanwhile, or if the server does
        not answer: then it expires)."""
        import redis

        with self._guard:
            if self._held.get(key, ("",))[0] != holder:
                raise ValueError(f"No lock held by {holder} for transaction with key {key}")
            _, lock, stop = self._held.pop(key)
        try:
            if self._first_to_stop(stop) and not _release(lock):
                self._warn_lost(key)  # lost before the renewal thread woke up to notice
        except redis.RedisError as exc:  # cleanup after the server stopped answering: not another error on top
            _log.warning("lock %s not released: the Redis server did not answer (%s); it expires within %g s",
                         key, exc, self.expiry_s)

    def _first_to_stop(self, stop: threading.Event) -> bool:
        """Set `stop`; True for the one caller (renewal thread or release) that set it first."""
        with self._guard:
            first = not stop.is_set()
            stop.set()
        return first

    def _warn_lost(self, key: str) -> None:
        consequence = ("a gc meanwhile may remove what this run reads next" if key.startswith(RUN_KEY_PREFIX) else
                       "another run may compute the stage, and this one will not record its result")
        _log.warning("%s lock %s expired before it was renewed (this process was stopped or cut off from Redis for "
                     "over %g s); %s", "run" if key.startswith(RUN_KEY_PREFIX) else "stage", key, self.expiry_s,
                     consequence)

    @_answers
    def is_locked(self, key: str) -> bool:
        """Return whether anyone holds the lock of `key`; a lock this process took and lost counts as held (by
        whoever has it now, or by nobody yet), so that Prefect refuses to record a result under it."""
        if key in self._held and not self._owned(key):
            return True
        return bool(self.client.exists(self._name(key)))

    @_answers
    def is_lock_holder(self, key: str, holder: str) -> bool:
        """Return whether `holder` holds the lock of `key` (taken here and, in Redis, still its own)."""
        return self._held.get(key, ("",))[0] == holder and self._owned(key)

    def _owned(self, key: str) -> bool:
        entry = self._held.get(key)
        return entry is not None and entry[1].owned()

    @_answers
    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """Wait until nobody holds the lock of `key`; False if `timeout` passed first."""
        return _wait(lambda: bool(self.client.exists(self._name(key))), timeout)


def _release(lock: Any) -> bool:
    """Release a redis-py lock; False if it was no longer ours (it expired: nothing left to release)."""
    from redis.exceptions import LockNotOwnedError

    try:
        lock.release()
    except LockNotOwnedError:
        return False
    return True


def _wait(locked: Any, timeout: float | None) -> bool:
    deadline = None if timeout is None else time.monotonic() + timeout
    while locked():
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True
