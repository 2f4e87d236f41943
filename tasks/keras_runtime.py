"""TensorFlow set-up shared by the stages that run the model: a lazy import and repeatable XLA execution."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def import_tensorflow() -> tuple[Any, Any]:
    """Import and return (tensorflow, keras); modules call this instead of importing TensorFlow at import time."""
    # Only TensorFlow's C++ INFO and WARNING lines (CUDA probing, CPU features) are silenced; a user's setting wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
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
