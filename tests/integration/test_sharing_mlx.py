"""Prefix blocks shared between agents, on real mlx-lm: every turn equals a fresh run."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import mlx.core as mx
import pytest
from helpers import LoadedModel, Reference, fresh, make_engine, words

from kvpool import BlockPoolBatchEngine, CacheHandle, CompletedGeneration
from kvpool.cache.manager import common_prefix_len
from kvpool.models import RECIPES, ModelRecipe, build_model, load_model

# gemma3-style: 5 of 6 layers slide, over a window that is no multiple of the block size.
GEMMA_W300: ModelRecipe = dataclasses.replace(
    RECIPES["tiny-swa"],
    name="tiny-gemma-w300",
    num_hidden_layers=6,
    sliding_window=300,
    sliding_window_pattern=6,
)


@pytest.fixture(scope="module")
def gemma_w300(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = build_model(GEMMA_W300, tmp_path_factory.mktemp("models") / GEMMA_W300.name)
    model, tokenizer = load_model(path)
    return model, tokenizer, Path(path)


def run_turn(
    engine: BlockPoolBatchEngine,
    requests: dict[str, tuple[list[int], CacheHandle | None]],
    max_tokens: int,
    **kwargs: object,
) -> dict[str, CompletedGeneration]:
    for agent, (prompt, cache) in requests.items():
        engine.submit(agent, prompt, cache, max_tokens, **kwargs)  # type: ignore[arg-type]
    done = {c.agent_id: c for c in engine.drain()}
    assert sorted(done) == sorted(requests)
    for c in done.values():
        assert c.error is None, c.error
    return done


def test_agents_share_a_system_prompt_forks_and_partial_blocks(
    tiny_model: LoadedModel, reference_generate: Reference
) -> None:
    _, tokenizer, _ = tiny_model
    engine, pool = make_engine(tiny_model, 64)
    rng = random.Random(11)
    system = words(rng, tokenizer, 600)  # two full blocks and part of a third
    contexts = {a: [*system, *words(rng, tokenizer, 40 + 30 * i)] for i, a in enumerate("abc")}
    caches: dict[str, CacheHandle | None] = dict.fromkeys(contexts)
    # Turn 1: "a" alone; then "b" and "c" arrive and find the system prompt cached.
    first = run_turn(engine, {"a": (contexts["a"], None)}, 6)["a"]
    assert first.cached_tokens == 0
    caches["a"] = first.blocks
    later = run_turn(engine, {a: (contexts[a], None) for a in "bc"}, 6)
    for agent, c in {"a": first, **later}.items():
        assert list(c.token_ids) == fresh(reference_generate, tiny_model, contexts[agent], 6)
    prompts_turn_1 = dict(contexts)
    assert first.blocks is not None
    for agent, c in later.items():
        # token-granular: 2 shared blocks + what a's third block holds of the prompt
        expected = common_prefix_len(first.blocks.token_ids, prompts_turn_1[agent])
        assert c.cached_tokens == expected >= 600
        assert c.blocks is not None
        assert c.blocks.block_ids[:2] == first.blocks.block_ids[:2]  # the same blocks
    for agent, c in {"a": first, **later}.items():
        caches[agent] = c.blocks
        contexts[agent] = [*contexts[agent], *c.token_ids]
    # A fork: "d" continues "a"'s whole context (including a's generated tokens).
    fork = [*contexts["a"], *words(rng, tokenizer, 25)]
    # Turn 2 for everyone, batched, plus the fork.
    requests = {a: ([*contexts[a], *words(rng, tokenizer, 20)], caches[a]) for a in "abc"}
    requests["d"] = (fork, None)
    done = run_turn(engine, requests, 6)
    for agent, c in done.items():
        prompt = requests[agent][0]
        assert list(c.token_ids) == fresh(reference_generate, tiny_model, prompt, 6), agent
    assert done["d"].cached_tokens == len(contexts["a"])  # all of a's first turn
    for agent in "abc":
        assert done[agent].cached_tokens == len(contexts[agent])
    # Four agents' caches share the system blocks: each is held once.
    assert pool.manager.num_shared_blocks() >= 2
    pool.check_invariants()
    for c in done.values():
        assert c.blocks is not None
        pool.release(c.blocks)
    assert pool.num_used == 0 and pool.num_cached > 0


def test_a_prompt_sharing_300_tokens_reuses_300(
    tiny_model: LoadedModel, reference_generate: Reference
) -> None:
    _, tokenizer, _ = tiny_model
    engine, _ = make_engine(tiny_model, 32)
    rng = random.Random(5)
    base = words(rng, tokenizer, 700)
    run_turn(engine, {"a": (base, None)}, 4)
    prompt = [*base[:300], *[t for t in words(rng, tokenizer, 80) if t != base[300]][:80]]
    assert prompt[300] != base[300]
    c = run_turn(engine, {"b": (prompt, None)}, 4)["b"]
    assert c.cached_tokens == 300
    assert list(c.token_ids) == fresh(reference_generate, tiny_model, prompt, 4)


def test_evicted_cached_blocks_are_reused_or_recomputed_exactly(
    tiny_model: LoadedModel, reference_generate: Reference
) -> None:
    _, tokenizer, _ = tiny_model
    engine, pool = make_engine(tiny_model, 7)  # room for about two agents
    rng = random.Random(8)
    system = words(rng, tokenizer, 512)
    prompts = {a: [*system, *words(rng, tokenizer, 60 + 40 * i)] for i, a in enumerate("abcd")}
    hits = []
    for agent, prompt in prompts.items():  # one after another; each cache released at once
        c = run_turn(engine, {agent: (prompt, None)}, 5)[agent]
        assert list(c.token_ids) == fresh(reference_generate, tiny_model, prompt, 5), agent
        hits.append(c.cached_tokens)
        assert c.blocks is not None
        pool.release(c.blocks)  # its blocks stay cached until an allocation needs them
        filler = words(rng, tokenizer, 700)  # another agent pushes blocks out of the cache
        f = run_turn(engine, {f"filler-{agent}": (filler, None)}, 2)[f"filler-{agent}"]
        assert f.blocks is not None
        pool.release(f.blocks)
        pool.check_invariants()
    assert hits[0] == 0 and max(hits[1:]) >= 512  # system blocks survived some fillers
    assert pool.usage().num_evictions > 0  # and others were evicted and recomputed


def test_tenants_with_different_cache_salts_share_nothing(
    tiny_model: LoadedModel, reference_generate: Reference
) -> None:
    _, tokenizer, _ = tiny_model
    engine, _ = make_engine(tiny_model, 32)
    prompt = words(random.Random(4), tokenizer, 520)
    a = run_turn(engine, {"a": (prompt, None)}, 4, cache_salt="tenant-a")["a"]
    b = run_turn(engine, {"b": (prompt, None)}, 4, cache_salt="tenant-b")["b"]
    c = run_turn(engine, {"c": (prompt, None)}, 4, cache_salt="tenant-a")["c"]
    assert (a.cached_tokens, b.cached_tokens, c.cached_tokens) == (0, 0, 519)
    assert a.blocks is not None and b.blocks is not None and c.blocks is not None
    assert set(a.blocks.block_ids).isdisjoint(b.blocks.block_ids)
    assert list(a.token_ids) == list(b.token_ids) == list(c.token_ids)
    assert list(a.token_ids) == fresh(reference_generate, tiny_model, prompt, 4)
    with pytest.raises(ValueError, match="another cache_salt"):
        engine.submit("a", prompt, a.blocks, cache_salt="tenant-b")


def test_negative_control_a_corrupted_shared_block_changes_the_sharer(
    tiny_model: LoadedModel, reference_generate: Reference
) -> None:
    """Sharing is real: zeroing a block of agent a changes what b generates from it."""
    _, tokenizer, _ = tiny_model
    engine, pool = make_engine(tiny_model, 32)
    rng = random.Random(6)
    system = words(rng, tokenizer, 512)
    a = run_turn(engine, {"a": ([*system, *words(rng, tokenizer, 30)], None)}, 4)["a"]
    assert a.blocks is not None
    storage = pool.storage
    victim = a.blocks.block_ids[1]
    for layer in range(len(storage.k)):  # type: ignore[attr-defined]
        storage.k[layer][victim] = mx.zeros_like(storage.k[layer][victim])  # type: ignore[attr-defined]
    prompt = [*system, *words(rng, tokenizer, 30)]
    b = run_turn(engine, {"b": (prompt, None)}, 8)["b"]
    assert b.cached_tokens >= 512
    assert list(b.token_ids) != fresh(reference_generate, tiny_model, prompt, 8)


def test_gemma_style_windows_free_blocks_and_resume_exactly(
    gemma_w300: LoadedModel, reference_generate: Reference
) -> None:
    model, tokenizer, _ = gemma_w300
    engine, pool = make_engine(gemma_w300, 64)
    groups = pool.spec.groups
    sliding = next(g for g, group in enumerate(groups) if group.window == 300)
    full = next(g for g, group in enumerate(groups) if group.window is None)
    rng = random.Random(13)
    contexts = {a: words(rng, tokenizer, 500 + 200 * i) for i, a in enumerate("ab")}
    caches: dict[str, CacheHandle | None] = dict.fromkeys(contexts)
    for turn in range(4):
        done = run_turn(engine, {a: (contexts[a], caches[a]) for a in contexts}, 6)
        for agent, c in done.items():
            assert list(c.token_ids) == fresh(reference_generate, gemma_w300, contexts[agent], 6)
            if turn:
                assert c.cached_tokens == len(contexts[agent]) - 40  # all but the new words
            assert c.blocks is not None
            held = c.blocks.tables[sliding].held
            assert len(held) <= -(-300 // 256) + 1  # ceil(W / B) + 1, not the whole context
            assert len(c.blocks.tables[full].held) == -(-c.blocks.total_tokens // 256)
            caches[agent] = c.blocks
            contexts[agent] = [*contexts[agent], *c.token_ids, *words(rng, tokenizer, 40)]
    # The full hit: a prompt equal to the cached tokens reuses all but the last one.
    blocks = caches["a"]
    assert blocks is not None
    again = run_turn(engine, {"a": (list(blocks.token_ids), blocks)}, 4)["a"]
    assert again.cached_tokens == blocks.total_tokens - 1
    assert list(again.token_ids) == fresh(reference_generate, gemma_w300, list(blocks.token_ids), 4)
    del model


@pytest.mark.parametrize("model_name", ["tiny_model", "gemma_w300"])
def test_agents_arriving_together_prefill_a_shared_prefix_once(
    model_name: str, request: pytest.FixtureRequest, reference_generate: Reference
) -> None:
    loaded: LoadedModel = request.getfixturevalue(model_name)
    _, tokenizer, _ = loaded
    engine, pool = make_engine(loaded, 64)
    rng = random.Random(21)
    system = words(rng, tokenizer, 512)  # two full blocks, cached nowhere yet
    prompts = {f"agent-{i}": [*system, *words(rng, tokenizer, 20 + 7 * i)] for i in range(4)}
    done = run_turn(engine, {a: (p, None) for a, p in prompts.items()}, 5)
    for agent, c in done.items():
        assert list(c.token_ids) == fresh(reference_generate, loaded, prompts[agent], 5), agent
    assert done["agent-0"].cached_tokens == 0
    assert [done[f"agent-{i}"].cached_tokens for i in (1, 2, 3)] == [512] * 3
    prefilled = sum(c.prefilled_tokens for c in done.values())
    assert prefilled == 512 + sum(len(p) - 512 for p in prompts.values())
    pool.check_invariants()
