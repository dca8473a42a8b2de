"""Memory: pool bytes, process RSS and MLX memory over 100 turns of 8 agents; the extra
memory one resume needs.

Turns: 8 agents, each turn all of them submitted together (16 new user tokens, 2 generated
tokens each). Every 10 turns (``--quick``: 5, over 15 turns) the conversations end and new
ones start (each agent releases its cache and opens with 144 fresh tokens), so the workload
is periodic and its memory should stay within the same envelope period after period once
warmed up: anything that grows is a leak. (All agents restart in the same turn: a fresh
144-token prompt batched with 18-token resumes would make mlx-lm pad every prompt of that
batch to 144 tokens.) After every turn: pool bytes (allocated up front), blocks in use,
process RSS, MLX active / peak-in-the-turn / buffer-cache bytes, and scatters that wrote in
place vs copied a slab.

Target: RSS growth after warm-up within 2%, measured on the envelope: the highest RSS of
the last period (turns 91-100) vs the highest of the first period after warm-up (turns
21-30). RSS moves by hundreds of MiB within a period as MLX's buffer cache fills and
trims (bounded by ``mx.set_cache_limit``), so a point-to-point comparison would measure
that phase, not a leak; the record has both.

Resume peak: an agent of 2K tokens (random K/V in the pool) resumes with 32 new tokens;
MLX's peak active memory during that turn, above what was active before it, divided by the
agent's cache size; measured with the engine's generator (``PoolBatchGenerator``: a batch of
one takes the gathered cache as it is) and, as the before figure, with plain mlx-lm
``BatchGenerator`` behind the same engine (its ``merge`` copies the gathered cache, the
first prefill step reallocates it, moving to decode gathers it again). For scale, the same
for plain mlx-lm prefilling the whole context. Target: at most 1.3x the cache.
"""

from __future__ import annotations

import gc
import random
from dataclasses import dataclass
from typing import Any

from kvpool.benchmarks.measure import GIB, MIB, at_most, mlx_cache_limit, mlx_memory, rss_bytes
from kvpool.benchmarks.records import BenchRecord, Section, Target
from kvpool.benchmarks.tables import mib, table
from kvpool.benchmarks.turns import (
    TurnRequest,
    cache_bytes,
    fill_agent_cache,
    load_recipe,
    next_context,
    plain_generator,
    random_tokens,
    run_kvpool_turn,
    run_plain_turn,
)
from kvpool.cache.spec import ModelCacheSpec
from kvpool.cache.tables import CacheHandle
from kvpool.engine import BlockPoolBatchEngine
from kvpool.pool import BlockPool

MODEL = "llama-8x128"
AGENTS = 8
# (turns, warm-up turns, turns per conversation)
FULL = (100, 20, 10)
QUICK = (15, 5, 5)
OPENING_TOKENS = 144
USER_TOKENS = 16
MAX_TOKENS = 2
RESUME_CONTEXT, QUICK_RESUME_CONTEXT = 2048, 1024
RESUME_NEW_TOKENS = 32
CACHE_LIMIT = 1 * GIB
TARGET_RSS_GROWTH = 0.02
TARGET_RESUME_PEAK_X = 1.3


def _turns(model: Any, tokenizer: Any, turns: int, warmup: int, period: int) -> TurnsResult:
    import mlx.core as mx

    from kvpool.mlx import kernels

    spec = ModelCacheSpec.from_model(model)
    longest = OPENING_TOKENS + period * (USER_TOKENS + MAX_TOKENS)
    pool = BlockPool(spec, num_blocks=2 * AGENTS * spec.blocks_for(longest) + 1)
    engine = BlockPoolBatchEngine(model, tokenizer, pool, spec)
    rng = random.Random(7)
    agents = [f"agent-{i}" for i in range(AGENTS)]
    contexts: dict[str, tuple[int, ...]] = {}
    caches: dict[str, CacheHandle] = {}
    readings: list[Reading] = []
    kernels.reset_scatter_stats()
    try:
        for t in range(1, turns + 1):
            if (t - 1) % period == 0:  # new conversations
                for agent in agents:
                    if agent in caches:
                        pool.release(caches.pop(agent))
                    contexts[agent] = random_tokens(rng, OPENING_TOKENS)
            requests = [TurnRequest(a, contexts[a], MAX_TOKENS, caches.get(a)) for a in agents]
            mx.reset_peak_memory()
            result = run_kvpool_turn(engine, requests)
            for r in requests:
                completion = result.completions[r.agent_id]
                assert completion.blocks is not None
                caches[r.agent_id] = completion.blocks
                user = random_tokens(rng, USER_TOKENS)
                contexts[r.agent_id] = next_context(r.prompt, completion.token_ids, user)
            gc.collect()
            mlx = mlx_memory()
            readings.append(
                Reading(
                    turn=t,
                    rss=rss_bytes(),
                    mlx_active=mlx["active"],
                    mlx_peak=mlx["peak"],
                    mlx_cache=mlx["cache"],
                    pool_bytes=pool.bytes_total,
                    pool_used_bytes=pool.bytes_used,
                    prompt_tokens_max=max(len(r.prompt) for r in requests),
                    turn_s=round(result.total_s, 3),
                )
            )
    finally:
        engine.close()
        for blocks in caches.values():
            pool.release(blocks)
    first, last = readings[warmup : warmup + period], readings[-period:]
    rss_at_warmup, rss_last = readings[warmup - 1].rss, readings[-1].rss
    rss, active, peak, cache = (_growth(first, last, key) for key in GROWTH_KEYS)
    return TurnsResult(
        turns=turns,
        warmup_turns=warmup,
        period=period,
        pool_bytes=pool.bytes_total,
        pool_blocks=pool.num_blocks,
        scatter_stats={k: int(v) for k, v in kernels.scatter_stats().items()},
        first_period=(first[0].turn, first[-1].turn),
        last_period=(last[0].turn, last[-1].turn),
        rss_after_warmup=rss_at_warmup,
        rss_last=rss_last,
        rss_point_growth_pct=_growth_pct(rss_at_warmup, rss_last),
        readings=tuple(readings),
        rss_growth_pct=rss[2],
        mlx_active_growth_pct=active[2],
        mlx_peak_growth_pct=peak[2],
        mlx_cache_growth_pct=cache[2],
        rss_max_first_period=rss[0],
        rss_max_last_period=rss[1],
        mlx_active_max_first_period=active[0],
        mlx_active_max_last_period=active[1],
        mlx_peak_max_first_period=peak[0],
        mlx_peak_max_last_period=peak[1],
        mlx_cache_max_first_period=cache[0],
        mlx_cache_max_last_period=cache[1],
    )


def _growth_pct(before: int | None, after: int | None) -> float | None:
    if not before or after is None:
        return None
    return round(100 * (after - before) / before, 3)


def _growth(
    first: list[Reading], last: list[Reading], key: str
) -> tuple[int | None, int | None, float | None]:
    """The highest ``key`` reading of the first period after warm-up, of the last period,
    and the growth in % from one to the other (all None when a reading is missing)."""
    values = [getattr(r, key) for r in first + last]
    if any(v is None for v in values):
        return None, None, None
    before = max(getattr(r, key) for r in first)
    after = max(getattr(r, key) for r in last)
    return before, after, _growth_pct(before, after)


def _resume_peak(model: Any, tokenizer: Any, context: int) -> ResumePeak:
    import mlx.core as mx

    from kvpool.mlx.mlx_lm import batch_generator

    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, num_blocks=2 * spec.blocks_for(context + RESUME_NEW_TOKENS + 1) + 1)
    engine = BlockPoolBatchEngine(model, tokenizer, pool, spec)
    # Before: the same engine on mlx-lm's own BatchGenerator (its merge copies the cache).
    mlx_lm_engine = BlockPoolBatchEngine(
        model, tokenizer, pool, spec, batch_gen_factory=batch_generator
    )
    plain = plain_generator(model, tokenizer)
    rng = random.Random(context)
    history = random_tokens(rng, context)
    prompt = history + random_tokens(rng, RESUME_NEW_TOKENS)
    size = cache_bytes(pool, context)

    def peak_extra(fn: Any) -> int:
        gc.collect()
        mx.clear_cache()
        before = int(mx.get_active_memory())
        mx.reset_peak_memory()
        fn()
        return int(mx.get_peak_memory()) - before

    def resume_extra(on: BlockPoolBatchEngine) -> int:
        """Peak MLX memory of one resume through ``on``, above what was active before it."""
        agent = fill_agent_cache(pool, "agent", history)  # written before the peak is reset
        gc.collect()
        mx.clear_cache()
        before = int(mx.get_active_memory())
        mx.reset_peak_memory()
        result = run_kvpool_turn(on, [TurnRequest("agent", prompt, 1, agent)])
        extra = int(mx.get_peak_memory()) - before
        blocks = result.completions["agent"].blocks
        assert blocks is not None
        pool.release(blocks)
        return extra

    try:
        resume_extra(engine)  # warm-up: first calls of both generators
        resume_extra(mlx_lm_engine)
        after = resume_extra(engine)
        before = resume_extra(mlx_lm_engine)
        plain_extra = peak_extra(lambda: run_plain_turn(plain, [TurnRequest("p", prompt, 1)]))
    finally:
        engine.close()
        mlx_lm_engine.close()
        plain.close()
    return ResumePeak(
        context_tokens=context,
        new_tokens=RESUME_NEW_TOKENS,
        cache_bytes=size,
        resume_peak_extra_bytes=after,
        resume_peak_extra_x_cache=round(after / size, 2),
        mlx_lm_generator_resume_peak_extra_bytes=before,
        mlx_lm_generator_resume_peak_extra_x_cache=round(before / size, 2),
        reprefill_peak_extra_bytes=plain_extra,
        reprefill_peak_extra_x_cache=round(plain_extra / size, 2),
    )


def run(quick: bool, model_ref: str | None = None) -> MemoryRecord:
    """The record; ``model_ref``: any model reference (default: ``MODEL``, as in the
    committed record)."""
    name = model_ref or MODEL
    turns, warmup, period = QUICK if quick else FULL
    model, tokenizer = load_recipe(name)
    with mlx_cache_limit(CACHE_LIMIT):
        over_turns = _turns(model, tokenizer, turns, warmup, period)
        resume = _resume_peak(model, tokenizer, QUICK_RESUME_CONTEXT if quick else RESUME_CONTEXT)
    growth = over_turns.rss_growth_pct
    first, last = over_turns.first_period, over_turns.last_period
    return MemoryRecord(
        targets=(
            Target(
                f"max RSS, turns {last[0]}-{last[1]} vs turns {first[0]}-{first[1]}",
                f"within {TARGET_RSS_GROWTH:.0%}",
                None if growth is None else f"{growth:+.2f}%",
                None if growth is None else growth <= 100 * TARGET_RSS_GROWTH,
            ),
            at_most(
                f"resume peak memory above the cache's own ({resume.context_tokens} tokens), "
                "x the cache",
                TARGET_RESUME_PEAK_X,
                resume.resume_peak_extra_x_cache,
            ),
        ),
        config=MemoryConfig(
            model=name,
            agents=AGENTS,
            turns=turns,
            warmup_turns=warmup,
            period=period,
            opening_tokens=OPENING_TOKENS,
            user_tokens=USER_TOKENS,
            max_tokens=MAX_TOKENS,
            cache_limit_bytes=CACHE_LIMIT,
        ),
        turns=over_turns,
        resume=resume,
    )


GROWTH_KEYS = ("rss", "mlx_active", "mlx_peak", "mlx_cache")


@dataclass(frozen=True, slots=True)
class Reading:
    """Memory after one turn (bytes; ``rss`` None where it cannot be read)."""

    turn: int
    rss: int | None
    mlx_active: int
    mlx_peak: int  # MLX's peak active memory within the turn
    mlx_cache: int  # MLX's buffer cache
    pool_bytes: int
    pool_used_bytes: int
    prompt_tokens_max: int
    turn_s: float


@dataclass(frozen=True, slots=True)
class TurnsResult:
    """The turns. For each of ``GROWTH_KEYS``: ``<key>_max_first_period`` (the highest
    reading of the first period after warm-up), ``<key>_max_last_period`` and
    ``<key>_growth_pct`` from one to the other (None: a reading is missing)."""

    turns: int
    warmup_turns: int
    period: int
    pool_bytes: int
    pool_blocks: int
    scatter_stats: dict[str, int]
    first_period: tuple[int, int]
    last_period: tuple[int, int]
    rss_after_warmup: int | None
    rss_last: int | None
    readings: tuple[Reading, ...]
    rss_growth_pct: float | None
    mlx_active_growth_pct: float | None
    mlx_peak_growth_pct: float | None
    mlx_cache_growth_pct: float | None
    rss_max_first_period: int | None = None
    rss_max_last_period: int | None = None
    mlx_active_max_first_period: int | None = None
    mlx_active_max_last_period: int | None = None
    mlx_peak_max_first_period: int | None = None
    mlx_peak_max_last_period: int | None = None
    mlx_cache_max_first_period: int | None = None
    mlx_cache_max_last_period: int | None = None
    rss_point_growth_pct: float | None = None  # RSS after warm-up -> after the last turn


@dataclass(frozen=True, slots=True)
class ResumePeak:
    """One resume: MLX's peak memory during it above what was active before, in bytes and
    as a multiple of the agent's cache; with the engine's generator, with mlx-lm's
    ``BatchGenerator`` behind the same engine (absent in older records), and for plain
    mlx-lm re-prefilling the whole context."""

    context_tokens: int
    new_tokens: int
    cache_bytes: int
    resume_peak_extra_bytes: int
    resume_peak_extra_x_cache: float
    reprefill_peak_extra_bytes: int
    reprefill_peak_extra_x_cache: float
    mlx_lm_generator_resume_peak_extra_bytes: int | None = None
    mlx_lm_generator_resume_peak_extra_x_cache: float | None = None


@dataclass(frozen=True, slots=True)
class MemoryConfig:
    model: str
    agents: int
    turns: int
    warmup_turns: int
    period: int
    opening_tokens: int
    user_tokens: int
    max_tokens: int
    cache_limit_bytes: int


@dataclass(frozen=True, slots=True)
class MemoryRecord(BenchRecord):
    config: MemoryConfig
    turns: TurnsResult
    resume: ResumePeak


RECORD = MemoryRecord


# --------------------------------------------------------------------------- report


def render_section(r: MemoryRecord) -> list[str]:
    t, res, c = r.turns, r.resume, r.config
    shown = [x for x in t.readings if x.turn % c.period in (0, 1)]
    rows = [
        (x.turn, x.prompt_tokens_max, mib(x.rss), mib(x.mlx_active), mib(x.mlx_peak),
         mib(x.mlx_cache), mib(x.pool_used_bytes), x.turn_s)
        for x in shown
    ]  # fmt: skip
    first, last = t.first_period, t.last_period

    def growth(key: str) -> str:
        pct = getattr(t, f"{key}_growth_pct")
        if pct is None:
            return "-"
        before = getattr(t, f"{key}_max_first_period")
        after = getattr(t, f"{key}_max_last_period")
        return f"{mib(before)} -> {mib(after)} ({pct:+.2f}%)"

    point = "-" if t.rss_point_growth_pct is None else f"{t.rss_point_growth_pct:+.2f}%"
    before = ""
    if res.mlx_lm_generator_resume_peak_extra_bytes is not None:
        before = (
            f"; with mlx-lm's BatchGenerator behind the engine: "
            f"{mib(res.mlx_lm_generator_resume_peak_extra_bytes)} = "
            f"{res.mlx_lm_generator_resume_peak_extra_x_cache:.2f}x"
        )
    return [
        f"Model {c.model}, {c.agents} agents x {t.turns} turns, new conversations "
        f"every {c.period} turns; MLX cache limit {mib(c.cache_limit_bytes)}.",
        "",
        f"- pool: {mib(t.pool_bytes)} ({t.pool_blocks} blocks), allocated up front",
        f"- max RSS, turns {first[0]}-{first[1]} -> turns {last[0]}-{last[1]}: {growth('rss')}",
        f"- max MLX active: {growth('mlx_active')}; max MLX peak in a turn: "
        f"{growth('mlx_peak')}; max MLX buffer cache: {growth('mlx_cache')}",
        f"- RSS after turn {t.warmup_turns}: {mib(t.rss_after_warmup)}, after turn "
        f"{t.turns}: {mib(t.rss_last)} ({point}, point to point)",
        f"- scatters: {t.scatter_stats}",
        f"- one resume of a {res.context_tokens}-token agent ({mib(res.cache_bytes)} of "
        f"K/V): peak extra MLX memory {mib(res.resume_peak_extra_bytes)} = "
        f"{res.resume_peak_extra_x_cache:.2f}x the cache{before}; plain mlx-lm re-prefill of "
        f"the same context: {mib(res.reprefill_peak_extra_bytes)} = "
        f"{res.reprefill_peak_extra_x_cache:.2f}x",
        "",
        "First and last turn of each conversation:",
        "",
        *table(
            ("turn", "prompt tokens", "RSS", "MLX active", "MLX peak in turn", "MLX cache",
             "pool used", "turn s"),
            rows,
        ),
    ]  # fmt: skip


def plot(figure: Any, r: MemoryRecord) -> None:
    readings = r.turns.readings
    turns = [x.turn for x in readings]
    ax = figure.add_subplot(1, 1, 1)
    for key, label in (
        ("rss", "process RSS"),
        ("mlx_active", "MLX active"),
        ("mlx_peak", "MLX peak in turn"),
        ("mlx_cache", "MLX buffer cache"),
        ("pool_bytes", "pool (allocated)"),
    ):
        ax.plot(turns, [(getattr(x, key) or 0) / MIB for x in readings], label=label)
    ax.axvline(r.turns.warmup_turns, color="gray", linestyle="--", label="end of warm-up")
    ax.set_xlabel("turn")
    ax.set_ylabel("MiB")
    ax.set_title(f"memory over {len(turns)} turns of {r.config.agents} agents")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


SECTION = Section(RECORD, render_section, plot)
