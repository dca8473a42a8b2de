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

A recurrent group (mlx-lm's ``ArraysCache``: conv and SSM states) holds no positions: its
"block" is one state of every layer of the group, and table entry ``j`` holds the state
after ``min((j + 1) * B, L)`` tokens. A finished sequence keeps only its last entry, the
state at its end (what the same agent's next turn resumes from); entry ``j < last`` may
hold a snapshot taken at the block boundary ``(j + 1) * B`` (a shared prefix)::

    positions   0..3   4..7   8..11  12..13
    recurrent   [ - ]  [ 5 ]  [ - ]  [ 3 ]     3: state after 14 tokens; 5: after 8 (snapshot)

A state cannot be trimmed: a recurrent group supplies a prefix of exactly ``(j + 1) * B``
tokens from a snapshot, or exactly ``L`` from a sequence's end state, nothing in between.
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

    @property
    def is_recurrent(self) -> bool:
        return self.kind is AttentionKind.RECURRENT

    @property
    def is_full(self) -> bool:
        """Full attention: every earlier position, token-granular reuse."""
        return self.kind is AttentionKind.GLOBAL

    def needed_from(self, p: int) -> int:
        """First position the group needs to compute position ``p`` (a recurrent group:
        the start of the block whose table entry holds the state at ``p``)."""
        if self.is_recurrent:
            return max(0, p - 1) // self.block_tokens * self.block_tokens
        if self.window is None:
            return 0
        return max(0, p - self.window + 1)

    def keep_from(self, length: int) -> int:
        """First position a finished sequence of ``length`` tokens keeps (a recurrent
        group: the start of its last block, whose entry holds the end state)."""
        if self.is_recurrent:
            return self.needed_from(length)
        if self.window is None:
            return 0
        return max(0, length - self.window)

    def max_fresh_blocks(self, num_positions: int) -> int:
        """Most blocks one request's final write can need for ``num_positions`` positions."""
        size = self.block_tokens
        blocks = -(-num_positions // size)
        if self.is_recurrent:
            return min(blocks, 1)
        if self.window is None:
            return blocks
        return min(blocks, -(-self.window // size) + 1)
