"""TensorFlow set-up shared by the stages that run the model: a lazy import and repeatable XLA execution."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_warming: threading.Thread | None = None


def warm_up() -> None:
    """Start importing TensorFlow in a background thread (once), so that a stage needing it later finds it loaded.

    The import takes seconds of mostly single-threaded work; the flow calls this when the model is about to be
    trained, so that the import overlaps the data stages on the other core.
    """
    global _warming
    if _warming is None and "tensorflow" not in sys.modules:
        _warming = threading.Thread(target=_import, name="import-tensorflow", daemon=True)
        _warming.start()


def dask_setup(worker: Any) -> None:
    """Dask preload (`dask worker --preload tasks.keras_runtime`): size TensorFlow's pools to the worker's threads
    and start importing it when the worker starts, so a worker's first trial does not wait for the whole import."""
    for name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        os.environ.setdefault(name, str(worker.state.nthreads))
    warm_up()


def import_tensorflow() -> tuple[Any, Any]:
    """Import and return (tensorflow, keras); modules call this instead of importing TensorFlow at import time."""
    if _warming is not None:
        _warming.join()  # one thread imports; a failed background import is retried (and raises) here
    return _import()


def _import() -> tuple[Any, Any]:
    # Only TensorFlow's C++ INFO and WARNING lines (CUDA probing, CPU features) are silenced; a user's setting wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    threads = _dask_worker_threads()
    if threads is not None:
        # N single-threaded workers on N cores: TensorFlow's own pools (one thread per core by default) would make
        # them fight. TensorFlow reads these once, when it starts; Dask's nanny sets only OMP/MKL/OpenBLAS.
        os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(threads))
        os.environ.setdefault("TF_NUM_INTEROP_THREADS", str(threads))
    import keras
    import tensorflow as tf

    return tf, keras


@contextmanager
def deterministic_after(tf: Any) -> Iterator[None]:
    """Run the block with TensorFlow op determinism off, then switch it on for the rest of the process."""
    # Keras silently drops jit_compile for a model compiled (or loaded) while op determinism is on, because some XLA
    # GPU ops lack deterministic kernels. The XLA CPU step here is deterministic (same seed: same weights, tested), so
    # compile with determinism off and run with it on; the flag is process-wide and may be on from an earlier stage.
    from tensorflow.python.framework import config as tf_config

    tf_config.disable_op_determinism()
    try:
        yield
    finally:
        tf.config.experimental.enable_op_determinism()


def _dask_worker_threads() -> int | None:
    """Return the threads of the Dask worker running this code, or None outside a Dask worker."""
    if "distributed" not in sys.modules:
        return None
    from distributed import get_worker

    try:
        return int(get_worker().state.nthreads)
    except (ValueError, AttributeError):
        return None
