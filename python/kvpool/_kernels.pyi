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

def scatter_stats() -> dict[str, int]:
    """Counts of scatters that wrote in place vs copied the slab."""

def reset_scatter_stats() -> None: ...
def set_strict_in_place(strict: bool) -> None:
    """When on, a scatter that would copy its slab raises instead."""
