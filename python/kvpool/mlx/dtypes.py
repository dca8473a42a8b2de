"""The MLX dtype of each cache dtype of :data:`kvpool.cache.format.CACHE_DTYPES`, and the
way from an MLX array of any float dtype to numpy."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def mx_dtype(name: str) -> mx.Dtype:
    """``mx.float32`` for ``"float32"``, and so on (KeyError for a name kvpool does not store)."""
    return MX_DTYPES[name]


def float32_numpy(array: mx.array) -> np.ndarray:
    """``array`` as a float32 numpy array (bfloat16 has no numpy type)."""
    return np.array(array.astype(mx.float32))
