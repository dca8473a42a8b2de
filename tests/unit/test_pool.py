from __future__ import annotations

import pytest
from fakes import SPEC

from kvpool import (
    AttentionKind,
    BlockPool,
    InvalidRequestError,
    LayerSpec,
    ModelCacheSpec,
    PoolExhaustedError,
)
from kvpool.cache.storage import LayerKV
from kvpool.pool import split_budget
from kvpool.testing import FakeStorage

# gemma3-style: 5 of 6 layers slide over a 1K window, blocks of 256.
GEMMA = ModelCacheSpec(
    tuple(
        LayerSpec(AttentionKind.GLOBAL, 4, 128, 128)
        if i % 6 == 5
        else LayerSpec(AttentionKind.SLIDING, 4, 128, 128, window=1024)
        for i in range(12)
    ),
    "bfloat16",
)


def make_pool(num_blocks: int = 8) -> BlockPool:
    return BlockPool(SPEC, num_blocks=num_blocks, storage=FakeStorage)


def test_sizing_by_blocks_or_bytes() -> None:
    assert make_pool(8).num_blocks == 8
    pool = BlockPool(SPEC, max_bytes=SPEC.bytes_per_block * 5 + 7, storage=FakeStorage)
    assert pool.num_blocks == 5
    assert pool.bytes_total == 5 * SPEC.bytes_per_block
    with pytest.raises(InvalidRequestError, match="exactly one"):
        BlockPool(SPEC, storage=FakeStorage)
    with pytest.raises(InvalidRequestError, match="exactly one"):
        BlockPool(SPEC, num_blocks=2, max_bytes=10**9, storage=FakeStorage)
    with pytest.raises(InvalidRequestError, match="holds no block"):
        BlockPool(SPEC, max_bytes=SPEC.bytes_per_block - 1, storage=FakeStorage)
    with pytest.raises(InvalidRequestError):
        BlockPool(SPEC, num_blocks=0, storage=FakeStorage)


def test_budget_split_between_layer_groups() -> None:
    # Per agent of 8K tokens: the global group needs 32 blocks, the sliding one 5.
    assert [g.window for g in GEMMA.groups] == [1024, None]
    sliding_bpb, full_bpb = (GEMMA.group_bytes_per_block(g) for g in range(2))
    assert sliding_bpb == 5 * full_bpb  # 10 sliding layers, 2 global ones
    budget = 64 * (5 * sliding_bpb + 32 * full_bpb)
    sliding_blocks, full_blocks = split_budget(GEMMA, budget)
    assert (sliding_blocks, full_blocks) == (64 * 5, 64 * 32)
    pool = BlockPool(GEMMA, max_bytes=budget, storage=FakeStorage)
    assert pool.bytes_total <= budget
    assert pool.blocks_per_group == (320, 2048)


def test_write_cache_and_release_accounting() -> None:
    pool = make_pool(4)
    storage = pool.storage
    assert isinstance(storage, FakeStorage)
    tokens = tuple(range(1, 7))  # 6 tokens: 2 blocks

    def kvs(n: int) -> list[LayerKV]:
        return [LayerKV(i, 0, *storage._encode(i, list(range(1, n + 1)))) for i in range(2)]

    a = pool.write_cache("a", tokens, kvs(6))
    assert (pool.num_used, pool.num_free, pool.usage().num_handles) == (2, 2, 1)
    # The same tokens again share the full block instead of writing it twice.
    b = pool.write_cache("b", tokens, kvs(6))
    assert b.tables[0].block_ids[0] == a.tables[0].block_ids[0]
    assert pool.num_used == 3
    assert pool.release(a) == 1  # a's partial block; the shared one is still b's
    assert pool.num_used == 2 and pool.num_cached == 1
    pool.release(b)
    assert pool.num_used == 0 and pool.num_free == 4 and pool.usage().num_handles == 0
    pool.check_invariants()
    with pytest.raises(PoolExhaustedError, match="needs 5 blocks, 4 free") as info:
        pool.write_cache("c", tuple(range(100, 120)), kvs(20))
    assert (info.value.needed, info.value.free, info.value.capacity) == (5, 4, 4)
    assert pool.num_used == 0


def test_stale_and_foreign_handles_are_refused() -> None:
    pool, other = make_pool(4), make_pool(4)
    storage = pool.storage
    assert isinstance(storage, FakeStorage)
    kvs = [LayerKV(i, 0, *storage._encode(i, [1, 2, 3])) for i in range(2)]
    mine = pool.write_cache("a", (1, 2, 3), kvs)
    theirs = other.write_cache("a", (1, 2, 3), kvs)
    assert mine.tables == theirs.tables and mine.handle_id == theirs.handle_id
    assert pool.is_live(mine) and not pool.is_live(theirs)
    with pytest.raises(InvalidRequestError, match="belongs to another pool"):
        pool.release(theirs)
    pool.release(mine)
    with pytest.raises(InvalidRequestError, match="not live"):
        pool.release(mine)
    assert other.is_live(theirs)
