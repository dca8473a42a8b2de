"""A byte budget follows the workload (fakes): the split between layer groups is only a
start, and a request is refused only when the other groups cannot spare the bytes.

The case that was reported: a model with a 4-token window got 2 sliding-window blocks
against 45 full-attention ones (the split is tuned for agents of 8K tokens), and the
second short agent was refused with most of the pool free.
"""

from __future__ import annotations

import math

import pytest
from fakes import HYBRID, B, prompt_of

from kvpool import (
    AttentionKind,
    BlockPool,
    BlockPoolBatchEngine,
    CompletedGeneration,
    LayerSpec,
    ModelCacheSpec,
    PoolExhaustedError,
)
from kvpool.errors import InvalidRequestError
from kvpool.testing import (
    FakeBatchGenerator,
    FakeModel,
    FakeStorage,
    FakeTokenizer,
    reference_tokens,
)

WINDOWED = ModelCacheSpec(
    (
        LayerSpec(AttentionKind.GLOBAL, 2, 8, 8),
        LayerSpec(AttentionKind.SLIDING, 2, 8, 8, window=4),
        LayerSpec(AttentionKind.SLIDING, 2, 8, 8, window=4),
    ),
    "float32",
    B,
)
PROMPT, MAX_TOKENS = 5, 2  # short agents: 7 positions, 2 blocks


def _engine(spec: ModelCacheSpec, pool: BlockPool) -> BlockPoolBatchEngine:
    return BlockPoolBatchEngine(
        FakeModel(spec), FakeTokenizer(), pool, spec, batch_gen_factory=FakeBatchGenerator
    )


def _bytes(pool: BlockPool, blocks: tuple[int, ...]) -> int:
    return sum(n * pool.spec.group_bytes_per_block(g) for g, n in enumerate(blocks))


def _one_turn_needs(spec: ModelCacheSpec) -> tuple[int, ...]:
    """Fresh blocks a short agent's first turn reserves in each group (measured on an
    empty pool of plenty)."""
    pool = BlockPool(spec, num_blocks=64, storage=FakeStorage)
    seq = pool.open_sequence("x", prompt_of(PROMPT), MAX_TOKENS)
    assert not isinstance(seq, PoolExhaustedError) and hasattr(seq, "abort")
    held = tuple(pool.usage().groups[g].num_used for g in range(len(spec.groups)))
    seq.abort()  # type: ignore[union-attr]
    return held


@pytest.mark.parametrize("spec", [WINDOWED, HYBRID], ids=["sliding", "recurrent"])
def test_short_agents_are_refused_only_when_the_bytes_run_out(spec: ModelCacheSpec) -> None:
    budget = 50 * spec.group_bytes_per_block(0)
    pool = BlockPool(spec, max_bytes=budget, storage=FakeStorage)
    first = pool.blocks_per_group
    assert first[1] <= 2  # the split, tuned for agents of 8K tokens, starves group 1
    engine = _engine(spec, pool)
    needs = _bytes(pool, _one_turn_needs(spec))
    served = []
    for a in range(1000):
        prompt = prompt_of(PROMPT, seed=a)
        try:
            engine.submit(f"a{a}", prompt, max_tokens=MAX_TOKENS)
        except PoolExhaustedError:
            break
        (done,) = engine.drain()
        assert list(done.token_ids) == reference_tokens(engine.model, prompt, MAX_TOKENS)
        served.append((prompt, done))
        assert pool.bytes_total <= budget
        pool.check_invariants()
    else:
        pytest.fail("the pool never filled")
    free_bytes = budget - pool.bytes_used
    assert free_bytes < needs, f"refused with {free_bytes} bytes free, {needs} needed"
    assert len(served) > 2 * first[1]  # far past where the first split ran out
    assert pool.num_resizes <= 2 * math.log2(len(served)) + 2  # geometric growth
    # Every cache moved through the resizes intact: each agent's next turn resumes it
    # (FakeStorage forgets blocks taken away, so a lost block fails the read).
    resumed = served[::2]
    for _, done in served:
        if all(done is not d for _, d in resumed):
            pool.release(done.blocks)  # room for the next turns
    for prompt, done in resumed:
        nxt = [*prompt, *done.token_ids, 7]
        engine.submit(done.agent_id, nxt, done.blocks, max_tokens=MAX_TOKENS)
        (again,) = engine.drain()
        assert again.cached_tokens == done.blocks.total_tokens
        assert list(again.token_ids) == reference_tokens(engine.model, nxt, MAX_TOKENS)
    pool.check_invariants()


def test_a_request_larger_than_the_whole_budget_never_fits() -> None:
    budget = 50 * WINDOWED.group_bytes_per_block(0)
    pool = BlockPool(WINDOWED, max_bytes=budget, storage=FakeStorage)
    most = pool.max_group_blocks(0)
    assert most == (budget - WINDOWED.group_bytes_per_block(1)) // WINDOWED.group_bytes_per_block(0)
    before = pool.usage()
    full = pool.open_sequence("a", prompt_of(B * most), 1)
    assert not hasattr(full, "abort")
    assert full.never_fits and full.capacity == most  # type: ignore[union-attr]
    assert pool.usage() == before and pool.num_resizes == 0


def test_blocks_handles_hold_at_the_top_of_a_group_move_down() -> None:
    """A fragmented pool: long agents fill the global group, all but the one holding its
    highest block let go. Short agents then need sliding-window blocks the group lacks: the global
    group's bytes go to it anyway, after the kept agent's blocks move down to free ids; it
    is refused only when the bytes run out, and the kept agent resumes its cache intact."""
    budget = 50 * WINDOWED.group_bytes_per_block(0)
    pool = BlockPool(WINDOWED, max_bytes=budget, storage=FakeStorage)
    engine = _engine(WINDOWED, pool)
    long_agents = []
    for a in range(100):
        prompt = prompt_of(7 * B, seed=100 + a)
        try:
            engine.submit(f"long{a}", prompt, max_tokens=MAX_TOKENS)
        except PoolExhaustedError:
            break
        (done,) = engine.drain()
        long_agents.append((prompt, done))
    assert len(long_agents) > 3
    top = max(b for _, d in long_agents for b in d.blocks.tables[0].held)
    (kept,) = [(p, d) for p, d in long_agents if top in d.blocks.tables[0].held]
    for _, done in long_agents:
        if done is not kept[1]:
            pool.release(done.blocks)
    tail = pool.manager.allocator(0).num_free_tail()  # all a shrink could take unmoved
    assert pool.manager.num_free(0) > pool.blocks_per_group[0] // 2 > 4 * tail
    assert pool.manager.spare_blocks(0) == pool.manager.num_free(0)
    needs = _bytes(pool, _one_turn_needs(WINDOWED))
    shorts = []
    for a in range(1000):
        prompt = prompt_of(PROMPT, seed=a)
        try:
            engine.submit(f"a{a}", prompt, max_tokens=MAX_TOKENS)
        except PoolExhaustedError:
            break
        (done,) = engine.drain()
        assert list(done.token_ids) == reference_tokens(engine.model, prompt, MAX_TOKENS)
        shorts.append(done)
        assert pool.bytes_total <= budget
        pool.check_invariants()
    free_bytes = budget - pool.bytes_used
    assert free_bytes < needs, f"refused with {free_bytes} bytes free, {needs} needed"
    assert pool.num_blocks_moved > 0 and len(shorts) > 5
    # the kept agent's blocks moved, and its next turn reads them all back
    prompt, done = kept
    assert max(done.blocks.tables[0].held) < top
    nxt = [*prompt, *done.token_ids, 7]
    for short in shorts:
        pool.release(short.blocks)  # room for its next turn
    engine.submit(done.agent_id, nxt, done.blocks, max_tokens=MAX_TOKENS)
    (again,) = engine.drain()
    assert again.cached_tokens == done.blocks.total_tokens
    assert list(again.token_ids) == reference_tokens(engine.model, nxt, MAX_TOKENS)
    pool.check_invariants()


def test_a_block_a_request_holds_at_the_top_of_a_group_keeps_its_bytes_there() -> None:
    """The limit that stays, and a control for the test above: a block that something other
    than handles holds (a request in flight, here a raw holder) never moves, so at the top
    of the donor group it blocks the move (refused with free bytes); once it is let go the
    same request fits."""
    budget = 50 * WINDOWED.group_bytes_per_block(0)
    pool = BlockPool(WINDOWED, max_bytes=budget, storage=FakeStorage)
    n0, n1 = pool.blocks_per_group
    assert n1 == 1
    alloc = pool.manager.allocator(0)
    ids = alloc.allocate(999, n0)  # a holder outside the manager, for the test only
    alloc.free(999, [b for b in ids if b != n0 - 1])
    assert pool.manager.spare_blocks(0) == 0 and pool.num_free >= n0 - 1
    full = pool.open_sequence("a", prompt_of(PROMPT), MAX_TOKENS)
    assert not hasattr(full, "abort") and not full.never_fits  # type: ignore[union-attr]
    assert pool.blocks_per_group == (n0, n1) and pool.num_resizes == 0
    alloc.release(999)
    seq = pool.open_sequence("a", prompt_of(PROMPT), MAX_TOKENS)
    assert hasattr(seq, "abort") and pool.num_resizes == 1
    seq.abort()  # type: ignore[union-attr]
    assert pool.bytes_total <= budget
    pool.check_invariants()


def test_a_pool_sized_by_num_blocks_keeps_its_counts() -> None:
    pool = BlockPool(WINDOWED, num_blocks=2, storage=FakeStorage)
    engine = _engine(WINDOWED, pool)
    engine.submit("a", prompt_of(PROMPT), max_tokens=MAX_TOKENS)
    engine.drain()
    with pytest.raises(PoolExhaustedError):
        engine.submit("b", prompt_of(PROMPT, seed=2), max_tokens=MAX_TOKENS)
    assert pool.blocks_per_group == (2, 2) and pool.num_resizes == 0


def test_blocks_a_request_holds_cannot_be_resized_away() -> None:
    pool = BlockPool(WINDOWED, num_blocks=4, storage=FakeStorage)
    seq = pool.open_sequence("a", prompt_of(PROMPT), MAX_TOKENS)
    assert hasattr(seq, "abort")
    before = pool.usage()
    with pytest.raises(InvalidRequestError, match="take 3 of its 4 blocks away, at most 2"):
        pool.manager.resize_group(0, 1)
    assert pool.usage() == before
    seq.abort()  # type: ignore[union-attr]
    pool.manager.resize_group(0, 1)
    assert pool.blocks_per_group == (1, 4)
    pool.check_invariants()


def test_the_longest_context_is_what_the_budget_can_give_the_global_group() -> None:
    budget = 50 * WINDOWED.group_bytes_per_block(0)
    pool = BlockPool(WINDOWED, max_bytes=budget, storage=FakeStorage)
    (g,) = [g for g, group in enumerate(WINDOWED.groups) if group.window is None]
    assert pool.max_context_tokens() == pool.max_group_blocks(g) * B >= pool.blocks_per_group[g] * B
    fixed = BlockPool(WINDOWED, num_blocks=5, storage=FakeStorage)
    assert fixed.max_context_tokens() == 5 * B


@pytest.mark.parametrize("budget", [True, False], ids=["max_bytes", "num_blocks"])
def test_snapshots_taken_mid_prefill_get_budget_moved_to_them(budget: bool) -> None:
    """A hybrid model's recurrent group has exactly the one free state block a request's
    own end state needs: the boundary snapshots it takes while prefilling need more. A
    byte budget moves bytes from the global group to them (a later agent on the same
    prefix resumes at its last boundary); a pool sized by num_blocks skips them (the
    control: the later agent prefills everything)."""
    if budget:
        pool = BlockPool(
            HYBRID, max_bytes=50 * HYBRID.group_bytes_per_block(0), storage=FakeStorage
        )
    else:
        pool = BlockPool(HYBRID, num_blocks=16, storage=FakeStorage)
    engine = BlockPoolBatchEngine(
        FakeModel(HYBRID), FakeTokenizer(), pool, HYBRID,
        batch_gen_factory=FakeBatchGenerator, state_snapshot_blocks=1,
    )  # fmt: skip
    states = pool.manager.allocator(1)
    states.allocate(999, states.num_free - 1)  # a holder outside the manager, for the test
    a = prompt_of(14)
    engine.submit("a", a, max_tokens=2)
    (done_a,) = engine.drain()
    assert list(done_a.token_ids) == reference_tokens(engine.model, a, 2)
    assert (pool.num_resizes > 0) == budget
    states.release(999)  # room for b's own state
    b = [*a[:11], 99, 98]
    engine.submit("b", b, max_tokens=3)
    (done_b,) = engine.drain()
    assert done_b.cached_tokens == (8 if budget else 0)
    assert list(done_b.token_ids) == reference_tokens(engine.model, b, 3)
    assert pool.bytes_total <= (pool.max_bytes or pool.bytes_total)
    pool.check_invariants()


def _shorts_arriving(engine: BlockPoolBatchEngine) -> list[int]:
    """Submit short agents ``a0, a1, ...`` (prompt seed = number) while they fit, checking
    the pool's invariants after each; their numbers."""
    shorts = []
    for a in range(1000):
        try:
            engine.submit(f"a{a}", prompt_of(PROMPT, seed=a), max_tokens=MAX_TOKENS)
        except PoolExhaustedError:
            break
        shorts.append(a)
        engine.pool.check_invariants()
    return shorts


def _next_turn_resumes_whole(
    engine: BlockPoolBatchEngine, prompt: list[int], long: CompletedGeneration, new_token: int
) -> None:
    """The "long" agent's next turn (``prompt``, its reply ``long``, ``new_token``) reads
    back every block it wrote where the moves put them, equal to the reference."""
    nxt = [*prompt, *long.token_ids, new_token]
    engine.submit("long", nxt, long.blocks, max_tokens=MAX_TOKENS)
    (again,) = engine.drain()
    assert again.cached_tokens == long.blocks.total_tokens
    assert list(again.token_ids) == reference_tokens(engine.model, nxt, MAX_TOKENS)


def test_a_running_requests_unwritten_blocks_move_and_its_turn_ends_intact() -> None:
    """A request in flight holds the top blocks of the global group, none written yet (its
    final cache goes in when it ends): short agents arriving meanwhile still get the global
    group's bytes, its blocks moving down under it, and its cache comes out whole."""
    budget = 50 * WINDOWED.group_bytes_per_block(0)
    pool = BlockPool(WINDOWED, max_bytes=budget, storage=FakeStorage)
    engine = _engine(WINDOWED, pool)
    n0 = pool.blocks_per_group[0]
    alloc = pool.manager.allocator(0)
    low = alloc.allocate(999, n0 - 10)  # a holder outside the manager, for the test only
    prompt = prompt_of(3, seed=7)  # no block boundary to publish a prefix at
    max_tokens = 3 * B + 1
    engine.submit("long", prompt, max_tokens=max_tokens)
    alloc.release(999)
    assert min(low) == 0 and max(low) == n0 - 11
    engine.step()  # running, its fresh blocks at the top of group 0, nothing written
    assert engine.is_in_flight("long")
    assert pool.manager.spare_blocks(0) == pool.manager.num_free(0)
    shorts = _shorts_arriving(engine)
    assert pool.blocks_per_group[0] < n0 - 4, "the global group gave no bytes"
    assert pool.num_blocks_moved > 0 and len(shorts) > 5
    done = {d.agent_id: d for d in engine.drain()}
    pool.check_invariants()
    long = done["long"]
    assert long.error is None, long.error
    assert list(long.token_ids) == reference_tokens(engine.model, prompt, max_tokens)
    for a in shorts:
        assert list(done[f"a{a}"].token_ids) == reference_tokens(
            engine.model, prompt_of(PROMPT, seed=a), MAX_TOKENS
        )
        pool.release(done[f"a{a}"].blocks)
    # its next turn reads back every block it wrote where the moves put them
    _next_turn_resumes_whole(engine, prompt, long, 7)


def test_a_request_writing_its_final_cache_keeps_its_blocks_where_they_are() -> None:
    """Once a request's final write has its tables (place), its fresh blocks are being
    written outside the pool's lock: a shrink must not move them (the control for the test
    above); before that, the same blocks can move."""
    pool = BlockPool(WINDOWED, num_blocks=8, storage=FakeStorage)
    m = pool.manager
    m.allocator(0).allocate(999, 6)  # ids 0..5 held: the request gets the top ones
    seq = pool.open_sequence("a", prompt_of(PROMPT), MAX_TOKENS)
    assert hasattr(seq, "abort")
    m.allocator(0).release(999)
    res = seq._res  # type: ignore[union-attr]
    top = max(res.fresh[0])
    assert top == 7 and m.spare_blocks(0) == m.num_free(0) == 6
    m.place(res, PROMPT + MAX_TOKENS)
    assert res.writing and m.spare_blocks(0) == 0
    with pytest.raises(InvalidRequestError, match="at most 0"):
        m.resize_group(0, 4)
    seq.abort()  # type: ignore[union-attr]
    pool.check_invariants()


def test_a_resumed_turn_in_flight_lets_the_blocks_it_read_move() -> None:
    """An agent's next turn is running: the blocks of its cache it resumed from (shared
    with its old handle, read already) sit at the top of the global group. Short agents
    arriving meanwhile still get the group's bytes: those blocks move under the running
    turn and the handle it replaces, and the turn's cache comes out whole."""
    budget = 50 * WINDOWED.group_bytes_per_block(0)
    pool = BlockPool(WINDOWED, max_bytes=budget, storage=FakeStorage)
    engine = _engine(WINDOWED, pool)
    n0 = pool.blocks_per_group[0]
    alloc = pool.manager.allocator(0)
    alloc.allocate(999, n0 - 10)  # a holder outside the manager: the agent gets the top ids
    prompt = prompt_of(3 * B, seed=7)
    engine.submit("long", prompt, max_tokens=2)
    (first,) = engine.drain()
    alloc.release(999)
    shared = set(first.blocks.tables[0].held)
    assert min(shared) >= n0 - 10
    nxt = [*prompt, *first.token_ids, 7]
    engine.submit("long", nxt, first.blocks, max_tokens=3 * B)
    engine.step()  # read: its prefix came from the blocks at the top
    assert engine.is_in_flight("long")
    assert pool.manager.spare_blocks(0) == pool.manager.num_free(0)
    shorts = _shorts_arriving(engine)
    assert len(shorts) >= 3 and pool.num_blocks_moved > 0
    assert shared - set(range(pool.blocks_per_group[0])), "none of the blocks it read moved"
    done = {d.agent_id: d for d in engine.drain()}
    pool.check_invariants()
    second = done["long"]
    assert second.error is None, second.error
    assert second.cached_tokens == first.blocks.total_tokens
    assert list(second.token_ids) == reference_tokens(engine.model, nxt, 3 * B)
    for a in shorts:
        pool.release(done[f"a{a}"].blocks)
    _next_turn_resumes_whole(engine, nxt, second, 9)
