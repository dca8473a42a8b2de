"""Session fork on the fakes: the manager's and the store's fork share blocks by reference.

A fork adds one reference to every block of the parent (no block allocated, no K/V written);
both branches then continue as if each had been run fresh on its own context, and nothing
is left held once both are released.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fakes import SPEC, B, fake_engine, prompt_of, run_one

from kvpool import InvalidRequestError
from kvpool.store import AgentCacheStore, Tier
from kvpool.testing import FakeModel, reference_tokens

FP = "sha256:fake-model"


def make_store(directory: Path, num_blocks: int = 64) -> AgentCacheStore:
    return AgentCacheStore(fake_engine(SPEC, num_blocks), directory, fingerprint=FP)


def layer_rows(store: AgentCacheStore, agent: str) -> list[np.ndarray]:
    """Every layer's keys of ``agent``'s cache, on the host (FakeStorage encodes token ids)."""
    handle = store.pool.manager.handles
    (h,) = [x for x in handle if x.agent_id == agent]
    kvs = store.pool.read_layers(h, range(len(SPEC.layers)), 0, h.total_tokens)
    return [kv.keys.copy() for kv in kvs]


def test_manager_fork_adds_one_reference_per_block_and_allocates_none(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    context = prompt_of(10)  # 10 tokens + 3 generated: 13 cached -> blocks 4 4 4 1(partial)
    done = run_one(store, "a", context)
    parent = done.blocks
    assert parent is not None
    pool = store.pool
    used, free = pool.num_used, pool.num_free
    before = {b: pool.manager.ref_cnt(b) for b in parent.block_ids}
    child = pool.fork(parent, "b")
    assert child.agent_id == "b" and child.token_ids == parent.token_ids
    assert child.block_ids == parent.block_ids and child.handle_id != parent.handle_id
    assert (pool.num_used, pool.num_free) == (used, free)  # zero blocks taken
    assert {b: pool.manager.ref_cnt(b) for b in parent.block_ids} == {
        b: n + 1 for b, n in before.items()
    }
    pool.check_invariants()
    pool.release(parent)
    assert pool.is_live(child)
    assert {b: pool.manager.ref_cnt(b) for b in child.block_ids} == before
    pool.release(child)
    assert pool.num_used == 0
    pool.check_invariants()


def test_forking_a_released_handle_is_refused(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    done = run_one(store, "a", prompt_of(6))
    assert done.blocks is not None
    store.forget("a")
    with pytest.raises(InvalidRequestError, match="not live"):
        store.pool.fork(done.blocks, "b")
    assert store.pool.num_handles == 0


def test_both_branches_generate_what_fresh_runs_generate(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    model = FakeModel(SPEC)
    first = run_one(store, "a", prompt_of(10))
    assert first.blocks is not None
    base = list(first.blocks.token_ids)
    assert len(base) % B, "the parent must end inside a block (the shared partial block)"
    parent_rows = layer_rows(store, "a")
    child = store.fork("a", "b")
    assert child is not None and store.tier("b") is Tier.HOT

    ctx_a = [*base, *prompt_of(5, seed=2)]
    ctx_b = [*base, *prompt_of(7, seed=3)]
    got_b = run_one(store, "b", ctx_b)
    # the child's turn copied the shared partial block: the parent's K/V is untouched
    after = layer_rows(store, "a")
    assert all(np.array_equal(x, y) for x, y in zip(after, parent_rows, strict=True))
    got_a = run_one(store, "a", ctx_a)
    assert list(got_a.token_ids) == reference_tokens(model, ctx_a, 3)
    assert list(got_b.token_ids) == reference_tokens(model, ctx_b, 3)
    # negative control: the branches' contexts differ, and so do their fresh runs
    assert reference_tokens(model, ctx_a, 3) != reference_tokens(model, ctx_b, 3)
    # each branch's first turn reused the whole parent cache
    assert got_b.cached_tokens == len(base) and got_a.cached_tokens == len(base)

    assert store.forget("a") and store.forget("b")
    assert store.pool.num_used == 0 and store.pool.num_handles == 0
    store.pool.check_invariants()


def test_without_the_fork_the_child_reuses_only_whole_published_blocks(tmp_path: Path) -> None:
    """Negative control for the cached-token count above: a new agent without a fork finds
    the parent's published whole blocks only when it shares its salt; under another salt
    it prefills everything."""
    store = make_store(tmp_path)
    first = run_one(store, "a", prompt_of(10))
    assert first.blocks is not None
    ctx = [*first.blocks.token_ids, *prompt_of(7, seed=3)]
    other = run_one(store, "c", ctx, salt="other")
    assert other.cached_tokens == 0


def test_fork_refusals_change_nothing(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    run_one(store, "a", prompt_of(6))
    run_one(store, "x", prompt_of(5, seed=4))
    handles = store.pool.num_handles
    assert store.fork("nobody", "b") is None
    with pytest.raises(InvalidRequestError, match="already exists"):
        store.fork("a", "x")
    with pytest.raises(InvalidRequestError, match="into itself"):
        store.fork("a", "a")
    store.submit("a", [*prompt_of(6), 1, 2], 2)  # "a" is checked out while it runs
    with pytest.raises(InvalidRequestError, match="checked out"):
        store.fork("a", "b")
    assert store.tier("b") is None and store.pool.num_handles == handles
    store.drain()
    assert store.fork("a", "b") is not None
    assert store.pool.num_handles == handles + 1


def test_a_cold_parent_is_loaded_then_forked(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    first = run_one(store, "a", prompt_of(9))
    assert first.blocks is not None
    base = list(first.blocks.token_ids)
    assert store.evict("a") and store.tier("a") is Tier.COLD
    child = store.fork("a", "b")
    assert child is not None and child.token_ids == tuple(base)
    assert store.tier("a") is Tier.HOT and store.tier("b") is Tier.HOT
    ctx = [*base, *prompt_of(4, seed=5)]
    got = run_one(store, "b", ctx)
    assert list(got.token_ids) == reference_tokens(FakeModel(SPEC), ctx, 3)
    assert got.cached_tokens == len(base)
    # the child's cache is its own: it is written at close under its own name
    report = store.close()
    assert report.failed == {} and store.pool.num_used == 0
    again = make_store(tmp_path)
    assert again.tier("b") is Tier.COLD and again.tier("a") is Tier.COLD
