from __future__ import annotations

import pytest

from kvpool import AgentBlocks, BlockPool, InvalidRequestError, ModelCacheSpec, PoolExhaustedError
from kvpool.testing import FakeStorage

SPEC = ModelCacheSpec.uniform(2, 2, 8, dtype="float32", block_tokens=4)


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


def test_allocate_share_release_accounting() -> None:
    pool = make_pool(4)
    a = pool.new_lease()
    assert pool.allocate(a, 2) == [0, 1]
    b = pool.new_lease()
    pool.share(b, [1])
    assert (pool.num_used, pool.num_free) == (2, 2)
    assert [pool.ref_cnt(i) for i in range(4)] == [1, 2, 0, 0]
    assert pool.release_lease(a) == 1  # block 0 freed, block 1 still held by b
    assert pool.table(b) == [1]
    assert pool.usage()["num_used"] == 1
    pool.check_invariants()


def test_exhaustion_takes_nothing() -> None:
    pool = make_pool(4)
    a = pool.new_lease()
    pool.allocate(a, 3)
    with pytest.raises(PoolExhaustedError, match="need 2 blocks, 1 free") as info:
        pool.allocate(pool.new_lease(), 2)
    assert (info.value.needed, info.value.free, info.value.capacity) == (2, 1, 4)
    assert pool.num_free == 1
    pool.check_invariants()


def test_stale_agent_blocks_are_refused() -> None:
    pool = make_pool(4)
    lease = pool.new_lease()
    ids = pool.allocate(lease, 2)
    blocks = AgentBlocks("a", tuple(ids), tuple(range(6)), 4, lease)
    assert pool.is_live(blocks)
    pool.release(blocks)
    assert not pool.is_live(blocks)
    with pytest.raises(InvalidRequestError, match="no longer in this pool"):
        pool.release(blocks)
    other = AgentBlocks("a", (0, 1), tuple(range(12)), 8, lease)
    assert not pool.is_live(other)
