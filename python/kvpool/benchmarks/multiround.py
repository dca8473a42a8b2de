"""Multi-round QA: users sharing a system prompt, each asking question after question.

The shape of LMCache's multi-round QA benchmark, scaled to a 2-core CPU: ``users`` users
share one system prompt; each opens with a question of its own and then, round after round,
reads a fixed-length answer and asks a next question, so its history grows by
``answer + question`` tokens a round. Users arrive staggered, ``arrivals`` per step (user
``i`` at step ``i // arrivals``), so at every step new users (system prompt + first
question) and returning users (their whole history + a new question) are served together
(one arrival per step drawn)::

    step:    0    1    2    3    4    5
    user 0:  r0   r1   r2   r3
    user 1:       r0   r1   r2   r3
    user 2:            r0   r1   r2   r3

Two scenarios: ``peer at its best`` (the LRU holds every user; the targets are judged
here) and ``server defaults`` (``mlx_lm.server``'s ``--prompt-cache-size`` of 10 sequences,
with more users alive at once than that; no re-prefill, to keep the run short).

Each step's requests are submitted together and served three ways (same prompts, rotating
order): kvpool (``BlockPoolBatchEngine``, resuming each user from its pool cache; a new
user finds the system prompt's blocks), mlx-lm's ``LRUPromptCache`` as ``mlx_lm.server``
uses it (:mod:`kvpool.benchmarks.peer`, sized to hold every user) and re-prefill. Reported
per way: total time, time to first token p50/p95 over all turns and over resumed turns
(round >= 1), prefix hit rate (prompt tokens taken from a cache / all prompt tokens), and
whether the greedy tokens equal kvpool's.

Targets: kvpool's total at most 0.7x of the LRU way's; resumed turns' TTFT p50 at most 0.6x.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvpool.benchmarks.measure import GIB, at_most, mlx_cache_limit, percentile, ratio
from kvpool.benchmarks.peer import DEFAULT_MAX_SIZE, LruPromptCacheWay, lru_size_for
from kvpool.benchmarks.records import BenchRecord, Section
from kvpool.benchmarks.tables import table, times
from kvpool.benchmarks.turns import (
    WAY_LABELS,
    WAYS,
    TurnRequest,
    TurnResult,
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
CACHE_LIMIT = 2 * GIB
TARGET_TOTAL_VS_LRU = 0.7
TARGET_RESUMED_TTFT_VS_LRU = 0.6


@dataclass(frozen=True, slots=True)
class Shape:
    """One scenario. ``lru_size`` None: the LRU holds every user."""

    name: str
    users: int
    rounds: int
    arrivals: int  # users arriving per step
    system_tokens: int  # shared by every user
    first_question_tokens: int  # a user's opening question
    question_tokens: int  # each later question
    answer_tokens: int  # generated per round (max_tokens)
    lru_size: int | None
    with_reprefill: bool

    @property
    def steps(self) -> int:
        return (self.users - 1) // self.arrivals + self.rounds

    def lru_max_size(self) -> int:
        return lru_size_for(self.users) if self.lru_size is None else self.lru_size


BEST = "peer at its best"
DEFAULTS = "server defaults"
FULL = (
    Shape(BEST, users=6, rounds=4, arrivals=1, system_tokens=512, first_question_tokens=64,
          question_tokens=32, answer_tokens=16, lru_size=None, with_reprefill=True),
    Shape(DEFAULTS, users=12, rounds=6, arrivals=2, system_tokens=512,
          first_question_tokens=64, question_tokens=32, answer_tokens=16,
          lru_size=DEFAULT_MAX_SIZE, with_reprefill=False),
)  # fmt: skip
QUICK = (
    Shape(BEST, users=3, rounds=2, arrivals=1, system_tokens=64, first_question_tokens=32,
          question_tokens=16, answer_tokens=4, lru_size=None, with_reprefill=True),
    Shape(DEFAULTS, users=4, rounds=2, arrivals=2, system_tokens=64, first_question_tokens=32,
          question_tokens=16, answer_tokens=4, lru_size=3, with_reprefill=False),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class WayResult:
    """One way over the whole run (TTFT in ms; hit rate = cached / prompt tokens)."""

    total_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    resumed_ttft_p50_ms: float
    resumed_ttft_p95_ms: float
    new_ttft_p50_ms: float  # first turns (round 0)
    prompt_tokens: int
    cached_tokens: int
    prefix_hit_rate: float
    turns_unequal: int  # turns whose tokens differ from kvpool's


@dataclass(frozen=True, slots=True)
class ScenarioConfig:
    name: str
    users: int
    rounds: int
    arrivals: int
    steps: int
    system_tokens: int
    first_question_tokens: int
    question_tokens: int
    answer_tokens: int
    lru_max_size: int


@dataclass(frozen=True, slots=True)
class ScenarioResult:
    """``kvpool_vs_*``: kvpool's figure / the baseline's (< 1: kvpool is faster; None
    where the baseline did not run). ``ways`` has no ``plain`` without re-prefill."""

    config: ScenarioConfig
    turns: int  # user-rounds served per way
    ways: dict[str, WayResult]
    step_total_s: dict[str, tuple[float, ...]]  # way -> seconds per step
    kvpool_vs_lru_total: float | None
    kvpool_vs_lru_resumed_ttft_p50: float | None
    kvpool_vs_plain_total: float | None
    kvpool_vs_plain_resumed_ttft_p50: float | None


@dataclass(frozen=True, slots=True)
class MultiroundRecord(BenchRecord):
    model: str
    cache_limit_bytes: int
    scenarios: tuple[ScenarioResult, ...]


RECORD = MultiroundRecord


@dataclass(slots=True)
class _Samples:
    """What one way measured, turn by turn."""

    total_s: float = 0.0
    ttft_s: list[float] | None = None
    resumed_s: list[float] | None = None
    new_s: list[float] | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    unequal: int = 0

    def __post_init__(self) -> None:
        self.ttft_s, self.resumed_s, self.new_s = [], [], []

    def add(self, result: TurnResult, requests: list[TurnRequest], rounds: dict[str, int]) -> None:
        assert self.ttft_s is not None and self.resumed_s is not None and self.new_s is not None
        self.total_s += result.total_s
        for r in requests:
            t = result.ttft_s[r.agent_id]
            self.ttft_s.append(t)
            (self.resumed_s if rounds[r.agent_id] > 0 else self.new_s).append(t)
            self.prompt_tokens += len(r.prompt)
            self.cached_tokens += result.cached_tokens.get(r.agent_id, 0)

    def result(self) -> WayResult:
        assert self.ttft_s is not None and self.resumed_s is not None and self.new_s is not None

        def ms(samples: list[float], q: float) -> float:
            return round(percentile(samples, q) * 1e3, 1) if samples else 0.0

        return WayResult(
            total_s=round(self.total_s, 3),
            ttft_p50_ms=ms(self.ttft_s, 50),
            ttft_p95_ms=ms(self.ttft_s, 95),
            resumed_ttft_p50_ms=ms(self.resumed_s, 50),
            resumed_ttft_p95_ms=ms(self.resumed_s, 95),
            new_ttft_p50_ms=ms(self.new_s, 50),
            prompt_tokens=self.prompt_tokens,
            cached_tokens=self.cached_tokens,
            prefix_hit_rate=round(self.cached_tokens / max(1, self.prompt_tokens), 3),
            turns_unequal=self.unequal,
        )


def _warm_up(engine: BlockPoolBatchEngine, lru: LruPromptCacheWay, plain: Any) -> None:
    rng = random.Random(7)
    prompt = random_tokens(rng, 48)
    done = run_kvpool_turn(engine, [TurnRequest("warm", prompt, 2)]).completions["warm"]
    assert done.blocks is not None
    prompt = next_context(prompt, done.token_ids, random_tokens(rng, 16))
    again = run_kvpool_turn(engine, [TurnRequest("warm", prompt, 2, done.blocks)])
    blocks = again.completions["warm"].blocks
    assert blocks is not None
    engine.pool.release(blocks)
    lru.run_turn([TurnRequest("warm", prompt, 2)])
    run_plain_turn(plain, [TurnRequest("warm", prompt, 2)])


def run(quick: bool, model_ref: str | None = None) -> MultiroundRecord:
    """The record; ``model_ref``: any model reference (default: ``MODEL``, as in the
    committed record)."""
    name = model_ref or MODEL
    model, tokenizer = load_recipe(name)
    with mlx_cache_limit(CACHE_LIMIT):
        scenarios = tuple(
            _scenario(model, tokenizer, shape) for shape in (QUICK if quick else FULL)
        )
    best = scenarios[0]
    return MultiroundRecord(
        model=name,
        cache_limit_bytes=CACHE_LIMIT,
        scenarios=scenarios,
        targets=(
            at_most(f"multi-round QA ({BEST}) total time: kvpool / LRU prompt cache",
                    TARGET_TOTAL_VS_LRU, best.kvpool_vs_lru_total),
            at_most(f"resumed turns' TTFT p50 ({BEST}): kvpool / LRU prompt cache",
                    TARGET_RESUMED_TTFT_VS_LRU, best.kvpool_vs_lru_resumed_ttft_p50),
        ),
    )  # fmt: skip


def _scenario(model: Any, tokenizer: Any, shape: Shape) -> ScenarioResult:
    spec = ModelCacheSpec.from_model(model)
    rng = random.Random(2024 + shape.users)
    system = random_tokens(rng, shape.system_tokens)
    contexts = {
        f"user-{i}": system + random_tokens(rng, shape.first_question_tokens)
        for i in range(shape.users)
    }
    longest = shape.system_tokens + shape.first_question_tokens
    longest += shape.rounds * (shape.answer_tokens + shape.question_tokens)
    pool = BlockPool(spec, num_blocks=2 * shape.users * spec.blocks_for(longest) + 1)
    ways = WAYS if shape.with_reprefill else tuple(w for w in WAYS if w != "plain")
    samples = {w: _Samples() for w in ways}
    steps: dict[str, list[float]] = {w: [] for w in ways}
    caches: dict[str, CacheHandle] = {}
    num_turns = 0
    engine = BlockPoolBatchEngine(model, tokenizer, pool, spec)
    lru = LruPromptCacheWay(model, tokenizer, shape.lru_max_size())
    plain = plain_generator(model, tokenizer)
    try:
        _warm_up(engine, lru, plain)
        lru.forget()
        for step in range(shape.steps):
            rounds = {
                f"user-{i}": step - i // shape.arrivals
                for i in range(shape.users)
                if 0 <= step - i // shape.arrivals < shape.rounds
            }
            requests = [
                TurnRequest(
                    u, contexts[u], shape.answer_tokens, caches.get(u), system_tokens=len(system)
                )
                for u in rounds
            ]
            run_way: dict[str, Callable[[], TurnResult]] = {
                "kvpool": lambda r=requests: run_kvpool_turn(engine, r),  # type: ignore[misc]
                "lru": lambda r=requests: lru.run_turn(r),  # type: ignore[misc]
                "plain": lambda r=requests: run_plain_turn(plain, r),  # type: ignore[misc]
            }
            turn = {w: run_way[w]() for w in rotation(step, ways)}
            num_turns += len(requests)
            for w in ways:
                samples[w].add(turn[w], requests, rounds)
                steps[w].append(round(turn[w].total_s, 3))
                if w != "kvpool":
                    samples[w].unequal += tokens_unequal(turn["kvpool"], turn[w])
            for u, done in turn["kvpool"].completions.items():
                assert done.blocks is not None
                caches[u] = done.blocks
                contexts[u] = next_context(
                    contexts[u], done.token_ids, random_tokens(rng, shape.question_tokens)
                )
    finally:
        engine.close()
        lru.close()
        plain.close()
    results = {w: samples[w].result() for w in ways}
    kv, peer, pl = results["kvpool"], results["lru"], results.get("plain")
    return ScenarioResult(
        config=ScenarioConfig(
            name=shape.name,
            users=shape.users,
            rounds=shape.rounds,
            arrivals=shape.arrivals,
            steps=shape.steps,
            system_tokens=shape.system_tokens,
            first_question_tokens=shape.first_question_tokens,
            question_tokens=shape.question_tokens,
            answer_tokens=shape.answer_tokens,
            lru_max_size=lru.max_size,
        ),
        turns=num_turns,
        ways=results,
        step_total_s={w: tuple(v) for w, v in steps.items()},
        kvpool_vs_lru_total=ratio(kv.total_s, peer.total_s),
        kvpool_vs_lru_resumed_ttft_p50=ratio(kv.resumed_ttft_p50_ms, peer.resumed_ttft_p50_ms),
        kvpool_vs_plain_total=None if pl is None else ratio(kv.total_s, pl.total_s),
        kvpool_vs_plain_resumed_ttft_p50=(
            None if pl is None else ratio(kv.resumed_ttft_p50_ms, pl.resumed_ttft_p50_ms)
        ),
    )


# --------------------------------------------------------------------------- report


def render_section(r: MultiroundRecord) -> list[str]:
    lines = [f"Model {r.model}; TTFT in ms; user i arrives at step i // arrivals."]
    for sc in r.scenarios:
        c = sc.config
        rows = [
            (
                WAY_LABELS[w],
                x.total_s,
                x.ttft_p50_ms,
                x.ttft_p95_ms,
                x.resumed_ttft_p50_ms,
                x.resumed_ttft_p95_ms,
                x.new_ttft_p50_ms,
                f"{x.prefix_hit_rate:.1%}",
                x.turns_unequal,
            )
            for w, x in sc.ways.items()
        ]
        lines += [
            "",
            f"**{c.name}**: {c.users} users share a {c.system_tokens}-token system prompt, "
            f"open with {c.first_question_tokens} tokens, then {c.rounds} rounds of "
            f"{c.answer_tokens}-token answers and {c.question_tokens}-token questions; "
            f"{c.arrivals} user(s) arrive per step ({c.steps} steps, {sc.turns} turns per way; "
            f"the LRU holds {c.lru_max_size} sequences).",
            "",
            *table(
                ("way", "total s", "TTFT p50", "TTFT p95", "resumed p50", "resumed p95",
                 "new user p50", "prefix hit rate", "turns with other tokens than kvpool"),
                rows,
            ),
            "",
            f"kvpool / LRU: total {times(sc.kvpool_vs_lru_total)}, resumed TTFT p50 "
            f"{times(sc.kvpool_vs_lru_resumed_ttft_p50)}; kvpool / re-prefill: total "
            f"{times(sc.kvpool_vs_plain_total)}, resumed TTFT p50 "
            f"{times(sc.kvpool_vs_plain_resumed_ttft_p50)}.",
        ]  # fmt: skip
    return lines


def plot(figure: Any, r: MultiroundRecord) -> None:
    for i, sc in enumerate(r.scenarios):
        ax = figure.add_subplot(1, len(r.scenarios), i + 1)
        for w, values in sc.step_total_s.items():
            ax.plot(range(len(values)), values, marker="o", label=WAY_LABELS[w])
        ax.set_xlabel("step")
        ax.set_ylabel("seconds per step")
        ax.set_title(f"multi-round QA, {sc.config.name}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)


SECTION = Section(RECORD, render_section, plot)
