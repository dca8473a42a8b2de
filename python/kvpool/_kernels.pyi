"""Gather/scatter between per-layer KV slabs and contiguous caches."""

from collections.abc import Sequence

import mlx.core

def gather(
    slabs: Sequence[mlx.core.array],
    block_table: Sequence[int],
    start: int,
    stop: int,
    capacity: int,
    *,
    stream: mlx.core.Stream
    | mlx.core.ThreadLocalStream
    | mlx.core.Device
    | mlx.core.DeviceType
    | None = None,
) -> list[mlx.core.array]:
    """
    Read positions [start, stop) of every slab through block_table into one [1, heads, capacity, head_dim] array per slab (rows past stop - start are zero).
    """

def scatter(
    slab: mlx.core.array,
    src: mlx.core.array,
    block_table: Sequence[int],
    start: int,
    *,
    stream: mlx.core.Stream
    | mlx.core.ThreadLocalStream
    | mlx.core.Device
    | mlx.core.DeviceType
    | None = None,
) -> mlx.core.array:
    """
    Write src [1, heads, T, head_dim] as positions [start, start + T) of slab through block_table; returns the slab (in place when donated).
    """

def gather_dequantized(
    slabs: Sequence[tuple[mlx.core.array, mlx.core.array, mlx.core.array]],
    block_table: Sequence[int],
    start: int,
    stop: int,
    capacity: int,
    *,
    bits: int,
    group_size: int = 64,
    stream: mlx.core.Stream
    | mlx.core.ThreadLocalStream
    | mlx.core.Device
    | mlx.core.DeviceType
    | None = None,
) -> list[mlx.core.array]:
    """
    Read positions [start, stop) of every quantized slab (codes, scales, biases) through block_table into one dense [1, heads, capacity, head_dim] array per slab in the scales' dtype (rows past stop - start are zero); values equal mx.dequantize's bit for bit.
    """

def scatter_quantized(
    slab: tuple[mlx.core.array, mlx.core.array, mlx.core.array],
    src: mlx.core.array,
    block_table: Sequence[int],
    start: int,
    *,
    bits: int,
    group_size: int = 64,
    stream: mlx.core.Stream
    | mlx.core.ThreadLocalStream
    | mlx.core.Device
    | mlx.core.DeviceType
    | None = None,
) -> tuple[mlx.core.array, mlx.core.array, mlx.core.array]:
    """
    Write dense src [1, heads, T, head_dim] as positions [start, start + T) of the quantized slab (codes, scales, biases) through block_table, quantized as mx.quantize does; returns the slab's three arrays (each in place when donated).
    """

def quantized_shapes(
    num_blocks: int,
    n_kv_heads: int,
    block_tokens: int,
    head_dim: int,
    *,
    bits: int,
    group_size: int = 64,
) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """
    The shapes (codes, scales) of a quantized slab of dense shape [num_blocks, n_kv_heads, block_tokens, head_dim] (biases share the scales' shape); raises ValueError for bits other than 4/8, a group size other than 32/64 or a head_dim it does not divide.
    """

def scatter_stats() -> dict[str, int]:
    """Counts of scatters that wrote in place vs copied the slab."""

def reset_scatter_stats() -> None: ...
def set_strict_in_place(strict: bool) -> None:
    """When on, a scatter that would copy its slab raises instead."""
