"""The pool's K/V bytes as preallocated MLX slabs per layer: one class per block format.

Each layer ``l`` has a K slab and a V slab; block id ``b`` is ``slab[b]`` in every layer of
its group. :class:`DenseSlabStorage` holds one ``[num_blocks, n_kv_heads, block_tokens,
head_dim]`` array of the cache dtype per slab; :class:`QuantizedSlabStorage` (``spec.kv_bits``
8 or 4) holds the three arrays of ``mx.quantize`` (see :mod:`kvpool.mlx.kernels`)::

    codes   [num_blocks, n_kv_heads, block_tokens, head_dim * bits // 32]   uint32
    scales  [num_blocks, n_kv_heads, block_tokens, head_dim // group_size]  cache dtype
    biases  like scales

so a 4-bit pool of a byte budget really holds about 3.5x the tokens. Loads dequantize inside
the gather into dense per-layer caches; stores quantize inside the scatter.
:func:`make_slab_storage` chooses the class once from the spec's format.

Where the slabs live follows the model: slabs are allocated on MLX's default device and read
and written by :class:`~kvpool.mlx.slab_kernels.SlabKernels` (the C++ kernels on a CPU, MLX
operations on the GPU stream on a GPU). Writes land in place: the storage keeps the only
reference to each slab array and rebinds it to the scatter's output
(``self.k[l] = kernels.scatter(self.k[l], ...)``), so MLX donates the buffer instead of
copying the slab. Host copies (persistence, the Redis tier) happen only in ``read_*`` and
``write_*``, a few layers at a time.

A pool whose budget moves between layer groups resizes them (:meth:`SlabStorage.resize`):
any thread may ask, and the slabs change at the start of the next K/V call, on the thread
that runs MLX. Kept blocks keep their rows, and blocks the pool moved down from the ids taken
away (:meth:`~kvpool.cache.manager.KVCacheManager.resize_group`) get theirs; the copy is
one slab at a time, so the peak is the pool plus one layer's slab.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import mlx.core as mx
import numpy as np

from kvpool.cache.spec import AttentionKind, ModelCacheSpec
from kvpool.cache.storage import (
    HostArray,
    LayerCodes,
    LayerKV,
    LayerState,
    QuantizedRows,
    first_writable,
    host_dtype,
)
from kvpool.errors import InvalidRequestError
from kvpool.mlx import kernels as cpu_kernels
from kvpool.mlx.dtypes import mx_dtype
from kvpool.mlx.mlx_lm import (
    KV_CACHE_STEP,
    arrays_cache,
    cache_states,
    is_arrays_cache,
    kv_cache,
    rotating_cache,
)
from kvpool.mlx.slab_kernels import QuantizedSlab, SlabKernels, default_kernels


def headroom_capacity(num_tokens: int, step: int = KV_CACHE_STEP) -> int:
    """Rows to allocate for ``num_tokens``: rounded up past the count to a
    multiple of mlx-lm's KVCache step, so the next token does not reallocate."""
    return (num_tokens // step + 1) * step


def _pad_front(array: mx.array) -> mx.array:
    """``[1, H, T, D]`` -> ``[1, H, T + 1, D]`` with a zero row in front."""
    zero = mx.zeros((*array.shape[:2], 1, array.shape[3]), dtype=array.dtype)
    return mx.concatenate([zero, array], axis=2)


def resized_slab(
    slab: mx.array, num_blocks: int, extra: int, moves: Mapping[int, int] | None = None
) -> mx.array:
    """``slab`` (``num_blocks`` of ``slab.shape[0] - extra`` blocks kept, then ``extra``
    zero blocks) with ``num_blocks`` blocks: a copy, so a shrunk slab's old buffer goes.
    Rows of added blocks are zero. ``moves`` (old -> new, a shrink only, every new id
    below ``num_blocks``): block ``new`` of the result holds block ``old``'s rows."""
    old = slab.shape[0] - extra
    if moves:
        if num_blocks >= old or max(moves.values()) >= num_blocks:
            raise InvalidRequestError(f"moves {dict(moves)} in a resize {old} -> {num_blocks}")
        rows = list(range(num_blocks))
        for src, dst in moves.items():
            rows[dst] = src
        kept = mx.take(slab, mx.array(rows, dtype=mx.int32), axis=0)
        zeros = mx.zeros((extra, *slab.shape[1:]), slab.dtype)
        return mx.concatenate([kept, zeros]) if extra else kept
    if num_blocks >= old:  # the old zero blocks become ordinary ones
        pad = mx.zeros((num_blocks - old, *slab.shape[1:]), slab.dtype)
        return mx.concatenate([slab, pad]) if num_blocks > old else slab
    zeros = mx.zeros((extra, *slab.shape[1:]), slab.dtype)
    return mx.concatenate([slab[:num_blocks], zeros]) if extra else mx.contiguous(slab[:num_blocks])


def _to_host(arrays: list[mx.array]) -> list[HostArray]:
    """``[1, H, T, D]`` arrays -> ``[H, T, D]`` numpy arrays (the explicit host copy).

    bfloat16 comes as its uint16 bits (numpy has no bfloat16). On the CPU the numpy
    arrays share the evaluated buffers; on a GPU this is where bytes leave the device.
    """
    arrays = [a.view(mx.uint16) if a.dtype == mx.bfloat16 else a for a in arrays]
    mx.eval(arrays)
    return [np.asarray(a)[0] for a in arrays]


class SlabStorage(ABC):
    """MLX slabs for ``blocks_per_group[g]`` blocks of every layer of group ``g`` of ``spec``.

    Subclasses hold the slabs of one block format and say how rows go in and out of them;
    this class turns block tables into per-layer caches and back.
    """

    def __init__(
        self, spec: ModelCacheSpec, blocks_per_group: Sequence[int], kernels: SlabKernels
    ) -> None:
        self.spec = spec
        self.format = spec.format
        self.blocks_per_group = tuple(blocks_per_group)
        self.kernels = kernels
        self._resize_lock = threading.Lock()
        # resize() calls not carried out yet: (blocks per group, moves per group)
        self._pending: list[tuple[tuple[int, ...], tuple[dict[int, int], ...]]] = []
        self._dtype = mx_dtype(spec.dtype)
        self._group_of_layer = spec.group_of_layer()
        self._groups = spec.groups
        # Recurrent layers: one slab [num_blocks, *shape] per state array; block b is
        # one state (dense, in the state's own dtype, whatever the K/V format).
        self.states: list[list[mx.array]] = [
            [
                mx.zeros(
                    (self.blocks_per_group[self._group_of_layer[i]], *a.shape), mx_dtype(a.dtype)
                )
                for a in layer.states
            ]
            for i, layer in enumerate(spec.layers)
        ]

    def resize(
        self, blocks_per_group: Sequence[int], moves: Sequence[Mapping[int, int]] = ()
    ) -> None:
        """Hold ``blocks_per_group[g]`` blocks in group ``g`` from the next K/V call on,
        block ``new`` of group ``g`` holding block ``old``'s rows for each ``old -> new``
        of ``moves[g]`` (see :meth:`KVStorage.resize`).

        No MLX work here, so any thread may ask (the pool does, under its lock, when its
        budget moves); the slabs are copied at the start of the next K/V call, every
        resize asked since in turn. Blocks below both sizes keep their rows; added ones
        are zero; removed ones must be free.
        """
        wanted = tuple(blocks_per_group)
        if len(wanted) != len(self._groups) or min(wanted) < 1:
            raise InvalidRequestError(f"resize: {wanted} for {len(self._groups)} layer groups")
        moved = tuple(dict(m) for m in moves) or tuple({} for _ in wanted)
        if len(moved) != len(wanted):
            raise InvalidRequestError(f"resize: moves for {len(moved)} of {len(wanted)} groups")
        with self._resize_lock:
            self._pending.append((wanted, moved))

    def _sync(self) -> None:
        """Carry out the pending :meth:`resize` calls, oldest first (on the thread that
        runs MLX)."""
        with self._resize_lock:
            pending, self._pending = self._pending, []
        for wanted, moves in pending:
            old = self.blocks_per_group
            for i in range(self.spec.n_layers):
                g = self._group_of_layer[i]
                if wanted[g] == old[g] and not moves[g]:
                    continue
                change = partial(resized_slab, num_blocks=wanted[g], moves=moves[g])
                self.states[i] = [change(a, extra=0) for a in self.states[i]]
                if not self._is_recurrent(i):
                    self._resize_layer(i, partial(change, extra=self.kernels.extra_blocks))
                self._eval_slabs([i])
            self.blocks_per_group = wanted

    @abstractmethod
    def _resize_layer(self, i: int, resize: Callable[[mx.array], mx.array]) -> None:
        """Replace each K/V slab array ``a`` of layer ``i`` by ``resize(a)``."""

    def _is_recurrent(self, i: int) -> bool:
        return self.spec.layers[i].kind is AttentionKind.RECURRENT

    @property
    def state_nbytes(self) -> int:
        """Bytes of the recurrent state slabs."""
        return sum(a.nbytes for slabs in self.states for a in slabs)

    def _slab_shape(self, i: int) -> tuple[int, int, int]:
        """``(num_blocks, n_kv_heads, block_tokens)`` of layer ``i``'s slabs."""
        num_blocks = self.blocks_per_group[self._group_of_layer[i]] + self.kernels.extra_blocks
        return (num_blocks, self.spec.layers[i].n_kv_heads, self.spec.block_tokens)

    @property
    def device(self) -> mx.Device:
        """Where the slabs live (MLX's default device when they were allocated)."""
        return self._device

    @property
    @abstractmethod
    def nbytes(self) -> int: ...

    @abstractmethod
    def _gather(
        self, layers: Sequence[int], table: list[int], start: int, stop: int, capacity: int
    ) -> list[mx.array]:
        """K and V of each of ``layers`` (one group), dense, ``[1, H, capacity, D]`` each:
        ``[k0, v0, k1, v1, ...]``."""

    @abstractmethod
    def _scatter(
        self, i: int, keys: mx.array, values: mx.array, table: list[int], first: int
    ) -> None:
        """Write dense rows ``[1, H, T, D]`` at positions ``first..`` of layer ``i`` (lazy)."""

    @abstractmethod
    def _slabs(self, layers: Sequence[int] | None = None) -> list[Any]:
        """The slab arrays of ``layers`` (all when None), to evaluate."""

    def _eval_slabs(self, layers: Sequence[int] | None = None) -> None:
        chosen = range(self.spec.n_layers) if layers is None else layers
        mx.eval(self._slabs(layers), [self.states[i] for i in chosen])

    def _finish_init(self) -> None:
        self._eval_slabs()
        self._device = mx.default_device()

    def load(self, tables: Sequence[Sequence[int]], num_tokens: int) -> list[Any]:
        self._sync()
        caches: list[Any] = [None] * self.spec.n_layers
        for g, group in enumerate(self._groups):
            table = list(tables[g])
            if group.kind is AttentionKind.RECURRENT:
                # the state after num_tokens tokens: a copy (the slab may be rewritten)
                block = mx.array([table[(num_tokens - 1) // self.spec.block_tokens]])
                for i in group.layers:
                    caches[i] = arrays_cache([mx.take(a, block, axis=0) for a in self.states[i]])
                continue
            if group.window is None:
                out = self._gather(
                    group.layers, table, 0, num_tokens, headroom_capacity(num_tokens)
                )
                for j, i in enumerate(group.layers):
                    caches[i] = kv_cache(out[2 * j], out[2 * j + 1], num_tokens)
                continue
            held = min(num_tokens, group.window - 1)
            out = self._gather(group.layers, table, num_tokens - held, num_tokens, held)
            if num_tokens >= group.window:
                # mlx-lm's RotatingKVCache is full (window rows) once offset >= window.
                # Row 0 stands for position num_tokens - window, which no later query
                # attends: the next token overwrites it (or the next prefill trims it).
                out = [_pad_front(a) for a in out]
            for j, i in enumerate(group.layers):
                caches[i] = rotating_cache(out[2 * j], out[2 * j + 1], num_tokens, group.window)
        mx.eval([cache_states(c) if is_arrays_cache(c) else [c.keys, c.values] for c in caches])
        return caches

    def store(
        self, caches: Sequence[Any], tables: Sequence[Sequence[int]], start: int
    ) -> tuple[int, ...]:
        self._sync()
        written_from = [start] * len(self._groups)
        for i, cache in enumerate(caches):
            g = self._group_of_layer[i]
            table = list(tables[g])
            if self._is_recurrent(i):
                written_from[g] = max(written_from[g], self._store_state(i, cache, table, start))
                continue
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
            self._scatter(i, cache.keys[:, :, rows, :], cache.values[:, :, rows, :], table, first)
        self._eval_slabs()
        return tuple(written_from)

    def _store_state(self, i: int, cache: Any, table: list[int], start: int) -> int:
        """Write recurrent layer ``i``'s state into the table's last entry (the state at the
        sequence's end) unless that entry is NULL or before ``start`` (a shared snapshot).
        Returns the first position the write stands for (``len(table) * B`` if none)."""
        size = self.spec.block_tokens
        j = len(table) - 1
        if j < 0 or table[j] < 0 or j * size < start:
            return len(table) * size
        arrays = cache_states(cache)
        slabs = self.states[i]
        if len(arrays) != len(slabs) or any(a is None for a in arrays):
            raise InvalidRequestError(
                f"layer {i}: a state of {len(arrays)} arrays for {len(slabs)} slabs (or unset)"
            )
        block = table[j]
        for e, state in enumerate(arrays):
            slab = slabs[e]
            if tuple(state.shape[1:]) != tuple(slab.shape[1:]) or state.shape[0] != 1:
                raise InvalidRequestError(
                    f"layer {i}: state {e} has shape {tuple(state.shape)}, "
                    f"expected (1, {', '.join(map(str, slab.shape[1:]))})"
                )
            slab[block : block + 1] = state.astype(slab.dtype)  # in place: the only reference
        return j * size

    def read_states(
        self, tables: Sequence[Sequence[int]], layers: Sequence[int], num_tokens: int
    ) -> list[LayerState]:
        self._sync()
        out = []
        j = (num_tokens - 1) // self.spec.block_tokens
        for i in layers:
            block = mx.array([tables[self._group_of_layer[i]][j]])
            arrays = _to_host([mx.take(a, block, axis=0) for a in self.states[i]])
            out.append(LayerState(i, num_tokens, tuple(np.ascontiguousarray(a) for a in arrays)))
        return out

    def write_states(self, tables: Sequence[Sequence[int]], states: Sequence[LayerState]) -> None:
        self._sync()
        size = self.spec.block_tokens
        for state in states:
            i = state.layer
            block = tables[self._group_of_layer[i]][(state.num_tokens - 1) // size]
            for slab, host in zip(self.states[i], state.arrays, strict=True):
                slab[block : block + 1] = self._to_device(host).astype(slab.dtype)
            self._eval_slabs([i])

    def read_layers(
        self, tables: Sequence[Sequence[int]], layers: Sequence[int], start: int, stop: int
    ) -> list[LayerKV]:
        self._sync()
        if not layers:
            return []
        n = stop - start
        if n <= 0:
            return [LayerKV(i, start, *self._empty_host(i)) for i in layers]
        by_layer: dict[int, tuple[mx.array, mx.array]] = {}
        for g in sorted({self._group_of_layer[i] for i in layers}):
            mine = [i for i in layers if self._group_of_layer[i] == g]
            got = self._gather(mine, list(tables[g]), start, stop, n)
            by_layer.update((i, (got[2 * j], got[2 * j + 1])) for j, i in enumerate(mine))
        host = _to_host([a for i in layers for a in by_layer[i]])
        return [LayerKV(i, start, host[2 * j], host[2 * j + 1]) for j, i in enumerate(layers)]

    def write_layers(self, tables: Sequence[Sequence[int]], kvs: Sequence[LayerKV]) -> None:
        self._sync()
        for kv in kvs:
            if kv.num_tokens == 0:
                continue
            i = kv.layer
            table = list(tables[self._group_of_layer[i]])
            keys, values = self._to_device(kv.keys), self._to_device(kv.values)
            self._scatter(i, keys, values, table, kv.start)
            del keys, values
            self._eval_slabs([i])

    def read_codes(
        self, tables: Sequence[Sequence[int]], layers: Sequence[int], start: int, stop: int
    ) -> list[LayerCodes]:
        raise InvalidRequestError(f"read_codes: the pool's blocks are dense ({self.format.name})")

    def write_codes(self, tables: Sequence[Sequence[int]], kvs: Sequence[LayerCodes]) -> None:
        raise InvalidRequestError(f"write_codes: the pool's blocks are dense ({self.format.name})")

    # -- host conversions --------------------------------------------------------

    def _to_device(self, host: HostArray) -> mx.array:
        """``[H, T, D]`` host array -> ``[1, H, T, D]`` array of the slab dtype (a copy);
        uint16 bits are bfloat16 (numpy has none)."""
        array = mx.array(host)[None]
        if array.dtype == mx.uint16:
            array = array.view(mx.bfloat16)
        return array

    def _empty_host(self, layer: int) -> tuple[HostArray, HostArray]:
        spec = self.spec.layers[layer]
        dtype = host_dtype(self.spec.dtype)
        return (
            np.empty((spec.n_kv_heads, 0, spec.k_head_dim), dtype),
            np.empty((spec.n_kv_heads, 0, spec.v_head_dim), dtype),
        )


class DenseSlabStorage(SlabStorage):
    """One K and one V array of the cache dtype per layer (``k[l]``, ``v[l]``)."""

    def __init__(
        self, spec: ModelCacheSpec, blocks_per_group: Sequence[int], kernels: SlabKernels
    ) -> None:
        super().__init__(spec, blocks_per_group, kernels)
        self.k: list[mx.array] = []
        self.v: list[mx.array] = []
        for i, layer in enumerate(spec.layers):
            shape = self._slab_shape(i) if not self._is_recurrent(i) else (0, 0, 0)
            self.k.append(mx.zeros((*shape, layer.k_head_dim), dtype=self._dtype))
            self.v.append(mx.zeros((*shape, layer.v_head_dim), dtype=self._dtype))
        self._finish_init()

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.k, *self.v)) + self.state_nbytes

    def _slabs(self, layers: Sequence[int] | None = None) -> list[Any]:
        chosen = range(len(self.k)) if layers is None else layers
        return [s for i in chosen for s in (self.k[i], self.v[i])]

    def _resize_layer(self, i: int, resize: Callable[[mx.array], mx.array]) -> None:
        self.k[i] = resize(self.k[i])
        self.v[i] = resize(self.v[i])

    def _gather(
        self, layers: Sequence[int], table: list[int], start: int, stop: int, capacity: int
    ) -> list[mx.array]:
        return self.kernels.gather(self._slabs(layers), table, start, stop, capacity)

    def _scatter(
        self, i: int, keys: mx.array, values: mx.array, table: list[int], first: int
    ) -> None:
        # Rebind so each slab array keeps one reference and the scatter writes in place.
        self.k[i] = self.kernels.scatter(self.k[i], keys, table, first)
        self.v[i] = self.kernels.scatter(self.v[i], values, table, first)


class QuantizedSlabStorage(SlabStorage):
    """One (codes, scales, biases) triple for K and one for V per layer (``qk[l]``, ``qv[l]``)."""

    def __init__(
        self, spec: ModelCacheSpec, blocks_per_group: Sequence[int], kernels: SlabKernels
    ) -> None:
        super().__init__(spec, blocks_per_group, kernels)
        self.bits = self.format.bits or 0
        self.group_size = self.format.group_size
        self.qk: list[QuantizedSlab] = []
        self.qv: list[QuantizedSlab] = []
        for i, layer in enumerate(spec.layers):
            if self._is_recurrent(i):  # no K/V: empty placeholders keep the lists by layer
                empty = mx.zeros((0,), dtype=mx.uint32)
                self.qk.append((empty, empty, empty))
                self.qv.append((empty, empty, empty))
                continue
            for slabs, dim in ((self.qk, layer.k_head_dim), (self.qv, layer.v_head_dim)):
                codes, scales = cpu_kernels.quantized_shapes(
                    *self._slab_shape(i), dim, bits=self.bits, group_size=self.group_size
                )
                slabs.append(
                    (
                        mx.zeros(codes, dtype=mx.uint32),
                        mx.zeros(scales, dtype=self._dtype),
                        mx.zeros(scales, dtype=self._dtype),
                    )
                )
        self._finish_init()

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for slab in (*self.qk, *self.qv) for a in slab) + self.state_nbytes

    def _slabs(self, layers: Sequence[int] | None = None) -> list[Any]:
        chosen = range(len(self.qk)) if layers is None else layers
        return [s for i in chosen for s in (self.qk[i], self.qv[i])]

    def _resize_layer(self, i: int, resize: Callable[[mx.array], mx.array]) -> None:
        k, v = self.qk[i], self.qv[i]
        self.qk[i] = (resize(k[0]), resize(k[1]), resize(k[2]))
        self.qv[i] = (resize(v[0]), resize(v[1]), resize(v[2]))

    def _gather(
        self, layers: Sequence[int], table: list[int], start: int, stop: int, capacity: int
    ) -> list[mx.array]:
        return self.kernels.gather_dequantized(
            self._slabs(layers),
            table,
            start,
            stop,
            capacity,
            bits=self.bits,
            group_size=self.group_size,
        )

    def _scatter(
        self, i: int, keys: mx.array, values: mx.array, table: list[int], first: int
    ) -> None:
        quantized = {"bits": self.bits, "group_size": self.group_size}
        self.qk[i] = self.kernels.scatter_quantized(self.qk[i], keys, table, first, **quantized)
        self.qv[i] = self.kernels.scatter_quantized(self.qv[i], values, table, first, **quantized)

    def read_codes(
        self, tables: Sequence[Sequence[int]], layers: Sequence[int], start: int, stop: int
    ) -> list[LayerCodes]:
        self._sync()
        n = max(stop - start, 0)
        out = []
        for i in layers:
            table = list(tables[self._group_of_layer[i]])
            parts = self.kernels.gather([*self.qk[i], *self.qv[i]], table, start, stop, n)
            host = _to_host(parts)
            out.append(LayerCodes(i, start, QuantizedRows(*host[:3]), QuantizedRows(*host[3:])))
        return out

    def write_codes(self, tables: Sequence[Sequence[int]], kvs: Sequence[LayerCodes]) -> None:
        self._sync()
        for kv in kvs:
            if kv.num_tokens == 0:
                continue
            i = kv.layer
            table = list(tables[self._group_of_layer[i]])
            for which, rows in ((self.qk, kv.keys), (self.qv, kv.values)):
                old = which[i]
                which[i] = (
                    self.kernels.scatter(old[0], mx.array(rows.codes)[None], table, kv.start),
                    self.kernels.scatter(old[1], self._to_device(rows.scales), table, kv.start),
                    self.kernels.scatter(old[2], self._to_device(rows.biases), table, kv.start),
                )
                del old  # the new tuple's scatters hold the only references: donated
            self._eval_slabs([i])


def make_slab_storage(
    spec: ModelCacheSpec, blocks_per_group: Sequence[int], kernels: SlabKernels | None = None
) -> SlabStorage:
    """The slab storage of ``spec``'s block format, on MLX's default device.

    ``kernels`` defaults to :func:`~kvpool.mlx.slab_kernels.default_kernels` of that device.
    """
    kernels = kernels or default_kernels()
    if spec.format.is_quantized:
        return QuantizedSlabStorage(spec, blocks_per_group, kernels)
    return DenseSlabStorage(spec, blocks_per_group, kernels)
