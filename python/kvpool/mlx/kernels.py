"""The C++ gather/scatter kernels on MLX arrays (``kvpool._kernels``).

Importing this module imports MLX. See ``csrc/kernels/gather_scatter.h`` for
the exact semantics of the block table, headroom and in-place writes, and
``csrc/kernels/quantized.h`` for the quantized slabs.

Dense slabs are ``[num_blocks, n_kv_heads, block_tokens, head_dim]`` arrays.
A quantized slab is a ``(codes, scales, biases)`` tuple in MLX's affine format,
``mx.quantize(dense_slab, group_size, bits)``::

    codes   [num_blocks, n_kv_heads, block_tokens, head_dim * bits // 32]  uint32
    scales  [num_blocks, n_kv_heads, block_tokens, head_dim // group_size] cache dtype
    biases  same shape and dtype as scales

bits is 4 or 8, group_size 32 or 64 and must divide head_dim.
``gather_dequantized`` writes dense caches bit for bit equal to
``mx.dequantize(codes, scales, biases, group_size, bits)``; ``scatter_quantized``
writes what ``mx.quantize`` makes of the new rows, each of the three arrays in
place when donated (``slab = scatter_quantized(slab, ...)`` with no other
reference to the old arrays).
"""

from __future__ import annotations

from kvpool._kernels import (
    gather,
    gather_dequantized,
    quantized_shapes,
    reset_scatter_stats,
    scatter,
    scatter_quantized,
    scatter_stats,
    set_strict_in_place,
)
from kvpool.errors import InvalidRequestError


def check_quantization(head_dim: int, bits: int, group_size: int) -> None:
    """Raise :class:`InvalidRequestError` unless bits is 4 or 8, group_size 32 or 64 and
    group_size divides head_dim > 0 (the message carries the numbers)."""
    try:
        quantized_shapes(1, 1, 1, head_dim, bits=bits, group_size=group_size)
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None


__all__ = [
    "check_quantization",
    "gather",
    "gather_dequantized",
    "quantized_shapes",
    "reset_scatter_stats",
    "scatter",
    "scatter_quantized",
    "scatter_stats",
    "set_strict_in_place",
]
