"""Quant, part 1: the gather out of quantized slabs vs dense slabs, and how many agents a
budget holds per format (the record is :mod:`kvpool.benchmarks.quant`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from kvpool import _kernels
from kvpool.benchmarks.measure import Summary, interleave, mlx_cache_limit, ratio
from kvpool.cache.spec import ModelCacheSpec
from kvpool.pool import split_budget

KV_HEADS = 8
HEAD_DIM = 128
BLOCK_TOKENS = 256
GROUP_SIZE = 64
BIT_WIDTHS = (8, 4)
DTYPE = mx.float16
# Large enough that every round reuses the previous round's output buffers.
CACHE_LIMIT = 4 << 30
TARGET_VS_DENSE = 1.2
EXPERIMENT = "EXP-006 shape, quantized slabs"

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


def within_target(value: float | None) -> bool:
    return value is not None and value <= TARGET_VS_DENSE


@dataclass(frozen=True, slots=True)
class GatherConfig:
    layers: int
    kv: int
    kv_heads: int
    head_dim: int
    block_tokens: int
    slab_blocks: int
    blocks: int
    dtype: str
    group_size: int
    data: str


@dataclass(frozen=True, slots=True)
class GatherTiming:
    """A gather's samples (ms) and its output bytes per second at the median."""

    n: int
    p50_ms: float
    p95_ms: float
    min_ms: float
    max_ms: float
    gb_per_s: float


@dataclass(frozen=True, slots=True)
class GatherResult:
    """The gathers by slab format (``dense``, ``q8``, ``q4``); ``vs_dense``: the quantized
    gather's p50 / the dense one's; ``capacity_vs_dense``: dense slab bytes / quantized."""

    config: GatherConfig
    iters: int
    output_bytes: int
    gather: dict[str, GatherTiming]
    vs_dense: dict[str, float | None]
    slab_bytes: dict[str, int]
    capacity_vs_dense: dict[str, float]
    capacity_vs_dense_float32_model: dict[str, float]
    relative_rms_error: dict[str, float]
    bit_identical_to_mx_dequantize: bool


def measure_gather(quick: bool) -> GatherResult:
    """Times the dense and the dequantizing gathers (ms, bytes)."""
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
        t = Summary.of(s)
        gb_per_s = round(out_bytes / (t.p50_ms * 1e-3) / 1e9, 2)
        timings[name] = GatherTiming(t.n, t.p50_ms, t.p95_ms, t.min_ms, t.max_ms, gb_per_s)
    dense_p50 = timings["dense"].p50_ms
    vs_dense = {n: ratio(timings[n].p50_ms, dense_p50, 3) for n in ("q8", "q4")}
    capacity = {n: round(slab_bytes["dense"] / slab_bytes[n], 3) for n in ("q8", "q4")}
    return GatherResult(
        config=GatherConfig(
            layers=shape.layers,
            kv=2,
            kv_heads=KV_HEADS,
            head_dim=HEAD_DIM,
            block_tokens=BLOCK_TOKENS,
            slab_blocks=shape.slab_blocks,
            blocks=shape.blocks,
            dtype="float16",
            group_size=GROUP_SIZE,
            data="random normal (one slab, scaled per slab)",
        ),
        iters=shape.iters,
        output_bytes=out_bytes,
        gather=timings,
        vs_dense=vs_dense,
        slab_bytes=slab_bytes,
        capacity_vs_dense=capacity,
        capacity_vs_dense_float32_model=_capacity_float32(),
        relative_rms_error=rel_rms,
        bit_identical_to_mx_dequantize=True,  # _check_and_error asserted it
    )


# --------------------------------------------------------------------------- capacity

CAPACITY_BUDGET = 24 << 30  # a 24 GB Mac's worth of K/V
AGENT_TOKENS = 4096
# The cache geometry of Llama-3-8B: 32 layers x 8 KV heads x 128 (128 KiB a token in fp16).
AGENT_LAYERS = 32
CAPACITY_TARGETS = {"float16": {8: 1.85, 4: 3.4}, "float32": {8: 3.7, 4: 6.5}}
FLOAT32_NOTE = (
    "float32 misses by layout: MLX's affine format keeps scales and biases in the cache "
    "dtype, so a float32 row of 128 takes 128 B of 8-bit codes + 16 B (3.56x) or 64 + 16 B "
    "(6.40x); 3.7x and 6.5x would need float16 scales, which mx.dequantize of a float32 "
    "quantization does not use (the blocks would no longer be what MLX produces)"
)


@dataclass(frozen=True, slots=True)
class CapacityCell:
    """One dtype and format: ``agents_vs_dense`` None for dense itself."""

    bytes_per_token: int
    blocks: int
    agents: int
    agents_vs_dense: float | None = None


@dataclass(frozen=True, slots=True)
class Capacity:
    """Agents per budget, ``by_dtype[dtype][format]`` (formats ``dense``, ``q8``, ``q4``)."""

    budget_bytes: int
    agent_tokens: int
    geometry: str
    group_size: int
    by_dtype: dict[str, dict[str, CapacityCell]]
    float32_note: str


def measure_capacity() -> Capacity:
    """Agents of AGENT_TOKENS that one budget holds, per dtype and format, as BlockPool
    sizes itself (split_budget over bytes at rest; no allocation)."""
    out: dict[str, dict[str, CapacityCell]] = {}
    for dtype in ("float16", "float32"):
        dense = ModelCacheSpec.uniform(AGENT_LAYERS, KV_HEADS, HEAD_DIM, dtype=dtype)
        per_agent = dense.blocks_for(AGENT_TOKENS)
        row: dict[str, CapacityCell] = {}
        for name, bits in (("dense", None), ("q8", 8), ("q4", 4)):
            spec = dense.with_format(bits, GROUP_SIZE)
            (blocks,) = split_budget(spec, CAPACITY_BUDGET)
            agents = blocks // per_agent
            vs_dense = None if bits is None else ratio(agents, row["dense"].agents, 3)
            row[name] = CapacityCell(spec.bytes_per_token, blocks, agents, vs_dense)
        out[dtype] = row
    return Capacity(
        budget_bytes=CAPACITY_BUDGET,
        agent_tokens=AGENT_TOKENS,
        geometry=f"{AGENT_LAYERS} layers x {KV_HEADS} KV heads x {HEAD_DIM}",
        group_size=GROUP_SIZE,
        by_dtype=out,
        float32_note=FLOAT32_NOTE,
    )


# --------------------------------------------------------------------------- save / load
