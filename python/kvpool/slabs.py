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
from mlx_lm.models.cache import KVCache, RotatingKVCache

from kvpool import kernels
from kvpool.spec import AttentionKind, ModelCacheSpec
from kvpool.storage import HostArray, LayerKV, host_dtype

_MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def headroom_capacity(num_tokens: int, step: int = KVCache.step) -> int:
    """Rows to allocate for ``num_tokens``: rounded up past the count to a
    multiple of mlx-lm's KVCache step, so the next token does not reallocate."""
    return (num_tokens // step + 1) * step


class SlabStorage:
    """MLX slabs for ``num_blocks`` blocks of every layer of ``spec``."""

    def __init__(self, spec: ModelCacheSpec, num_blocks: int) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        dtype = _MX_DTYPES[spec.dtype]
        self.k: list[mx.array] = []
        self.v: list[mx.array] = []
        for layer in spec.layers:
            shape = (num_blocks, layer.n_kv_heads, spec.block_tokens)
            self.k.append(mx.zeros((*shape, layer.k_head_dim), dtype=dtype))
            self.v.append(mx.zeros((*shape, layer.v_head_dim), dtype=dtype))
        mx.eval(self.k, self.v)
        self._global = [i for i, s in enumerate(spec.layers) if s.kind is AttentionKind.GLOBAL]
        self._sliding = [i for i, s in enumerate(spec.layers) if s.kind is AttentionKind.SLIDING]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)

    def load(self, block_table: Sequence[int], num_tokens: int) -> list[Any]:
        table = list(block_table)
        caches: list[Any] = [None] * self.spec.n_layers
        if self._global:
            cap = headroom_capacity(num_tokens)
            slabs = [s for i in self._global for s in (self.k[i], self.v[i])]
            out = kernels.gather(slabs, table, 0, num_tokens, cap)
            for j, i in enumerate(self._global):
                cache = KVCache()
                cache.keys, cache.values, cache.offset = out[2 * j], out[2 * j + 1], num_tokens
                caches[i] = cache
        for i in self._sliding:
            window = self.spec.layers[i].window
            assert window is not None
            held = min(num_tokens, window)
            keys, values = kernels.gather(
                [self.k[i], self.v[i]], table, num_tokens - held, num_tokens, held
            )
            cache = RotatingKVCache(max_size=window, keep=0)
            cache.keys, cache.values = keys, values
            cache.offset, cache._idx = num_tokens, held
            caches[i] = cache
        mx.eval([a for c in caches for a in (c.keys, c.values)])
        return caches

    def store(self, caches: Sequence[Any], block_table: Sequence[int], start: int) -> int:
        table = list(block_table)
        valid_from = 0
        for i, cache in enumerate(caches):
            offset = int(cache.offset)
            # Global caches hold positions [0, offset) at rows 0..offset-1
            # (rows past offset are headroom); extracted sliding caches hold
            # the last rows in temporal order: positions [offset - held, offset).
            base = 0
            if self.spec.layers[i].kind is AttentionKind.SLIDING:
                base = offset - min(int(cache.keys.shape[2]), offset)
                valid_from = max(valid_from, base)
            first = max(start, base)
            if first >= offset:
                continue
            rows = slice(first - base, offset - base)
            self.k[i] = kernels.scatter(self.k[i], cache.keys[:, :, rows, :], table, first)
            self.v[i] = kernels.scatter(self.v[i], cache.values[:, :, rows, :], table, first)
        mx.eval(self.k, self.v)
        return valid_from

    def read_layers(
        self, block_table: Sequence[int], layers: Sequence[int], start: int, stop: int
    ) -> list[LayerKV]:
        if not layers:
            return []
        n = stop - start
        if n <= 0:
            return [LayerKV(i, start, *self._empty_host(i)) for i in layers]
        slabs = [s for i in layers for s in (self.k[i], self.v[i])]
        out = kernels.gather(slabs, list(block_table), start, stop, n)
        if self.spec.dtype == "bfloat16":  # numpy has no bfloat16: hand out its bits
            out = [a.view(mx.uint16) for a in out]
        mx.eval(out)
        # np.asarray shares the gathered buffers (no copy); [0] drops the batch axis.
        host = [np.asarray(a)[0] for a in out]
        return [LayerKV(i, start, host[2 * j], host[2 * j + 1]) for j, i in enumerate(layers)]

    def write_layers(self, block_table: Sequence[int], kvs: Sequence[LayerKV]) -> None:
        table = list(block_table)
        for kv in kvs:
            if kv.num_tokens == 0:
                continue
            i = kv.layer
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
