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
        # the sliding group's windows: the session's last 63 positions (block 2), and the
        # window at the prompt's last block boundary (512: block 1), published for agents
        # that share that prefix
        assert len(window_keys) == 2
        assert len(client.keys("kvpool:blk:*")) == 3 + 2
        if drop_window_rows:  # negative control: a session without its windows is a miss
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


@pytest.mark.parametrize("damage", [None, "flip", "delete"])
def test_a_new_agent_on_another_engine_imports_a_shared_system_prompt(
    damage: str | None,
    tmp_path: Path,
    tiny_swa_model: LoadedModel,
    reference_generate: Reference,
) -> None:
    """Engine A serves three agents arriving together with a 900-token system prompt: the
    leader publishes the prefix at 768 (3 blocks), leaving the sliding group's block of
    positions 512..767 (the window at 768 starts at 705) cached in the pool; each session's
    save writes it to Redis beside its own records (once: deduplicated). Engine B, a fresh
    pool on the same Redis, gets a new agent with that system prompt and a message of its
    own: it imports the 3 global blocks and the window block and its turn reuses all 768
    tokens, token-equal to a fresh mlx-lm run. Negative controls: that window record
    failing its checksum (deleted, counted) or missing: nothing imported, nothing left in
    B's pool but the new agent's own cache, the turn prefilled and still token-equal."""
    from redis_process import RedisProcess

    from kvpool.tier.redis import RedisTier

    model, tokenizer, _ = tiny_swa_model
    fingerprint = model_fingerprint(model)
    rng = random.Random(5)
    system = words(rng, tokenizer, 900)
    prompts = {f"a{i}": [*system, *words(rng, tokenizer, 20 + 7 * i)] for i in range(3)}
    with RedisProcess(tmp_path / "redis") as server:

        def store() -> AgentCacheStore:
            engine, pool = make_engine(tiny_swa_model, 48)
            tier = RedisTier.from_url(server.url, spec=pool.spec, fingerprint=fingerprint)
            return AgentCacheStore(engine, tier, fingerprint=fingerprint)

        a = store()
        for agent, prompt in prompts.items():
            a.submit(agent, prompt, max_tokens=6)
        done = a.drain()
        assert sorted(c.cached_tokens for c in done) == [0, 768, 768]  # a leader, 2 followers
        assert a.flush() == 3
        tier_a = a.cold
        assert isinstance(tier_a, RedisTier)
        (sliding,) = [g for g, grp in enumerate(a.pool.spec.groups) if grp.window]
        chain = tier_a.keys.chain(system[:768], "")
        window_key = tier_a.keys.window_key("", chain[2], sliding, 0)
        client = server.client()
        assert client.exists(window_key)  # the window at 768: one whole block, row 0
        assert a.stats.tier.num_blocks_written == 3 + 3 * 2 + 1  # shared blocks written once
        if damage == "flip":
            record = bytearray(client.get(window_key))
            record[-1] ^= 0x40
            client.set(window_key, bytes(record))
        elif damage == "delete":
            client.delete(window_key)
        new = [*system, *words(rng, tokenizer, 15)]
        b = store()
        b.submit("n", new, max_tokens=6)
        (got,) = b.drain()
        assert got.error is None, got.error
        imported = 0 if damage else 768
        assert b.stats.prefix_tokens_imported == imported
        assert got.cached_tokens == imported
        assert list(got.token_ids) == fresh(reference_generate, tiny_swa_model, new, 6)
        if damage == "flip":
            assert b.stats.tier.num_blocks_corrupt == 1 and not client.exists(window_key)
        pool = b.pool
        pool.check_invariants()
        assert [h.agent_id for h in pool.manager.handles] == ["n"]  # no import handle left
        assert pool.usage().num_used == sum(len(t.held) for t in got.blocks.tables)
        a.close()
        b.close()
