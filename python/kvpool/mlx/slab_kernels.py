"""How slabs are read and written: the C++ kernels on the CPU, or MLX operations on any device.

A :class:`SlabKernels` moves rows between a layer's block slabs and the contiguous caches
mlx-lm consumes. Both implementations take the same arguments and give the same bits:

* :class:`ExtensionKernels` -- kvpool's C++ primitives (``kvpool._kernels``), multi-threaded
  memcpy on a CPU stream. The default where the model runs on the CPU.
* :class:`PortableKernels` -- MLX's own ``gather`` and in-place ``scatter`` (``slab[i] = x``)
  on the default stream, so on a GPU the slabs stay in device memory and every copy runs on
  the GPU. The default where the model runs on a GPU (CUDA or Metal). Checked bit for bit
  against the C++ kernels on the CPU device (tests/integration/test_slab_kernels.py).

Dense slab layout (both): ``[num_blocks, n_kv_heads, block_tokens, head_dim]``; a quantized
slab is the ``(codes, scales, biases)`` of ``mx.quantize`` of such a slab. Portable slabs carry
one more block, the *zero block* (index ``num_blocks``, never allocated by the manager,
never written): headroom rows of a gather read it, so one MLX gather fills a whole cache::

    positions   start .. stop-1 | stop .. start+capacity-1
    (block, slot) from table     | (zero block, 0)  -> rows of zeros

so a gather is one device kernel per slab. A scatter is one in-place update per block run
(positions in one block, or whole blocks of consecutive ids): an end-of-turn store of a few
rows is one slice update per slab, with no index arrays.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import mlx.core as mx
import numpy as np
import numpy.typing as npt

from kvpool import _kernels
from kvpool.errors import InvalidRequestError

QuantizedSlab = tuple[mx.array, mx.array, mx.array]
"""(codes, scales, biases) of one layer's K or V."""

IndexArray = npt.NDArray[np.int32]


class SlabKernels(Protocol):
    """Gather and scatter between slabs and caches (see the module docstring for layouts).

    Position ``p`` of a layer lives in block ``table[p // block_tokens]``, slot
    ``p % block_tokens``. Gathers return ``[1, H, capacity, D]`` arrays, row ``t`` holding
    position ``start + t`` for ``t < stop - start`` and zero past that. Scatters write
    ``rows`` (``[1, H, T, D]``) as positions ``[first, first + T)`` and return the updated
    slab: the caller rebinds its only reference to it (``slab = kernels.scatter(slab, ...)``)
    so the write lands in place.
    """

    name: str
    extra_blocks: int  # blocks a slab holds past the manager's (the zero block)

    def gather(
        self,
        slabs: Sequence[mx.array],
        table: Sequence[int],
        start: int,
        stop: int,
        capacity: int,
    ) -> list[mx.array]:
        """Rows of each slab, any dtype (float caches, uint32 codes, scales, biases)."""
        ...

    def scatter(
        self, slab: mx.array, rows: mx.array, table: Sequence[int], first: int
    ) -> mx.array: ...

    def gather_dequantized(
        self,
        slabs: Sequence[QuantizedSlab],
        table: Sequence[int],
        start: int,
        stop: int,
        capacity: int,
        *,
        bits: int,
        group_size: int,
    ) -> list[mx.array]:
        """Dense caches in the scales' dtype, equal to ``mx.dequantize`` of the rows."""
        ...

    def scatter_quantized(
        self,
        slab: QuantizedSlab,
        rows: mx.array,
        table: Sequence[int],
        first: int,
        *,
        bits: int,
        group_size: int,
    ) -> QuantizedSlab:
        """Writes what ``mx.quantize(rows, group_size, bits)`` makes of the rows."""
        ...


class ExtensionKernels:
    """kvpool's C++ kernels (``kvpool._kernels``): CPU streams only."""

    name = "cpu-extension"
    extra_blocks = 0

    def gather(
        self,
        slabs: Sequence[mx.array],
        table: Sequence[int],
        start: int,
        stop: int,
        capacity: int,
    ) -> list[mx.array]:
        # The C++ gather copies float rows: other dtypes of 4 bytes go through as float32 bits.
        views = [s.view(mx.float32) if s.dtype == mx.uint32 else s for s in slabs]
        out = _kernels.gather(list(views), list(table), start, stop, capacity)
        return [
            o.view(mx.uint32) if s.dtype == mx.uint32 else o
            for o, s in zip(out, slabs, strict=True)
        ]

    def scatter(self, slab: mx.array, rows: mx.array, table: Sequence[int], first: int) -> mx.array:
        return _kernels.scatter(slab, rows, list(table), first)

    def gather_dequantized(
        self,
        slabs: Sequence[QuantizedSlab],
        table: Sequence[int],
        start: int,
        stop: int,
        capacity: int,
        *,
        bits: int,
        group_size: int,
    ) -> list[mx.array]:
        return _kernels.gather_dequantized(
            list(slabs), list(table), start, stop, capacity, bits=bits, group_size=group_size
        )

    def scatter_quantized(
        self,
        slab: QuantizedSlab,
        rows: mx.array,
        table: Sequence[int],
        first: int,
        *,
        bits: int,
        group_size: int,
    ) -> QuantizedSlab:
        codes, scales, biases = _kernels.scatter_quantized(
            slab, rows, list(table), first, bits=bits, group_size=group_size
        )
        return codes, scales, biases


def blocks_of(
    table: Sequence[int], start: int, stop: int, *, block_tokens: int, zero_block: int, op: str
) -> npt.NDArray[np.int64]:
    """The block of each position in ``[start, stop)``, checked against the table and slab.

    Raises ValueError ``"[kvpool::<op>] ..."`` (with the numbers) on a short table or an id
    outside ``[0, zero_block)``.
    """
    if start < 0 or stop < start:
        raise ValueError(
            f"[kvpool::{op}] need 0 <= start <= stop. Received start {start}, stop {stop}."
        )
    ids = np.asarray(table, dtype=np.int64)
    need = -(-stop // block_tokens) if stop > start else 0
    if len(ids) < need:
        raise ValueError(
            f"[kvpool::{op}] positions up to {stop} need {need} table entries. Received {len(ids)}."
        )
    used = ids[np.arange(start, stop, dtype=np.int64) // block_tokens]
    bad = used[(used < 0) | (used >= zero_block)]
    if len(bad):
        raise ValueError(
            f"[kvpool::{op}] block id {int(bad[0])} out of range for a slab of {zero_block} blocks."
        )
    return used


class RowIndex:
    """Index arrays that address positions ``[start, start + capacity)`` of a block table.

    ``blocks`` and ``slots`` are ``[1, capacity]``; positions at or past ``stop`` address
    the zero block (``zero_block``, slot 0). Built on the host once per table and shared
    by every layer of a group.
    """

    __slots__ = ("blocks", "capacity", "slots")

    def __init__(
        self,
        table: Sequence[int],
        start: int,
        stop: int,
        capacity: int,
        *,
        block_tokens: int,
        zero_block: int,
        op: str,
    ) -> None:
        used = blocks_of(
            table, start, stop, block_tokens=block_tokens, zero_block=zero_block, op=op
        )
        n = stop - start
        if capacity < n:
            raise ValueError(f"[kvpool::{op}] capacity {capacity} is less than stop - start = {n}.")
        blocks = np.full(capacity, zero_block, dtype=np.int32)
        slots = np.zeros(capacity, dtype=np.int32)
        blocks[:n] = used
        slots[:n] = np.arange(start, stop) % block_tokens
        self.capacity = capacity
        self.blocks = mx.array(blocks[None])
        self.slots = mx.array(slots[None])


@dataclass(frozen=True, slots=True)
class ScatterPlan:
    """Where a scatter's rows go, relative to its first row.

    ``runs``: ``(lo, hi, block, slot)``: rows ``[lo, hi)`` land in ``block`` from ``slot``
    on (inside one block), or, when ``slot == 0`` and ``hi - lo`` spans several blocks,
    in whole blocks ``block, block + 1, ...`` (consecutive ids): one slice update each.
    ``indexed``: ``(lo, hi, block_ids)``: whole blocks whose ids are not one consecutive
    run, written by one block-indexed update.
    """

    runs: tuple[tuple[int, int, int, int], ...]
    indexed: tuple[int, int, mx.array] | None


@functools.lru_cache(maxsize=16)
def _heads(n: int) -> mx.array:
    """``[n, 1]`` head indices (made once per head count)."""
    return mx.arange(n, dtype=mx.int32)[:, None]


class PortableKernels:
    """MLX operations on the default stream: one ``gather`` or in-place ``scatter`` per slab.

    Runs on any MLX device; on a GPU nothing leaves device memory. A gather is
    ``slab[blocks, heads, slots]``; a scatter is slice updates (``slab[b : b + k, :, s0 : s1]
    = rows``) and, for whole blocks of scattered ids, one ``slab[block_ids] = rows``. MLX
    evaluates them in place when the slab is donatable (the caller holds its only
    reference), as for the C++ scatter.
    """

    name = "mlx-portable"
    extra_blocks = 1
    MAX_PLANS = 8

    def __init__(self) -> None:
        self._plans: dict[tuple[Any, ...], ScatterPlan] = {}

    def _index(
        self,
        slab: mx.array,
        table: Sequence[int],
        start: int,
        stop: int,
        capacity: int,
        op: str,
    ) -> RowIndex:
        if slab.ndim != 4:
            raise ValueError(f"[kvpool::{op}] slabs must be 4-D. Received shape {slab.shape}.")
        return RowIndex(
            table,
            start,
            stop,
            capacity,
            block_tokens=slab.shape[2],
            zero_block=slab.shape[0] - 1,
            op=op,
        )

    def _take(self, slab: mx.array, index: RowIndex) -> mx.array:
        """``[1, H, capacity, D]`` rows of ``slab`` (one MLX gather, contiguous)."""
        return slab[index.blocks, _heads(slab.shape[1]), index.slots][None]

    def gather(
        self,
        slabs: Sequence[mx.array],
        table: Sequence[int],
        start: int,
        stop: int,
        capacity: int,
    ) -> list[mx.array]:
        if not slabs:
            return []
        index = self._index(slabs[0], table, start, stop, capacity, "gather")
        return [self._take(s, index) for s in slabs]

    def scatter(self, slab: mx.array, rows: mx.array, table: Sequence[int], first: int) -> mx.array:
        """Basic-indexed slice updates where the rows go to one block or to consecutive
        block ids (an end-of-turn store's few rows: one update per slab); whole blocks of
        scattered ids in one block-indexed update. Each is in place when the slab is
        donatable, and no index array is built for a slice update."""
        n = rows.shape[2]
        if n == 0:
            return slab
        if rows.ndim != 4 or rows.shape[1] != slab.shape[1] or rows.shape[3] != slab.shape[3]:
            raise ValueError(
                f"[kvpool::scatter] rows must be [1, {slab.shape[1]}, T, {slab.shape[3]}]. "
                f"Received shape {rows.shape}."
            )
        plan = self._scatter_plan(slab, table, first, n)
        heads, size, dim = slab.shape[1], slab.shape[2], slab.shape[3]
        for lo, hi, block, slot in plan.runs:
            part = rows if hi - lo == n else rows[:, :, lo:hi, :]
            if slot + hi - lo <= size:
                slab[block : block + 1, :, slot : slot + hi - lo, :] = part
            else:
                k = (hi - lo) // size
                slab[block : block + k] = part.reshape(heads, k, size, dim).transpose(1, 0, 2, 3)
        if plan.indexed is not None:
            lo, hi, block_ids = plan.indexed
            whole = rows[:, :, lo:hi, :].reshape(heads, -1, size, dim)  # [1, H, ..]: no squeeze
            slab[block_ids] = whole.transpose(1, 0, 2, 3)
        return slab

    def _scatter_plan(
        self, slab: mx.array, table: Sequence[int], first: int, n: int
    ) -> ScatterPlan:
        """The updates of a scatter (checked against the table and slab once), reused by the
        next slabs of the same call pattern (every layer of a group writes the same positions
        through the same table)."""
        size, zero_block = slab.shape[2], slab.shape[0] - 1
        key = (tuple(table), first, n, size, zero_block)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        stop = first + n
        used = blocks_of(table, first, stop, block_tokens=size, zero_block=zero_block, op="scatter")
        # one (lo, hi, block, slot) per block touched, rows relative to first
        pieces = []
        for j in range(first // size, (stop - 1) // size + 1):
            lo, hi = max(first, j * size), min(stop, (j + 1) * size)
            pieces.append((lo - first, hi - first, int(used[lo - first]), lo - j * size))
        whole = [p for p in pieces if p[1] - p[0] == size]
        runs = [p for p in pieces if p[1] - p[0] < size]
        indexed = None
        if whole:
            ids = [p[2] for p in whole]
            if ids == list(range(ids[0], ids[0] + len(ids))):
                runs.append((whole[0][0], whole[-1][1], ids[0], 0))
            else:
                indexed = (whole[0][0], whole[-1][1], mx.array(ids, dtype=mx.int32))
        plan = ScatterPlan(tuple(runs), indexed)
        if len(self._plans) >= self.MAX_PLANS:
            self._plans.pop(next(iter(self._plans)))
        self._plans[key] = plan
        return plan

    def gather_dequantized(
        self,
        slabs: Sequence[QuantizedSlab],
        table: Sequence[int],
        start: int,
        stop: int,
        capacity: int,
        *,
        bits: int,
        group_size: int,
    ) -> list[mx.array]:
        if not slabs:
            return []
        index = self._index(slabs[0][0], table, start, stop, capacity, "gather_dequantized")
        return [
            mx.dequantize(
                self._take(codes, index),
                self._take(scales, index),
                self._take(biases, index),
                group_size=group_size,
                bits=bits,
            )
            for codes, scales, biases in slabs
        ]

    def scatter_quantized(
        self,
        slab: QuantizedSlab,
        rows: mx.array,
        table: Sequence[int],
        first: int,
        *,
        bits: int,
        group_size: int,
    ) -> QuantizedSlab:
        if rows.shape[2] == 0:
            return slab
        codes, scales, biases = mx.quantize(rows, group_size=group_size, bits=bits)
        return (
            self.scatter(slab[0], codes, table, first),
            self.scatter(slab[1], scales, table, first),
            self.scatter(slab[2], biases, table, first),
        )


_CUDA_GATHER_SOURCE = """
    // One thread copies 16 bytes of one row: out[0, h, p, :] = slab[blocks[p], h, slots[p], :].
    const unsigned long long i = cooperative_groups::this_grid().thread_rank();
    const long long heads = params[0], block_tokens = params[1], rows = params[2];
    const long long row_vecs = params[3];  // 16-byte vectors per row
    if (i >= (unsigned long long)(heads * rows * row_vecs)) return;
    const long long c = i % row_vecs;
    const long long r = i / row_vecs;
    const long long p = r % rows;
    const long long h = r / rows;
    const long long src_row = ((long long)blocks[p] * heads + h) * block_tokens + slots[p];
    const uint4* src = reinterpret_cast<const uint4*>(slab) + src_row * row_vecs;
    uint4* dst = reinterpret_cast<uint4*>(out) + r * row_vecs;
    dst[c] = src[c];
"""


class CudaGatherKernels(PortableKernels):
    """:class:`PortableKernels` with the gather as one run-time compiled CUDA kernel per slab.

    A 16-byte vector copy per thread straight from the blocks into the cache (headroom from
    the zero block), where MLX's general gather computes an index per element. Rows whose
    size is not a multiple of 16 bytes (the scales of quantized slabs) use MLX's gather.
    The default on CUDA; ``bench/gpu/device_check.py gather`` checks it bit for bit against
    :class:`PortableKernels` and times both.
    """

    name = "cuda-gather"

    def __init__(self) -> None:
        super().__init__()
        self._kernel: Callable[..., list[mx.array]] = mx.fast.cuda_kernel(  # type: ignore[assignment]
            name="kvpool_gather_rows",
            input_names=["slab", "blocks", "slots", "params"],
            output_names=["out"],
            source=_CUDA_GATHER_SOURCE,
        )

    def _take(self, slab: mx.array, index: RowIndex) -> mx.array:
        row_bytes = slab.shape[3] * slab.itemsize
        if row_bytes % 16:
            return super()._take(slab, index)
        heads, rows = slab.shape[1], index.capacity
        vecs = row_bytes // 16
        params = mx.array([heads, slab.shape[2], rows, vecs], dtype=mx.int64)
        threads = heads * rows * vecs
        (out,) = self._kernel(
            inputs=[slab, index.blocks, index.slots, params],
            grid=(max(threads, 1), 1, 1),
            threadgroup=(256, 1, 1),
            output_shapes=[(1, heads, rows, slab.shape[3])],
            output_dtypes=[slab.dtype],
        )
        return out


KERNELS: dict[str, type[ExtensionKernels] | type[PortableKernels]] = {
    ExtensionKernels.name: ExtensionKernels,
    PortableKernels.name: PortableKernels,
    CudaGatherKernels.name: CudaGatherKernels,
}
"""Every implementation by name."""

KERNELS_ENV = "KVPOOL_SLAB_KERNELS"
"""Names the kernels to use instead of the device's default (one of :data:`KERNELS`)."""


def default_kernels(device: mx.Device | None = None) -> SlabKernels:
    """The kernels for slabs on ``device`` (default: MLX's default device).

    CPU: the C++ kernels. GPU: MLX operations on the GPU stream, so slabs stay in device
    memory (the C++ kernels have no GPU code: on a GPU they would pull every slab through
    host memory); on CUDA the gather is kvpool's own kernel (:class:`CudaGatherKernels`,
    run and checked bit for bit against the portable gather on an H200). Metal gets the
    portable operations: no custom Metal kernel has been run on Apple hardware.
    ``KVPOOL_SLAB_KERNELS`` names other kernels (the C++ ones are refused for a GPU).
    """
    device = device or mx.default_device()
    on_cpu = device.type == mx.DeviceType.cpu
    name = os.environ.get(KERNELS_ENV, "").strip()
    if not name:
        if on_cpu:
            return ExtensionKernels()
        return CudaGatherKernels() if mx.cuda.is_available() else PortableKernels()
    if name not in KERNELS:
        raise InvalidRequestError(
            f"{KERNELS_ENV}={name!r} names no slab kernels; choose one of {sorted(KERNELS)}"
        )
    if name == ExtensionKernels.name and not on_cpu:
        raise InvalidRequestError(
            f"{KERNELS_ENV}={name!r} runs on the CPU only; the default device is {device}"
        )
    return KERNELS[name]()


def device_report() -> dict[str, str]:
    """Where a pool made now would keep its slabs, and which kernels would move them."""
    device = mx.default_device()
    kernels = default_kernels(device)
    on_cpu = device.type == mx.DeviceType.cpu
    if on_cpu:
        location = "host memory (MLX CPU device)"
    elif mx.cuda.is_available():
        location = "GPU device memory (MLX CUDA backend)"
    else:
        location = "GPU memory (MLX Metal backend, unified)"
    return {
        "device": str(device),
        "slab_location": location,
        "slab_kernels": kernels.name,
        "custom_gpu_kernels": (
            "n/a"
            if on_cpu
            else "CUDA gather on"
            if kernels.name == CudaGatherKernels.name
            else "off (MLX gather/scatter on the GPU stream)"
        ),
    }
