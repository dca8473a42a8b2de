"""Hybrid: a Qwen3-Next-shaped model (3 of every 4 layers recurrent) in the pool.

* **Bytes per agent** at 8K tokens: the attention layers' K/V blocks plus one state per
  recurrent layer, against the K/V the same model would hold if every layer were attention
  (from the spec: exact arithmetic, nothing run).
* **Resume**: an agent of ``context`` tokens (2K; 256 with ``--quick``) sends a next turn
  of 32 new tokens. TTFT from the pool (its blocks and its end state) against a re-prefill
  of the whole prompt by a fresh engine with nothing cached, and against mlx-lm's
  ``LRUPromptCache`` resumed the way ``mlx_lm.server`` does (:mod:`kvpool.benchmarks.peer`)
  holding the same cache (the pool's, as mlx-lm caches); timed by one clock, in rotation,
  3 samples of the pool and the LRU way per re-prefill (3 re-prefills; 1 and 1 quick).
  Each sample's tokens are compared with the re-prefill's.
* **Shared system prompt**: 16 agents (3 quick) arrive one after another, each with a
  system prompt of ``context`` tokens and 32 tokens of its own. Prefilled tokens, wall time
  and the recurrent group's memory at the end, with state snapshots every block, every 4th
  block and none (``BlockPoolBatchEngine(state_snapshot_blocks=)``).

The model is mlx-lm's ``qwen3_next`` with random weights (Linear and Embedding weights x4:
context-dependent greedy output), float32, built in-process; ``--model`` takes another
model directory or recipe with recurrent layers. Tokens are random ids; the tiny recipe's
tokenizer stands in for decoding.

Target: TTFT from the pool >= 10x faster than re-prefill at 2K tokens.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace
from typing import Any

from kvpool.benchmarks.measure import GIB, Summary, at_least, mlx_cache_limit, ratio
from kvpool.benchmarks.peer import LruPromptCacheWay, caches_from_pool
from kvpool.benchmarks.records import BenchRecord, Section
from kvpool.benchmarks.tables import mib, table, times
from kvpool.benchmarks.turns import WAYS, TurnRequest, TurnResult, rotation, run_kvpool_turn
from kvpool.cache.spec import AttentionKind, ModelCacheSpec
from kvpool.engine import BlockPoolBatchEngine
from kvpool.pool import BlockPool

MODEL = "qwen3_next-8x512"
QWEN3_NEXT = {
    "model_type": "qwen3_next",
    "hidden_size": 512,
    "num_hidden_layers": 8,  # full attention every 4th layer (mlx-lm's default interval)
    "intermediate_size": 1024,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "linear_num_value_heads": 8,
    "linear_num_key_heads": 4,
    "linear_key_head_dim": 64,
    "linear_value_head_dim": 64,
    "linear_conv_kernel_dim": 4,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "decoder_sparse_step": 1,
    "shared_expert_intermediate_size": 512,
    "mlp_only_layers": [],
    "moe_intermediate_size": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.25,
    "max_position_embeddings": 32768,
    "vocab_size": 512,
}
QUICK = {"hidden_size": 128, "num_hidden_layers": 4, "intermediate_size": 256}
BYTES_CONTEXT = 8192
CONTEXT, QUICK_CONTEXT = 2048, 256
NEW_TOKENS = 32
MAX_TOKENS = 4
REPS, QUICK_REPS = 3, 1
FAST_REPS, QUICK_FAST_REPS = 3, 1  # pool and LRU samples per repetition (one re-prefill each)
AGENTS, QUICK_AGENTS = 16, 3
SNAPSHOTS: tuple[int | None, ...] = (1, 4, None)
TARGET_SPEEDUP = 10.0


def _build(quick: bool) -> Any:
    import mlx.core as mx
    from mlx.nn.layers.embedding import Embedding
    from mlx.nn.layers.linear import Linear

    from kvpool.mlx.mlx_lm import model_module

    config = {**QWEN3_NEXT, **(QUICK if quick else {})}
    module = model_module("qwen3_next")
    mx.random.seed(0)
    model = module.Model(module.ModelArgs.from_dict(config))
    model.set_dtype(mx.float32)
    for _, layer in model.named_modules():
        if isinstance(layer, (Linear, Embedding)):
            layer.weight = layer.weight * 4.0
    mx.eval(model.parameters())
    return model


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 500) for _ in range(n)]


def _engine(model: Any, tokenizer: Any, spec: ModelCacheSpec, **kw: Any) -> BlockPoolBatchEngine:
    pool = BlockPool(spec, num_blocks=256)
    return BlockPoolBatchEngine(model, tokenizer, pool, spec, **kw)


def _turn(engine: BlockPoolBatchEngine, agent: str, prompt: list[int], cache: Any = None) -> Any:
    engine.submit(agent, prompt, cache, MAX_TOKENS)
    (done,) = engine.drain()
    if done.error is not None:
        raise done.error
    return done


def _bytes(spec: ModelCacheSpec) -> AgentBytes:
    attention = [x for x in spec.layers if x.kind is not AttentionKind.RECURRENT]
    kv = spec.bytes_per_token * BYTES_CONTEXT
    per_layer = spec.bytes_per_token / max(1, len(attention))
    return AgentBytes(
        context_tokens=BYTES_CONTEXT,
        kv_bytes=kv,
        state_bytes=spec.state_bytes,
        all_attention_kv_bytes=int(per_layer * spec.n_layers * BYTES_CONTEXT),
        saved_x=ratio(per_layer * spec.n_layers * BYTES_CONTEXT, kv + spec.state_bytes, 2),
    )


def _resume(
    model: Any, tokenizer: Any, spec: ModelCacheSpec, context: int, reps: int, fast: int
) -> Resume:
    rng = random.Random(1)
    lru = LruPromptCacheWay(model, tokenizer)
    lru.run_turn([TurnRequest("warm", tuple(_tokens(random.Random(0), 16)), 2)])  # its generator
    ttft: dict[str, list[float]] = {way: [] for way in WAYS}
    unequal = dict.fromkeys(WAYS, 0)
    for r in range(reps):
        # No prefix sharing: a repeated resume would find the previous one's blocks.
        engine = _engine(model, tokenizer, spec, prefix_sharing=False)
        first = _turn(engine, f"a{r}", _tokens(rng, context))
        held = first.blocks
        prompt = (*held.token_ids, first.token_ids[-1], *_tokens(rng, NEW_TOKENS - 1))
        # The LRU way holds the same cache (the pool's, as mlx-lm caches): what mlx_lm.server
        # would have stored after the first turn.
        lru_held = caches_from_pool(engine.pool, held)
        fresh = _engine(model, tokenizer, spec, prefix_sharing=False)
        request = TurnRequest("a", prompt, MAX_TOKENS)
        pairs = [w for i in range(fast) for w in rotation(r + i, ("kvpool", "lru"))]
        results: list[tuple[str, TurnResult]] = []
        for way in rotation(r, ["plain", *pairs]):  # the re-prefill in another place each time
            if way == "kvpool":
                result = run_kvpool_turn(engine, [replace(request, cache=held)])
                resumed = result.completions["a"].blocks
                assert resumed is not None, "this indicates a bug"
                engine.pool.release(resumed)
            elif way == "lru":
                lru.forget()  # else the previous sample's finished sequence is a longer hit
                lru.hold(held.token_ids, lru_held)  # fetch_nearest_cache copies what it returns
                result = lru.run_turn([request])
            else:  # re-prefill: a fresh engine, nothing cached
                result = run_kvpool_turn(fresh, [request])
            assert result.cached_tokens["a"] == (0 if way == "plain" else len(held.token_ids))
            results.append((way, result))
            ttft[way].append(result.ttft_s["a"])
        (plain,) = (x for w, x in results if w == "plain")
        for way, result in results:
            unequal[way] += int(result.tokens != plain.tokens)
        engine.pool.release(held)
    lru.close()
    pool, reprefill, peer = (Summary.of(ttft[w]) for w in ("kvpool", "plain", "lru"))
    return Resume(
        context_tokens=context,
        pool=pool,
        reprefill=reprefill,
        speedup=ratio(reprefill.p50_ms, pool.p50_ms, 1),
        tokens_equal=unequal["kvpool"] == 0,
        lru=peer,
        pool_vs_lru=ratio(pool.p50_ms, peer.p50_ms),
        lru_tokens_equal=unequal["lru"] == 0,
    )


def _shared(
    model: Any, tokenizer: Any, spec: ModelCacheSpec, context: int, agents: int
) -> list[Shared]:
    rng = random.Random(2)
    system = _tokens(rng, context)
    prompts = [[*system, *_tokens(rng, NEW_TOKENS)] for _ in range(agents)]
    recurrent = next(g for g, x in enumerate(spec.groups) if x.kind is AttentionKind.RECURRENT)
    rows = []
    for every in SNAPSHOTS:
        engine = _engine(model, tokenizer, spec, state_snapshot_blocks=every)
        prefilled = 0
        t0 = time.perf_counter()
        for i, prompt in enumerate(prompts):
            done = _turn(engine, f"s{i}", prompt)
            prefilled += done.prompt_tokens - done.cached_tokens
        wall = time.perf_counter() - t0
        usage = engine.pool.usage().groups[recurrent]
        rows.append(
            Shared(
                snapshot_blocks=every,
                agents=agents,
                prompt_tokens=sum(len(p) for p in prompts),
                prefilled_tokens=prefilled,
                wall_s=round(wall, 3),
                states_held=usage.num_used,
                snapshots_cached=usage.num_cached,
                state_bytes=(usage.num_used + usage.num_cached) * usage.bytes_per_block,
            )
        )
    return rows


def run(quick: bool, model_ref: str | None = None) -> HybridRecord:
    from kvpool.benchmarks.turns import load_recipe

    _, tokenizer = load_recipe("tiny")
    if model_ref is None:
        model, name = _build(quick), MODEL if not quick else "qwen3_next-4x128"
    else:
        model, tokenizer = load_recipe(model_ref)
        name = model_ref
    spec = ModelCacheSpec.from_model(model)
    if not spec.has_recurrent:
        raise ValueError(f"{name}: no recurrent layers ({spec.describe()})")
    context = QUICK_CONTEXT if quick else CONTEXT
    with mlx_cache_limit(2 * GIB):
        reps = (QUICK_REPS, QUICK_FAST_REPS) if quick else (REPS, FAST_REPS)
        resume = _resume(model, tokenizer, spec, context, *reps)
        shared = _shared(model, tokenizer, spec, context, QUICK_AGENTS if quick else AGENTS)
    judged = resume.speedup if context == CONTEXT else None
    return HybridRecord(
        targets=(
            at_least(
                f"TTFT from the pool vs re-prefill at {CONTEXT} tokens", TARGET_SPEEDUP, judged
            ),
        ),
        config=HybridConfig(name, spec.describe(), context, NEW_TOKENS, MAX_TOKENS),
        bytes_per_agent=_bytes(spec),
        resume=resume,
        shared=tuple(shared),
    )


@dataclass(frozen=True, slots=True)
class HybridConfig:
    model: str
    spec: str
    context_tokens: int
    new_tokens: int
    max_tokens: int


@dataclass(frozen=True, slots=True)
class AgentBytes:
    """One agent at ``context_tokens``: K/V of the attention layers and the recurrent states,
    against the K/V if every layer were attention (``saved_x``: that / what it holds)."""

    context_tokens: int
    kv_bytes: int
    state_bytes: int
    all_attention_kv_bytes: int
    saved_x: float | None


@dataclass(frozen=True, slots=True)
class Resume:
    """A next turn's TTFT from the pool, re-prefilled, and from mlx-lm's ``LRUPromptCache``
    holding the same cache (``lru``); ``*tokens_equal``: that way generated the re-prefill's
    tokens in every repetition."""

    context_tokens: int
    pool: Summary
    reprefill: Summary
    speedup: float | None  # re-prefill TTFT p50 / the pool's
    tokens_equal: bool
    lru: Summary
    pool_vs_lru: float | None  # the pool's TTFT p50 / the LRU way's (< 1: kvpool is faster)
    lru_tokens_equal: bool


@dataclass(frozen=True, slots=True)
class Shared:
    """Agents one after another on one system prompt (``snapshot_blocks`` None: no snapshots)."""

    snapshot_blocks: int | None
    agents: int
    prompt_tokens: int
    prefilled_tokens: int
    wall_s: float
    states_held: int  # end states of the agents' handles
    snapshots_cached: int  # cached-free snapshots at the end
    state_bytes: int  # both


@dataclass(frozen=True, slots=True)
class HybridRecord(BenchRecord):
    config: HybridConfig
    bytes_per_agent: AgentBytes
    resume: Resume
    shared: tuple[Shared, ...]


RECORD = HybridRecord


def render_section(r: HybridRecord) -> list[str]:
    b, x, c = r.bytes_per_agent, r.resume, r.config
    shared_rows = [
        (
            "none" if s.snapshot_blocks is None else f"every {s.snapshot_blocks}",
            s.agents,
            s.prompt_tokens,
            s.prefilled_tokens,
            f"{s.wall_s:.2f}",
            s.states_held,
            s.snapshots_cached,
            mib(s.state_bytes),
        )
        for s in r.shared
    ]
    return [
        f"Model {c.model}: {c.spec}.",
        "",
        f"One agent at {b.context_tokens} tokens: K/V {mib(b.kv_bytes)} + states "
        f"{mib(b.state_bytes)}, against {mib(b.all_attention_kv_bytes)} if every layer were "
        f"attention ({times(b.saved_x)} less).",
        "",
        f"Next turn of {c.new_tokens} tokens after {x.context_tokens}: TTFT "
        f"{x.pool.p50_ms:.1f} ms from the pool vs {x.reprefill.p50_ms:.1f} ms re-prefilling "
        f"({times(x.speedup)}; tokens equal: {x.tokens_equal}) and {x.lru.p50_ms:.1f} ms from "
        f"mlx-lm's LRUPromptCache (kvpool / LRU {times(x.pool_vs_lru)}; its tokens equal the "
        f"re-prefill's: {x.lru_tokens_equal}).",
        "",
        *table(
            ("snapshots", "agents", "prompt tokens", "prefilled", "wall s", "end states",
             "snapshots cached", "state memory"),
            shared_rows,
        ),
    ]  # fmt: skip


SECTION = Section(RECORD, render_section)
