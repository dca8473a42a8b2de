"""The KVStorage protocol: where a pool's K/V bytes live.

The pool does the bookkeeping (which block belongs to whom); a storage holds
the bytes of every block for every layer and converts between blocks and the
per-layer caches a batch generator consumes. :class:`kvpool.mlx.slabs.SlabStorage`
is the real one (MLX slabs); :class:`kvpool.testing.FakeStorage` records token
ids instead of K/V so unit tests run without MLX.

``read_layers`` / ``write_layers`` move dense K/V between blocks and host (numpy)
arrays, layer by layer, so saving or loading an agent never needs a second copy of
it in memory: bit for bit for dense blocks; quantized blocks dequantize on the way
out and quantize on the way in. ``read_codes`` / ``write_codes`` move quantized
blocks as they are at rest (codes, scales, biases), bit for bit, for persistence
(:mod:`kvpool.persist`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from kvpool.cache.format import HOST_DTYPES
from kvpool.cache.spec import ModelCacheSpec

HostArray = npt.NDArray[Any]

__all__ = [
    "HostArray",
    "KVStorage",
    "LayerCodes",
    "LayerKV",
    "LayerState",
    "QuantizedRows",
    "first_writable",
    "host_dtype",
]


def host_dtype(dtype: str) -> np.dtype[Any]:
    """The numpy dtype that holds one element of a ``dtype`` cache, bit for bit.

    ``float32`` and ``float16`` map to themselves; ``bfloat16`` maps to
    ``uint16`` (the same 16 bits). Host arrays never convert values.
    """
    return np.dtype(HOST_DTYPES[dtype])


@dataclass(frozen=True, slots=True)
class LayerKV:
    """One layer's K and V for positions ``[start, start + num_tokens)``, on the host.

    ``keys`` is ``[n_kv_heads, num_tokens, k_head_dim]`` and ``values``
    ``[n_kv_heads, num_tokens, v_head_dim]``, C-contiguous, in
    :func:`host_dtype` of the spec's dtype: row ``t`` holds position ``start + t``.
    """

    layer: int
    start: int
    keys: HostArray
    values: HostArray

    @property
    def num_tokens(self) -> int:
        return int(self.keys.shape[1])

    def drop(self, n: int) -> LayerKV:
        """The same layer without its first ``n`` positions."""
        return LayerKV(self.layer, self.start + n, self.keys[:, n:], self.values[:, n:])


@dataclass(frozen=True, slots=True)
class QuantizedRows:
    """Rows of K or V as a quantized block holds them (``mx.quantize`` layout, on the host).

    ``codes`` ``[n_kv_heads, T, head_dim * bits // 32]`` uint32; ``scales`` and ``biases``
    ``[n_kv_heads, T, head_dim // group_size]`` in the host dtype of the cache dtype.
    """

    codes: HostArray
    scales: HostArray
    biases: HostArray

    def drop(self, n: int) -> QuantizedRows:
        return QuantizedRows(self.codes[:, n:], self.scales[:, n:], self.biases[:, n:])


@dataclass(frozen=True, slots=True)
class LayerCodes:
    """One layer's quantized K and V for positions ``[start, start + num_tokens)``."""

    layer: int
    start: int
    keys: QuantizedRows
    values: QuantizedRows

    @property
    def num_tokens(self) -> int:
        return int(self.keys.codes.shape[1])

    def drop(self, n: int) -> LayerCodes:
        """The same layer without its first ``n`` positions."""
        return LayerCodes(self.layer, self.start + n, self.keys.drop(n), self.values.drop(n))


@dataclass(frozen=True, slots=True)
class LayerState:
    """One recurrent layer's state after ``num_tokens`` tokens, on the host: one array per
    :class:`~kvpool.cache.spec.StateSpec` of the layer (its shape, batch axis left out), in
    :func:`host_dtype` of the state's dtype. Always dense, whatever the block format."""

    layer: int
    num_tokens: int
    arrays: tuple[HostArray, ...]


class KVStorage(Protocol):
    """K/V bytes for ``blocks_per_group[g]`` blocks of every layer of group ``g`` of ``spec``.

    Every method takes ``tables``: one block table per layer group
    (:attr:`ModelCacheSpec.groups`), position ``p`` of a layer of group ``g`` in
    block ``tables[g][p // block_tokens]``. Entries the call does not touch may
    be :data:`~kvpool.cache.tables.NULL_BLOCK` (``-1``).
    """

    spec: ModelCacheSpec
    blocks_per_group: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes this storage holds (all blocks, all layers, K and V)."""
        ...

    def resize(
        self, blocks_per_group: Sequence[int], moves: Sequence[Mapping[int, int]] = ()
    ) -> None:
        """Hold ``blocks_per_group[g]`` blocks in group ``g`` (the pool moving its budget),
        after copying block ``old``'s rows to block ``new`` in every layer of group ``g``
        for each ``old -> new`` of ``moves[g]`` (empty: none; a group with moves shrinks,
        and every ``new`` is below its new size).

        Any thread may call it; it takes effect before the next of the calls below, in
        the order of the calls. Blocks below both sizes keep their contents (moved ones:
        their source's); blocks taken away are free (no holder); added blocks are written
        before they are read.
        """
        ...

    def load(self, tables: Sequence[Sequence[int]], num_tokens: int) -> list[Any]:
        """Per-layer caches for positions ``[0, num_tokens)``.

        Global layers get every position; a sliding layer with window ``W``
        gets the last ``min(num_tokens, W - 1)`` positions, all that computing
        position ``num_tokens`` needs (the caller checked the blocks hold them);
        a cache may pad that to the ``W`` rows its format wants with a row no
        query attends.
        Returned caches are evaluated: the blocks may be rewritten as soon as
        this returns.
        """
        ...

    def store(
        self, caches: Sequence[Any], tables: Sequence[Sequence[int]], start: int
    ) -> tuple[int, ...]:
        """Write positions ``>= start`` of each layer's cache through ``tables``.

        ``caches`` are a finished sequence's per-layer caches (all at the same
        offset). A layer writes only the positions it holds, and only from the
        first table entry (at or after ``start``) past which no entry is NULL.
        Returns, per group, the first position every layer of it wrote.
        """
        ...

    def read_layers(
        self, tables: Sequence[Sequence[int]], layers: Sequence[int], start: int, stop: int
    ) -> list[LayerKV]:
        """Positions ``[start, stop)`` of each of ``layers``, copied to the host.

        The caller asks only for positions the blocks hold. The arrays stay
        valid after the blocks are rewritten or freed.
        """
        ...

    def write_layers(self, tables: Sequence[Sequence[int]], kvs: Sequence[LayerKV]) -> None:
        """Write each :class:`LayerKV` into its layer at its positions, through the tables.

        The inverse of :meth:`read_layers`: only those positions of those
        layers change. The caller owns the blocks (no one else reads them).
        """
        ...

    def read_codes(
        self, tables: Sequence[Sequence[int]], layers: Sequence[int], start: int, stop: int
    ) -> list[LayerCodes]:
        """Like :meth:`read_layers`, the blocks' quantized rows as they are at rest.

        Quantized formats only (InvalidRequestError for a dense one).
        """
        ...

    def write_codes(self, tables: Sequence[Sequence[int]], kvs: Sequence[LayerCodes]) -> None:
        """The inverse of :meth:`read_codes`, bit for bit (quantized formats only)."""
        ...

    def read_states(
        self, tables: Sequence[Sequence[int]], layers: Sequence[int], num_tokens: int
    ) -> list[LayerState]:
        """The states of recurrent ``layers`` after ``num_tokens`` tokens (held in their
        group's table entry ``(num_tokens - 1) // block_tokens``), copied to the host."""
        ...

    def write_states(self, tables: Sequence[Sequence[int]], states: Sequence[LayerState]) -> None:
        """The inverse of :meth:`read_states`, bit for bit. The caller owns the blocks."""
        ...


def first_writable(table: Sequence[int], start: int, block_tokens: int) -> int:
    """The first position ``>= start`` from which every entry of ``table`` is a block.

    ``len(table) * block_tokens`` when there is none.
    """
    j = len(table)
    while j > start // block_tokens and table[j - 1] >= 0:
        j -= 1
    return max(start, j * block_tokens)
