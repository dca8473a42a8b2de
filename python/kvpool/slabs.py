"""SlabStorage: the pool's K/V bytes as one preallocated MLX slab per layer.

Each layer ``l`` has a K slab and a V slab shaped
``[num_blocks, n_kv_heads, block_tokens, head_dim]``; block id ``b`` is
``slab[b]`` in every layer. Writes land in place: the storage keeps the only
reference to each slab and rebinds it to the scatter's output
(``self.k[l] = scatter(self.k[l], ...)``), so MLX donates the buffer instead of
copying the slab (``kvpool.kernels.scatter_stats()`` counts both).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from kvpool import kernels
from kvpool.mlx.mlx_lm import KV_CACHE_STEP, kv_cache, rotating_cache
from kvpool.spec import ModelCacheSpec
from kvpool.storage import HostArray, LayerKV, first_writable, host_dtype

_MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def headroom_capacity(num_tokens: int, step: int = KV_CACHE_STEP) -> int:
    """Rows to allocate for ``num_tokens``: rounded up past the count to a
    multiple of mlx-lm's KVCache step, so the next token does not reallocate."""
    return (num_tokens // step + 1) * step


def _pad_front(array: mx.array) -> mx.array:
    """``[1, H, T, D]`` -> ``[1, H, T + 1, D]`` with a zero row in front."""
    zero = mx.zeros((*array.shape[:2], 1, array.shape[3]), dtype=array.dtype)
    return mx.concatenate([zero, array], axis=2)


class SlabStorage:
    """MLX slabs for ``blocks_per_group[g]`` blocks of every layer of group ``g`` of ``spec``."""

    def __init__(self, spec: ModelCacheSpec, blocks_per_group: Sequence[int]) -> None:
        self.spec = spec
        self.blocks_per_group = tuple(blocks_per_group)
        dtype = _MX_DTYPES[spec.dtype]
        self._group_of_layer = spec.group_of_layer()
        self._groups = spec.groups
        self.k: list[mx.array] = []
        self.v: list[mx.array] = []
        for i, layer in enumerate(spec.layers):
            num_blocks = self.blocks_per_group[self._group_of_layer[i]]
            shape = (num_blocks, layer.n_kv_heads, spec.block_tokens)
            self.k.append(mx.zeros((*shape, layer.k_head_dim), dtype=dtype))
            self.v.append(mx.zeros((*shape, layer.v_head_dim), dtype=dtype))
        mx.eval(self.k, self.v)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)

    def load(self, tables: Sequence[Sequence[int]], num_tokens: int) -> list[Any]:
        caches: list[Any] = [None] * self.spec.n_layers
        for g, group in enumerate(self._groups):
            table = list(tables[g])
            slabs = [s for i in group.layers for s in (self.k[i], self.v[i])]
            if group.window is None:
                out = kernels.gather(slabs, table, 0, num_tokens, headroom_capacity(num_tokens))
                for j, i in enumerate(group.layers):
                    caches[i] = kv_cache(out[2 * j], out[2 * j + 1], num_tokens)
                continue
            held = min(num_tokens, group.window - 1)
            out = kernels.gather(slabs, table, num_tokens - held, num_tokens, held)
            if num_tokens >= group.window:
                # mlx-lm's RotatingKVCache is full (window rows) once offset >= window.
                # Row 0 stands for position num_tokens - window, which no later query
                # attends: the next token overwrites it (or the next prefill trims it).
                out = [_pad_front(a) for a in out]
            for j, i in enumerate(group.layers):
                caches[i] = rotating_cache(out[2 * j], out[2 * j + 1], num_tokens, group.window)
        mx.eval([a for c in caches for a in (c.keys, c.values)])
        return caches

    def store(
        self, caches: Sequence[Any], tables: Sequence[Sequence[int]], start: int
    ) -> tuple[int, ...]:
        written_from = [start] * len(self._groups)
        for i, cache in enumerate(caches):
            g = self._group_of_layer[i]
            table = list(tables[g])
            offset = int(cache.offset)
            # Global caches hold positions [0, offset) at rows 0..offset-1
            # (rows past offset are headroom); extracted sliding caches hold
            # the last rows in temporal order: positions [offset - held, offset).
            base = 0
            if self._groups[g].window is not None:
                base = offset - min(int(cache.keys.shape[2]), offset)
            first = first_writable(table, max(start, base), self.spec.block_tokens)
            written_from[g] = max(written_from[g], first)
            if first >= offset:
                continue
            rows = slice(first - base, offset - base)
            self.k[i] = kernels.scatter(self.k[i], cache.keys[:, :, rows, :], table, first)
            self.v[i] = kernels.scatter(self.v[i], cache.values[:, :, rows, :], table, first)
        mx.eval(self.k, self.v)
        return tuple(written_from)

    def read_layers(
        self, tables: Sequence[Sequence[int]], layers: Sequence[int], start: int, stop: int
    ) -> list[LayerKV]:
        if not layers:
            return []
        n = stop - start
        if n <= 0:
            return [LayerKV(i, start, *self._empty_host(i)) for i in layers]
        out: list[tuple[int, mx.array, mx.array]] = []
        for g in sorted({self._group_of_layer[i] for i in layers}):
            mine = [i for i in layers if self._group_of_layer[i] == g]
            slabs = [s for i in mine for s in (self.k[i], self.v[i])]
            got = kernels.gather(slabs, list(tables[g]), start, stop, n)
            out.extend((i, got[2 * j], got[2 * j + 1]) for j, i in enumerate(mine))
        by_layer = {i: (key, value) for i, key, value in out}
        arrays = [a for i in layers for a in by_layer[i]]
        if self.spec.dtype == "bfloat16":  # numpy has no bfloat16: hand out its bits
            arrays = [a.view(mx.uint16) for a in arrays]
        mx.eval(arrays)
        # np.asarray shares the gathered buffers (no copy); [0] drops the batch axis.
        host = [np.asarray(a)[0] for a in arrays]
        return [LayerKV(i, start, host[2 * j], host[2 * j + 1]) for j, i in enumerate(layers)]

    def write_layers(self, tables: Sequence[Sequence[int]], kvs: Sequence[LayerKV]) -> None:
        for kv in kvs:
            if kv.num_tokens == 0:
                continue
            i = kv.layer
            table = list(tables[self._group_of_layer[i]])
            keys, values = self._to_device(kv.keys), self._to_device(kv.values)
            # Rebind so the slab keeps one reference and the scatter writes in place.
            self.k[i] = kernels.scatter(self.k[i], keys, table, kv.start)
            self.v[i] = kernels.scatter(self.v[i], values, table, kv.start)
            del keys, values
            mx.eval(self.k[i], self.v[i])

    def _to_device(self, host: HostArray) -> mx.array:
        """``[H, T, D]`` host array -> ``[1, H, T, D]`` array of the slab dtype (a copy)."""
        array = mx.array(host)[None]
        if self.spec.dtype == "bfloat16":
            array = array.view(mx.bfloat16)
        return array

    def _empty_host(self, layer: int) -> tuple[HostArray, HostArray]:
        spec = self.spec.layers[layer]
        dtype = host_dtype(self.spec.dtype)
        return (
            np.empty((spec.n_kv_heads, 0, spec.k_head_dim), dtype),
            np.empty((spec.n_kv_heads, 0, spec.v_head_dim), dtype),
        )
