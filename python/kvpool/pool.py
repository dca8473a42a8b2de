"""BlockPool: a fixed number of KV blocks, their owners and their bytes.

Bookkeeping (free list, reference counts, block tables) is the C++ core
``kvpool._blocks.BlockAllocator``; the bytes live in a :class:`KVStorage`
(MLX slabs by default). No MLX import at module level.

Owners: every holder of blocks is an integer *lease* (an agent's cache, a
request's reservation, a pin held while a gather reads blocks). A block is
free exactly when no lease holds it.

Not thread-safe by itself: the engine serialises access under its lock.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from kvpool import _blocks
from kvpool.blocks import AgentBlocks
from kvpool.errors import InvalidRequestError, PoolAllocationError, PoolExhaustedError
from kvpool.spec import ModelCacheSpec
from kvpool.storage import KVStorage

StorageFactory = Callable[[ModelCacheSpec, int], KVStorage]


MAX_NUM_BLOCKS = 2**31 - 1  # block ids are int32 in the C++ core
BOOKKEEPING_BYTES_PER_BLOCK = 12  # the C++ core's ref count and two links, int32 each


def physical_memory_bytes() -> int | None:
    """The memory this machine gives the process, or None if it cannot tell.

    Linux: ``MemTotal`` of ``/proc/meminfo``, bounded by the cgroup (v2) limit
    ``/sys/fs/cgroup/memory.max`` when one is set; elsewhere the physical pages
    (``os.sysconf``).
    """
    total: int | None = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        total = None
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        limit = "max"
    if limit.isdigit():
        total = min(total, int(limit))
    return total if total > 0 else None


def check_pool_fits(spec: ModelCacheSpec, num_blocks: int) -> None:
    """Raise InvalidRequestError unless ``num_blocks`` blocks of ``spec`` fit this machine.

    The bound is the machine's memory (:func:`physical_memory_bytes`), checked
    before anything is allocated: a pool past it could only swap, be killed
    by the OOM killer or crash inside MLX.
    """
    if num_blocks > MAX_NUM_BLOCKS:
        raise InvalidRequestError(
            f"num_blocks {num_blocks} is more than the {MAX_NUM_BLOCKS} a pool can hold"
        )
    memory = physical_memory_bytes()
    needed = num_blocks * (spec.bytes_per_block + BOOKKEEPING_BYTES_PER_BLOCK)
    if memory is not None and needed > memory:
        raise InvalidRequestError(
            f"a pool of {num_blocks} blocks x {spec.bytes_per_block / 2**20:.2f} MiB needs "
            f"{needed / 2**20:,.0f} MiB, more than this machine's memory "
            f"({memory / 2**20:,.0f} MiB)"
        )


def _default_storage(spec: ModelCacheSpec, num_blocks: int) -> KVStorage:
    from kvpool.slabs import SlabStorage

    return SlabStorage(spec, num_blocks)


class BlockPool:
    """``num_blocks`` blocks of ``spec.block_tokens`` positions for every layer.

    Size it with exactly one of ``num_blocks`` or ``max_bytes`` (the byte
    budget of K and V over all layers; it holds ``max_bytes //
    spec.bytes_per_block`` blocks). The storage is allocated up front, after
    :func:`check_pool_fits` (InvalidRequestError for a pool larger than the
    machine's memory); an allocation that fails anyway raises
    PoolAllocationError.
    """

    def __init__(
        self,
        spec: ModelCacheSpec,
        *,
        num_blocks: int | None = None,
        max_bytes: int | None = None,
        storage: StorageFactory = _default_storage,
    ) -> None:
        if (num_blocks is None) == (max_bytes is None):
            raise InvalidRequestError("give exactly one of num_blocks or max_bytes")
        for name, value in (("num_blocks", num_blocks), ("max_bytes", max_bytes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise InvalidRequestError(f"{name} must be an int, got {value!r}")
        if max_bytes is not None:
            if max_bytes < spec.bytes_per_block:
                raise InvalidRequestError(
                    f"a budget of {max_bytes} bytes holds no block "
                    f"({spec.bytes_per_block} bytes per block: {spec.describe()})"
                )
            num_blocks = max_bytes // spec.bytes_per_block
        assert num_blocks is not None
        if num_blocks < 1:
            raise InvalidRequestError(f"num_blocks must be >= 1, got {num_blocks}")
        check_pool_fits(spec, num_blocks)
        self.spec = spec
        try:
            self._allocator = _blocks.BlockAllocator(num_blocks)
            self._lease_ids = itertools.count(1)
            self.storage = storage(spec, num_blocks)
        except (MemoryError, RuntimeError) as exc:  # MLX reports a failed malloc as RuntimeError
            raise PoolAllocationError(
                f"could not allocate a pool of {num_blocks} blocks x {spec.bytes_per_block} "
                f"bytes: {exc}"
            ) from exc

    # -- capacity -------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return int(self._allocator.num_blocks)

    @property
    def num_free(self) -> int:
        return int(self._allocator.num_free)

    @property
    def num_used(self) -> int:
        return int(self._allocator.num_used)

    @property
    def num_leases(self) -> int:
        return int(self._allocator.num_owners)

    @property
    def bytes_total(self) -> int:
        return self.num_blocks * self.spec.bytes_per_block

    @property
    def bytes_used(self) -> int:
        return self.num_used * self.spec.bytes_per_block

    def usage(self) -> dict[str, int]:
        """Blocks and bytes, total/used/free, as plain numbers."""
        return {
            "num_blocks": self.num_blocks,
            "num_used": self.num_used,
            "num_free": self.num_free,
            "bytes_total": self.bytes_total,
            "bytes_used": self.bytes_used,
            "bytes_per_block": self.spec.bytes_per_block,
        }

    # -- leases ---------------------------------------------------------------

    def new_lease(self) -> int:
        """A fresh owner id holding nothing."""
        return next(self._lease_ids)

    def allocate(self, lease: int, n: int) -> list[int]:
        """Give ``lease`` ``n`` free blocks, all or nothing."""
        if n > self.num_free:
            raise PoolExhaustedError(
                f"need {n} blocks, {self.num_free} free (pool of {self.num_blocks})",
                needed=n,
                free=self.num_free,
                capacity=self.num_blocks,
            )
        return [int(b) for b in self._allocator.allocate(lease, n)]

    def share(self, lease: int, block_ids: Sequence[int]) -> None:
        """Add ``lease``'s reference to blocks another lease holds."""
        if block_ids:
            self._allocator.share(lease, list(block_ids))

    def free(self, lease: int, block_ids: Sequence[int]) -> None:
        """Drop ``lease``'s reference on these blocks."""
        if block_ids:
            self._allocator.free(lease, list(block_ids))

    def release_lease(self, lease: int) -> int:
        """Drop every block ``lease`` holds; returns how many became free."""
        return int(self._allocator.release(lease))

    def holds(self, lease: int) -> bool:
        return bool(self._allocator.has_owner(lease))

    def table(self, lease: int) -> list[int]:
        return [int(b) for b in self._allocator.table(lease)]

    def ref_cnt(self, block_id: int) -> int:
        return int(self._allocator.ref_cnt(block_id))

    def check_invariants(self) -> None:
        self._allocator.check_invariants()

    # -- agent caches ---------------------------------------------------------

    def is_live(self, blocks: AgentBlocks) -> bool:
        """True while ``blocks`` still names blocks this pool holds for it."""
        if blocks.block_tokens != self.spec.block_tokens:
            return False
        if not blocks.block_ids:
            return True
        return self.holds(blocks.lease) and self.table(blocks.lease) == list(blocks.block_ids)

    def check_live(self, blocks: AgentBlocks) -> None:
        """Raise InvalidRequestError unless ``blocks`` is live in this pool."""
        if not self.is_live(blocks):
            raise InvalidRequestError(
                f"the cache of agent {blocks.agent_id!r} ({blocks.total_tokens} tokens) is no "
                "longer in this pool: it was released, superseded by a later generation, or "
                "belongs to another pool"
            )

    def release(self, blocks: AgentBlocks) -> int:
        """Return an agent's cache to the pool; the record becomes stale."""
        self.check_live(blocks)
        return self.release_lease(blocks.lease)
