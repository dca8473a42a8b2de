"""Tests of the compiled block-table core, ``kvpool._blocks`` (no MLX).

Expected states are drawn in comments as
    free: <free list, head first>   ref: <ref_cnt of block 0, 1, ...>
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from kvpool import _blocks

PROBE = -(2**63)  # owner id reserved for free_list() below


def free_list(alloc: _blocks.BlockAllocator) -> list[int]:
    """The free list, head first, read through the public API.

    Takes every free block for a probe owner (allocation pops from the head)
    and releases them again (release pushes at the tail, in table order), which
    restores the list exactly.
    """
    assert not alloc.has_owner(PROBE)
    ids = alloc.allocate(PROBE, alloc.num_free)
    alloc.release(PROBE)
    return ids


def ref_cnts(alloc: _blocks.BlockAllocator) -> list[int]:
    return [alloc.ref_cnt(b) for b in range(alloc.num_blocks)]


@dataclass(frozen=True, slots=True)
class Snapshot:
    free_list: tuple[int, ...]
    ref_cnt: tuple[int, ...]
    tables: tuple[tuple[int, tuple[int, ...]], ...]
    num_owners: int


def snapshot(alloc: _blocks.BlockAllocator, owners: range = range(16)) -> Snapshot:
    return Snapshot(
        free_list=tuple(free_list(alloc)),
        ref_cnt=tuple(ref_cnts(alloc)),
        tables=tuple((o, tuple(alloc.table(o))) for o in owners if alloc.has_owner(o)),
        num_owners=alloc.num_owners,
    )


def test_fresh_pool() -> None:
    alloc = _blocks.BlockAllocator(5)
    # free: 0 1 2 3 4   ref: 0 0 0 0 0
    assert (alloc.num_blocks, alloc.num_free, alloc.num_used, alloc.num_owners) == (5, 5, 0, 0)
    assert free_list(alloc) == [0, 1, 2, 3, 4]
    assert ref_cnts(alloc) == [0, 0, 0, 0, 0]
    alloc.check_invariants()


@pytest.mark.parametrize("num_blocks", [0, -1])
def test_constructor_rejects_empty_pool(num_blocks: int) -> None:
    with pytest.raises(ValueError, match=rf"num_blocks must be > 0, got {num_blocks}"):
        _blocks.BlockAllocator(num_blocks)


def test_allocate_exact_ids_and_append() -> None:
    alloc = _blocks.BlockAllocator(8)
    assert alloc.allocate(1, 3) == [0, 1, 2]
    assert alloc.allocate(owner=2, n=2) == [3, 4]
    assert alloc.allocate(1, 1) == [5]
    # free: 6 7   tables: 1 -> [0 1 2 5], 2 -> [3 4]
    assert free_list(alloc) == [6, 7]
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


def test_freed_blocks_go_to_the_tail() -> None:
    alloc = _blocks.BlockAllocator(6)
    assert alloc.allocate(1, 4) == [0, 1, 2, 3]
    alloc.free(1, [2, 0])
    # free: 4 5 2 0   ref: 0 1 0 1 0 0   table 1: [1 3]
    assert free_list(alloc) == [4, 5, 2, 0]
    assert ref_cnts(alloc) == [0, 1, 0, 1, 0, 0]
    assert alloc.table(1) == [1, 3]
    assert alloc.allocate(2, 3) == [4, 5, 2]
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
    # ref: 0 1 0 0   free: 2 3 0
    assert ref_cnts(alloc) == [0, 1, 0, 0]
    assert free_list(alloc) == [2, 3, 0]
    assert alloc.release(9) == 1
    # free: 2 3 0 1
    assert free_list(alloc) == [2, 3, 0, 1]
    assert alloc.release(9) == 0  # unknown owner
    assert alloc.num_owners == 0
    alloc.check_invariants()


def test_free_of_shared_block_keeps_it_in_use() -> None:
    alloc = _blocks.BlockAllocator(3)
    alloc.allocate(1, 2)  # [0 1]
    alloc.share(2, [0])
    alloc.free(1, [0])
    # ref: 1 1 0   free: 2
    assert ref_cnts(alloc) == [1, 1, 0]
    assert free_list(alloc) == [2]
    alloc.free(2, [0])
    # free: 2 0
    assert free_list(alloc) == [2, 0]
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
    (lambda a: a.share(9, [5]), ValueError, "[kvpool::share] block 5 is free"),
    (lambda a: a.share(9, [3, 3]), ValueError, "block 3 appears more than once"),
    (lambda a: a.share(7, [3, 1]), ValueError, "[kvpool::share] owner 7 already holds block 1"),
    (lambda a: a.allocate(7, -1), ValueError, "[kvpool::allocate] n must be >= 0, got -1"),
    (lambda a: a.ref_cnt(-1), IndexError, "[kvpool::ref_cnt] block id -1 out of range"),
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
    ],
)
def test_out_of_type_range_arguments_are_type_errors(call: Call) -> None:
    alloc = _blocks.BlockAllocator(4)
    with pytest.raises(TypeError):
        call(alloc)
    assert alloc.num_free == 4
    assert alloc.num_owners == 0
