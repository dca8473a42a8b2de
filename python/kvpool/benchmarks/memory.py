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
from typing import Any

from kvpool.benchmarks.measure import GIB, mlx_cache_limit, mlx_memory, rss_bytes, target
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
from kvpool.cache.tables import CacheHandle
from kvpool.engine import BlockPoolBatchEngine
from kvpool.pool import BlockPool
from kvpool.spec import ModelCacheSpec

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


def _turns(model: Any, tokenizer: Any, turns: int, warmup: int, period: int) -> dict[str, Any]:
    import mlx.core as mx

    from kvpool import kernels

    spec = ModelCacheSpec.from_model(model)
    longest = OPENING_TOKENS + period * (USER_TOKENS + MAX_TOKENS)
    pool = BlockPool(spec, num_blocks=2 * AGENTS * spec.blocks_for(longest) + 1)
    engine = BlockPoolBatchEngine(model, tokenizer, pool, spec)
    rng = random.Random(7)
    agents = [f"agent-{i}" for i in range(AGENTS)]
    contexts: dict[str, tuple[int, ...]] = {}
    caches: dict[str, CacheHandle] = {}
    readings: list[dict[str, Any]] = []
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
            readings.append(
                {
                    "turn": t,
                    "rss": rss_bytes(),
                    **{f"mlx_{k}": v for k, v in mlx_memory().items()},
                    "pool_bytes": pool.bytes_total,
                    "pool_used_bytes": pool.bytes_used,
                    "prompt_tokens_max": max(len(r.prompt) for r in requests),
                    "turn_s": round(result.total_s, 3),
                }
            )
    finally:
        engine.close()
        for blocks in caches.values():
            pool.release(blocks)
    return {
        "turns": turns,
        "warmup_turns": warmup,
        "period": period,
        "pool_bytes": pool.bytes_total,
        "pool_blocks": pool.num_blocks,
        "scatter_stats": {k: int(v) for k, v in kernels.scatter_stats().items()},
        **_growth(readings, warmup, period),
        "readings": readings,
    }


def _growth(readings: list[dict[str, Any]], warmup: int, period: int) -> dict[str, Any]:
    """RSS and MLX growth from the first period after warm-up to the last period."""
    first = readings[warmup : warmup + period]
    last = readings[-period:]
    out: dict[str, Any] = {
        "first_period": [first[0]["turn"], first[-1]["turn"]],
        "last_period": [last[0]["turn"], last[-1]["turn"]],
    }
    for key in ("rss", "mlx_active", "mlx_peak", "mlx_cache"):
        values = [r[key] for r in first + last]
        if any(v is None for v in values):
            out[f"{key}_growth_pct"] = None
            continue
        before, after = max(r[key] for r in first), max(r[key] for r in last)
        out[f"{key}_max_first_period"] = before
        out[f"{key}_max_last_period"] = after
        out[f"{key}_growth_pct"] = round(100 * (after - before) / before, 3) if before else None
    rss_at_warmup, rss_last = readings[warmup - 1]["rss"], readings[-1]["rss"]
    out["rss_after_warmup"], out["rss_last"] = rss_at_warmup, rss_last
    if rss_at_warmup and rss_last is not None:
        out["rss_point_growth_pct"] = round(100 * (rss_last - rss_at_warmup) / rss_at_warmup, 3)
    return out


def _resume_peak(model: Any, tokenizer: Any, context: int) -> dict[str, Any]:
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
    return {
        "context_tokens": context,
        "new_tokens": RESUME_NEW_TOKENS,
        "cache_bytes": size,
        "resume_peak_extra_bytes": after,
        "resume_peak_extra_x_cache": round(after / size, 2),
        "mlx_lm_generator_resume_peak_extra_bytes": before,
        "mlx_lm_generator_resume_peak_extra_x_cache": round(before / size, 2),
        "reprefill_peak_extra_bytes": plain_extra,
        "reprefill_peak_extra_x_cache": round(plain_extra / size, 2),
    }


def run(quick: bool) -> dict[str, Any]:
    turns, warmup, period = QUICK if quick else FULL
    model, tokenizer = load_recipe(MODEL)
    with mlx_cache_limit(CACHE_LIMIT):
        over_turns = _turns(model, tokenizer, turns, warmup, period)
        resume = _resume_peak(model, tokenizer, QUICK_RESUME_CONTEXT if quick else RESUME_CONTEXT)
    growth = over_turns["rss_growth_pct"]
    peak_x = resume["resume_peak_extra_x_cache"]
    first, last = over_turns["first_period"], over_turns["last_period"]
    return {
        "bench": "memory",
        "quick": quick,
        "config": {
            "model": MODEL,
            "agents": AGENTS,
            "turns": turns,
            "warmup_turns": warmup,
            "period": period,
            "opening_tokens": OPENING_TOKENS,
            "user_tokens": USER_TOKENS,
            "max_tokens": MAX_TOKENS,
            "cache_limit_bytes": CACHE_LIMIT,
        },
        "turns": over_turns,
        "resume": resume,
        "targets": [
            target(
                f"max RSS, turns {last[0]}-{last[1]} vs turns {first[0]}-{first[1]}",
                f"within {TARGET_RSS_GROWTH:.0%}",
                None if growth is None else f"{growth:+.2f}%",
                None if growth is None else growth <= 100 * TARGET_RSS_GROWTH,
            ),
            target(
                f"resume peak memory above the cache's own ({resume['context_tokens']} tokens)",
                f"<= {TARGET_RESUME_PEAK_X}x the cache",
                peak_x,
                peak_x <= TARGET_RESUME_PEAK_X,
            ),
        ],
    }
