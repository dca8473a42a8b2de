"""Prefix sharing: many agents on one system prompt (LMCache's multi-round QA shape).

Users share one system prompt of ``SYSTEM`` tokens, each with a private history of
``PRIVATE`` tokens (random byte-level ids, greedy, random weights with real geometry):

* ``memory``: ``SHARED_AGENTS`` agents take one turn together; blocks held afterwards vs
  what unshared storage needs (every agent's own copy: ``sum(ceil(tokens / 256))``).
* ``new_agent``: a new agent arrives while the system prompt is cached (by the agents
  above); its time to first token vs the same agent with nothing cached (an engine with
  ``prefix_sharing=False`` on the same pool), measured in rotation.
* ``together``: ``TOGETHER_AGENTS`` agents arrive in the same step with an uncached shared
  prefix: prefilled tokens and wall time with prefix sharing vs without (today's engine
  prefilled every prompt whole), tokens checked equal.
* ``partial``: a prompt sharing 300 tokens with a cached sequence reuses 300, not 256.
* ``windows``: bytes one agent of 8K tokens holds for a gemma3-style geometry (5 of 6
  layers slide over a 1K window), one table spanning every layer vs per-group tables
  (bookkeeping only: the manager's tables, no model run).

Targets: memory <= 0.3x unshared; new-agent TTFT >= 5x lower; together: prefilled tokens
<= system + agents x private; partial reuse == 300.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from kvpool.benchmarks.measure import GIB, Summary, mlx_cache_limit, ratio
from kvpool.benchmarks.records import BenchRecord, Section, Target
from kvpool.benchmarks.tables import mib, table, times
from kvpool.benchmarks.turns import (
    TurnRequest,
    load_recipe,
    random_tokens,
    run_kvpool_turn,
)
from kvpool.cache.manager import KVCacheManager, Reservation
from kvpool.cache.spec import AttentionKind, LayerSpec, ModelCacheSpec
from kvpool.engine import BlockPoolBatchEngine
from kvpool.models import RECIPES
from kvpool.pool import BlockPool

MODEL = "llama-8x128"
CACHE_LIMIT = 2 * GIB
GENERATED = 8


@dataclass(frozen=True, slots=True)
class MemoryResult:
    """Blocks held after one turn of ``agents`` agents on one system prompt."""

    agents: int
    blocks_held: int
    blocks_unshared: int
    ratio: float
    bytes_held: int
    bytes_saved: int
    total_s: float
    prefilled_tokens: int
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class NewAgentResult:
    """TTFT of a new agent with the system prompt cached vs nothing cached."""

    prompt_tokens: int
    cached_tokens: tuple[int, ...]
    cached: Summary
    nothing_cached: Summary
    speedup: float | None


@dataclass(frozen=True, slots=True)
class TogetherSide:
    total_s: float
    prefilled_tokens: int
    mean_ttft_ms: float


@dataclass(frozen=True, slots=True)
class TogetherResult:
    """Agents arriving in one step with an uncached shared prefix."""

    agents: int
    prefill_bound: int
    shared: TogetherSide
    unshared: TogetherSide
    speedup_total: float | None
    tokens_equal: bool


@dataclass(frozen=True, slots=True)
class PartialResult:
    shared_tokens: int
    cached_tokens: int


@dataclass(frozen=True, slots=True)
class WindowsResult:
    geometry: str
    context_tokens: int
    bytes_one_table: int
    bytes_per_group_tables: int
    ratio: float
    blocks_per_group: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PrefixCacheUsage:
    query_tokens: int
    hit_tokens: int
    hit_rate: float
    num_evictions: int


@dataclass(frozen=True, slots=True)
class PrefixConfig:
    model: str
    system_tokens: int
    private_tokens: int
    generated_tokens: int
    block_tokens: int
    bytes_per_block: int
    weights: str


@dataclass(frozen=True, slots=True)
class PrefixRecord(BenchRecord):
    config: PrefixConfig
    memory: MemoryResult
    new_agent: NewAgentResult
    together: TogetherResult
    partial: PartialResult
    windows: WindowsResult
    prefix_cache: PrefixCacheUsage


RECORD = PrefixRecord


def _sizes(quick: bool) -> dict[str, int]:
    if quick:
        return {"system": 512, "private": 64, "shared_agents": 4, "together": 3, "reps": 1}
    return {"system": 2048, "private": 256, "shared_agents": 16, "together": 8, "reps": 3}


def _private(rng: random.Random, n: int) -> tuple[int, ...]:
    return random_tokens(rng, n)


def run(quick: bool, model_ref: str | None = None) -> PrefixRecord:
    """The record; ``model_ref``: any model reference (default: ``MODEL``, as in the
    committed record)."""
    name = model_ref or MODEL
    sizes = _sizes(quick)
    system_n, private_n = sizes["system"], sizes["private"]
    model, tokenizer = load_recipe(name)
    spec = ModelCacheSpec.from_model(model)
    rng = random.Random(0)
    system = random_tokens(rng, system_n)
    per_agent = spec.blocks_for(system_n + private_n + GENERATED + 64)
    # Requests reserve their worst case (no sharing) when submitted, so the pool must fit
    # every agent of a step unshared; what they hold after the turn is what sharing saves.
    num_blocks = (max(sizes["shared_agents"], sizes["together"]) + 4) * per_agent
    with mlx_cache_limit(CACHE_LIMIT):
        pool = BlockPool(spec, num_blocks=num_blocks)
        engine = BlockPoolBatchEngine(model, tokenizer, pool, spec)
        plain = BlockPoolBatchEngine(model, tokenizer, pool, spec, prefix_sharing=False)
        try:
            _warm_up(engine, rng)
            memory = _memory(engine, pool, system, sizes, rng)
            new_agent = _new_agent(engine, plain, pool, system, sizes, rng)
            for handle in pool.manager.handles:
                pool.release(handle)
            together = _together(engine, plain, pool, sizes, rng)
            partial = _partial(engine, pool, system, rng)
            usage = pool.usage()
        finally:
            engine.close()
            plain.close()
    windows = _windows()
    return PrefixRecord(
        config=PrefixConfig(
            model=name,
            system_tokens=system_n,
            private_tokens=private_n,
            generated_tokens=GENERATED,
            block_tokens=spec.block_tokens,
            bytes_per_block=spec.bytes_per_block,
            weights="random (real geometry): timings are real, text is not"
            if name in RECIPES
            else "those of the model given",
        ),
        memory=memory,
        new_agent=new_agent,
        together=together,
        partial=partial,
        windows=windows,
        prefix_cache=PrefixCacheUsage(
            query_tokens=usage.query_tokens,
            hit_tokens=usage.hit_tokens,
            hit_rate=round(usage.hit_rate, 4),
            num_evictions=usage.num_evictions,
        ),
        targets=(
            Target(
                f"{sizes['shared_agents']} agents on one system prompt: blocks held vs unshared",
                "<= 0.3x",
                memory.ratio,
                memory.ratio <= 0.3,
            ),
            Target(
                "new agent, system prompt cached: TTFT vs nothing cached",
                ">= 5x lower",
                new_agent.speedup,
                new_agent.speedup is not None and new_agent.speedup >= 5.0,
            ),
            Target(
                f"{sizes['together']} agents arriving together: prefilled tokens",
                f"<= {together.prefill_bound}",
                together.shared.prefilled_tokens,
                together.shared.prefilled_tokens <= together.prefill_bound,
            ),
            Target(
                "a prompt sharing 300 tokens with a cached sequence: tokens reused",
                "== 300",
                partial.cached_tokens,
                partial.cached_tokens == 300,
            ),
        ),
    )


def _warm_up(engine: BlockPoolBatchEngine, rng: random.Random) -> None:
    requests = [
        TurnRequest(f"warm-{i}", random_tokens(rng, 300), 2, None, "warm") for i in range(2)
    ]
    for c in run_kvpool_turn(engine, requests).completions.values():
        if c.blocks is not None:
            engine.pool.release(c.blocks)


def _memory(
    engine: BlockPoolBatchEngine,
    pool: BlockPool,
    system: tuple[int, ...],
    sizes: dict[str, int],
    rng: random.Random,
) -> MemoryResult:
    """Agents on one system prompt take a turn together; blocks held after it."""
    n = sizes["shared_agents"]
    requests = [
        TurnRequest(f"user-{i}", (*system, *_private(rng, sizes["private"])), GENERATED)
        for i in range(n)
    ]
    used_before = pool.num_used
    result = run_kvpool_turn(engine, requests)
    held = pool.num_used - used_before
    unshared = sum(
        pool.spec.blocks_for(c.blocks.total_tokens)
        for c in result.completions.values()
        if c.blocks is not None
    )
    return MemoryResult(
        agents=n,
        blocks_held=held,
        blocks_unshared=unshared,
        ratio=round(held / unshared, 3),
        bytes_held=held * pool.spec.bytes_per_block,
        bytes_saved=(unshared - held) * pool.spec.bytes_per_block,
        total_s=round(result.total_s, 3),
        prefilled_tokens=sum(c.prefilled_tokens for c in result.completions.values()),
        prompt_tokens=sum(c.prompt_tokens for c in result.completions.values()),
    )


def _new_agent(
    engine: BlockPoolBatchEngine,
    plain: BlockPoolBatchEngine,
    pool: BlockPool,
    system: tuple[int, ...],
    sizes: dict[str, int],
    rng: random.Random,
) -> NewAgentResult:
    """TTFT of a new agent with the system prompt cached vs nothing cached, in rotation."""
    cached_s: list[float] = []
    cold_s: list[float] = []
    reused: list[int] = []
    for rep in range(sizes["reps"]):
        order = [(engine, cached_s), (plain, cold_s)]
        for which, samples in order if rep % 2 == 0 else order[::-1]:
            # A private tail of its own: the other engine's run (its blocks are published
            # too) must not turn this one into a full hit.
            prompt = (*system, *_private(rng, 64))
            agent = f"new-{rep}-{'shared' if which is engine else 'plain'}"
            result = run_kvpool_turn(which, [TurnRequest(agent, prompt, 1)])
            samples.append(result.ttft_s[agent])
            done = result.completions[agent]
            if which is engine:
                reused.append(done.cached_tokens)
            if done.blocks is not None:
                pool.release(done.blocks)
    cached, cold = Summary.of(cached_s), Summary.of(cold_s)
    return NewAgentResult(
        prompt_tokens=len(system) + 64,
        cached_tokens=tuple(reused),
        cached=cached,
        nothing_cached=cold,
        speedup=ratio(cold.p50_ms, cached.p50_ms, 1),
    )


def _together(
    engine: BlockPoolBatchEngine,
    plain: BlockPoolBatchEngine,
    pool: BlockPool,
    sizes: dict[str, int],
    rng: random.Random,
) -> TogetherResult:
    """Agents arriving in one step with a shared uncached prefix: prefill it once?"""
    n, system_n, private_n = sizes["together"], sizes["system"], sizes["private"]
    fresh_system = random_tokens(rng, system_n)  # cached nowhere
    prompts = [(*fresh_system, *_private(rng, private_n)) for _ in range(n)]
    sides: dict[str, TogetherSide] = {}
    tokens: dict[str, list[tuple[int, ...]]] = {}
    for name, which, salt in (("shared", engine, "together"), ("unshared", plain, "")):
        requests = [
            TurnRequest(f"{name}-{i}", p, GENERATED, None, salt) for i, p in enumerate(prompts)
        ]
        t0 = time.perf_counter()
        result = run_kvpool_turn(which, requests)
        elapsed = time.perf_counter() - t0
        done = [result.completions[r.agent_id] for r in requests]
        tokens[name] = [c.token_ids for c in done]
        sides[name] = TogetherSide(
            total_s=round(elapsed, 3),
            prefilled_tokens=sum(c.prefilled_tokens for c in done),
            mean_ttft_ms=round(1e3 * result.mean_ttft_s, 1),
        )
        for c in done:
            if c.blocks is not None:
                pool.release(c.blocks)
    return TogetherResult(
        agents=n,
        prefill_bound=system_n + n * private_n,
        shared=sides["shared"],
        unshared=sides["unshared"],
        speedup_total=ratio(sides["unshared"].total_s, sides["shared"].total_s, 2),
        tokens_equal=tokens["shared"] == tokens["unshared"],
    )


def _partial(
    engine: BlockPoolBatchEngine, pool: BlockPool, system: tuple[int, ...], rng: random.Random
) -> PartialResult:
    """A prompt that shares exactly 300 tokens with the cached system prompt."""
    tail = [t for t in random_tokens(rng, 80) if t != system[300]]
    prompt = (*system[:300], *tail)
    result = run_kvpool_turn(engine, [TurnRequest("partial", prompt, 1)])
    done = result.completions["partial"]
    if done.blocks is not None:
        pool.release(done.blocks)
    return PartialResult(shared_tokens=300, cached_tokens=done.cached_tokens)


def _windows() -> WindowsResult:
    """Bytes an 8K-token agent holds, gemma3-style (5 of 6 layers slide over 1K tokens)."""
    layers = tuple(
        LayerSpec(AttentionKind.GLOBAL, 8, 128, 128)
        if i % 6 == 5
        else LayerSpec(AttentionKind.SLIDING, 8, 128, 128, window=1024)
        for i in range(48)
    )
    spec = ModelCacheSpec(layers, "bfloat16")
    context = 8192
    manager = KVCacheManager(spec, [64] * len(spec.groups))
    tokens = list(range(context))
    res = manager.reserve("agent", tokens[:-1], 1, manager.lookup(tokens[:-1]))
    assert isinstance(res, Reservation)
    manager.release_pin(res)
    tables = manager.place(res, context)
    # What a storage writes for a finished sequence: sliding layers hold their last W.
    written = [0 if p.window is None else context - p.window for p in manager.policies]
    handle = manager.commit(res, tokens, tables, written)
    after = sum(len(t.held) * spec.group_bytes_per_block(g) for g, t in enumerate(handle.tables))
    before = spec.blocks_for(context) * spec.bytes_per_block
    return WindowsResult(
        geometry="48 layers (40 sliding, window 1024; 8 global) x 8 KV heads x 128, bf16",
        context_tokens=context,
        bytes_one_table=before,
        bytes_per_group_tables=after,
        ratio=round(after / before, 3),
        blocks_per_group=tuple(len(t.held) for t in handle.tables),
    )


# --------------------------------------------------------------------------- report


def render_section(r: PrefixRecord) -> list[str]:
    c, m, n, t, w = r.config, r.memory, r.new_agent, r.together, r.windows
    return [
        f"System prompt of {c.system_tokens} tokens, {c.private_tokens} private tokens "
        f"per agent, {c.model} ({c.weights}).",
        "",
        *table(
            ("measure", "with sharing", "without", "ratio"),
            [
                (
                    f"blocks held, {m.agents} agents after one turn",
                    m.blocks_held,
                    m.blocks_unshared,
                    f"{m.ratio}x",
                ),
                (
                    "new agent TTFT p50 (system prompt cached)",
                    f"{n.cached.p50_ms:.0f} ms",
                    f"{n.nothing_cached.p50_ms:.0f} ms",
                    times(n.speedup),
                ),
                (
                    f"{t.agents} agents together: prefilled tokens",
                    t.shared.prefilled_tokens,
                    t.unshared.prefilled_tokens,
                    f"bound {t.prefill_bound}",
                ),
                (
                    f"{t.agents} agents together: wall time",
                    f"{t.shared.total_s:.2f} s",
                    f"{t.unshared.total_s:.2f} s",
                    times(t.speedup_total),
                ),
                (
                    f"8K-token agent, {w.geometry}",
                    mib(w.bytes_per_group_tables),
                    mib(w.bytes_one_table),
                    f"{w.ratio}x",
                ),
            ],
        ),
        "",
        f"Partial block: a prompt sharing {r.partial.shared_tokens} tokens reused "
        f"{r.partial.cached_tokens}. Prefix hit rate {r.prefix_cache.hit_rate:.1%} "
        f"({r.prefix_cache.hit_tokens} of {r.prefix_cache.query_tokens} tokens); "
        f"bytes saved after the shared turn: {mib(m.bytes_saved)}; tokens equal with and "
        f"without sharing: {t.tokens_equal}.",
    ]


SECTION = Section(RECORD, render_section)
