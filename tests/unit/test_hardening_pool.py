"""Hardening (issue 11) of the pool's size: checked against the machine before anything is
allocated; a failed allocation is a kvpool error."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes import SPEC

from kvpool import (
    BlockPool,
    InvalidRequestError,
    KvpoolError,
    ModelCacheSpec,
    PoolAllocationError,
)
from kvpool.cache.storage import KVStorage
from kvpool.pool import MAX_NUM_BLOCKS, check_pool_fits, physical_memory_bytes
from kvpool.testing import FakeStorage

HUGE = ModelCacheSpec.uniform(64, 64, 256, dtype="float32", block_tokens=256)  # 2 GiB per block


def test_physical_memory_is_read_from_the_machine() -> None:
    memory = physical_memory_bytes()
    assert memory is not None and memory > 2**27
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        total = next(ln for ln in meminfo.read_text().splitlines() if ln.startswith("MemTotal:"))
        assert memory <= int(total.split()[1]) * 1024


def test_a_pool_larger_than_the_machine_is_refused_before_allocating() -> None:
    memory = physical_memory_bytes()
    assert memory is not None
    made: list[tuple[int, ...]] = []

    def storage(spec: ModelCacheSpec, blocks_per_group: tuple[int, ...]) -> KVStorage:
        made.append(blocks_per_group)
        return FakeStorage(spec, blocks_per_group)

    too_many = memory // HUGE.bytes_per_block + 1
    with pytest.raises(InvalidRequestError, match="more than this machine's memory"):
        BlockPool(HUGE, num_blocks=too_many, storage=storage)
    with pytest.raises(InvalidRequestError, match="more than this machine's memory"):
        BlockPool(HUGE, max_bytes=too_many * HUGE.bytes_per_block, storage=storage)
    assert made == []  # refused before the storage was asked for anything
    pool = BlockPool(HUGE, num_blocks=1, storage=storage)  # 2 GiB fits (never allocated here)
    assert pool.num_blocks == 1 and made == [(1,)]


def test_the_block_id_range_bounds_the_pool() -> None:
    with pytest.raises(InvalidRequestError, match=f"the {MAX_NUM_BLOCKS} a pool can hold"):
        check_pool_fits(SPEC, [MAX_NUM_BLOCKS + 1])
    with pytest.raises(InvalidRequestError):  # was a TypeError from the C++ binding
        BlockPool(SPEC, num_blocks=3 * 10**9, storage=FakeStorage)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_blocks": "10"}, "num_blocks must be an int"),
        ({"num_blocks": 2.5}, "num_blocks must be an int"),
        ({"num_blocks": True}, "num_blocks must be an int"),
        ({"max_bytes": 1.5e6}, "max_bytes must be an int"),
        ({"max_bytes": "1MB"}, "max_bytes must be an int"),
    ],
)
def test_pool_sizes_must_be_ints(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidRequestError, match=match):
        BlockPool(SPEC, storage=FakeStorage, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("failure", [MemoryError(), RuntimeError("[malloc] Unable to allocate")])
def test_a_failed_allocation_is_a_kvpool_error(failure: Exception) -> None:
    def storage(spec: ModelCacheSpec, blocks_per_group: tuple[int, ...]) -> KVStorage:
        raise failure

    with pytest.raises(
        PoolAllocationError, match=r"could not allocate a pool of \(8,\) blocks"
    ) as info:
        BlockPool(SPEC, num_blocks=8, storage=storage)
    assert isinstance(info.value, KvpoolError) and isinstance(info.value, MemoryError)
    assert info.value.__cause__ is failure
