"""The MLX dtype of each cache dtype of :data:`kvpool.cache.format.CACHE_DTYPES`."""

from __future__ import annotations

import mlx.core as mx

MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def mx_dtype(name: str) -> mx.Dtype:
    """``mx.float32`` for ``"float32"``, and so on (KeyError for a name kvpool does not store)."""
    return MX_DTYPES[name]
