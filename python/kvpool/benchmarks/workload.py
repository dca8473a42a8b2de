"""Multi-agent workload: N agents x T turns end to end, kvpool vs mlx-lm's prompt cache vs
re-prefill.

Every agent holds a conversation that grows turn after turn: a system prompt shared by all
agents plus its own task, then per turn its generated tokens and a new user message. All N
agents of a turn are submitted together and generate in one batch, three times per turn:

* ``kvpool``: ``BlockPoolBatchEngine``, each agent resuming from its cache in the pool (in
  the first turn the agents arrive together and share the system prompt's prefill);
* ``lru``: mlx-lm's ``LRUPromptCache`` the way ``mlx_lm.server`` uses it
  (:mod:`kvpool.benchmarks.peer`), sized to hold every agent;
* ``plain``: mlx-lm ``BatchGenerator`` given every agent's whole context (re-prefill).

All three get the same prompts token for token (kvpool's contexts), and their greedy tokens
are compared. The order of the three rotates turn by turn, so all see the same machine load.
Reported per N and way: total time, TTFT mean/p50/p95 (over every agent-turn; in a batch it
includes waiting for the other agents' prefill), prefilled tokens, and per-turn numbers.

Target: kvpool's total time at most 0.8x of the LRU way's.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvpool.benchmarks.measure import GIB, at_most, mlx_cache_limit, ratio
from kvpool.benchmarks.peer import LruPromptCacheWay, lru_size_for
from kvpool.benchmarks.records import BenchRecord, Section
from kvpool.benchmarks.tables import table, times
from kvpool.benchmarks.turns import (
    WAY_LABELS,
    WAYS,
    TurnRequest,
    TurnResult,
    WayTotals,
    add_parts,
    load_recipe,
    next_context,
    plain_generator,
    random_tokens,
    rotation,
    run_kvpool_turn,
    run_plain_turn,
    tokens_unequal,
)
from kvpool.cache.spec import ModelCacheSpec
from kvpool.cache.tables import CacheHandle
from kvpool.engine import BlockPoolBatchEngine
from kvpool.pool import BlockPool

MODEL = "llama-8x128"
AGENT_COUNTS = (4, 16)
CACHE_LIMIT = 2 * GIB
TARGET_VS_LRU = 0.8


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


@dataclass(frozen=True, slots=True)
class TurnRow:
    """One turn, per way (keys of ``WAYS``)."""

    turn: int
    prompt_tokens: int
    total_s: dict[str, float]
    mean_ttft_ms: dict[str, float]
    prefilled_tokens: dict[str, int]


@dataclass(frozen=True, slots=True)
class AgentsResult:
    """N agents x T turns. ``kvpool_vs_*``: kvpool's time / the baseline's (< 1 = faster)."""

    agents: int
    turns: int
    lru_max_size: int
    pool_blocks: int
    ways: dict[str, WayTotals]
    kvpool_vs_lru_total: float | None
    kvpool_vs_plain_total: float | None
    kvpool_vs_lru_mean_ttft: float | None
    kvpool_vs_plain_mean_ttft: float | None
    agent_turns: int
    agent_turns_unequal: dict[str, int]  # way -> agent-turns whose tokens differ from kvpool's
    per_turn: tuple[TurnRow, ...]


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    model: str
    agent_counts: tuple[int, ...]
    turns: int
    system_tokens: int
    task_tokens: int
    user_tokens: int
    max_tokens: int
    cache_limit_bytes: int


@dataclass(frozen=True, slots=True)
class WorkloadRecord(BenchRecord):
    config: WorkloadConfig
    results: tuple[AgentsResult, ...]


RECORD = WorkloadRecord


def _warm_up(engine: BlockPoolBatchEngine, lru: LruPromptCacheWay, plain: Any) -> None:
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
    lru.run_turn([TurnRequest("warm", prompt, 2)])


def one_at_a_time(
    serve: Callable[[list[TurnRequest]], TurnResult], requests: list[TurnRequest]
) -> TurnResult:
    """``requests`` served one after another (each arrives when the previous finished), as
    one turn: times add up, each agent's TTFT counts from its own submit."""
    parts = [serve([r]) for r in requests]
    return TurnResult(
        total_s=sum(p.total_s for p in parts),
        ttft_s={a: t for p in parts for a, t in p.ttft_s.items()},
        tokens={a: t for p in parts for a, t in p.tokens.items()},
        completions={a: c for p in parts for a, c in p.completions.items()},
        cached_tokens={a: n for p in parts for a, n in p.cached_tokens.items()},
        parts_s=functools.reduce(add_parts, (p.parts_s for p in parts), {}),
    )


def _run_agents(
    model: Any, tokenizer: Any, num_agents: int, shape: Shape, *, one_by_one: bool = False
) -> AgentsResult:
    """``num_agents`` x ``shape.turns``; ``one_by_one``: the agents of a turn arrive one
    after another (each submitted when the previous finished) instead of together."""
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
    lru = LruPromptCacheWay(model, tokenizer, lru_size_for(num_agents))
    caches: dict[str, CacheHandle] = {}
    rows = []
    results: dict[str, list[TurnResult]] = {w: [] for w in WAYS}
    unequal = {w: 0 for w in WAYS if w != "kvpool"}
    try:
        _warm_up(engine, lru, plain)
        for t in range(1, shape.turns + 1):
            requests = [
                TurnRequest(a, p, shape.max_tokens, caches.get(a), system_tokens=len(system))
                for a, p in contexts.items()
            ]
            serve: dict[str, Callable[[list[TurnRequest]], TurnResult]] = {
                "kvpool": lambda r: run_kvpool_turn(engine, r),
                "lru": lru.run_turn,
                "plain": lambda r: run_plain_turn(plain, r),
            }
            turn = {
                w: one_at_a_time(serve[w], requests) if one_by_one else serve[w](requests)
                for w in rotation(t, WAYS)
            }
            for w in unequal:
                unequal[w] += tokens_unequal(turn["kvpool"], turn[w])
            prompt_tokens = sum(len(r.prompt) for r in requests)
            rows.append(
                TurnRow(
                    turn=t,
                    prompt_tokens=prompt_tokens,
                    total_s={w: round(turn[w].total_s, 3) for w in WAYS},
                    mean_ttft_ms={w: round(turn[w].mean_ttft_s * 1e3, 1) for w in WAYS},
                    prefilled_tokens={w: turn[w].prefilled_tokens(requests) for w in WAYS},
                )
            )
            for w in WAYS:
                results[w].append(turn[w])
            for agent_id, completion in turn["kvpool"].completions.items():
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
        lru.close()
    ways = {w: WayTotals.of(results[w], sum(t.prefilled_tokens[w] for t in rows)) for w in WAYS}
    return AgentsResult(
        agents=num_agents,
        turns=shape.turns,
        lru_max_size=lru.max_size,
        pool_blocks=pool.num_blocks,
        ways=ways,
        kvpool_vs_lru_total=ratio(ways["kvpool"].total_s, ways["lru"].total_s),
        kvpool_vs_plain_total=ratio(ways["kvpool"].total_s, ways["plain"].total_s),
        kvpool_vs_lru_mean_ttft=ratio(ways["kvpool"].mean_ttft_ms, ways["lru"].mean_ttft_ms),
        kvpool_vs_plain_mean_ttft=ratio(ways["kvpool"].mean_ttft_ms, ways["plain"].mean_ttft_ms),
        agent_turns=num_agents * shape.turns,
        agent_turns_unequal=unequal,
        per_turn=tuple(rows),
    )


def run(quick: bool, model_ref: str | None = None) -> WorkloadRecord:
    """The record; ``model_ref``: any model reference (default: ``MODEL``, as in the
    committed record)."""
    name = model_ref or MODEL
    shape = QUICK if quick else FULL
    model, tokenizer = load_recipe(name)
    with mlx_cache_limit(CACHE_LIMIT):
        results = tuple(_run_agents(model, tokenizer, n, shape) for n in AGENT_COUNTS)
    return WorkloadRecord(
        config=WorkloadConfig(
            model=name,
            agent_counts=AGENT_COUNTS,
            turns=shape.turns,
            system_tokens=shape.system_tokens,
            task_tokens=shape.task_tokens,
            user_tokens=shape.user_tokens,
            max_tokens=shape.max_tokens,
            cache_limit_bytes=CACHE_LIMIT,
        ),
        results=results,
        targets=tuple(
            at_most(
                f"{r.agents} agents x {r.turns} turns: kvpool total time / LRU prompt cache's",
                TARGET_VS_LRU,
                r.kvpool_vs_lru_total,
            )
            for r in results
        ),
    )


# --------------------------------------------------------------------------- report


def render_section(r: WorkloadRecord) -> list[str]:
    c = r.config
    rows = []
    for x in r.results:
        for w in WAYS:
            y = x.ways[w]
            rows.append(
                (
                    x.agents,
                    WAY_LABELS[w],
                    y.total_s,
                    y.mean_ttft_ms,
                    y.p50_ttft_ms,
                    y.p95_ttft_ms,
                    y.prefilled_tokens,
                    x.agent_turns_unequal.get(w, 0),
                )
            )
    ratios = [
        (
            x.agents,
            times(x.kvpool_vs_lru_total),
            times(x.kvpool_vs_plain_total),
            times(x.kvpool_vs_lru_mean_ttft),
            times(x.kvpool_vs_plain_mean_ttft),
            x.lru_max_size,
        )
        for x in r.results
    ]
    lines = [
        f"Model {c.model}; per agent: {c.system_tokens} shared + {c.task_tokens} own tokens, "
        f"then per turn {c.max_tokens} generated + {c.user_tokens} user tokens; "
        f"{c.turns} turns, all agents of a turn submitted together:",
        "",
        *table(
            ("agents", "way", "total s", "mean TTFT ms", "TTFT p50 ms", "TTFT p95 ms",
             "prefilled tokens", "agent-turns with other tokens than kvpool"),
            rows,
        ),
        "",
        "kvpool's time as a fraction of each baseline's (< 1x: kvpool is faster):",
        "",
        *table(
            ("agents", "total vs LRU", "total vs re-prefill", "mean TTFT vs LRU",
             "mean TTFT vs re-prefill", "LRU size (sequences)"),
            ratios,
        ),
    ]  # fmt: skip
    for x in r.results:
        per_turn = [
            (
                t.turn,
                t.prompt_tokens,
                *(t.prefilled_tokens[w] for w in WAYS),
                *(t.total_s[w] for w in WAYS),
            )
            for t in x.per_turn
        ]
        lines += [
            "",
            f"{x.agents} agents, per turn (prefilled tokens, seconds):",
            "",
            *table(
                ("turn", "prompt tokens", *(f"{w} prefilled" for w in WAYS),
                 *(f"{w} s" for w in WAYS)),
                per_turn,
            ),
        ]  # fmt: skip
    return lines


def plot(figure: Any, r: WorkloadRecord) -> None:
    labels = [f"{x.agents} agents" for x in r.results]
    xs = list(range(len(r.results)))
    width = 0.8 / len(WAYS)
    metrics = (("total_s", "total time, s"), ("mean_ttft_ms", "mean TTFT, ms"))
    for i, (metric, title) in enumerate(metrics):
        ax = figure.add_subplot(1, 2, i + 1)
        for k, w in enumerate(WAYS):
            values = [getattr(x.ways[w], metric) for x in r.results]
            ax.bar([x + (k - 1) * width for x in xs], values, width, label=WAY_LABELS[w])
        ax.set_xticks(xs, labels)
        ax.set_title(f"workload: {title}")
        ax.legend()


SECTION = Section(RECORD, render_section, plot)
