"""Multi-agent workload: N agents x T turns end to end, kvpool vs plain mlx-lm re-prefill.

Every agent holds a conversation that grows turn after turn: a system prompt shared by all
agents plus its own task, then per turn its generated tokens and a new user message. All N
agents of a turn are submitted together and generate in one batch, twice per turn:

* ``kvpool``: ``BlockPoolBatchEngine``, each agent resuming from its cache in the pool (in
  the first turn the agents arrive together and share the system prompt's prefill: it is
  computed once, see ``kvpool.cache``);
* ``plain``: mlx-lm ``BatchGenerator`` given every agent's whole context (re-prefill), the
  same prompts token for token (kvpool's, so both sides do the same work).

The two alternate turn by turn (kvpool first on odd turns, plain first on even ones), so
both see the same machine load. Reported per N: total time, mean time to first token (over
every agent-turn; in a batch it includes waiting for the other agents' prefill), prefilled
tokens, and per-turn numbers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from kvpool.benchmarks.measure import GIB, mlx_cache_limit, ratio, target
from kvpool.benchmarks.turns import (
    TurnRequest,
    TurnResult,
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
AGENT_COUNTS = (4, 16)
CACHE_LIMIT = 2 * GIB


@dataclass(frozen=True, slots=True)
class Shape:
    """The conversation: token counts per part."""

    turns: int
    system_tokens: int  # shared by every agent
    task_tokens: int  # each agent's own opening
    user_tokens: int  # each later turn's new user message
    max_tokens: int  # generated per turn


FULL = Shape(turns=4, system_tokens=256, task_tokens=128, user_tokens=64, max_tokens=8)
QUICK = Shape(turns=2, system_tokens=64, task_tokens=64, user_tokens=32, max_tokens=4)


def _warm_up(engine: BlockPoolBatchEngine, plain: Any) -> None:
    rng = random.Random(99)
    prompt = random_tokens(rng, 48)
    first = run_kvpool_turn(engine, [TurnRequest("warm", prompt, 2)]).completions["warm"]
    assert first.blocks is not None
    prompt = next_context(prompt, first.token_ids, random_tokens(rng, 16))
    second = run_kvpool_turn(engine, [TurnRequest("warm", prompt, 2, first.blocks)])
    blocks = second.completions["warm"].blocks
    assert blocks is not None
    engine.pool.release(blocks)
    run_plain_turn(plain, [TurnRequest("warm", prompt, 2)])


def _run_agents(model: Any, tokenizer: Any, num_agents: int, shape: Shape) -> dict[str, Any]:
    spec = ModelCacheSpec.from_model(model)
    rng = random.Random(num_agents)
    system = random_tokens(rng, shape.system_tokens)
    contexts = {
        f"agent-{i}": system + random_tokens(rng, shape.task_tokens) for i in range(num_agents)
    }
    longest = shape.system_tokens + shape.task_tokens
    longest += (shape.turns - 1) * (shape.max_tokens + shape.user_tokens) + shape.max_tokens
    # each agent: its previous cache + the lease of the running turn
    pool = BlockPool(spec, num_blocks=2 * num_agents * spec.blocks_for(longest) + 1)
    engine = BlockPoolBatchEngine(model, tokenizer, pool, spec)
    plain = plain_generator(model, tokenizer)
    caches: dict[str, CacheHandle] = {}
    turns = []
    totals = {"kvpool": 0.0, "plain": 0.0}
    ttfts: dict[str, list[float]] = {"kvpool": [], "plain": []}
    prefilled = {"kvpool": 0, "plain": 0}
    try:
        _warm_up(engine, plain)
        for t in range(1, shape.turns + 1):
            requests = [
                TurnRequest(a, prompt, shape.max_tokens, caches.get(a))
                for a, prompt in contexts.items()
            ]
            baseline = [TurnRequest(r.agent_id, r.prompt, r.max_tokens) for r in requests]

            def kvpool_turn(requests: list[TurnRequest] = requests) -> TurnResult:
                return run_kvpool_turn(engine, requests)

            def plain_turn(baseline: list[TurnRequest] = baseline) -> TurnResult:
                return run_plain_turn(plain, baseline)

            if t % 2 == 1:
                kv, pl = kvpool_turn(), plain_turn()
            else:
                pl = plain_turn()
                kv = kvpool_turn()
            cached = sum(c.cached_tokens for c in kv.completions.values())
            prompt_tokens = sum(len(r.prompt) for r in requests)
            turns.append(
                {
                    "turn": t,
                    "prompt_tokens": prompt_tokens,
                    "kvpool_prefilled_tokens": prompt_tokens - cached,
                    "kvpool_total_s": round(kv.total_s, 3),
                    "plain_total_s": round(pl.total_s, 3),
                    "kvpool_mean_ttft_ms": round(kv.mean_ttft_s * 1e3, 1),
                    "plain_mean_ttft_ms": round(pl.mean_ttft_s * 1e3, 1),
                }
            )
            for name, result in (("kvpool", kv), ("plain", pl)):
                totals[name] += result.total_s
                ttfts[name].extend(result.ttft_s.values())
            prefilled["kvpool"] += prompt_tokens - cached
            prefilled["plain"] += prompt_tokens
            for agent_id, completion in kv.completions.items():
                assert completion.blocks is not None
                caches[agent_id] = completion.blocks
                contexts[agent_id] = next_context(
                    contexts[agent_id],
                    completion.token_ids,
                    random_tokens(rng, shape.user_tokens),
                )
    finally:
        engine.close()
        plain.close()
    mean_ttft = {k: sum(v) / len(v) for k, v in ttfts.items()}
    return {
        "agents": num_agents,
        "turns": shape.turns,
        "kvpool_total_s": round(totals["kvpool"], 2),
        "plain_total_s": round(totals["plain"], 2),
        "speedup_total": ratio(totals["plain"], totals["kvpool"]),
        "kvpool_mean_ttft_ms": round(mean_ttft["kvpool"] * 1e3, 1),
        "plain_mean_ttft_ms": round(mean_ttft["plain"] * 1e3, 1),
        "speedup_mean_ttft": ratio(mean_ttft["plain"], mean_ttft["kvpool"]),
        "kvpool_prefilled_tokens": prefilled["kvpool"],
        "plain_prefilled_tokens": prefilled["plain"],
        "pool_blocks": pool.num_blocks,
        "per_turn": turns,
    }


def run(quick: bool) -> dict[str, Any]:
    shape = QUICK if quick else FULL
    model, tokenizer = load_recipe(MODEL)
    with mlx_cache_limit(CACHE_LIMIT):
        results = [_run_agents(model, tokenizer, n, shape) for n in AGENT_COUNTS]
    return {
        "bench": "workload",
        "quick": quick,
        "config": {
            "model": MODEL,
            "agent_counts": list(AGENT_COUNTS),
            "turns": shape.turns,
            "system_tokens": shape.system_tokens,
            "task_tokens": shape.task_tokens,
            "user_tokens": shape.user_tokens,
            "max_tokens": shape.max_tokens,
            "cache_limit_bytes": CACHE_LIMIT,
        },
        "results": results,
        "targets": [
            target(
                f"{r['agents']} agents x {r['turns']} turns: total time vs re-prefill",
                "faster (> 1x)",
                r["speedup_total"],
                None if r["speedup_total"] is None else r["speedup_total"] > 1.0,
            )
            for r in results
        ],
    }
