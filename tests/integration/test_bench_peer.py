"""The benchmarks' real peer (mlx-lm's LRUPromptCache driven as mlx_lm.server drives it)
generates kvpool's greedy tokens, resumes from the prompt cache, and shares a system prompt
between conversations, on the tiny model."""

from __future__ import annotations

import random

import mlx.core as mx

from conftest import LoadedModel
from kvpool import BlockPool, BlockPoolBatchEngine, ModelCacheSpec
from kvpool.benchmarks.peer import LruPromptCacheWay, caches_from_pool
from kvpool.benchmarks.turns import (
    TurnRequest,
    next_context,
    plain_generator,
    random_tokens,
    run_kvpool_turn,
    run_plain_turn,
    tokens_unequal,
)
from kvpool.cache.tables import CacheHandle
from kvpool.mlx.mlx_lm import kv_cache

SYSTEM = 40


def test_lru_way_equals_kvpool_and_re_prefill_turn_after_turn(tiny_model: LoadedModel) -> None:
    model, tokenizer, _ = tiny_model
    spec = ModelCacheSpec.from_model(model)
    engine = BlockPoolBatchEngine(model, tokenizer, BlockPool(spec, num_blocks=64), spec)
    lru = LruPromptCacheWay(model, tokenizer, max_size=10)
    plain = plain_generator(model, tokenizer)
    rng = random.Random(0)
    system = random_tokens(rng, SYSTEM)
    contexts = {f"a{i}": system + random_tokens(rng, 20) for i in range(3)}
    caches: dict[str, CacheHandle] = {}
    try:
        for turn in range(3):
            requests = [
                TurnRequest(a, p, 6, caches.get(a), system_tokens=SYSTEM)
                for a, p in contexts.items()
            ]
            kv = run_kvpool_turn(engine, requests)
            peer = lru.run_turn(requests)
            again = run_plain_turn(plain, requests)
            assert tokens_unequal(kv, peer) == 0
            assert tokens_unequal(kv, again) == 0
            assert all(len(t) == 6 for t in kv.tokens.values())
            if turn == 0:
                assert set(peer.cached_tokens.values()) == {0}  # all arrived together
            else:
                # the whole previous context, generated tokens included, came from the trie
                assert peer.cached_tokens == kv.cached_tokens
                assert all(n > SYSTEM for n in peer.cached_tokens.values())
            for a, done in kv.completions.items():
                assert done.blocks is not None
                caches[a] = done.blocks
                contexts[a] = next_context(contexts[a], done.token_ids, random_tokens(rng, 10))
        # A newcomer finds the system prompt (the server stores its segment separately).
        newcomer = TurnRequest("new", system + random_tokens(rng, 12), 4, system_tokens=SYSTEM)
        late = lru.run_turn([newcomer])
        assert late.cached_tokens["new"] >= SYSTEM
        assert late.tokens == run_plain_turn(plain, [newcomer]).tokens
    finally:
        engine.close()
        lru.close()
        plain.close()


def test_a_held_pool_cache_resumes_to_kvpool_tokens_and_a_wrong_one_does_not(
    tiny_model: LoadedModel,
) -> None:
    model, tokenizer, _ = tiny_model
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, num_blocks=32)
    engine = BlockPoolBatchEngine(model, tokenizer, pool, spec, prefix_sharing=False)
    rng = random.Random(1)
    history = random_tokens(rng, 300)
    first = run_kvpool_turn(engine, [TurnRequest("agent", history, 1)])
    handle = first.completions["agent"].blocks
    assert handle is not None
    prompt = (*handle.token_ids, *random_tokens(rng, 16))
    try:
        held = caches_from_pool(pool, handle)
        assert [int(c.offset) for c in held] == [len(handle.token_ids)] * len(spec.layers)
        good = LruPromptCacheWay(model, tokenizer)
        good.hold(handle.token_ids, held)
        # negative control: the same tokens held with other K/V (zeros)
        wrong = LruPromptCacheWay(model, tokenizer)
        zeroed = [kv_cache(mx.zeros_like(c.keys), mx.zeros_like(c.values), c.offset) for c in held]
        wrong.hold(handle.token_ids, zeroed)
        kv = run_kvpool_turn(engine, [TurnRequest("resume", prompt, 8, handle)])
        peer = good.run_turn([TurnRequest("resume", prompt, 8)])
        bad = wrong.run_turn([TurnRequest("resume", prompt, 8)])
        assert peer.cached_tokens["resume"] == len(handle.token_ids)
        assert tokens_unequal(kv, peer) == 0
        assert tokens_unequal(kv, bad) == 1
        good.close()
        wrong.close()
    finally:
        engine.close()
