"""Reconstruct: rebuild an agent's contiguous KV caches from pool blocks.

EXP-006: gathers 32 blocks x 48 layers (K and V, 8 KV heads, head_dim 128, float16:
1.5 GiB) out of [64, 8, 256, 128] slabs with one ``_kernels.gather`` call, and
compares, in the same run, with

* memcpy: numpy copying a buffer of the same size (the physical limit), and
* concatenate: the usual way, 32 separate (1, 8, 256, 128) arrays per layer
  and K/V joined by ``mx.concatenate`` along the token axis.

Targets: >= 2x faster than concatenate, >= 70% of memcpy bandwidth.

Sweep: the same three methods, interleaved, over the number of blocks (1..64, at 48
layers) and of layers (1..48, at 32 blocks) out of one set of 48-layer slabs. Here
concatenate joins evaluated (1, 8, 256, 128) views of the slab rows (no second copy
of the slabs in memory) and memcpy copies each layer's slab rows with numpy into one
preallocated buffer: the same bytes as the gather, read and written once.

    kvpool bench reconstruct [--quick]      (or python bench/bench_reconstruct.py)
"""

from __future__ import annotations

import importlib.metadata
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
import numpy.typing as npt

from kvpool import _kernels
from kvpool.benchmarks.measure import at_least, interleave, mlx_cache_limit, ratio
from kvpool.benchmarks.records import BenchRecord, Section
from kvpool.benchmarks.tables import mib, table, times

LAYERS = 48
KV_HEADS = 8
HEAD_DIM = 128
BLOCK_TOKENS = 256
SLAB_BLOCKS = 64
BLOCKS = 32
TOKENS = BLOCKS * BLOCK_TOKENS
DTYPE = mx.float16
ITEMSIZE = 2
# mlx-lm's KVCache grows in steps of 256: the headroom a restored cache needs.
HEADROOM = 256
# Large enough that every round reuses the previous round's output buffers.
CACHE_LIMIT = 4 << 30

TARGET_SPEEDUP_VS_CONCATENATE = 2.0
TARGET_FRACTION_OF_MEMCPY = 0.7

SWEEP_BLOCKS = (1, 2, 4, 8, 16, 32, 64)  # at SWEEP_BLOCKS_LAYERS layers
SWEEP_LAYERS = (1, 2, 4, 8, 16, 32, 48)  # at SWEEP_LAYERS_BLOCKS blocks
QUICK_SWEEP_BLOCKS = (1, 8, 32)
QUICK_SWEEP_LAYERS = (1, 12)
SWEEP_BLOCKS_LAYERS = LAYERS
SWEEP_LAYERS_BLOCKS = BLOCKS


def _time_ms(*fns: Callable[[], None], iters: int, warmup: int = 2) -> list[list[float]]:
    """Times fns in alternation (so load from elsewhere hits them alike).

    Warm-up rounds fault in the output buffers that later rounds reuse.
    """
    samples: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + iters):
        for fn, out in zip(fns, samples, strict=True):
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                out.append((time.perf_counter() - t0) * 1e3)
    return samples


@dataclass(frozen=True, slots=True)
class Bandwidth:
    """One method's copy time (ms) and bandwidth at the median."""

    p50_ms: float
    p95_ms: float
    gb_per_s: float


@dataclass(frozen=True, slots=True)
class SweepPoint:
    """``concatenate_copies`` False: one block, which ``mx.concatenate`` hands back uncopied
    (no speedup to report)."""

    blocks: int
    layers: int
    bytes: int
    gather: Bandwidth
    concatenate: Bandwidth
    memcpy: Bandwidth
    concatenate_copies: bool
    speedup_vs_concatenate: float | None
    fraction_of_memcpy: float | None


@dataclass(frozen=True, slots=True)
class Sweep:
    iters: int
    note: str
    by_blocks: tuple[SweepPoint, ...]
    by_layers: tuple[SweepPoint, ...]


@dataclass(frozen=True, slots=True)
class ReconstructConfig:
    layers: int
    kv: int
    kv_heads: int
    head_dim: int
    block_tokens: int
    slab_blocks: int
    blocks: int
    dtype: str
    headroom_tokens: int


@dataclass(frozen=True, slots=True)
class ReconstructRecord(BenchRecord):
    """EXP-006 and the sweep. ``fraction_of_memcpy_bandwidth``: memcpy's time / the
    gather's (memcpy of the same bytes is the physical limit)."""

    experiment: str
    config: ReconstructConfig
    iters: int
    bytes_moved: int
    gather: Bandwidth
    gather_with_headroom: Bandwidth
    concatenate: Bandwidth
    memcpy: Bandwidth
    speedup_vs_concatenate: float
    fraction_of_memcpy_bandwidth: float
    sweep: Sweep
    mlx_version: str
    cache_limit_bytes: int
    machine: str


RECORD = ReconstructRecord


def _summary(samples_ms: list[float], nbytes: int) -> Bandwidth:
    p50, p95 = np.percentile(samples_ms, [50, 95])
    return Bandwidth(
        p50_ms=round(float(p50), 2),
        p95_ms=round(float(p95), 2),
        gb_per_s=round(nbytes / (float(p50) * 1e-3) / 1e9, 2),
    )


def _numpy_memcpy(nbytes: int) -> Callable[[], None]:
    src = np.ones(nbytes // ITEMSIZE, dtype=np.float16)
    dst = np.zeros_like(src)  # Written once so no timed copy page-faults.

    def fn() -> None:
        np.copyto(dst, src)

    return fn


def _bench_gather_and_memcpy(
    iters: int, table: list[int], nbytes: int
) -> tuple[list[float], list[float], list[float]]:
    """Times the kernel (no headroom) alternating with a numpy memcpy of the
    same bytes, then the kernel with headroom; returns the three samples."""
    slabs = [
        mx.full((SLAB_BLOCKS, KV_HEADS, BLOCK_TOKENS, HEAD_DIM), float(i % 7 + 1), dtype=DTYPE)
        for i in range(2 * LAYERS)
    ]
    mx.eval(slabs)
    (check,) = _kernels.gather(slabs[5:6], table, 0, TOKENS, TOKENS + HEADROOM)
    assert mx.array_equal(check[0, :, BLOCK_TOKENS : 2 * BLOCK_TOKENS], slabs[5][table[1]])
    assert not mx.any(check[:, :, TOKENS:]).item()
    del check

    def gather(capacity: int) -> Callable[[], None]:
        def fn() -> None:
            mx.eval(_kernels.gather(slabs, table, 0, TOKENS, capacity))

        return fn

    memcpy = _numpy_memcpy(nbytes)
    gather_ms, memcpy_ms = _time_ms(gather(TOKENS), memcpy, iters=iters)
    del memcpy  # Frees its buffers.
    mx.clear_cache()
    (headroom_ms,) = _time_ms(gather(TOKENS + HEADROOM), iters=iters)
    slabs.clear()
    mx.clear_cache()
    return gather_ms, memcpy_ms, headroom_ms


def _bench_concatenate(iters: int) -> list[float]:
    blocks = [
        [
            mx.full((1, KV_HEADS, BLOCK_TOKENS, HEAD_DIM), float(b % 5 + 1), dtype=DTYPE)
            for b in range(BLOCKS)
        ]
        for _ in range(2 * LAYERS)
    ]
    mx.eval(blocks)

    def concatenate() -> None:
        mx.eval([mx.concatenate(layer, axis=2) for layer in blocks])

    (samples,) = _time_ms(concatenate, iters=iters)
    blocks.clear()
    mx.clear_cache()
    return samples


def _sweep_point(
    slabs: list[mx.array],
    views: list[list[mx.array]],
    order: list[int],
    dst: npt.NDArray[np.float16],
    num_blocks: int,
    num_layers: int,
    *,
    iters: int,
) -> SweepPoint:
    """Gather, concatenate and memcpy of ``num_blocks`` blocks x ``num_layers`` layers,
    interleaved; ``order`` is the block table (a permutation of the slab's rows).

    With one block, ``mx.concatenate`` of a single array copies nothing (it hands back the
    view): its number is not a copy's.
    """
    mx.clear_cache()  # start each point from an empty buffer cache; the warm-up refills it
    table = order[:num_blocks]
    tokens = num_blocks * BLOCK_TOKENS
    chosen = slabs[: 2 * num_layers]
    block_views = [[layer_views[b] for b in table] for layer_views in views[: 2 * num_layers]]
    host = [np.asarray(s) for s in chosen]  # shares the slabs' memory
    block_elems = KV_HEADS * BLOCK_TOKENS * HEAD_DIM
    nbytes = len(chosen) * num_blocks * block_elems * ITEMSIZE

    def gather() -> None:
        mx.eval(_kernels.gather(chosen, table, 0, tokens, tokens))

    def concatenate() -> None:
        mx.eval([mx.concatenate(v, axis=2) for v in block_views])

    def memcpy() -> None:
        n = num_blocks * block_elems
        for j, src in enumerate(host):
            np.copyto(dst[j * n : (j + 1) * n], src[:num_blocks].reshape(-1))

    gather_s, concatenate_s, memcpy_s = interleave(
        [gather, concatenate, memcpy], iters=iters, warmup=1
    )
    gather_p = _summary([x * 1e3 for x in gather_s], nbytes)
    concatenate_p = _summary([x * 1e3 for x in concatenate_s], nbytes)
    memcpy_p = _summary([x * 1e3 for x in memcpy_s], nbytes)
    copies = num_blocks > 1
    return SweepPoint(
        blocks=num_blocks,
        layers=num_layers,
        bytes=nbytes,
        gather=gather_p,
        concatenate=concatenate_p,
        memcpy=memcpy_p,
        concatenate_copies=copies,
        speedup_vs_concatenate=ratio(concatenate_p.p50_ms, gather_p.p50_ms) if copies else None,
        fraction_of_memcpy=ratio(memcpy_p.p50_ms, gather_p.p50_ms),
    )


def _bench_sweep(
    blocks: Sequence[int], layers: Sequence[int], iters: int
) -> tuple[list[SweepPoint], list[SweepPoint]]:
    """The block sweep (at SWEEP_BLOCKS_LAYERS layers) and the layer sweep (at
    SWEEP_LAYERS_BLOCKS blocks), out of one set of slabs as large as the largest point."""
    slab_blocks = max(*blocks, SWEEP_LAYERS_BLOCKS)
    slabs = [
        mx.full((slab_blocks, KV_HEADS, BLOCK_TOKENS, HEAD_DIM), float(i % 7 + 1), dtype=DTYPE)
        for i in range(2 * max(SWEEP_BLOCKS_LAYERS, *layers))
    ]
    mx.eval(slabs)
    views = [[slab[b : b + 1] for b in range(slab_blocks)] for slab in slabs]
    mx.eval(views)
    order = [int(b) for b in np.random.default_rng(1).permutation(slab_blocks)]
    largest = max(2 * SWEEP_BLOCKS_LAYERS * max(blocks), 2 * max(layers) * SWEEP_LAYERS_BLOCKS) * (
        KV_HEADS * BLOCK_TOKENS * HEAD_DIM
    )
    dst = np.zeros(largest, dtype=np.float16)
    try:
        by_blocks = [
            _sweep_point(slabs, views, order, dst, n, SWEEP_BLOCKS_LAYERS, iters=iters)
            for n in blocks
        ]
        by_layers = [
            _sweep_point(slabs, views, order, dst, SWEEP_LAYERS_BLOCKS, n, iters=iters)
            for n in layers
        ]
    finally:
        del dst
        views.clear()
        slabs.clear()
        mx.clear_cache()
    return by_blocks, by_layers


def run(quick: bool) -> ReconstructRecord:
    """Runs EXP-006 and the sweep; returns the record (times in ms, rates in GB/s)."""
    iters = 3 if quick else 20
    sweep_iters = 2 if quick else 5
    nbytes = 2 * LAYERS * KV_HEADS * TOKENS * HEAD_DIM * ITEMSIZE
    rng = np.random.default_rng(0)
    table = [int(b) for b in rng.permutation(SLAB_BLOCKS)[:BLOCKS]]

    with mlx_cache_limit(CACHE_LIMIT):
        gather_ms, memcpy_ms, headroom_ms = _bench_gather_and_memcpy(iters, table, nbytes)
        concatenate_ms = _bench_concatenate(iters)
        by_blocks, by_layers = _bench_sweep(
            QUICK_SWEEP_BLOCKS if quick else SWEEP_BLOCKS,
            QUICK_SWEEP_LAYERS if quick else SWEEP_LAYERS,
            sweep_iters,
        )

    gather = _summary(gather_ms, nbytes)
    concatenate = _summary(concatenate_ms, nbytes)
    memcpy = _summary(memcpy_ms, nbytes)
    speedup = round(concatenate.p50_ms / gather.p50_ms, 2)
    fraction = round(memcpy.p50_ms / gather.p50_ms, 2)
    return ReconstructRecord(
        experiment="EXP-006",
        config=ReconstructConfig(
            layers=LAYERS,
            kv=2,
            kv_heads=KV_HEADS,
            head_dim=HEAD_DIM,
            block_tokens=BLOCK_TOKENS,
            slab_blocks=SLAB_BLOCKS,
            blocks=BLOCKS,
            dtype="float16",
            headroom_tokens=HEADROOM,
        ),
        iters=iters,
        bytes_moved=nbytes,
        gather=gather,
        gather_with_headroom=_summary(headroom_ms, nbytes),
        concatenate=concatenate,
        memcpy=memcpy,
        speedup_vs_concatenate=speedup,
        fraction_of_memcpy_bandwidth=fraction,
        targets=(
            at_least("EXP-006 gather vs mx.concatenate", TARGET_SPEEDUP_VS_CONCATENATE, speedup),
            at_least(
                "EXP-006 gather bandwidth / memcpy's (the physical limit)",
                TARGET_FRACTION_OF_MEMCPY,
                fraction,
            ),
        ),
        sweep=Sweep(
            iters=sweep_iters,
            note="concatenate joins evaluated views of the slab rows (with 1 block it "
            "copies nothing); memcpy copies each slab's rows with numpy",
            by_blocks=tuple(by_blocks),
            by_layers=tuple(by_layers),
        ),
        mlx_version=importlib.metadata.version("mlx"),
        cache_limit_bytes=CACHE_LIMIT,
        machine=f"{platform.system()} {platform.machine()}",
    )


# --------------------------------------------------------------------------- report


def render_section(r: ReconstructRecord) -> list[str]:
    c = r.config
    lines = [
        f"EXP-006: {c.blocks} blocks x {c.layers} layers x K,V of "
        f"[{c.kv_heads}, {c.block_tokens}, {c.head_dim}] {c.dtype} "
        f"({mib(r.bytes_moved)}), {r.iters} rounds, interleaved:",
        "",
    ]
    methods = (
        ("gather", r.gather),
        ("gather_with_headroom", r.gather_with_headroom),
        ("memcpy", r.memcpy),
        ("concatenate", r.concatenate),
    )
    lines += table(
        ("method", "p50 ms", "p95 ms", "GB/s (p50)"),
        [(m, b.p50_ms, b.p95_ms, b.gb_per_s) for m, b in methods],
    )
    lines += [
        "",
        f"gather is {times(r.speedup_vs_concatenate)} faster than mx.concatenate and runs at "
        f"{r.fraction_of_memcpy_bandwidth:.0%} of memcpy's bandwidth (the physical limit).",
    ]
    sweeps = (("blocks (48 layers)", r.sweep.by_blocks), ("layers (32 blocks)", r.sweep.by_layers))
    for label, points in sweeps:
        sweep_rows = [
            (
                p.blocks if label.startswith("blocks") else p.layers,
                mib(p.bytes),
                p.gather.gb_per_s,
                p.memcpy.gb_per_s,
                p.concatenate.gb_per_s if p.concatenate_copies else "(no copy)",
                times(p.speedup_vs_concatenate),
                p.fraction_of_memcpy,
            )
            for p in points
        ]
        lines += [
            "",
            f"Sweep over {label}, GB/s at the median of {r.sweep.iters} rounds:",
            "",
            *table(
                (label.split()[0], "bytes", "gather", "memcpy", "concatenate",
                 "gather vs concat", "gather / memcpy"),
                sweep_rows,
            ),
        ]  # fmt: skip
    lines += ["", f"Sweep: {r.sweep.note}."]
    return lines


def plot(figure: Any, r: ReconstructRecord) -> None:
    for i, (points, label) in enumerate(
        ((r.sweep.by_blocks, "blocks"), (r.sweep.by_layers, "layers"))
    ):
        ax = figure.add_subplot(1, 2, i + 1)
        for method in ("gather", "memcpy", "concatenate"):
            # concatenate of a single block copies nothing: no bandwidth to show
            shown = [p for p in points if method != "concatenate" or p.concatenate_copies]
            ax.plot(
                [getattr(p, label) for p in shown],
                [getattr(p, method).gb_per_s for p in shown],
                marker="o",
                label=method,
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label + (" (48 layers)" if label == "blocks" else " (32 blocks)"))
        ax.set_ylabel("GB/s (median)")
        ax.set_title(f"reconstruct: bandwidth vs {label}")
        ax.grid(True, alpha=0.3)
        ax.legend()


SECTION = Section(RECORD, render_section, plot)
