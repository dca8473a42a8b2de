"""Block-table bookkeeping: allocator, reference counts, tables."""

from collections.abc import Sequence

class PoolExhausted(RuntimeError):
    pass

class BlockAllocator:
    """
    Fixed-capacity block allocator with reference counts and per-owner block tables.
    """

    def __init__(self, num_blocks: int) -> None: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def num_free(self) -> int: ...
    @property
    def num_used(self) -> int: ...
    @property
    def num_owners(self) -> int: ...
    def ref_cnt(self, block_id: int) -> int:
        """Reference count of one block (0 = free)."""

    def allocate(self, owner: int, n: int) -> list[int]:
        """Take n free blocks for owner, all or nothing (PoolExhausted)."""

    def share(self, owner: int, block_ids: Sequence[int]) -> None:
        """Add owner's reference to blocks already in use."""

    def free(self, owner: int, block_ids: Sequence[int]) -> None:
        """Drop owner's reference on these blocks."""

    def release(self, owner: int) -> int:
        """Drop all of owner's blocks; returns how many became free."""

    def table(self, owner: int) -> list[int]:
        """Owner's block table in allocation order."""

    def has_owner(self, owner: int) -> bool: ...
    def check_invariants(self) -> None:
        """Raise if an internal invariant fails (a bug)."""
