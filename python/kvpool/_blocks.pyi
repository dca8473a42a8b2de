"""
Block-table bookkeeping: allocator, reference counts, tables, and the prefix cache's free queue and hash index.
"""

from collections.abc import Sequence

class PoolExhausted(RuntimeError):
    pass

class BlockAllocator:
    """
    Fixed-capacity block allocator with reference counts, per-owner block tables, cached-free blocks (LRU free queue) and a prefix-hash index.

    Each block is FREE (ref_cnt 0, no content), CACHED (ref_cnt 0, has content: evictable, still findable) or HELD (ref_cnt > 0). Keys are ints in [0, 2**64).
    """

    def __init__(self, num_blocks: int, block_tokens: int = 256) -> None: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def block_tokens(self) -> int:
        """Tokens in a full block."""

    @property
    def num_free(self) -> int:
        """Allocatable blocks: FREE + CACHED."""

    @property
    def num_used(self) -> int:
        """HELD blocks."""

    @property
    def num_cached(self) -> int:
        """CACHED blocks."""

    @property
    def num_evictions(self) -> int:
        """CACHED blocks whose content allocate() dropped, cumulative."""

    @property
    def num_owners(self) -> int: ...
    def ref_cnt(self, block_id: int) -> int:
        """Reference count of one block (0 = FREE or CACHED)."""

    def allocate(self, owner: int, n: int) -> list[int]:
        """
        Take n blocks for owner, all or nothing (PoolExhausted): FREE ones first, then CACHED ones least recently freed first (evicted).
        """

    def share(self, owner: int, block_ids: Sequence[int]) -> None:
        """
        Add owner's reference to HELD or CACHED blocks (a CACHED one leaves the free queue, content kept).
        """

    def free(self, owner: int, block_ids: Sequence[int]) -> None:
        """
        Drop owner's reference on these blocks, in order; one reaching ref_cnt 0 is queued at the tail with content, at the head without.
        """

    def release(self, owner: int) -> int:
        """
        Drop all of owner's blocks (table order, queued as by free); returns how many reached ref_cnt 0.
        """

    def table(self, owner: int) -> list[int]:
        """Owner's block table in allocation order."""

    def has_owner(self, owner: int) -> bool: ...
    def publish(
        self, block_id: int, parent_key: int, tokens: Sequence[int], key: int | None = None
    ) -> int:
        """
        Record the content of a HELD block without content; key is given exactly for a full block. Returns key's canonical block (block_id unless another block already holds key, or key is None).
        """

    def lookup(self, key: int, tokens: Sequence[int]) -> int:
        """The canonical block for key if its tokens equal tokens, else -1."""

    def best_child(self, parent_key: int, tokens: Sequence[int]) -> tuple[int, int]:
        """
        (block_id, num_common): the block with content under parent_key sharing the longest token prefix with tokens (lowest id on ties); (-1, 0) if none shares a token.
        """

    def content_tokens(self, block_id: int) -> list[int]:
        """The block's tokens; empty without content."""

    def has_content(self, block_id: int) -> bool: ...
    def key_of(self, block_id: int) -> int | None:
        """The block's key; None without content or for a partial block."""

    def parent_key_of(self, block_id: int) -> int | None:
        """The block's parent key; None without content."""

    def invalidate(self, block_id: int) -> None:
        """
        Drop the block's content; a CACHED block becomes FREE (queue head). No-op without content.
        """

    def num_free_tail(self) -> int:
        """
        How many of the highest ids no one holds (the most resize() can take away).
        """

    def resize(self, num_blocks: int) -> None:
        """
        Grow (new FREE blocks, taken next) or shrink (the ids taken away must be FREE or CACHED; their content is dropped). ValueError, nothing changed, otherwise.
        """

    def relocate(self, from_id: int, to_id: int) -> None:
        """
        Move HELD block from_id to FREE or CACHED to_id (whose content is dropped): references, owners' tables and content go with it; from_id becomes FREE. The caller moves the bytes. ValueError, nothing changed, otherwise.
        """

    def free_queue(self) -> list[int]:
        """The free queue, head (taken first) to tail."""

    def check_invariants(self) -> None:
        """Raise if an internal invariant fails (a bug)."""
