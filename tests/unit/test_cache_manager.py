"""KVCacheManager: sharing, token-granular reuse, cached-free blocks, windows, isolation."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Sequence

import pytest
from fakes import SPEC, B

from kvpool import AttentionKind, InvalidRequestError, LayerSpec, ModelCacheSpec
from kvpool.cache import NULL_BLOCK, CacheHandle, KVCacheManager, PoolFull, Reservation
from kvpool.cache.manager import StateLease
from kvpool.cache.prefix import block_keys
from kvpool.cache.spec import StateSpec

# Two layer groups: full attention and a sliding window of 6 (not a multiple of B).
HYBRID = ModelCacheSpec(
    (
        LayerSpec(AttentionKind.GLOBAL, 2, 8, 8),
        LayerSpec(AttentionKind.SLIDING, 2, 8, 8, window=6),
        LayerSpec(AttentionKind.SLIDING, 2, 8, 8, window=6),
    ),
    "float32",
    B,
)


# Three groups: full attention, a recurrent state, a sliding window of 6.
RECURRENT = ModelCacheSpec(
    (
        LayerSpec(AttentionKind.GLOBAL, 2, 8, 8),
        LayerSpec.recurrent((StateSpec((2, 8), "float32"), StateSpec((2, 4, 4), "float32"))),
        LayerSpec(AttentionKind.SLIDING, 2, 8, 8, window=6),
    ),
    "float32",
    B,
)


def written_from(manager: KVCacheManager, res: Reservation, length: int) -> list[int]:
    """What a storage writes for a finished sequence: positions from the shared end,
    and a sliding layer only its last W (it holds no more)."""
    start = (res.match.num_tokens // B) * B
    out = []
    for policy in manager.policies:
        if policy.is_recurrent:  # the end state, in the last block's entry
            out.append(max(start, policy.keep_from(length)))
        else:
            out.append(start if policy.window is None else max(start, length - policy.window))
    return out


def turn(
    manager: KVCacheManager,
    agent: str,
    tokens: Sequence[int],
    generated: Sequence[int] = (),
    *,
    own: CacheHandle | None = None,
    salt: str = "",
) -> tuple[CacheHandle, int]:
    """One request start to end; returns the new handle and the tokens reused."""
    match = manager.lookup(tokens, salt=salt, own=own)
    res = manager.reserve(
        agent, tokens, max(1, len(generated)), match, salt=salt,
        replacing=own if own is not None and own.agent_id == agent else None,
    )  # fmt: skip
    assert isinstance(res, Reservation), res
    manager.release_pin(res)
    final = [*tokens, *generated]
    tables = manager.place(res, len(final))
    handle = manager.commit(res, final, tables, written_from(manager, res, len(final)))
    manager.check_invariants()
    return handle, match.num_tokens


def test_two_agents_share_a_system_prompt_by_reference() -> None:
    m = KVCacheManager(SPEC, [16])
    system = list(range(100, 108))  # two full blocks
    a, reused = turn(m, "a", [*system, 1, 2], [3])
    assert reused == 0
    # a: s0..s3 | s4..s7 | 1 2 3      -> blocks [0, 1, 2]
    assert a.tables[0].block_ids == (0, 1, 2)
    b, reused = turn(m, "b", [*system, 9], [8])
    assert reused == 8  # both system blocks, from agent a
    # b: s0..s3 | s4..s7 | 9 8        -> blocks [0, 1, 3]: 0 and 1 shared
    assert b.tables[0].block_ids == (0, 1, 3)
    assert [m.ref_cnt(i) for i in range(4)] == [2, 2, 1, 1]


def test_partial_block_is_reused_up_to_the_first_differing_token() -> None:
    m = KVCacheManager(SPEC, [16])
    first, _ = turn(m, "a", list(range(1, 12)), [50])  # 12 tokens: 3 full blocks
    # Shares 6 tokens (1.5 blocks) with a: 4 by reference, 2 read from a's block 1.
    prompt = [1, 2, 3, 4, 5, 6, 99, 98, 97]
    match = m.lookup(prompt)
    assert match.num_tokens == 6
    assert match.groups[0].shared == ((0, first.tables[0].block_ids[0]),)
    assert match.groups[0].pinned == (first.tables[0].block_ids[1],)


def test_full_hit_reuses_all_but_the_last_token() -> None:
    m = KVCacheManager(SPEC, [16])
    a, _ = turn(m, "a", [1, 2, 3, 4, 5], [6, 7, 8])  # 8 tokens
    assert m.lookup(list(a.token_ids), own=a).num_tokens == 7


def test_released_blocks_stay_cached_until_evicted_lru() -> None:
    m = KVCacheManager(SPEC, [4])
    a, _ = turn(m, "a", [1, 2, 3, 4, 5], [6, 7])  # blocks 0, 1 (7 tokens)
    m.release(a)
    usage = m.usage().groups[0]
    assert (usage.num_used, usage.num_free, usage.num_cached) == (0, 4, 2)
    # Found again although nobody holds it.
    assert m.lookup([1, 2, 3, 4, 5, 6, 7, 9]).num_tokens == 7
    # A handle's blocks are freed last position first, so the queue is
    #   free queue: 2 3 1 0      (head: never used; then cached, least recent first)
    # and allocating 3 takes 2, 3 and evicts 1, the tail of a's chain: its head stays.
    b, reused = turn(m, "b", [40, 41, 42, 43, 44, 45, 46, 47, 48], [49])
    assert reused == 0
    assert b.tables[0].block_ids == (2, 3, 1)
    assert m.usage().groups[0].num_evictions == 1
    assert m.lookup([1, 2, 3, 4, 5, 6, 7, 9]).num_tokens == 4  # block 0 is still cached
    m.release(b)
    m.check_invariants()


def test_cache_salt_isolates_tenants() -> None:
    m = KVCacheManager(SPEC, [16])
    prompt = list(range(1, 14))
    turn(m, "a", prompt, [1], salt="tenant-a")
    assert m.lookup(prompt, salt="tenant-b").num_tokens == 0
    assert m.lookup(prompt, salt="tenant-a").num_tokens == 12
    assert m.lookup(prompt).num_tokens == 0


def test_handles_of_another_manager_or_released_are_refused() -> None:
    m1, m2 = KVCacheManager(SPEC, [8]), KVCacheManager(SPEC, [8])
    x, _ = turn(m1, "x", [1, 2, 3, 4, 5], [6])
    y, _ = turn(m2, "y", [7, 8, 9, 10, 11], [12])
    assert x.handle_id == y.handle_id and x.tables == y.tables  # same ids in both
    with pytest.raises(InvalidRequestError, match="not live in this pool"):
        m2.lookup([1, 2, 3], own=x)
    with pytest.raises(InvalidRequestError, match="not live"):
        m2.release(x)
    assert m2.is_live(y)
    m1.release(x)
    with pytest.raises(InvalidRequestError, match="not live"):
        m1.release(x)
    with pytest.raises(InvalidRequestError, match="another cache_salt"):
        m2.lookup([1], own=y, salt="other")


def test_pool_full_is_a_result_and_changes_nothing() -> None:
    m = KVCacheManager(SPEC, [4])
    a, _ = turn(m, "a", list(range(1, 10)), [1])  # 10 tokens: 3 blocks
    before = m.usage()
    match = m.lookup(list(range(50, 60)))
    full = m.reserve("b", list(range(50, 60)), 2, match)
    assert full == PoolFull(0, 3, 1, 4, False)
    never = m.reserve("b", list(range(50, 60)), 100, match)
    assert isinstance(never, PoolFull) and never.never_fits
    assert m.usage() == before
    m.release(a)


def test_two_copies_of_one_block_are_deduplicated_at_commit() -> None:
    m = KVCacheManager(SPEC, [16])
    prompt = list(range(1, 10))
    # Both reserve before either commits: both compute the same blocks.
    r1 = m.reserve("a", prompt, 1, m.lookup(prompt))
    r2 = m.reserve("b", prompt, 1, m.lookup(prompt))
    assert isinstance(r1, Reservation) and isinstance(r2, Reservation)
    handles = []
    for res, agent in ((r1, "a"), (r2, "b")):
        final = [*prompt, 0]
        tables = m.place(res, len(final))
        handles.append(m.commit(res, final, tables, written_from(m, res, len(final))))
        del agent
    a, b = handles
    assert a.tables[0].block_ids[:2] == b.tables[0].block_ids[:2]  # full blocks: one copy
    assert a.tables[0].block_ids[2] != b.tables[0].block_ids[2]  # partial: private
    m.check_invariants()


def test_sliding_group_keeps_only_its_window() -> None:
    m = KVCacheManager(HYBRID, [16, 16])
    prompt = list(range(1, 12))
    a, _ = turn(m, "a", prompt, [12, 13, 14])  # 14 tokens
    full, sliding = a.tables
    assert len(full.held) == 4
    # window 6: keeps positions >= 14 - 6 = 8, i.e. the blocks of 8..11 and 12..13
    assert sliding.block_ids[:2] == (NULL_BLOCK, NULL_BLOCK) and len(sliding.held) == 2
    assert sliding.valid_from == 8
    # Resuming with a full hit needs positions [13 - 6 + 1, 13) = [8, 13): held.
    again = m.lookup(list(a.token_ids), own=a)
    assert again.num_tokens == 13
    # The next turn of the agent extends it; the reuse is the whole cache.
    b, reused = turn(m, "a", [*a.token_ids, 20, 21], [22], own=a)
    assert reused == 14 and not m.is_live(a)
    assert len(b.tables[1].held) <= -(-6 // B) + 1
    m.release(b)
    m.check_invariants()


def test_sliding_group_supplies_only_what_it_still_holds() -> None:
    m = KVCacheManager(HYBRID, [32, 32])
    system = list(range(100, 112))  # 12 tokens: 3 full blocks
    turn(m, "a", [*system, 1], [2])  # the sliding layers hold positions 8..13 at the end
    # A new agent at p = 12 needs [12 - 6 + 1, 12) = [7, 12) from the sliding group:
    # position 7 was out of a's window when it finished, so no block holds it, and
    # every shorter block boundary needs positions a's sliding layers never kept.
    assert m.lookup([*system, 5, 6]).num_tokens == 0
    # The full-attention group alone would have given 12: the hybrid match is the
    # longest prefix *every* group can supply.
    assert m.lookup([*system, 5, 6]).groups[0].read == ()


def test_sliding_group_shares_blocks_inside_the_window() -> None:
    wide = ModelCacheSpec(
        (LayerSpec(AttentionKind.GLOBAL, 2, 8, 8), LayerSpec(AttentionKind.SLIDING, 2, 8, 8, 9)),
        "float32",
        B,
    )
    m = KVCacheManager(wide, [32, 32])
    a, _ = turn(m, "a", [1, 2, 3, 4, 5, 6, 7, 8], [9])  # 9 tokens <= window: all kept
    match = m.lookup([1, 2, 3, 4, 5, 6, 7, 8, 20, 21])
    assert match.num_tokens == 8
    assert match.groups[1].shared == tuple(enumerate(a.tables[1].block_ids[:2]))


# -- model-based property test ------------------------------------------------


def _block_tokens(m: KVCacheManager, g: int, block: int) -> list[int]:
    return [int(t) for t in m.allocator(g).content_tokens(block)]


@pytest.mark.parametrize(
    ("spec", "blocks"),
    [(HYBRID, [24, 12]), (RECURRENT, [24, 10, 12])],
    ids=["sliding", "recurrent"],
)
def test_random_operations_keep_every_invariant(spec: ModelCacheSpec, blocks: list[int]) -> None:
    """Random requests, commits, rollbacks, releases and group resizes (moving the blocks
    only live handles hold); after each: the allocators' and the manager's records agree,
    published blocks are findable, and a recurrent state is handed out only for the exact
    token prefix it was computed at (the model: block -> prefix)."""
    rng = random.Random(1234)
    m = KVCacheManager(spec, blocks, key_salt="model")
    states = [g for g, p in enumerate(m.policies) if p.is_recurrent]
    state_of: dict[int, tuple[int, ...]] = {}  # recurrent block -> the tokens its state is of
    num_state_reads = 0
    num_snapshots = 0
    num_live_snapshots = 0  # place_snapshot + commit_snapshot on a live handle
    num_states_left_cached = 0  # releases after which the state group held cached blocks
    prefixes: Counter[bool | None] = Counter()  # mid-prefill prefixes: published, refused
    num_resizes = 0
    num_moved = 0  # held blocks moved down by a shrink
    num_fresh_moved = 0  # of them, requests' fresh blocks (not written yet)
    vocab = 5  # tiny vocabulary: prompts collide and share often
    live: list[CacheHandle] = []
    open_res: list[tuple[Reservation, list[int], int]] = []
    num_ops = 10_000
    for _ in range(num_ops):
        op = rng.random()
        if op < 0.35 or not (live or open_res):  # a new request
            base = list(rng.choice(live).token_ids) if live and rng.random() < 0.6 else []
            cut = rng.randint(0, len(base))
            prompt = base[:cut] + [rng.randrange(vocab) for _ in range(rng.randint(1, 9))]
            own = rng.choice(live) if live and rng.random() < 0.5 else None
            salt = rng.choice(["", "", "t2"])
            if own is not None and own.salt != salt:
                own = None
            if states and own is not None and rng.random() < 0.5:  # the agent's next turn
                prompt = [*own.token_ids, *(rng.randrange(vocab) for _ in range(rng.randint(1, 5)))]
            match = m.lookup(prompt, salt=salt, own=own)
            _check_match(m, prompt, match)
            for g in states:
                read = match.groups[g].read
                assert len(read) == -(-match.num_tokens // B)
                if read:  # the state after exactly num_tokens prompt tokens
                    assert state_of[read[-1]] == tuple(prompt[: match.num_tokens])
                    num_state_reads += 1
            max_tokens = rng.randint(1, 6)
            res = m.reserve(
                f"a{rng.randrange(6)}", prompt, max_tokens, match, salt=salt,
                replacing=own if own is not None and rng.random() < 0.5 else None,
            )  # fmt: skip
            if isinstance(res, Reservation):
                if rng.random() < 0.5:
                    m.release_pin(res)
                    if states and rng.random() < 0.5:  # a snapshot mid-prefill
                        prefixes[_snapshot(m, res, prompt, rng, state_of)] += 1
                        num_snapshots += 1
                open_res.append((res, prompt, max_tokens))
        elif op < 0.65 and open_res:  # a request ends: commit (or fail)
            res, prompt, max_tokens = open_res.pop(rng.randrange(len(open_res)))
            if rng.random() < 0.15:
                m.rollback(res)
            else:
                gen = [rng.randrange(vocab) for _ in range(rng.randint(0, max_tokens))]
                final = [*prompt, *gen]
                tables = m.place(res, len(final))
                replaced = res.replacing
                handle = m.commit(res, final, tables, written_from(m, res, len(final)))
                for g in states:  # one state per handle: at its end
                    (end_state,) = handle.tables[g].held
                    assert handle.tables[g].block_ids[-1] == end_state
                    if tables[g][-1] == end_state:  # written (not swapped for a twin)
                        state_of[end_state] = tuple(final)
                    assert state_of[end_state] == tuple(final)
                live.append(handle)
                if replaced is not None and replaced in live:
                    live.remove(replaced)
        elif op < 0.70:  # the pool moves budget: a group shrinks (held blocks move), or grows
            g = rng.randrange(len(blocks))
            n, spare = m.num_blocks(g), m.spare_blocks(g)
            if spare < n - 1 and rng.random() < 0.2:  # more than it can spare: refused
                before, tables = m.usage(), [h.tables for h in live]
                with pytest.raises(InvalidRequestError, match="at most"):
                    m.resize_group(g, n - spare - 1)
                assert m.usage() == before and [h.tables for h in live] == tables
            elif rng.random() < 0.5:
                fresh = {b for res, _, _ in open_res for b in res.fresh[g]}
                unread = {
                    b for res, _, _ in open_res if not res.read for b in res.match.groups[g].read
                }
                moves = m.resize_group(g, max(1, n - rng.randint(0, spare)))
                num_fresh_moved += len(fresh & set(moves))
                assert not unread & set(moves), "a block a request has yet to read moved"
                assert all(old >= m.num_blocks(g) > new for old, new in moves.items())
                if g in states:  # a moved state keeps its prefix (a request's fresh
                    for old, new in moves.items():  # blocks move too: no state in them yet)
                        if old in state_of:
                            state_of[new] = state_of.pop(old)
                num_resizes += 1
                num_moved += len(moves)
            else:
                m.resize_group(g, min(n + rng.randint(1, 4), 2 * blocks[g]))
                num_resizes += 1
        elif op < 0.74 and states and live:  # a snapshot of a live handle's prefix
            handle = rng.choice(live)
            if handle.total_tokens > 1:
                length = rng.randint(1, handle.total_tokens - 1)
                snap = m.place_snapshot(handle, length)
                if isinstance(snap, StateLease):
                    assert len(snap.tables[states[0]]) == -(-length // B)
                    if rng.random() < 0.2:
                        m.abort_snapshot(snap)
                    else:
                        for g in states:
                            state_of[snap.tables[g][-1]] = tuple(handle.token_ids[:length])
                        m.commit_snapshot(snap)
                        num_live_snapshots += 1
                        assert length in m.snapshot_tables(handle, only=length)
            for length, tables in m.snapshot_tables(handle).items():
                for g in states:  # every snapshot found is of exactly that prefix
                    assert state_of[tables[g][-1]] == tuple(handle.token_ids[:length])
        elif live:  # a handle is released
            m.release(live.pop(rng.randrange(len(live))))
            if states and m.usage().groups[states[0]].num_cached > 0:
                num_states_left_cached += 1
        m.check_invariants()
        _check_published(m, live)
    for res, _, _ in open_res:
        m.rollback(res)
    for handle in live:
        m.release(handle)
    m.check_invariants()
    usage = m.usage()
    assert usage.num_used == 0 and usage.num_handles == 0  # nothing leaked
    assert usage.num_queries > 1000 and usage.hit_tokens > 0  # the test did share
    assert num_resizes > 200
    assert num_moved > 100
    assert num_fresh_moved > 20
    if states:
        assert num_states_left_cached > 50  # end states at boundaries stay findable
        assert num_state_reads > 300  # states were reused, from own ends and by key
        assert num_snapshots > 100
        # prefixes published, and refused where a sliding group's write left a block the
        # request keeps partly written (with the block given back: nothing leaked, above)
        assert prefixes[True] > 20 and prefixes[False] > 0, prefixes
        assert num_live_snapshots > 100


def _snapshot(
    m: KVCacheManager,
    res: Reservation,
    prompt: list[int],
    rng: random.Random,
    state_of: dict[int, tuple[int, ...]],
) -> bool | None:
    """Publish ``prompt[:length]`` (a block boundary past the match) as a running request
    does at a segment end: its blocks and the state there (recorded in ``state_of``); or,
    half the time, a state alone at any length (a prompt-end snapshot). Returns whether a
    prefix was published (None: no prefix tried)."""
    if rng.random() < 0.5 and len(prompt) > res.match.num_tokens + 1:
        length = rng.randint(res.match.num_tokens + 1, len(prompt) - 1)
        placed = m.place_state(res, length)
        if not isinstance(placed, PoolFull):
            for g, policy in enumerate(m.policies):
                if policy.is_recurrent:
                    state_of[placed[g][-1]] = tuple(prompt[:length])
            m.commit_state(res, placed, length)
            m.check_invariants()
        return None
    first = res.match.num_tokens // B + 1
    last = (len(prompt) - 1) // B
    if first > last:
        return None
    length = rng.randint(first, last) * B
    tables = m.place_prefix(res, length)
    if isinstance(tables, PoolFull):  # a sliding or recurrent group has no free block: skipped
        return None
    for g, policy in enumerate(m.policies):
        if policy.is_recurrent:
            state_of[tables[g][-1]] = tuple(prompt[:length])
    start = m.shared_end(res.match)
    written = [
        max(start, policy.keep_from(length)) if policy.is_recurrent
        else start if policy.window is None else max(start, length - policy.window)
        for policy in m.policies
    ]  # fmt: skip
    published = m.commit_prefix(res, tables, written)
    m.check_invariants()
    return published


def _check_match(m: KVCacheManager, prompt: list[int], match: object) -> None:
    """Every block a match hands out holds exactly the prompt's tokens there."""
    from kvpool.cache import PrefixMatch

    assert isinstance(match, PrefixMatch)
    p = match.num_tokens
    assert 0 <= p < len(prompt)
    for g, gm in enumerate(match.groups):
        for j, block in gm.shared:
            assert _block_tokens(m, g, block) == prompt[j * B : (j + 1) * B] or (
                _held_by_own_only(m, g, block)
            )
        for block in gm.pinned:
            got = _block_tokens(m, g, block)
            j = p // B
            assert got[: p - j * B] == prompt[j * B : p] or _held_by_own_only(m, g, block)


def _held_by_own_only(m: KVCacheManager, g: int, block: int) -> bool:
    """An unpublished block of a live handle (a sliding group's partly written block)."""
    return not m.allocator(g).has_content(block) and m.ref_cnt(block, g) > 0


def _check_published(m: KVCacheManager, live: list[CacheHandle]) -> None:
    """The key index finds each live handle's published blocks under their own tokens."""
    for handle in live:
        keys = block_keys(handle.token_ids, B, m.root(handle.salt))
        for g, table in enumerate(handle.tables):
            for j, block in enumerate(table.block_ids):
                if block == NULL_BLOCK or j >= len(keys):
                    continue
                alloc = m.allocator(g)
                if alloc.has_content(block):
                    assert _block_tokens(m, g, block) == list(handle.token_ids[j * B : (j + 1) * B])
                    found = alloc.lookup(keys[j], list(handle.token_ids[j * B : (j + 1) * B]))
                    assert found != -1, (g, j, block, handle.tables)


# -- recurrent groups ---------------------------------------------------------


def _recurrent() -> KVCacheManager:
    return KVCacheManager(RECURRENT, [16, 8, 16], key_salt="model")


def test_recurrent_group_keeps_one_state_at_the_sequence_end() -> None:
    m = _recurrent()
    tokens = list(range(1, 11))  # 10 tokens: 3 blocks of 4
    handle, reused = turn(m, "a", tokens, [50, 51])  # 12 positions
    assert reused == 0
    #            positions 0..3  4..7  8..11
    # full                 [ x ]  [ x ]  [ x ]
    # recurrent            [ - ]  [ - ]  [ s ]    the state after 12 tokens
    assert len(handle.tables[0].held) == 3
    assert handle.tables[1].block_ids[:2] == (NULL_BLOCK, NULL_BLOCK)
    assert handle.tables[1].held == (handle.tables[1].block_ids[2],)
    assert handle.tables[1].valid_from == 8


def test_recurrent_group_resumes_at_the_agents_exact_end() -> None:
    m = _recurrent()
    handle, _ = turn(m, "a", list(range(1, 10)), [60])  # 10 positions: not a boundary
    nxt = [*handle.token_ids, 7, 8, 9]
    match = m.lookup(nxt, own=handle)
    assert match.num_tokens == 10  # full and sliding could give 12, the state only 10
    rec = match.groups[1]
    assert rec.shared == () and rec.pinned == (handle.tables[1].block_ids[2],)
    _, reused = turn(m, "a", nxt, [1], own=handle)
    assert reused == 10


def test_recurrent_state_is_not_shared_mid_block_with_another_agent() -> None:
    """Agent b shares a's first 9 tokens, but a's state is after 10: b reuses nothing
    (an attention-only model would reuse 9 tokens)."""
    m = _recurrent()
    a, _ = turn(m, "a", list(range(1, 10)), [60])
    match = m.lookup([*a.token_ids[:9], 99, 98])
    assert match.num_tokens == 0
    plain = KVCacheManager(HYBRID, [16, 16])
    turn(plain, "a", list(range(1, 10)), [60])
    assert plain.lookup([*a.token_ids[:9], 99, 98]).num_tokens == 9


def test_a_state_at_a_block_boundary_is_shared_by_key() -> None:
    """A sequence that ends on a block boundary published its state under the block's
    key: another agent with that exact prefix resumes from it, shared by reference.
    (Without a sliding layer: its partly written first block is not shareable.)"""
    m = KVCacheManager(dataclasses.replace(RECURRENT, layers=RECURRENT.layers[:2]), [16, 8])
    a, _ = turn(m, "a", list(range(1, 8)), [70])  # 8 positions: ends on a boundary
    state = a.tables[1].block_ids[1]
    match = m.lookup([*a.token_ids, 5, 6])
    assert match.num_tokens == 8
    assert match.groups[1].shared == ((1, state),)
    b, reused = turn(m, "b", [*a.token_ids, 5, 6], [1])
    assert reused == 8
    assert m.ref_cnt(state, 1) == 1  # a's; b holds its own end state
    assert b.tables[1].held != (state,)
    # one token less than the boundary: no state for 7 tokens
    assert m.lookup([*a.token_ids[:7], 42]).num_tokens == 0


def test_a_full_hit_cannot_trim_a_state() -> None:
    """The same prompt again: attention would re-feed the last token (reuse len - 1), a
    state cannot step back one token, so only a boundary snapshot below it is reused."""
    m = _recurrent()
    a, _ = turn(m, "a", list(range(1, 10)), [60])  # 10 positions
    assert m.lookup(list(a.token_ids), own=a).num_tokens == 0
    b, _ = turn(m, "b", list(range(1, 8)), [70])  # 8 positions, a boundary
    assert m.lookup([*b.token_ids, 1], own=b).num_tokens == 8


def test_recurrent_pool_full_changes_nothing_and_rollback_frees_everything() -> None:
    m = KVCacheManager(RECURRENT, [16, 1, 16])
    a, _ = turn(m, "a", [1, 2, 3], [4])
    before = m.usage()
    res = m.reserve("b", [9, 9, 9], 2, m.lookup([9, 9, 9]))
    assert isinstance(res, PoolFull) and res.group == 1 and res.never_fits is False
    assert m.usage() == before
    res = m.reserve("a", [*a.token_ids, 5], 2, m.lookup([*a.token_ids, 5], own=a), replacing=a)
    assert isinstance(res, PoolFull)  # a's end state is held until the commit
    m.release(a)
    res = m.reserve("b", [9, 9, 9], 2, m.lookup([9, 9, 9]))
    assert isinstance(res, Reservation)
    m.rollback(res)
    assert m.usage().num_used == 0
    m.check_invariants()


def test_the_prompt_end_snapshot_index_stays_bounded() -> None:
    """Every request publishes a prompt-end snapshot under its own prefix; the index of
    their (parent, length) keeps at most as many entries as the recurrent group has
    blocks, and the newest snapshot is still found."""
    m = _recurrent()
    most = sum(m.num_blocks(g) for g, p in enumerate(m.policies) if p.is_recurrent)
    prompts = [[100 + i, 7, 8, 9, 10, 11] for i in range(5 * most)]  # partial at 5 tokens
    for prompt in prompts:
        res = m.reserve("a", prompt, 1, m.lookup(prompt))
        assert isinstance(res, Reservation)
        m.release_pin(res)
        placed = m.place_state(res, len(prompt) - 1)
        assert not isinstance(placed, PoolFull)
        m.commit_state(res, placed, len(prompt) - 1)
        tables = m.place(res, len(prompt))
        m.release(m.commit(res, prompt, tables, written_from(m, res, len(prompt))))
        assert m.num_snapshot_entries <= most
    assert m.num_snapshot_entries == most
    newest = prompts[-1]
    assert m.lookup([*newest[:-1], 99, 98]).num_tokens == len(newest) - 1
    m.check_invariants()


def test_a_snapshot_of_a_live_handle_is_reused_for_exactly_its_prefix() -> None:
    """``place_snapshot`` + ``commit_snapshot`` publish a state after a prefix of a live
    handle (mid-block or at a boundary) as a prompt-end snapshot is: a later prompt with
    exactly that prefix resumes there, one that differs inside it does not; the handle's
    own tables are untouched and nothing stays held."""
    m = KVCacheManager(dataclasses.replace(RECURRENT, layers=RECURRENT.layers[:2]), [16, 8])
    a, _ = turn(m, "a", list(range(1, 11)), [60])  # 11 tokens, end state mid-block
    tables_before, used_before = a.tables, m.usage().num_used
    assert m.lookup([*a.token_ids[:6], 99]).num_tokens == 0  # control: no state there yet
    assert m.lookup([*a.token_ids[:8], 99, 98]).num_tokens == 0
    for length in (6, 8):
        snap = m.place_snapshot(a, length)
        assert isinstance(snap, StateLease) and snap.tokens == a.token_ids[:length]
        # 6 or 8 tokens: 2 entries; the state in the last one of the recurrent group
        #   full       [ - ]  [ - ]
        #   recurrent  [ - ]  [ s ]
        assert snap.tables[0] == (NULL_BLOCK, NULL_BLOCK)
        assert snap.tables[1][0] == NULL_BLOCK and snap.tables[1][1] != NULL_BLOCK
        m.commit_snapshot(snap)
        with pytest.raises(InvalidRequestError, match="already committed"):
            m.commit_snapshot(snap)
    assert a.tables == tables_before and m.usage().num_used == used_before
    assert list(m.snapshot_tables(a)) == [6, 8]
    assert m.lookup([*a.token_ids[:6], 99]).num_tokens == 6
    assert m.lookup([*a.token_ids[:8], 99, 98]).num_tokens == 8
    assert m.lookup([*a.token_ids[:5], 77, 99]).num_tokens == 0  # differs at 5: no state
    assert m.lookup([*a.token_ids[:7], 99]).num_tokens == 6  # the longest exact one below
    # abort: nothing published, nothing held
    before = m.usage()
    snap = m.place_snapshot(a, 7)
    assert isinstance(snap, StateLease)
    m.abort_snapshot(snap)
    m.abort_snapshot(snap)  # a no-op
    assert m.usage() == before and 7 not in m.snapshot_tables(a)
    m.check_invariants()
    for bad in (0, 11):
        with pytest.raises(InvalidRequestError, match=r"must hold 1\.\.10"):
            m.place_snapshot(a, bad)
    m.release(a)
    with pytest.raises(InvalidRequestError, match="not live"):
        m.place_snapshot(a, 4)
    assert m.usage().num_used == 0


def test_a_snapshot_without_a_free_state_block_changes_nothing() -> None:
    m = KVCacheManager(dataclasses.replace(RECURRENT, layers=RECURRENT.layers[:2]), [16, 1])
    a, _ = turn(m, "a", list(range(1, 11)), [60])  # its end state takes the only one
    before = m.usage()
    full = m.place_snapshot(a, 4)
    assert isinstance(full, PoolFull) and full.group == 1 and (full.needed, full.free) == (1, 0)
    assert m.usage() == before
    m.check_invariants()


def test_held_snapshots_survive_allocations_until_released() -> None:
    """``hold_snapshots`` takes a reference on each snapshot of a handle's prefix: an
    allocation that would evict them (cached-free, least recently freed first) cannot."""
    m = KVCacheManager(dataclasses.replace(RECURRENT, layers=RECURRENT.layers[:2]), [16, 3])
    a, _ = turn(m, "a", list(range(1, 11)), [60])
    for length in (4, 8):
        snap = m.place_snapshot(a, length)
        assert isinstance(snap, StateLease)
        m.commit_snapshot(snap)
    held = m.hold_snapshots(a)
    assert held.lengths == (4, 8)
    assert isinstance(m.place_snapshot(a, 9), PoolFull)  # both cached-free ones are held
    m.release_snapshots(held)
    snap = m.place_snapshot(a, 9)  # now one is evicted for it
    assert isinstance(snap, StateLease)
    m.commit_snapshot(snap)
    assert len(m.snapshot_tables(a)) == 2  # one of 4, 8 gone, 9 there
    m.check_invariants()


@pytest.mark.parametrize(("prompt_len", "published"), [(11, False), (14, True)])
def test_a_prefix_whose_sliding_block_is_partly_written_is_refused_if_the_request_keeps_it(
    prompt_len: int, published: bool
) -> None:
    """A resumed request (its own 6 tokens, mid-block) publishes the prefix at 8 or 12 mid-
    prefill, and its sliding cache wrote block 1 only from position 7 (it no longer held
    rows 4..6). A block written in part cannot be shared: when the request's final cache
    keeps it (prompt of 11: the window keeps positions from 5) the prefix is refused, its
    blocks given back and the match unchanged, so the final write covers block 1; when it
    does not (prompt of 14: from 8), the block is freed and the rest published."""
    m = KVCacheManager(HYBRID, [16, 16])
    own, _ = turn(m, "a", list(range(5)), [5])
    prompt = list(range(prompt_len))
    match = m.lookup(prompt, own=own)
    assert match.num_tokens == 6
    res = m.reserve("a", prompt, 1, match, replacing=own)
    assert isinstance(res, Reservation)
    m.release_pin(res)
    used = m.usage().num_used
    length = 8 if prompt_len < 12 else 12
    tables = m.place_prefix(res, length)
    assert not isinstance(tables, PoolFull)
    assert m.commit_prefix(res, tables, [4, 7]) is published
    m.check_invariants()
    if published:
        assert res.match.num_tokens == 12
        assert m.lookup([*range(12), 99]).num_tokens < 12  # block 1 was not published
    else:
        assert res.match is match and m.usage().num_used == used
    final = [*prompt, 50]
    handle = m.commit(res, final, m.place(res, len(final)), written_from(m, res, len(final)))
    m.check_invariants()  # the handle holds a block wherever it says positions are valid
    assert NULL_BLOCK not in handle.tables[1].block_ids[handle.tables[1].valid_from // B :]
    again = m.lookup([*final, 60], own=handle)
    assert again.num_tokens == len(final)  # the agent's next turn reuses all of it
    m.release(handle)
    m.check_invariants()
    assert m.usage().num_used == 0


def test_window_blocks_are_found_for_each_handle_asked_about_in_turn() -> None:
    """``window_lengths`` and ``window_block`` name the sliding blocks the pool holds under
    each handle's own block keys (kept for the last handle asked about: asking about
    another must not reuse them). Window 8 (a multiple of B): a 16-token sequence keeps
    whole blocks 2 and 3, the window at 16."""
    spec = ModelCacheSpec(
        (
            LayerSpec(AttentionKind.GLOBAL, 2, 8, 8),
            LayerSpec(AttentionKind.SLIDING, 2, 8, 8, window=8),
        ),
        "float32",
        B,
    )
    m = KVCacheManager(spec, [16, 16])
    a, _ = turn(m, "a", list(range(15)), [15])
    b, _ = turn(m, "b", list(range(100, 115)), [115])
    for handle in (a, b, a, b):
        assert m.window_lengths(handle) == [16]
        for j in (2, 3):
            assert m.window_block(handle, 1, j) == handle.tables[1].block_ids[j] != NULL_BLOCK
        assert m.window_block(handle, 1, 1) == NULL_BLOCK  # out of the window: not kept
