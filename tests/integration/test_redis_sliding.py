"""A sliding-window model's sessions through a real redis-server (gemma3, window 64, blocks
of 256): the global layers' blocks and the sliding group's window rows, which are records of
their own, resume on another engine token-equal with nothing prefilled again."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from helpers import LoadedModel, Reference, fresh, make_engine, words

from kvpool import AgentCacheStore
from kvpool.persist import model_fingerprint


@pytest.mark.parametrize("drop_window_rows", [False, True])
def test_a_sliding_window_session_resumes_on_another_engine(
    drop_window_rows: bool,
    tmp_path: Path,
    tiny_swa_model: LoadedModel,
    reference_generate: Reference,
) -> None:
    from redis_process import RedisProcess

    from kvpool.tier.redis import RedisTier

    model, tokenizer, _ = tiny_swa_model
    fingerprint = model_fingerprint(model)
    rng = random.Random(12)
    context = words(rng, tokenizer, 600)  # 3 blocks; the window starts inside the third
    with RedisProcess(tmp_path / "redis") as server:

        def store() -> AgentCacheStore:
            engine, pool = make_engine(tiny_swa_model, 32)
            tier = RedisTier.from_url(server.url, spec=pool.spec, fingerprint=fingerprint)
            return AgentCacheStore(engine, tier, fingerprint=fingerprint)

        a = store()
        a.submit("s", context, max_tokens=6)
        (first,) = a.drain()
        assert a.flush() == 1
        client = server.client()
        window_keys = client.keys("kvpool:blk:*:g*")
        assert len(window_keys) == 1  # the window: the last 63 positions, all in block 2
        assert len(client.keys("kvpool:blk:*")) == 3 + 1
        if drop_window_rows:  # negative control: a session without its window is a miss
            client.delete(*window_keys)
        nxt = [*context, *first.token_ids, *words(rng, tokenizer, 5)]
        b = store()
        b.submit("s", nxt, max_tokens=6)
        (second,) = b.drain()
        assert second.error is None, second.error
        held = first.blocks.total_tokens
        assert second.cached_tokens == (0 if drop_window_rows else held)
        assert list(second.token_ids) == fresh(reference_generate, tiny_swa_model, nxt, 6)
        b.pool.check_invariants()
        a.close()
        b.close()
