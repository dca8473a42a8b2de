"""EXP-006: rebuild an agent's contiguous KV caches from pool blocks.

Gathers 32 blocks x 48 layers (K and V, 8 KV heads, head_dim 128, float16:
1.5 GiB) out of [64, 8, 256, 128] slabs with one ``_kernels.gather`` call, and
compares, in the same run, with

* memcpy: numpy copying a buffer of the same size (the physical limit), and
* concatenate: the usual way, 32 separate (1, 8, 256, 128) arrays per layer
  and K/V joined by ``mx.concatenate`` along the token axis.

Targets: >= 2x faster than concatenate, >= 70% of memcpy bandwidth.

    python bench/bench_reconstruct.py [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from kvpool import _kernels

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


def _summary(samples_ms: list[float], nbytes: int) -> dict[str, float]:
    p50, p95 = np.percentile(samples_ms, [50, 95])
    return {
        "p50_ms": round(float(p50), 2),
        "p95_ms": round(float(p95), 2),
        "gb_per_s": round(nbytes / (float(p50) * 1e-3) / 1e9, 2),
    }


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


def run(quick: bool) -> dict[str, Any]:
    """Runs EXP-006 and returns its record (times in ms, rates in GB/s)."""
    iters = 3 if quick else 20
    nbytes = 2 * LAYERS * KV_HEADS * TOKENS * HEAD_DIM * ITEMSIZE
    rng = np.random.default_rng(0)
    table = [int(b) for b in rng.permutation(SLAB_BLOCKS)[:BLOCKS]]

    previous_limit = mx.set_cache_limit(CACHE_LIMIT)
    try:
        gather_ms, memcpy_ms, headroom_ms = _bench_gather_and_memcpy(iters, table, nbytes)
        concatenate_ms = _bench_concatenate(iters)
    finally:
        mx.set_cache_limit(previous_limit)

    gather = _summary(gather_ms, nbytes)
    concatenate = _summary(concatenate_ms, nbytes)
    memcpy = _summary(memcpy_ms, nbytes)
    speedup = concatenate["p50_ms"] / gather["p50_ms"]
    fraction = memcpy["p50_ms"] / gather["p50_ms"]
    return {
        "bench": "reconstruct",
        "experiment": "EXP-006",
        "config": {
            "layers": LAYERS,
            "kv": 2,
            "kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "block_tokens": BLOCK_TOKENS,
            "slab_blocks": SLAB_BLOCKS,
            "blocks": BLOCKS,
            "dtype": "float16",
            "headroom_tokens": HEADROOM,
        },
        "iters": iters,
        "quick": quick,
        "bytes_moved": nbytes,
        "gather": gather,
        "gather_with_headroom": _summary(headroom_ms, nbytes),
        "concatenate": concatenate,
        "memcpy": memcpy,
        "speedup_vs_concatenate": round(speedup, 2),
        "fraction_of_memcpy_bandwidth": round(fraction, 2),
        "targets_met": {
            "speedup_vs_concatenate": speedup >= TARGET_SPEEDUP_VS_CONCATENATE,
            "fraction_of_memcpy_bandwidth": fraction >= TARGET_FRACTION_OF_MEMCPY,
        },
        "mlx_version": importlib.metadata.version("mlx"),
        "cache_limit_bytes": CACHE_LIMIT,
        "machine": f"{platform.system()} {platform.machine()}",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timed rounds instead of 20")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the record here")
    args = parser.parse_args(argv)
    record = run(args.quick)
    text = json.dumps(record, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
