"""One turn of several agents, timed the same way through kvpool and through plain mlx-lm.

The model benchmarks compare kvpool with what a user would run instead: mlx-lm's
``BatchGenerator`` given every agent's whole context each turn (re-prefill). Both sides are
timed by the same clock: ``t0`` just before the first request goes in, an agent's time to
first token (TTFT) when its first generated token reaches the caller, the turn's total when
every agent has finished. Prompts are token ids (no tokenizer cost on either side).

Caches can also be made without a model (:func:`fill_agent_cache`): random K/V written
straight into pool blocks. Resuming from them costs exactly what resuming a real cache costs
(attention does the same arithmetic whatever the values), without paying a long prefill first
just to produce a cache.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvpool.benchmarks.measure import percentile
from kvpool.blocks import CompletedGeneration, TokenEvent
from kvpool.cache.storage import LayerKV, host_dtype
from kvpool.cache.tables import CacheHandle
from kvpool.engine import BlockPoolBatchEngine
from kvpool.errors import GenerationError
from kvpool.pool import BlockPool

# Byte-level token ids: valid for every recipe's tokenizer, never a special (stop) token.
PROMPT_VOCAB = 256


@dataclass(frozen=True, slots=True)
class TurnRequest:
    """One agent's turn: its whole context, the cache to resume from (kvpool only).

    ``system_tokens``: the length of the system prompt at the head of ``prompt`` (the
    segment ``mlx_lm.server`` caches on its own, see :mod:`kvpool.benchmarks.peer`).
    """

    agent_id: str
    prompt: tuple[int, ...]
    max_tokens: int
    cache: CacheHandle | None = None
    cache_salt: str = ""  # kvpool only: the tenant the cache was computed under
    system_tokens: int = 0


@dataclass(frozen=True, slots=True)
class TurnResult:
    """A finished turn. ``ttft_s``, ``tokens`` and ``cached_tokens`` are keyed by agent id;
    ``cached_tokens[a]`` prompt tokens came from a cache (the rest were prefilled);
    ``parts_s`` splits ``total_s`` (see :func:`add_parts`)."""

    total_s: float
    ttft_s: dict[str, float]
    tokens: dict[str, tuple[int, ...]]
    completions: dict[str, CompletedGeneration]  # kvpool only: each agent's new cache
    cached_tokens: dict[str, int] = field(default_factory=dict)
    # where the turn's time went, in seconds, by the same names for every way:
    # "cache_in" (caches made ready to resume from), "generate" (BatchGenerator.next),
    # "cache_out" (finished caches kept); the rest of total_s is the way's own bookkeeping
    parts_s: dict[str, float] = field(default_factory=dict)

    @property
    def mean_ttft_s(self) -> float:
        return sum(self.ttft_s.values()) / len(self.ttft_s)

    def prefilled_tokens(self, requests: Sequence[TurnRequest]) -> int:
        """Prompt tokens of ``requests`` this turn computed (not taken from a cache)."""
        return sum(len(r.prompt) - self.cached_tokens.get(r.agent_id, 0) for r in requests)


# The ways a turn is served, in the benchmarks that compare all three.
WAYS = ("kvpool", "lru", "plain")
WAY_LABELS = {
    "kvpool": "kvpool",
    "lru": "mlx-lm LRUPromptCache",
    "plain": "re-prefill (mlx-lm)",
}


def rotation(turn: int, ways: Sequence[str]) -> list[str]:
    """The order ``ways`` run in at ``turn``: rotated by one each turn, so no way always
    runs right after another (the machine is shared: its load drifts)."""
    k = turn % len(ways)
    return [*ways[k:], *ways[:k]]


def tokens_unequal(reference: TurnResult, other: TurnResult) -> int:
    """How many agents of a turn generated other tokens in ``other`` than in ``reference``."""
    return sum(other.tokens.get(a) != t for a, t in reference.tokens.items())


@dataclass(frozen=True, slots=True)
class WayTotals:
    """One way over a whole run: time, time to first token over every agent-turn."""

    total_s: float
    mean_ttft_ms: float
    p50_ttft_ms: float
    p95_ttft_ms: float
    prefilled_tokens: int
    parts_s: dict[str, float] = field(default_factory=dict)  # summed TurnResult.parts_s

    @classmethod
    def of(cls, results: Sequence[TurnResult], prefilled_tokens: int) -> WayTotals:
        ttfts = [t for r in results for t in r.ttft_s.values()]
        parts: dict[str, float] = {}
        for r in results:
            add_parts(parts, r.parts_s)
        return cls(
            total_s=round(sum(r.total_s for r in results), 3),
            mean_ttft_ms=round(sum(ttfts) / len(ttfts) * 1e3, 1),
            p50_ttft_ms=round(percentile(ttfts, 50) * 1e3, 1),
            p95_ttft_ms=round(percentile(ttfts, 95) * 1e3, 1),
            prefilled_tokens=prefilled_tokens,
            parts_s={k: round(v, 3) for k, v in parts.items()},
        )


def add_parts(into: dict[str, float], parts: dict[str, float]) -> dict[str, float]:
    """``into`` with each of ``parts`` added to its own name (the names of
    :attr:`TurnResult.parts_s`); returns ``into``."""
    for name, seconds in parts.items():
        into[name] = into.get(name, 0.0) + seconds
    return into


@functools.lru_cache(maxsize=4)
def load_recipe(name: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a built-in recipe, built on first use, loaded once."""
    from kvpool.models import load_model

    return load_model(name)


def random_tokens(rng: random.Random, n: int) -> tuple[int, ...]:
    return tuple(rng.randrange(PROMPT_VOCAB) for _ in range(n))


def next_context(
    prompt: Sequence[int], generated: Sequence[int], user: Sequence[int]
) -> tuple[int, ...]:
    """An agent's next context: its prompt, what it generated, the new user tokens."""
    return (*prompt, *generated, *user)


def plain_generator(model: Any, tokenizer: Any) -> Any:
    """mlx-lm's ``BatchGenerator`` with the engine's defaults and stop tokens."""
    from kvpool.mlx.mlx_lm import batch_generator

    stops = [[int(t)] for t in sorted(tokenizer.eos_token_ids)]
    return batch_generator(model, stop_tokens=stops)


def run_kvpool_turn(
    engine: BlockPoolBatchEngine, requests: Sequence[TurnRequest], t0: float | None = None
) -> TurnResult:
    """Submit every request, step until all finish. ``t0``: the clock's start, if earlier
    than the first submit (for work done before it, such as loading a cache from disk)."""
    first: dict[str, float] = {}

    def on_token(event: TokenEvent) -> None:
        first.setdefault(event.agent_id, time.perf_counter())

    start = time.perf_counter() if t0 is None else t0
    before = engine.times
    for r in requests:
        engine.submit(
            r.agent_id, r.prompt, r.cache, r.max_tokens, on_token=on_token, cache_salt=r.cache_salt
        )
    completions: dict[str, CompletedGeneration] = {}
    while engine.has_work:
        for done in engine.step():
            if done.error is not None:
                raise done.error
            completions[done.agent_id] = done
    total = time.perf_counter() - start
    spent = engine.times.minus(before)
    return TurnResult(
        total_s=total,
        ttft_s={a: t - start for a, t in first.items()},
        tokens={a: c.token_ids for a, c in completions.items()},
        completions=completions,
        cached_tokens={a: c.cached_tokens for a, c in completions.items()},
        parts_s={
            "cache_in": spent.read_s,
            "generate": spent.generate_s,
            "cache_out": spent.write_s,
        },
    )


def run_plain_turn(generator: Any, requests: Sequence[TurnRequest]) -> TurnResult:
    """Insert every request's whole prompt into mlx-lm's ``BatchGenerator`` (no cache) and
    call ``next()`` until all finish."""
    start = time.perf_counter()
    uids = generator.insert(
        [list(r.prompt) for r in requests], max_tokens=[r.max_tokens for r in requests]
    )
    uid_to_agent = {int(u): r.agent_id for u, r in zip(uids, requests, strict=True)}
    first: dict[str, float] = {}
    tokens: dict[str, list[int]] = {r.agent_id: [] for r in requests}
    running = set(uid_to_agent)
    generate = 0.0
    while running:
        step = time.perf_counter()
        _, responses = generator.next()
        now = time.perf_counter()
        generate += now - step
        for response in responses:
            agent = uid_to_agent.get(int(response.uid))
            if agent is None:
                continue
            first.setdefault(agent, now)
            tokens[agent].append(int(response.token))
            if response.finish_reason is not None:
                running.discard(int(response.uid))
    total = time.perf_counter() - start
    if len(first) != len(requests):
        raise GenerationError(f"{len(requests) - len(first)} sequences generated no token")
    return TurnResult(
        total_s=total,
        ttft_s={a: t - start for a, t in first.items()},
        tokens={a: tuple(t) for a, t in tokens.items()},
        completions={},
        cached_tokens={r.agent_id: 0 for r in requests},
        parts_s={"generate": generate},
    )


def fill_agent_cache(
    pool: BlockPool, agent_id: str, tokens: Sequence[int], seed: int = 0
) -> CacheHandle:
    """An agent cache of ``tokens`` made without a model: blocks taken from ``pool`` and
    filled with random K/V (one random array per shape, reused across layers)."""
    spec = pool.spec
    rng = np.random.default_rng(seed)
    shape_to_array: dict[tuple[int, int, int], Any] = {}
    kvs = []
    for i, layer in enumerate(spec.layers):
        arrays = []
        for head_dim in (layer.k_head_dim, layer.v_head_dim):
            shape = (layer.n_kv_heads, len(tokens), head_dim)
            if shape not in shape_to_array:
                shape_to_array[shape] = _random_host(rng, shape, spec.dtype)
            arrays.append(shape_to_array[shape])
        kvs.append(LayerKV(i, 0, arrays[0], arrays[1]))
    return pool.write_cache(agent_id, tokens, kvs)


def _random_host(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> Any:
    """Standard-normal values in the host layout of ``dtype`` (bfloat16: its upper 16 bits)."""
    values = rng.standard_normal(shape, dtype=np.float32)
    if dtype == "bfloat16":
        return (values.view(np.uint32) >> 16).astype(np.uint16)
    return values.astype(host_dtype(dtype))


def cache_bytes(pool: BlockPool, num_tokens: int) -> int:
    """Bytes of K and V that ``num_tokens`` positions take in every layer (no block padding)."""
    return pool.spec.bytes_per_block * num_tokens // pool.spec.block_tokens
