"""Engine overhead: decode tokens/s of BlockPoolBatchEngine vs plain mlx-lm BatchGenerator.

For each model and batch size (1, 8, 32 agents), the same prompts (128 random tokens each;
``--quick``: 32, on the small ``demo`` model, a smoke run) go into a ``BlockPoolBatchEngine``
(on its own generator, ``PoolBatchGenerator``) and into a plain mlx-lm ``BatchGenerator``,
and the two are stepped in alternation (engine step, plain step, plain step, engine step,
...) until both finish, so
each pair of steps sees the same machine load. Decode steps are the steady ones: every
sequence generated one token, none finished, no prompt was being processed.

Reported per batch size: each side's decode tokens/s (batch / median step time), the median
of the per-pair ratios kvpool/plain, and the engine's own cost per step measured directly:
``step()`` wall time minus the time spent inside its generator's ``next()`` (the engine's
generator is wrapped through the ``batch_gen_factory`` seam), which no machine noise can
blur. ``finish_ms`` is the engine's extra work in the step where the batch ends (scattering
every sequence's cache into its blocks), a once-per-turn cost, not a decode cost.

Target: kvpool decodes within 3% of plain mlx-lm (ratio >= 0.97).
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from typing import Any

from kvpool.benchmarks.measure import GIB, Summary, median, mlx_cache_limit, percentile, ratio
from kvpool.benchmarks.records import BenchRecord, Section, Target
from kvpool.benchmarks.tables import table
from kvpool.benchmarks.turns import load_recipe, plain_generator, random_tokens
from kvpool.cache.spec import ModelCacheSpec
from kvpool.cache.tables import CacheHandle
from kvpool.engine import BlockPoolBatchEngine
from kvpool.pool import BlockPool

MODELS = ("smollm2-135m", "llama-8x128")
# --quick is a smoke run (CI): the small demo model, so batch 32 stays within seconds.
QUICK_MODELS = ("demo",)
BATCH_SIZES = (1, 8, 32)
PROMPT_TOKENS, QUICK_PROMPT_TOKENS = 128, 32
DECODE_STEPS = 40
QUICK_DECODE_STEPS = 6
CACHE_LIMIT = 2 * GIB
TARGET_RATIO = 0.97


@dataclass(slots=True)
class _Step:
    wall_s: float
    inner_s: float  # inside BatchGenerator.next()
    num_generated: int
    num_prompt: int  # prompt-processing responses (a prefill ran)
    num_finished: int


class _TimedGenerator:
    """A ``BatchGenerator`` whose ``next()`` calls are timed and counted."""

    def __init__(self, generator: Any) -> None:
        self.generator = generator
        self.last: _Step = _Step(0.0, 0.0, 0, 0, 0)

    def insert(self, *args: Any, **kwargs: Any) -> Any:
        return self.generator.insert(*args, **kwargs)

    def insert_segments(self, *args: Any, **kwargs: Any) -> Any:
        return self.generator.insert_segments(*args, **kwargs)

    def extract_cache(self, *args: Any, **kwargs: Any) -> Any:
        return self.generator.extract_cache(*args, **kwargs)

    def remove(self, *args: Any, **kwargs: Any) -> Any:
        return self.generator.remove(*args, **kwargs)

    def close(self) -> None:
        self.generator.close()

    def next(self) -> tuple[Any, Any]:
        t0 = time.perf_counter()
        prompt_responses, responses = self.generator.next()
        inner = time.perf_counter() - t0
        finished = sum(1 for r in responses if r.finish_reason is not None)
        self.last = _Step(0.0, inner, len(responses), len(prompt_responses), finished)
        return prompt_responses, responses


def _is_decode(step: _Step, batch: int) -> bool:
    return step.num_generated == batch and step.num_prompt == 0 and step.num_finished == 0


def _measure_batch(
    model: Any, tokenizer: Any, name: str, batch: int, steps: int, prompt_tokens: int
) -> BatchResult:
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, num_blocks=batch * spec.blocks_for(prompt_tokens + steps + 4))
    timed: list[_TimedGenerator] = []

    def factory(model: Any, **kwargs: Any) -> _TimedGenerator:
        from kvpool.mlx.mlx_lm import pool_batch_generator

        timed.append(_TimedGenerator(pool_batch_generator(model, **kwargs)))
        return timed[-1]

    engine = BlockPoolBatchEngine(model, tokenizer, pool, spec, batch_gen_factory=factory)
    plain = _TimedGenerator(plain_generator(model, tokenizer))
    rng = random.Random(batch)
    prompts = [random_tokens(rng, prompt_tokens) for _ in range(batch)]
    # The first token comes with the prefill, the last one finishes; mlx-lm prefills
    # prefill_batch_size (8) prompts at a time, two next() calls per group, while the
    # earlier groups decode: those steps are not pure decode steps.
    max_tokens = steps + 2 + 2 * -(-batch // 8)
    for i, prompt in enumerate(prompts):
        engine.submit(f"agent-{i}", prompt, max_tokens=max_tokens)
    plain.insert([list(p) for p in prompts], max_tokens=[max_tokens] * batch)

    engine_steps: list[_Step] = []
    plain_steps: list[_Step] = []
    plain_left = batch
    finished_blocks: list[CacheHandle] = []

    def step_engine() -> None:
        t0 = time.perf_counter()
        done = list(engine.step())
        wall = time.perf_counter() - t0
        inner = timed[-1].last
        engine_steps.append(
            _Step(wall, inner.inner_s, inner.num_generated, inner.num_prompt, len(done))
        )
        finished_blocks.extend(c.blocks for c in done if c.blocks is not None)
        for c in done:
            if c.error is not None:
                raise c.error

    def step_plain() -> None:
        nonlocal plain_left
        t0 = time.perf_counter()
        plain.next()
        wall = time.perf_counter() - t0
        plain_steps.append(dataclasses.replace(plain.last, wall_s=wall))
        plain_left -= plain.last.num_finished

    try:
        i = 0
        while engine.has_work or plain_left > 0:
            # ABBA order: neither side always runs right after the other.
            order = (step_engine, step_plain) if i % 4 in (0, 3) else (step_plain, step_engine)
            for fn in order:
                if (fn is step_engine and engine.has_work) or (fn is step_plain and plain_left):
                    fn()
            i += 1
    finally:
        engine.close()
        plain.close()
    for blocks in finished_blocks:
        pool.release(blocks)

    eng = [s for s in engine_steps if _is_decode(s, batch)]
    pla = [s for s in plain_steps if _is_decode(s, batch)]
    pairs = list(zip(eng, pla, strict=False))
    pair_ratios = [p.wall_s / e.wall_s for e, p in pairs]
    engine_p50, plain_p50 = median([s.wall_s for s in eng]), median([s.wall_s for s in pla])
    overhead = [s.wall_s - s.inner_s for s in eng]
    finish = [s.wall_s - s.inner_s for s in engine_steps if s.num_finished]
    return BatchResult(
        model=name,
        batch=batch,
        decode_steps=len(pairs),
        kvpool_tok_s=round(batch / engine_p50, 2),
        plain_tok_s=round(batch / plain_p50, 2),
        kvpool_step=Summary.of([s.wall_s for s in eng]),
        plain_step=Summary.of([s.wall_s for s in pla]),
        ratio_of_medians=ratio(plain_p50, engine_p50, 4),
        paired_ratio_p50=round(median(pair_ratios), 4),
        paired_ratio_p5_p95=(
            round(percentile(pair_ratios, 5), 4),
            round(percentile(pair_ratios, 95), 4),
        ),
        engine_overhead_us_p50=round(median(overhead) * 1e6, 1),
        engine_overhead_us_p95=round(percentile(overhead, 95) * 1e6, 1),
        engine_overhead_pct_of_step=round(100 * median(overhead) / engine_p50, 3),
        finish_ms=round(max(finish) * 1e3, 2) if finish else None,
    )


def run(quick: bool, model_ref: str | None = None) -> EngineOverheadRecord:
    """The record; ``model_ref``: any model reference, measured alone (default: ``MODELS``,
    as in the committed record; ``QUICK_MODELS`` with ``quick``)."""
    models = (model_ref,) if model_ref else QUICK_MODELS if quick else MODELS
    steps = QUICK_DECODE_STEPS if quick else DECODE_STEPS
    prompt_tokens = QUICK_PROMPT_TOKENS if quick else PROMPT_TOKENS
    results = []
    with mlx_cache_limit(CACHE_LIMIT):
        for name in models:
            model, tokenizer = load_recipe(name)
            _measure_batch(model, tokenizer, name, 1, 2, prompt_tokens)  # warm-up: first calls
            for batch in BATCH_SIZES:
                results.append(_measure_batch(model, tokenizer, name, batch, steps, prompt_tokens))
    return EngineOverheadRecord(
        targets=tuple(
            Target(
                f"{r.model} batch {r.batch}: kvpool decode tok/s vs plain",
                f">= {TARGET_RATIO:.2f}x (within 3%)",
                r.paired_ratio_p50,
                r.paired_ratio_p50 >= TARGET_RATIO,
            )
            for r in results
        ),
        config=EngineOverheadConfig(
            models=models,
            batch_sizes=BATCH_SIZES,
            prompt_tokens=prompt_tokens,
            decode_steps=steps,
            cache_limit_bytes=CACHE_LIMIT,
        ),
        results=tuple(results),
    )


@dataclass(frozen=True, slots=True)
class BatchResult:
    """One model at one batch size. ``paired_ratio_*``: plain's step time / kvpool's over
    the pairs of decode steps (>= 1: kvpool is as fast); ``engine_overhead_*``: the engine's
    own time per decode step (its ``step()`` minus its generator's ``next()``);
    ``finish_ms``: its extra work in the step where the batch ends (None: none finished)."""

    model: str
    batch: int
    decode_steps: int  # pairs of steady decode steps compared
    kvpool_tok_s: float
    plain_tok_s: float
    kvpool_step: Summary
    plain_step: Summary
    ratio_of_medians: float | None
    paired_ratio_p50: float
    paired_ratio_p5_p95: tuple[float, float]
    engine_overhead_us_p50: float
    engine_overhead_us_p95: float
    engine_overhead_pct_of_step: float
    finish_ms: float | None


@dataclass(frozen=True, slots=True)
class EngineOverheadConfig:
    models: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    prompt_tokens: int
    decode_steps: int
    cache_limit_bytes: int


@dataclass(frozen=True, slots=True)
class EngineOverheadRecord(BenchRecord):
    config: EngineOverheadConfig
    results: tuple[BatchResult, ...]


RECORD = EngineOverheadRecord


# --------------------------------------------------------------------------- report


def render_section(r: EngineOverheadRecord) -> list[str]:
    rows = [
        (
            x.model,
            x.batch,
            x.kvpool_tok_s,
            x.plain_tok_s,
            x.paired_ratio_p50,
            f"{x.paired_ratio_p5_p95[0]:.3f}-{x.paired_ratio_p5_p95[1]:.3f}",
            x.engine_overhead_us_p50,
            f"{x.engine_overhead_pct_of_step:.3f}%",
            x.finish_ms,
            x.decode_steps,
        )
        for x in r.results
    ]
    c = r.config
    return [
        f"{c.prompt_tokens}-token prompts, {c.decode_steps} decode steps per batch, "
        "engine and plain generator stepped in alternation:",
        "",
        *table(
            ("model", "batch", "kvpool tok/s", "plain tok/s", "kvpool/plain (paired p50)",
             "pairs p5-p95", "engine us/step", "of step", "finish ms", "steps"),
            rows,
        ),
    ]  # fmt: skip


def plot(figure: Any, r: EngineOverheadRecord) -> None:
    ax = figure.add_subplot(1, 1, 1)
    labels = [f"{x.model}\nbatch {x.batch}" for x in r.results]
    xs = list(range(len(r.results)))
    width = 0.4
    ax.bar([x - width / 2 for x in xs], [x.kvpool_tok_s for x in r.results], width, label="kvpool")
    ax.bar(
        [x + width / 2 for x in xs],
        [x.plain_tok_s for x in r.results],
        width,
        label="plain mlx-lm",
    )
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_ylabel("decode tokens/s (median step)")
    ax.set_title("engine overhead: decode throughput")
    ax.legend()


SECTION = Section(RECORD, render_section, plot)
