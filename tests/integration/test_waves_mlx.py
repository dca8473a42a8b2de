"""Prefill waves and the engine's PoolBatchGenerator on real mlx-lm: tokens equal fresh runs."""

from __future__ import annotations

import random

import pytest
from helpers import LoadedModel, Reference, fresh, words

from kvpool import BlockPool, BlockPoolBatchEngine, ModelCacheSpec


def _mixed_step(loaded: LoadedModel, reference: Reference, *, waves: bool) -> None:
    """Four agents resume with a few new tokens while a new agent sends a long prompt, all
    submitted in one step (the new agent first); every agent's tokens equal a fresh run."""
    model, tokenizer, _ = loaded
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, num_blocks=64)
    engine = BlockPoolBatchEngine(model, tokenizer, pool, spec, prefill_waves=waves)
    rng = random.Random(11)
    contexts = {f"r{i}": words(rng, tokenizer, 200 + 90 * i) for i in range(4)}
    added = {f"r{i}": 5 + i for i in range(4)}  # new tokens of each resume
    for agent, context in contexts.items():
        engine.submit(agent, context, max_tokens=6)
    caches = {c.agent_id: c for c in engine.drain()}
    for agent, c in caches.items():
        assert c.error is None, c.error
        contexts[agent] = [
            *contexts[agent],
            *c.token_ids,
            *words(rng, tokenizer, added[agent]),
        ]
    contexts["new"] = words(rng, tokenizer, 700)
    engine.submit("new", contexts["new"], max_tokens=10)
    for agent in sorted(caches):
        engine.submit(agent, contexts[agent], caches[agent].blocks, max_tokens=10)
    done = engine.drain()
    assert sorted(c.agent_id for c in done) == sorted(contexts)
    for c in done:
        assert c.error is None, c.error
        assert list(c.token_ids) == fresh(reference, loaded, contexts[c.agent_id], 10), c.agent_id
        if c.agent_id != "new":
            assert c.cached_tokens > 0
    engine.close()
    pool.check_invariants()


@pytest.mark.parametrize("waves", [True, False], ids=["waves", "no-waves"])
def test_mixed_step_equals_fresh_runs(
    tiny_model: LoadedModel, reference_generate: Reference, waves: bool
) -> None:
    _mixed_step(tiny_model, reference_generate, waves=waves)


def test_mixed_step_sliding_window_model(
    tiny_swa_model: LoadedModel, reference_generate: Reference
) -> None:
    _mixed_step(tiny_swa_model, reference_generate, waves=True)


def test_pool_kv_cache_batches_of_one_take_the_arrays_as_they_are() -> None:
    """A batch of one gathered cache is the gathered arrays (headroom included); larger
    batches, filtering and extraction give what mlx-lm's own BatchKVCache gives."""
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache, KVCache

    from kvpool.mlx.mlx_lm import PoolBatchKVCache, PoolKVCache

    def gathered(n: int, rows: int, seed: int) -> PoolKVCache:
        keys = mx.random.normal((1, 2, rows, 4), key=mx.random.key(seed))
        cache = PoolKVCache()
        cache.state = (keys, keys + 1, n)
        return cache

    one = gathered(5, 8, 0)
    batch = PoolKVCache.merge([one])
    assert isinstance(batch, PoolBatchKVCache)
    assert batch.keys is one.keys and batch.values is one.values  # no copy
    assert batch.size() == 5 and batch.offset.tolist() == [5]
    batch.filter([0])
    assert batch.keys is one.keys  # every row kept: nothing moves
    extracted = batch.extract(0)
    assert extracted.offset == 5
    assert mx.array_equal(extracted.keys, one.keys[..., :5, :]).item()

    # Two rows of different lengths: as mlx-lm merges them (left padding).
    rows = [gathered(3, 8, 1), gathered(6, 8, 2)]
    ours = PoolKVCache.merge(rows)
    plain = [KVCache.from_state(r.state) for r in rows]
    theirs = BatchKVCache.merge(plain)
    assert isinstance(ours, PoolBatchKVCache)
    assert ours.left_padding.tolist() == theirs.left_padding.tolist() == [3, 0]
    assert mx.array_equal(ours.keys, theirs.keys).item()
    for i in range(2):
        a, b = ours.extract(i), theirs.extract(i)
        assert a.offset == b.offset
        assert mx.array_equal(a.keys, b.keys).item() and mx.array_equal(a.values, b.values).item()
    ours.filter([1])
    theirs.filter([1])
    assert ours.left_padding.tolist() == theirs.left_padding.tolist() == [0]
    assert mx.array_equal(ours.keys, theirs.keys).item()
