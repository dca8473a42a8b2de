"""Tests of the compiled block-table core, ``kvpool._blocks`` (no MLX).

Expected states are drawn in comments as
    queue: <free queue, head first; C marks a cached block>
    ref: <ref_cnt of block 0, 1, ...>
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from kvpool import _blocks


def ref_cnts(alloc: _blocks.BlockAllocator) -> list[int]:
    return [alloc.ref_cnt(b) for b in range(alloc.num_blocks)]


Content = tuple[int, tuple[int, ...], int | None]  # parent_key, tokens, key


def content(alloc: _blocks.BlockAllocator, block_id: int) -> Content | None:
    parent = alloc.parent_key_of(block_id)
    if parent is None:
        assert not alloc.has_content(block_id)
        assert alloc.content_tokens(block_id) == []
        assert alloc.key_of(block_id) is None
        return None
    return parent, tuple(alloc.content_tokens(block_id)), alloc.key_of(block_id)


@dataclass(frozen=True, slots=True)
class Snapshot:
    free_queue: tuple[int, ...]
    ref_cnt: tuple[int, ...]
    tables: tuple[tuple[int, tuple[int, ...]], ...]
    num_owners: int
    num_cached: int
    num_evictions: int
    content: tuple[Content | None, ...]


def snapshot(alloc: _blocks.BlockAllocator, owners: range = range(16)) -> Snapshot:
    return Snapshot(
        free_queue=tuple(alloc.free_queue()),
        ref_cnt=tuple(ref_cnts(alloc)),
        tables=tuple((o, tuple(alloc.table(o))) for o in owners if alloc.has_owner(o)),
        num_owners=alloc.num_owners,
        num_cached=alloc.num_cached,
        num_evictions=alloc.num_evictions,
        content=tuple(content(alloc, b) for b in range(alloc.num_blocks)),
    )


def test_fresh_pool() -> None:
    alloc = _blocks.BlockAllocator(5)
    # queue: 0 1 2 3 4   ref: 0 0 0 0 0
    assert (alloc.num_blocks, alloc.num_free, alloc.num_used, alloc.num_owners) == (5, 5, 0, 0)
    assert (alloc.block_tokens, alloc.num_cached, alloc.num_evictions) == (256, 0, 0)
    assert _blocks.BlockAllocator(3, block_tokens=16).block_tokens == 16
    assert alloc.free_queue() == [0, 1, 2, 3, 4]
    assert ref_cnts(alloc) == [0, 0, 0, 0, 0]
    alloc.check_invariants()


@pytest.mark.parametrize("num_blocks", [0, -1])
def test_constructor_rejects_empty_pool(num_blocks: int) -> None:
    with pytest.raises(ValueError, match=rf"num_blocks must be > 0, got {num_blocks}"):
        _blocks.BlockAllocator(num_blocks)
    with pytest.raises(ValueError, match=r"block_tokens must be > 0, got 0"):
        _blocks.BlockAllocator(4, 0)


def test_allocate_exact_ids_and_append() -> None:
    alloc = _blocks.BlockAllocator(8)
    assert alloc.allocate(1, 3) == [0, 1, 2]
    assert alloc.allocate(owner=2, n=2) == [3, 4]
    assert alloc.allocate(1, 1) == [5]
    # queue: 6 7   tables: 1 -> [0 1 2 5], 2 -> [3 4]
    assert alloc.free_queue() == [6, 7]
    assert alloc.table(1) == [0, 1, 2, 5]
    assert alloc.table(2) == [3, 4]
    assert alloc.table(3) == []
    assert (alloc.num_free, alloc.num_used, alloc.num_owners) == (2, 6, 2)
    assert alloc.allocate(3, 0) == []
    assert not alloc.has_owner(3)  # n == 0 registers nothing
    alloc.check_invariants()


def test_pool_exhausted_changes_nothing() -> None:
    assert issubclass(_blocks.PoolExhausted, RuntimeError)
    alloc = _blocks.BlockAllocator(64)
    alloc.allocate(1, 61)
    before = snapshot(alloc)
    with pytest.raises(
        _blocks.PoolExhausted,
        match=r"^\[kvpool::allocate\] need 12 blocks, 3 free \(pool of 64\)$",
    ):
        alloc.allocate(2, 12)
    with pytest.raises(_blocks.PoolExhausted, match="need 4 blocks, 3 free"):
        alloc.allocate(1, 4)
    assert snapshot(alloc) == before
    assert not alloc.has_owner(2)
    assert alloc.allocate(2, 3) == [61, 62, 63]
    alloc.check_invariants()


def test_freed_blocks_without_content_go_to_the_head() -> None:
    alloc = _blocks.BlockAllocator(6)
    assert alloc.allocate(1, 4) == [0, 1, 2, 3]
    alloc.free(1, [2, 0])  # pushed at the head one by one: 2, then 0
    # queue: 0 2 4 5   ref: 0 1 0 1 0 0   table 1: [1 3]
    assert alloc.free_queue() == [0, 2, 4, 5]
    assert ref_cnts(alloc) == [0, 1, 0, 1, 0, 0]
    assert alloc.table(1) == [1, 3]
    assert alloc.allocate(2, 3) == [0, 2, 4]
    alloc.free(1, (1, 3))  # any sequence; the emptied owner is forgotten
    assert not alloc.has_owner(1)
    alloc.check_invariants()


def test_share_and_release_header_example() -> None:
    alloc = _blocks.BlockAllocator(4)
    assert alloc.allocate(7, 2) == [0, 1]
    alloc.share(9, [1])
    # ref: 1 2 0 0
    assert ref_cnts(alloc) == [1, 2, 0, 0]
    assert alloc.table(9) == [1]
    assert alloc.release(7) == 1  # block 1 is still held by 9
    # ref: 0 1 0 0   queue: 0 2 3
    assert ref_cnts(alloc) == [0, 1, 0, 0]
    assert alloc.free_queue() == [0, 2, 3]
    assert alloc.release(9) == 1
    # queue: 1 0 2 3
    assert alloc.free_queue() == [1, 0, 2, 3]
    assert alloc.release(9) == 0  # unknown owner
    assert alloc.num_owners == 0
    alloc.check_invariants()


def test_free_of_shared_block_keeps_it_in_use() -> None:
    alloc = _blocks.BlockAllocator(3)
    alloc.allocate(1, 2)  # [0 1]
    alloc.share(2, [0])
    alloc.free(1, [0])
    # ref: 1 1 0   queue: 2
    assert ref_cnts(alloc) == [1, 1, 0]
    assert alloc.free_queue() == [2]
    alloc.free(2, [0])
    # queue: 0 2
    assert alloc.free_queue() == [0, 2]
    alloc.check_invariants()


Call = Callable[[_blocks.BlockAllocator], object]

# Pool of 64 with owner 7 -> [0 1 2], owner 8 -> [3 4]. nanobind maps
# std::out_of_range to IndexError and std::invalid_argument to ValueError.
MISTAKES: list[tuple[Call, type[Exception], str]] = [
    (lambda a: a.free(7, [99]), IndexError, "[kvpool::free] block id 99 out of range [0, 64)"),
    (lambda a: a.free(7, [10]), ValueError, "block 10 is already free (double free)"),
    (lambda a: a.free(7, [3]), ValueError, "[kvpool::free] owner 7 does not hold block 3"),
    (lambda a: a.free(5, [0]), ValueError, "owner 5 does not hold block 0"),
    (lambda a: a.free(7, [1, 1]), ValueError, "block 1 appears more than once in block_ids"),
    (lambda a: a.free(7, [0, 1, 64]), IndexError, "block id 64 out of range"),
    (lambda a: a.share(9, [64]), IndexError, "[kvpool::share] block id 64 out of range [0, 64)"),
    (lambda a: a.share(9, [5]), ValueError, "[kvpool::share] block 5 is free; only held or cached"),
    (lambda a: a.share(9, [3, 3]), ValueError, "block 3 appears more than once"),
    (lambda a: a.share(7, [3, 1]), ValueError, "[kvpool::share] owner 7 already holds block 1"),
    (lambda a: a.allocate(7, -1), ValueError, "[kvpool::allocate] n must be >= 0, got -1"),
    (lambda a: a.ref_cnt(-1), IndexError, "[kvpool::ref_cnt] block id -1 out of range"),
    (lambda a: a.publish(64, 0, [1]), IndexError, "[kvpool::publish] block id 64 out of range"),
    (lambda a: a.publish(5, 0, [1]), ValueError, "[kvpool::publish] block 5 is not held"),
    (lambda a: a.publish(0, 0, []), ValueError, "block 0: tokens must hold 1 to 256 ids, got 0"),
    (lambda a: a.publish(0, 0, [1] * 257, 1), ValueError, "tokens must hold 1 to 256 ids, got 257"),
    (
        lambda a: a.publish(0, 0, [1, 2], 9),
        ValueError,
        "block 0: key given for a partial block (2 of 256 tokens)",
    ),
    (
        lambda a: a.publish(0, 0, [1] * 256),
        ValueError,
        "block 0: key missing for a full block (256 tokens)",
    ),
    (lambda a: a.invalidate(-1), IndexError, "[kvpool::invalidate] block id -1 out of range"),
    (lambda a: a.content_tokens(64), IndexError, "[kvpool::content_tokens] block id 64"),
    (lambda a: a.key_of(64), IndexError, "[kvpool::key_of] block id 64"),
    (lambda a: a.parent_key_of(64), IndexError, "[kvpool::parent_key_of] block id 64"),
    (lambda a: a.has_content(64), IndexError, "[kvpool::has_content] block id 64"),
]


@pytest.mark.parametrize(("call", "error", "message"), MISTAKES)
def test_caller_mistakes_raise_and_change_nothing(
    call: Call, error: type[Exception], message: str
) -> None:
    alloc = _blocks.BlockAllocator(64)
    alloc.allocate(7, 3)
    alloc.allocate(8, 2)
    before = snapshot(alloc)
    with pytest.raises(error) as info:
        call(alloc)
    assert type(info.value) is error
    assert message in str(info.value)
    assert snapshot(alloc) == before
    alloc.check_invariants()


def test_real_double_free() -> None:
    alloc = _blocks.BlockAllocator(4)
    alloc.allocate(1, 2)
    alloc.free(1, [1])
    with pytest.raises(ValueError, match=r"block 1 is already free \(double free\)"):
        alloc.free(1, [1])
    assert alloc.table(1) == [0]
    alloc.check_invariants()


@pytest.mark.parametrize(
    "call",
    [
        lambda a: a.allocate(1, 2**31),  # n is int32
        lambda a: a.allocate(2**63, 1),  # owner is int64
        lambda a: a.free(1, [2**31]),  # block ids are int32
        lambda a: a.publish(0, -1, [1]),  # keys are uint64
        lambda a: a.publish(0, 2**64, [1]),
        lambda a: a.lookup(2**64, [1]),
        lambda a: a.best_child(-1, [1]),
        lambda a: a.publish(0, 0, [2**31]),  # token ids are int32
    ],
)
def test_out_of_type_range_arguments_are_type_errors(call: Call) -> None:
    alloc = _blocks.BlockAllocator(4)
    with pytest.raises(TypeError):
        call(alloc)
    assert alloc.num_free == 4
    assert alloc.num_owners == 0


# --- Prefix-cache bookkeeping -------------------------------------------------


def test_publish_lookup_and_content() -> None:
    alloc = _blocks.BlockAllocator(4, block_tokens=2)
    assert alloc.allocate(1, 3) == [0, 1, 2]
    assert alloc.publish(0, 7, [10, 11], 50) == 0  # full block: canonical for 50
    assert alloc.publish(1, parent_key=50, tokens=[12]) == 1  # partial: no key
    assert content(alloc, 0) == (7, (10, 11), 50)
    assert content(alloc, 1) == (50, (12,), None)
    assert content(alloc, 2) is None
    assert alloc.lookup(50, [10, 11]) == 0
    assert alloc.lookup(50, [10]) == -1  # tokens must match exactly
    assert alloc.lookup(51, [10, 11]) == -1
    # The whole uint64 range is a key.
    top = 2**64 - 1
    assert alloc.publish(2, top, [1, 2], key=top) == 2
    assert alloc.lookup(top, [1, 2]) == 2
    assert alloc.best_child(top, [1, 5]) == (2, 1)
    # Publishing touches neither references nor the queue.
    assert ref_cnts(alloc) == [1, 1, 1, 0]
    assert alloc.free_queue() == [3]
    alloc.check_invariants()


def test_duplicate_and_colliding_keys() -> None:
    alloc = _blocks.BlockAllocator(4, block_tokens=2)
    alloc.allocate(1, 3)
    assert alloc.publish(0, 7, [1, 2], 50) == 0
    assert alloc.publish(1, 7, [1, 2], 50) == 0  # duplicate: 0 stays canonical
    assert alloc.publish(2, 7, [3, 4], 50) == 0  # collision: same key, other tokens
    assert alloc.key_of(2) == 50
    assert alloc.lookup(50, [1, 2]) == 0
    assert alloc.lookup(50, [3, 4]) == -1  # a collision never returns a block
    assert alloc.best_child(7, [3, 4]) == (2, 2)
    assert alloc.best_child(7, [1, 9]) == (0, 1)  # tie 0 / 1: lowest id
    alloc.invalidate(0)  # duplicates are not promoted
    assert alloc.lookup(50, [1, 2]) == -1
    assert alloc.best_child(7, [1, 2]) == (1, 2)
    alloc.check_invariants()


def test_release_queues_cached_blocks_at_the_tail() -> None:
    alloc = _blocks.BlockAllocator(6, block_tokens=2)
    assert alloc.allocate(1, 4) == [0, 1, 2, 3]
    alloc.publish(1, 0, [10, 11], 101)
    alloc.publish(3, 101, [12])
    assert alloc.release(1) == 4
    # table order: 0 -> head, 1 -> tail, 2 -> head, 3 -> tail
    # queue: 2 0 4 5 1C 3C
    assert alloc.free_queue() == [2, 0, 4, 5, 1, 3]
    assert (alloc.num_free, alloc.num_used, alloc.num_cached) == (6, 0, 2)
    assert alloc.lookup(101, [10, 11]) == 1  # cached: still findable
    # allocate takes FREE blocks first, then the least recently freed cached one.
    assert alloc.allocate(2, 5) == [2, 0, 4, 5, 1]
    # queue: 3C
    assert alloc.free_queue() == [3]
    assert (alloc.num_cached, alloc.num_evictions) == (1, 1)
    assert content(alloc, 1) is None
    assert alloc.lookup(101, [10, 11]) == -1  # the eviction dropped the index entry
    assert alloc.best_child(101, [12, 0]) == (3, 1)
    assert alloc.allocate(3, 1) == [3]
    assert (alloc.num_cached, alloc.num_evictions) == (0, 2)
    assert alloc.best_child(101, [12]) == (-1, 0)
    alloc.check_invariants()


def test_share_revives_a_cached_block_from_the_middle() -> None:
    alloc = _blocks.BlockAllocator(5, block_tokens=1)
    alloc.allocate(1, 5)
    for b in range(5):
        alloc.publish(b, 0, [b], 100 + b)
    alloc.release(1)
    # queue: 0C 1C 2C 3C 4C
    assert alloc.free_queue() == [0, 1, 2, 3, 4]
    alloc.share(2, [2])
    # queue: 0C 1C 3C 4C   content kept
    assert alloc.free_queue() == [0, 1, 3, 4]
    assert (alloc.num_free, alloc.num_cached, alloc.ref_cnt(2)) == (4, 4, 1)
    assert alloc.lookup(102, [2]) == 2
    alloc.free(2, [2])
    # queue: 0C 1C 3C 4C 2C   (most recently used at the tail)
    assert alloc.free_queue() == [0, 1, 3, 4, 2]
    alloc.share(3, [0, 2])
    assert alloc.free_queue() == [1, 3, 4]
    assert alloc.num_evictions == 0
    alloc.check_invariants()


def test_invalidate() -> None:
    alloc = _blocks.BlockAllocator(5, block_tokens=2)
    alloc.allocate(1, 4)
    alloc.publish(0, 0, [1, 2], 10)
    alloc.publish(1, 10, [3, 4], 11)
    alloc.publish(2, 11, [5])
    alloc.share(2, [1])
    alloc.release(1)
    # queue: 3 4 0C 2C   owner 2 holds 1
    assert alloc.free_queue() == [3, 4, 0, 2]
    alloc.invalidate(2)  # cached -> free, to the head
    # queue: 2 3 4 0C
    assert alloc.free_queue() == [2, 3, 4, 0]
    assert (alloc.num_free, alloc.num_cached) == (4, 1)
    alloc.invalidate(1)  # held: loses its content, stays held
    assert (alloc.ref_cnt(1), alloc.has_content(1), alloc.lookup(11, [3, 4])) == (1, False, -1)
    before = snapshot(alloc)
    alloc.invalidate(1)  # no content: no-op
    alloc.invalidate(3)
    assert snapshot(alloc) == before
    assert alloc.num_evictions == 0  # invalidation is not eviction
    alloc.check_invariants()


def test_best_child_token_granular() -> None:
    alloc = _blocks.BlockAllocator(8, block_tokens=4)
    alloc.allocate(1, 5)
    alloc.publish(0, 5, [1, 2, 3, 4], 100)
    alloc.publish(1, 5, [1, 2, 7, 7], 101)
    alloc.publish(2, 5, [1, 2])  # partial
    alloc.publish(3, 6, [1, 2, 3, 4], 102)  # another parent
    alloc.release(1)  # held or cached makes no difference
    assert alloc.best_child(5, [1, 2, 3, 4]) == (0, 4)
    assert alloc.best_child(5, [1, 2, 3]) == (0, 3)
    assert alloc.best_child(5, [1, 2, 7, 8]) == (1, 3)
    assert alloc.best_child(5, [1, 2, 8]) == (0, 2)  # 0, 1, 2 tie: lowest id
    assert alloc.best_child(5, [8]) == (-1, 0)
    assert alloc.best_child(5, []) == (-1, 0)
    assert alloc.best_child(4, [1]) == (-1, 0)
    assert alloc.best_child(6, [1, 2, 3, 4]) == (3, 4)


def test_publish_mistakes_change_nothing() -> None:
    alloc = _blocks.BlockAllocator(8, block_tokens=4)
    alloc.allocate(1, 2)
    alloc.publish(0, 3, [1, 2, 3, 4], 9)
    alloc.release(1)
    alloc.allocate(2, 1)
    before = snapshot(alloc)
    with pytest.raises(ValueError, match=r"block 0 is not held \(ref_cnt 0, cached\)"):
        alloc.publish(0, 0, [1])
    alloc.share(3, [0])
    before = snapshot(alloc)
    with pytest.raises(
        ValueError,
        match=r"^\[kvpool::publish\] block 0 already has content \(4 tokens under parent_key 3\)",
    ):
        alloc.publish(0, 0, [1])
    assert snapshot(alloc) == before
    alloc.check_invariants()


class _Model:
    """Plain-Python reference of the allocator's prefix bookkeeping (for the random test)."""

    def __init__(self, num_blocks: int, block_tokens: int) -> None:
        self.block_tokens = block_tokens
        self.queue: list[int] = list(range(num_blocks))
        self.ref_cnt = [0] * num_blocks
        self.tables: dict[int, list[int]] = {}
        self.content: list[Content | None] = [None] * num_blocks
        self.key_to_block: dict[int, int] = {}
        self.num_evictions = 0

    def drop_content(self, b: int) -> None:
        entry = self.content[b]
        assert entry is not None
        if entry[2] is not None and self.key_to_block.get(entry[2]) == b:
            del self.key_to_block[entry[2]]
        self.content[b] = None

    def allocate(self, owner: int, n: int) -> list[int]:
        taken, self.queue = self.queue[:n], self.queue[n:]
        for b in taken:
            if self.content[b] is not None:
                self.drop_content(b)
                self.num_evictions += 1
            self.ref_cnt[b] = 1
        self.tables.setdefault(owner, []).extend(taken)
        return taken

    def share(self, owner: int, ids: list[int]) -> None:
        for b in ids:
            if self.ref_cnt[b] == 0:
                self.queue.remove(b)
            self.ref_cnt[b] += 1
        self.tables.setdefault(owner, []).extend(ids)

    def release(self, owner: int) -> int:
        num_freed = 0
        for b in self.tables.pop(owner, []):
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] == 0:
                num_freed += 1
                if self.content[b] is None:
                    self.queue.insert(0, b)
                else:
                    self.queue.append(b)
        return num_freed

    def publish(self, b: int, parent: int, tokens: list[int], key: int | None) -> int:
        self.content[b] = (parent, tuple(tokens), key)
        return b if key is None else self.key_to_block.setdefault(key, b)

    def lookup(self, key: int, tokens: list[int]) -> int:
        b = self.key_to_block.get(key, -1)
        entry = self.content[b] if b >= 0 else None
        return b if entry is not None and entry[1] == tuple(tokens) else -1

    def best_child(self, parent: int, tokens: list[int]) -> tuple[int, int]:
        best = (-1, 0)
        for b, entry in enumerate(self.content):
            if entry is None or entry[0] != parent:
                continue
            common = 0
            for x, y in zip(entry[1], tokens, strict=False):
                if x != y:
                    break
                common += 1
            if common > best[1]:
                best = (b, common)
        return best

    def invalidate(self, b: int) -> None:
        if self.content[b] is not None:
            self.drop_content(b)
            if self.ref_cnt[b] == 0:
                self.queue.remove(b)
                self.queue.insert(0, b)


@pytest.mark.parametrize("seed", [1, 2])
def test_random_ops_match_a_model(seed: int) -> None:
    """Valid random ops through the binding, keys spread over the whole uint64 range."""
    rng = random.Random(seed)
    num_blocks, block_tokens = 12, 2
    alloc = _blocks.BlockAllocator(num_blocks, block_tokens)
    model = _Model(num_blocks, block_tokens)
    keys = [rng.randrange(2**64) for _ in range(5)] + [0, 2**64 - 1]
    num_hits = num_touches = 0
    for _ in range(2000):
        op = rng.randrange(6)
        owner = rng.randrange(4)
        if op == 0:
            n = rng.randrange(min(4, len(model.queue)) + 1)
            assert alloc.allocate(owner, n) == model.allocate(owner, n)
        elif op == 1:
            held = set(model.tables.get(owner, []))
            pool = [
                b
                for b in range(num_blocks)
                if b not in held and (model.ref_cnt[b] > 0 or model.content[b] is not None)
            ]
            ids = rng.sample(pool, min(len(pool), rng.randrange(3)))
            num_touches += sum(model.ref_cnt[b] == 0 for b in ids)
            alloc.share(owner, ids)
            model.share(owner, ids)
        elif op == 2:
            assert alloc.release(owner) == model.release(owner)
        elif op == 3:
            pool = [b for b in range(num_blocks) if model.ref_cnt[b] and not model.content[b]]
            if pool:
                b = rng.choice(pool)
                tokens = [rng.randrange(3) for _ in range(rng.randrange(1, block_tokens + 1))]
                key = rng.choice(keys) if len(tokens) == block_tokens else None
                parent = rng.choice(keys)
                assert alloc.publish(b, parent, tokens, key) == model.publish(
                    b, parent, tokens, key
                )
        elif op == 4:
            key = rng.choice(keys)
            tokens = [rng.randrange(3) for _ in range(block_tokens)]
            got = alloc.lookup(key, tokens)
            assert got == model.lookup(key, tokens)
            num_hits += got >= 0
            parent = rng.choice(keys)
            assert alloc.best_child(parent, tokens[:1]) == model.best_child(parent, tokens[:1])
        else:
            b = rng.randrange(num_blocks)
            alloc.invalidate(b)
            model.invalidate(b)
        assert alloc.free_queue() == model.queue
        assert ref_cnts(alloc) == model.ref_cnt
        assert [content(alloc, b) for b in range(num_blocks)] == model.content
        assert alloc.num_evictions == model.num_evictions
        for key, b in model.key_to_block.items():
            entry = model.content[b]
            assert entry is not None
            assert alloc.lookup(key, list(entry[1])) == b
        alloc.check_invariants()
    assert num_hits > 0
    assert num_touches > 0
    assert model.num_evictions > 0
    for owner in range(4):
        alloc.release(owner)
    assert (alloc.num_used, alloc.num_free, alloc.num_owners) == (0, num_blocks, 0)
