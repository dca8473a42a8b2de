"""Per-group policies: which positions a layer group must hold, and for how long.

A full-attention group attends to every earlier position, so it keeps every
block. A sliding-window group with window ``W`` computes position ``p`` from
positions ``[p - W + 1, p)`` only, so once a sequence of length ``L`` ends it
keeps the blocks holding positions ``>= L - W`` (what resuming at ``L - 1``, a
full hit that re-feeds the last token, or later needs: at most
``ceil(W / B) + 1`` blocks) and the rest go back to the pool.

With ``B = 4`` and ``W = 6``, a sequence of 14 tokens::

    positions   0..3   4..7   8..11  12..13
    full        [ 7 ]  [ 2 ]  [ 9 ]  [ 4 ]
    sliding     [ - ]  [ - ]  [ 1 ]  [ 8 ]     keeps the blocks of positions >= 14 - 6 = 8

(``-`` is :data:`~kvpool.cache.tables.NULL_BLOCK`: the table keeps its positions.)
"""

from __future__ import annotations

from dataclasses import dataclass

from kvpool.cache.spec import AttentionKind

__all__ = ["GroupPolicy"]


@dataclass(frozen=True, slots=True)
class GroupPolicy:
    """What one layer group needs, by attention kind (``window`` None = full)."""

    kind: AttentionKind
    window: int | None
    block_tokens: int

    def needed_from(self, p: int) -> int:
        """First position the group needs to compute position ``p``."""
        if self.window is None:
            return 0
        return max(0, p - self.window + 1)

    def keep_from(self, length: int) -> int:
        """First position a finished sequence of ``length`` tokens keeps."""
        if self.window is None:
            return 0
        return max(0, length - self.window)

    def max_fresh_blocks(self, num_positions: int) -> int:
        """Most blocks one request's final write can need for ``num_positions`` positions."""
        size = self.block_tokens
        blocks = -(-num_positions // size)
        if self.window is None:
            return blocks
        return min(blocks, -(-self.window // size) + 1)
