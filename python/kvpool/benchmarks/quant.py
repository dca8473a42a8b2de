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

import dataclasses
from dataclasses import dataclass

from kvpool.benchmarks.quant_gather import (
    AGENT_TOKENS,
    CAPACITY_TARGETS,
    EXPERIMENT,
    TARGET_VS_DENSE,
    Capacity,
    GatherConfig,
    GatherTiming,
    measure_capacity,
    measure_gather,
    within_target,
)
from kvpool.benchmarks.quant_persist import FILE_TARGET, LOAD_TARGET, SaveLoad, measure_persist
from kvpool.benchmarks.quant_quality import (
    AGREEMENT_TARGET,
    Quality,
    Sensitivity,
    measure_quality,
    measure_sensitivity,
)
from kvpool.benchmarks.records import BenchRecord, Section, Target
from kvpool.benchmarks.tables import mib, table, times


def run(quick: bool, model_ref: str | None = None) -> QuantRecord:
    """Gather timings, capacity, save/load and quality per format: one record. ``model_ref``
    (any model reference) is the model of the quality part (default: its recipe); gather,
    capacity and save/load use fixed geometries, and the sensitivity sweep scales a recipe's
    weights."""
    gather = measure_gather(quick)
    capacity = measure_capacity()
    saved = measure_persist(quick)
    quality = dataclasses.replace(
        measure_quality(quick, model_ref), sensitivity=measure_sensitivity(quick)
    )
    targets = [
        Target(
            f"gather from {n[1:]}-bit slabs vs dense gather (same output)",
            f"<= {TARGET_VS_DENSE:g}x the dense time",
            gather.vs_dense[n],
            within_target(gather.vs_dense[n]),
        )
        for n in ("q8", "q4")
    ]
    for dtype, goals in CAPACITY_TARGETS.items():
        for bits, goal in goals.items():
            value = capacity.by_dtype[dtype][f"q{bits}"].agents_vs_dense
            targets.append(
                Target(
                    f"{bits}-bit agents of {AGENT_TOKENS} tokens per budget vs dense ({dtype})",
                    f">= {goal}x",
                    value,
                    value is not None and value >= goal,
                )
            )
    q4 = saved.formats["q4"]
    targets.append(
        Target(
            "4-bit cache file vs dense file",
            f">= {FILE_TARGET:g}x smaller",
            q4.file_vs_dense,
            (q4.file_vs_dense or 0) >= FILE_TARGET,
        )
    )
    targets.append(
        Target(
            "4-bit cache load vs dense load",
            f">= {LOAD_TARGET:g}x faster",
            q4.load_speedup_vs_dense,
            (q4.load_speedup_vs_dense or 0) >= LOAD_TARGET,
        )
    )
    q8 = quality.by_format["q8"].turns_equal_to_dense
    targets.append(
        Target(
            "8-bit resumed turns with the dense run's greedy tokens (random weights x4; "
            "see quality.sensitivity)",
            f">= {AGREEMENT_TARGET:.0%}",
            q8,
            q8 is not None and q8 >= AGREEMENT_TARGET,
        )
    )
    g = gather
    return QuantRecord(
        targets=tuple(targets),
        config=g.config,
        iters=g.iters,
        output_bytes=g.output_bytes,
        gather=g.gather,
        vs_dense=g.vs_dense,
        slab_bytes=g.slab_bytes,
        capacity_vs_dense=g.capacity_vs_dense,
        capacity_vs_dense_float32_model=g.capacity_vs_dense_float32_model,
        relative_rms_error=g.relative_rms_error,
        bit_identical_to_mx_dequantize=g.bit_identical_to_mx_dequantize,
        capacity=capacity,
        save_load=saved,
        quality=quality,
    )


@dataclass(frozen=True, slots=True)
class QuantRecord(BenchRecord):
    """The gather (fields of :class:`GatherResult`, flat), capacity, save/load and quality
    per block format (``dense``, ``q8``, ``q4``)."""

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
    capacity: Capacity
    save_load: SaveLoad
    quality: Quality
    experiment: str = EXPERIMENT


RECORD = QuantRecord


# --------------------------------------------------------------------------- report


def render_section(r: QuantRecord) -> list[str]:
    c = r.config
    rows = [
        (
            name,
            r.gather[name].p50_ms,
            r.gather[name].p95_ms,
            times(r.vs_dense.get(name, 1.0)),
            mib(r.slab_bytes[name]),
            times(r.capacity_vs_dense.get(name, 1.0)),
        )
        for name in ("dense", "q8", "q4")
    ]
    f32 = r.capacity_vs_dense_float32_model
    return [
        f"Gather of {c.blocks} blocks x {c.layers} layers x K,V of "
        f"[{c.kv_heads}, {c.block_tokens}, {c.head_dim}] into dense {c.dtype} "
        f"caches ({mib(r.output_bytes)}) out of dense, 8-bit and 4-bit slabs (group "
        f"size {c.group_size}), {r.iters} rounds, interleaved:",
        "",
        *table(("slabs", "p50 ms", "p95 ms", "vs dense", "slab bytes", "capacity"), rows),
        "",
        f"Relative RMS error of the dequantized values: 8-bit {r.relative_rms_error['q8']}, "
        f"4-bit {r.relative_rms_error['q4']} (random normal data). Capacity for a float32 "
        f"model: 8-bit {times(f32['q8'])}, 4-bit {times(f32['q4'])}.",
        *_render_capacity(r.capacity),
        *_render_save_load(r.save_load),
        *_render_quality(r.quality),
        *_render_sensitivity(r.quality.sensitivity),
    ]


def _render_capacity(cap: Capacity) -> list[str]:
    rows = [
        (dtype, *(str(row[n].agents) for n in ("dense", "q8", "q4")),
         times(row["q8"].agents_vs_dense), times(row["q4"].agents_vs_dense))
        for dtype, row in cap.by_dtype.items()
    ]  # fmt: skip
    return [
        "",
        f"Agents of {cap.agent_tokens} tokens ({cap.geometry}) in {mib(cap.budget_bytes)}:",
        "",
        *table(("dtype", "dense", "8-bit", "4-bit", "8-bit vs dense", "4-bit vs dense"), rows),
        "",
        cap.float32_note + ".",
    ]


def _render_save_load(saved: SaveLoad) -> list[str]:
    rows = [
        (n, mib(f.file_bytes), f.save.p50_ms, f.load.p50_ms,
         times(f.file_vs_dense), times(f.load_speedup_vs_dense))
        for n, f in saved.formats.items()
    ]  # fmt: skip
    return [
        "",
        f"Save and load of one {saved.num_tokens}-token agent ({saved.geometry}), "
        f"{saved.rounds} rounds interleaved:",
        "",
        *table(("format", "file", "save p50 ms", "load p50 ms", "smaller", "load faster"), rows),
    ]


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _render_quality(quality: Quality) -> list[str]:
    rows = [
        (n, f"{_percent(q.turns_equal_to_dense)} of {quality.resumed_turns}",
         _percent(q.first_token_argmax_equal),
         f"{q.first_logit_max_abs_diff.mean:.3g}", f"{q.first_token_kl.mean:.3g}",
         f"{q.relative_rms_error_k:.3g}", f"{q.relative_rms_error_v:.3g}")
        for n, q in quality.by_format.items()
    ]  # fmt: skip
    return [
        "",
        f"Quality: {quality.agents} agents x {quality.turns} turns on the "
        f"{quality.model!r} model, resumed from quantized blocks vs the dense run "
        f"({quality.note}):",
        "",
        *table(
            ("format", "turns equal", "first token equal", "logit max-abs (mean)",
             "KL (mean)", "K rel. RMS", "V rel. RMS"),
            rows,
        ),
    ]  # fmt: skip


def _render_sensitivity(sens: Sensitivity | None) -> list[str]:
    if sens is None or not sens.by_weight_scale:
        return []
    rows = [
        (scale, str(row.distinct_dense_outputs),
         *(_percent(v) for v in row.turns_equal_to_dense.values()))
        for scale, row in sens.by_weight_scale.items()
    ]  # fmt: skip
    first = next(iter(sens.by_weight_scale.values())).turns_equal_to_dense
    return [
        "",
        f"Sensitivity of the random-weight model ({sens.model}): {sens.resume_points} "
        f"resume points, {sens.tokens} greedy tokens each, equal to the unperturbed "
        f"decode after perturbing the K/V ({sens.note}):",
        "",
        *table(("weights", "distinct outputs", *first), rows),
    ]


SECTION = Section(RECORD, render_section)
