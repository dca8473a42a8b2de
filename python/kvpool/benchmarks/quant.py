"""Quant: gather of dense caches out of quantized slabs (8-bit and 4-bit) vs dense slabs.

The EXP-006 shape: 32 blocks x 48 layers (K and V, 8 KV heads, head_dim 128, float16: a
1.5 GiB dense output) gathered out of [64, 8, 256, 128] slabs, three ways timed in
alternation (load from elsewhere hits all three alike):

* dense: ``_kernels.gather`` of float16 slabs, and
* q8 / q4: ``_kernels.gather_dequantized`` of the same slabs quantized by ``mx.quantize``
  (group size 64), dequantizing while it copies. The output is the same dense float16
  caches; it reads fewer bytes (codes + scales + biases) and computes more.

Target: each quantized gather takes at most 1.2x the dense gather's median time.

Also reported: the bytes of the slabs per format and the capacity ratio (dense bytes /
quantized bytes: how many more tokens one byte budget holds), measured on the arrays and,
for a float32 model, computed from the shapes; the relative RMS error of the dequantized
values vs the dense ones (random normal data, one layer); and a check, before timing, that
the gather equals ``mx.dequantize`` bit for bit.

    kvpool bench quant [--quick]        (or: python bench/bench_quant.py)

``--quick``: 4 layers x 8 blocks out of 16-block slabs, 3 rounds (a smoke test).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from kvpool import _kernels
from kvpool.benchmarks.measure import interleave, mlx_cache_limit, ratio, summary_ms, target

KV_HEADS = 8
HEAD_DIM = 128
BLOCK_TOKENS = 256
GROUP_SIZE = 64
BIT_WIDTHS = (8, 4)
DTYPE = mx.float16
# Large enough that every round reuses the previous round's output buffers.
CACHE_LIMIT = 4 << 30
TARGET_VS_DENSE = 1.2

QuantizedSlab = tuple[mx.array, mx.array, mx.array]


@dataclass(frozen=True, slots=True)
class Shape:
    """One benchmark size: ``layers`` x (K, V) slabs of ``slab_blocks`` blocks, of which
    ``blocks`` are gathered (``blocks * BLOCK_TOKENS`` tokens, no headroom)."""

    layers: int
    slab_blocks: int
    blocks: int
    iters: int

    @property
    def tokens(self) -> int:
        return self.blocks * BLOCK_TOKENS


FULL = Shape(layers=48, slab_blocks=64, blocks=32, iters=9)
QUICK = Shape(layers=4, slab_blocks=16, blocks=8, iters=3)


def _nbytes(arrays: list[mx.array]) -> int:
    return sum(int(a.nbytes) for a in arrays)


def _dense_slabs(shape: Shape) -> list[mx.array]:
    """2 * layers float16 slabs of random normal values (one random slab, scaled per
    slab so every slab holds its own values without generating them all)."""
    base = mx.random.normal(
        (shape.slab_blocks, KV_HEADS, BLOCK_TOKENS, HEAD_DIM), key=mx.random.key(0)
    )
    slabs = []
    for i in range(2 * shape.layers):
        slab = (base * (1.0 + i / 97)).astype(DTYPE)
        mx.eval(slab)
        slabs.append(slab)
    return slabs


def _quantize(slabs: list[mx.array], bits: int) -> list[QuantizedSlab]:
    out = []
    for slab in slabs:
        codes, scales, biases = mx.quantize(slab, GROUP_SIZE, bits)
        mx.eval(codes, scales, biases)
        out.append((codes, scales, biases))
    return out


def _check_and_error(
    dense: mx.array, quantized: QuantizedSlab, bits: int, table: list[int], tokens: int
) -> float:
    """Asserts that the gather of one slab equals mx.dequantize bit for bit (with 256
    rows of zero headroom); returns the relative RMS error of those values vs dense."""
    (out,) = _kernels.gather_dequantized(
        [quantized], table, 0, tokens, tokens + 256, bits=bits, group_size=GROUP_SIZE
    )
    reference = mx.dequantize(*quantized, group_size=GROUP_SIZE, bits=bits)
    expect = mx.concatenate([reference[b] for b in table], axis=1)[None]
    assert mx.array_equal(out[:, :, :tokens].view(mx.uint16), expect.view(mx.uint16)).item()
    assert not mx.any(out[:, :, tokens:]).item()
    exact = mx.concatenate([dense[b] for b in table], axis=1)[None].astype(mx.float32)
    err = out[:, :, :tokens].astype(mx.float32) - exact
    value = mx.sqrt(mx.mean(err * err) / mx.mean(exact * exact)).item()
    assert isinstance(value, float)
    return value


def _capacity_float32() -> dict[str, float]:
    """Dense / quantized bytes per token for a float32 model (scales and biases float32)."""
    dense = HEAD_DIM * 4
    out: dict[str, float] = {}
    for bits in BIT_WIDTHS:
        codes, scales = _kernels.quantized_shapes(1, 1, 1, HEAD_DIM, bits=bits)
        quantized = codes[3] * 4 + 2 * scales[3] * 4
        out[f"q{bits}"] = round(dense / quantized, 3)
    return out


def _within_target(value: float | None) -> bool:
    return value is not None and value <= TARGET_VS_DENSE


def run(quick: bool) -> dict[str, Any]:
    """Times the dense and the dequantizing gathers; returns the record (ms, bytes)."""
    shape = QUICK if quick else FULL
    rng = np.random.default_rng(0)
    table = [int(b) for b in rng.permutation(shape.slab_blocks)[: shape.blocks]]
    tokens = shape.tokens
    out_bytes = 2 * shape.layers * KV_HEADS * tokens * HEAD_DIM * 2

    with mlx_cache_limit(CACHE_LIMIT):
        dense = _dense_slabs(shape)
        quantized = {bits: _quantize(dense, bits) for bits in BIT_WIDTHS}
        slab_bytes = {"dense": _nbytes(dense)}
        rel_rms: dict[str, float] = {}
        for bits, slabs in quantized.items():
            slab_bytes[f"q{bits}"] = _nbytes([a for slab in slabs for a in slab])
            rel_rms[f"q{bits}"] = round(
                _check_and_error(dense[0], slabs[0], bits, table, tokens), 5
            )

        def gather_dense() -> None:
            mx.eval(_kernels.gather(dense, table, 0, tokens, tokens))

        def gather_quantized(bits: int) -> Callable[[], None]:
            slabs = quantized[bits]

            def fn() -> None:
                mx.eval(
                    _kernels.gather_dequantized(
                        slabs, table, 0, tokens, tokens, bits=bits, group_size=GROUP_SIZE
                    )
                )

            return fn

        samples = interleave(
            [gather_dense, gather_quantized(8), gather_quantized(4)],
            iters=shape.iters,
            warmup=2,
        )
        dense.clear()
        quantized.clear()

    names = ["dense", "q8", "q4"]
    timings = {}
    for name, s in zip(names, samples, strict=True):
        timings[name] = summary_ms(s)
        timings[name]["gb_per_s"] = round(out_bytes / (timings[name]["p50_ms"] * 1e-3) / 1e9, 2)
    dense_p50 = timings["dense"]["p50_ms"]
    vs_dense = {n: ratio(timings[n]["p50_ms"], dense_p50, 3) for n in ("q8", "q4")}
    capacity = {n: round(slab_bytes["dense"] / slab_bytes[n], 3) for n in ("q8", "q4")}
    return {
        "bench": "quant",
        "experiment": "EXP-006 shape, quantized slabs",
        "config": {
            "layers": shape.layers,
            "kv": 2,
            "kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "block_tokens": BLOCK_TOKENS,
            "slab_blocks": shape.slab_blocks,
            "blocks": shape.blocks,
            "dtype": "float16",
            "group_size": GROUP_SIZE,
            "data": "random normal (one slab, scaled per slab)",
        },
        "iters": shape.iters,
        "quick": quick,
        "output_bytes": out_bytes,
        "gather": timings,
        "vs_dense": vs_dense,
        "slab_bytes": slab_bytes,
        "capacity_vs_dense": capacity,
        "capacity_vs_dense_float32_model": _capacity_float32(),
        "relative_rms_error": rel_rms,
        "bit_identical_to_mx_dequantize": True,
        "targets": [
            target(
                f"gather from {n[1:]}-bit slabs vs dense gather (same output)",
                f"<= {TARGET_VS_DENSE:g}x the dense time",
                vs_dense[n],
                _within_target(vs_dense[n]),
            )
            for n in ("q8", "q4")
        ],
    }
