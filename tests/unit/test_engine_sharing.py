"""The engine's prefix sharing on fakes: across agents, prefill-once, tenants, handles."""

from __future__ import annotations

import pytest
from test_engine import SPEC, Harness, prompt_of

from kvpool import InvalidRequestError
from kvpool.testing import reference_tokens

B = SPEC.block_tokens


def test_a_new_agent_reuses_another_agents_prefix_without_passing_a_cache() -> None:
    h = Harness(num_blocks=32)
    system = prompt_of(13)  # 3 full blocks + 1 token
    a = h.run("a", [*system, 7, 8], max_tokens=3)
    b = h.run("b", [*system, 9], max_tokens=3)
    assert a.cached_tokens == 0 and b.cached_tokens == 13
    assert a.blocks is not None and b.blocks is not None
    assert b.blocks.block_ids[:3] == a.blocks.block_ids[:3]
    assert h.pool.num_shared_blocks() == 3  # held by a's and b's handles
    assert list(b.token_ids) == reference_tokens(h.model, [*system, 9], 3)
    assert h.pool.usage().hit_tokens == 13 and h.pool.usage().query_tokens == 15 + 14


def test_requests_arriving_together_prefill_their_shared_prefix_once() -> None:
    h = Harness(num_blocks=64)
    system = prompt_of(16)  # 4 full blocks, uncached
    prompts = {f"agent-{i}": [*system, *prompt_of(3 + i, seed=10 + i)] for i in range(4)}
    for agent, prompt in prompts.items():
        h.engine.submit(agent, prompt, max_tokens=4)
    done = {c.agent_id: c for c in h.engine.drain()}
    for agent, c in done.items():
        assert c.error is None
        assert list(c.token_ids) == reference_tokens(h.model, prompts[agent], 4), agent
    assert done["agent-0"].cached_tokens == 0  # the leader prefilled the prefix once
    assert all(done[f"agent-{i}"].cached_tokens == 16 for i in (1, 2, 3))
    prefilled = sum(c.prefilled_tokens for c in done.values())
    assert prefilled == 16 + sum(len(p) - 16 for p in prompts.values())
    assert not h.engine.has_work and not h.engine._waiting
    h.pool.check_invariants()


def test_cancelling_the_leader_lets_its_followers_run_on_their_own() -> None:
    h = Harness(num_blocks=64, prefill_step_size=4)
    system = prompt_of(16)
    leader = h.engine.submit("a", [*system, 1, 2], max_tokens=3)
    h.engine.submit("b", [*system, 3], max_tokens=3)
    list(h.engine.step())  # the leader starts; b waits for its prefix
    assert h.engine.cancel(leader)
    (b,) = h.engine.drain()
    assert b.error is None and b.agent_id == "b"
    assert list(b.token_ids) == reference_tokens(h.model, [*system, 3], 3)
    h.pool.check_invariants()


def test_cancelling_a_waiting_follower() -> None:
    h = Harness(num_blocks=64, prefill_step_size=4)
    system = prompt_of(16)
    h.engine.submit("a", [*system, 1, 2], max_tokens=3)
    follower = h.engine.submit("b", [*system, 3], max_tokens=3)
    list(h.engine.step())
    assert h.engine.cancel(follower) and not h.engine.is_in_flight("b")
    (a,) = h.engine.drain()
    assert a.error is None
    assert a.blocks is not None and h.pool.num_used == a.blocks.num_blocks
    h.pool.check_invariants()


def test_tenants_never_share_and_a_foreign_salt_handle_is_refused() -> None:
    h = Harness(num_blocks=32)
    prompt = prompt_of(13)
    h.engine.submit("a", prompt, max_tokens=2, cache_salt="t1")
    (a,) = h.engine.drain()
    h.engine.submit("b", prompt, max_tokens=2, cache_salt="t2")
    (b,) = h.engine.drain()
    assert (a.cached_tokens, b.cached_tokens) == (0, 0)
    with pytest.raises(InvalidRequestError, match="another cache_salt"):
        h.engine.submit("a", prompt, a.blocks, cache_salt="t2")


def test_a_handle_of_another_pool_is_refused_before_anything_changes() -> None:
    """Issue 11, case 1: a cache from another pool used to be accepted and free someone's."""
    h1, h2 = Harness(num_blocks=16), Harness(num_blocks=16)
    x1 = h1.run("X", prompt_of(5, seed=1), max_tokens=4)
    y1 = h2.run("Y", prompt_of(5, seed=2), max_tokens=4)
    assert x1.blocks is not None and y1.blocks is not None
    assert x1.blocks.tables == y1.blocks.tables  # same ids in both pools
    used = h2.pool.num_used
    with pytest.raises(InvalidRequestError, match="belongs to another pool"):
        h2.engine.submit("X", [*x1.blocks.token_ids, 3], x1.blocks, max_tokens=12)
    assert h2.pool.is_live(y1.blocks) and h2.pool.num_used == used
    assert not h2.engine.has_work


def test_prefix_sharing_off_reuses_only_the_passed_cache() -> None:
    h = Harness(num_blocks=32, prefix_sharing=False)
    system = prompt_of(13)
    a = h.run("a", [*system, 7], max_tokens=3)
    b = h.run("b", [*system, 9], max_tokens=3)
    assert b.cached_tokens == 0
    assert a.blocks is not None
    again = h.run("a", [*a.blocks.token_ids, 4], a.blocks, max_tokens=2)
    assert again.cached_tokens == a.blocks.total_tokens
