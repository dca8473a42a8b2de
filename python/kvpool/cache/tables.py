"""Block tables and cache handles: what an agent's cache is, as the manager hands it out.

A :class:`CacheHandle` names one sequence's K/V in the pool: its tokens and one
:class:`GroupTable` per layer group. Position ``p`` of group ``g`` lives in block
``tables[g].block_ids[p // B]`` at slot ``p % B``. Two agents that share a system
prompt of 8 tokens (``B = 4``) share its blocks by reference::

    agent A  tokens  s0..s7 a0 a1     full group  [ 12, 3, 40 ]
    agent B  tokens  s0..s7 b0        full group  [ 12, 3,  7 ]   blocks 12 and 3: ref_cnt 2

Handles are unforgeable: only the :class:`~kvpool.cache.manager.KVCacheManager`
that made one accepts it, and only while it is live (not released or superseded).
A handle's agent, tokens and salt never change; its block ids may: when a pool moves
budget between layer groups it can move a block only live handles hold to another id
(:meth:`~kvpool.cache.manager.KVCacheManager.shrink_group`), and re-points their
tables. So read ``tables`` when you use them, never keep block ids across pool calls.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvpool.errors import InvalidRequestError

__all__ = ["NULL_BLOCK", "CacheHandle", "GroupTable", "repoint_blocks"]

NULL_BLOCK = -1
"""A table entry whose block the group no longer holds (fell out of its window)."""


@dataclass(frozen=True, slots=True)
class GroupTable:
    """One layer group's block table for a sequence.

    ``block_ids[j]`` holds positions ``[j * B, (j + 1) * B)``, or is
    :data:`NULL_BLOCK`. Every layer of the group holds positions
    ``[valid_from, num_tokens)``; entries below ``valid_from // B`` are NULL.
    """

    block_ids: tuple[int, ...]
    valid_from: int = 0

    @property
    def held(self) -> tuple[int, ...]:
        """The block ids actually held (NULL entries left out)."""
        return tuple(b for b in self.block_ids if b != NULL_BLOCK)

    def moved(self, moves: dict[int, int]) -> GroupTable:
        """This table with every block id ``b`` in ``moves`` replaced by ``moves[b]``."""
        return GroupTable(tuple(moves.get(b, b) for b in self.block_ids), self.valid_from)


@dataclass(frozen=True, slots=True, eq=False)
class CacheHandle:
    """One agent's cache in a pool: tokens plus one table per layer group.

    Invariants: every table has ``ceil(len(token_ids) / block_tokens)`` entries;
    ``salt`` is the tenant salt the blocks were computed under. Compared by
    identity: a handle equals only itself (the manager keeps the live ones).
    """

    agent_id: str
    token_ids: tuple[int, ...]
    tables: tuple[GroupTable, ...]
    block_tokens: int
    salt: str
    handle_id: int

    def __post_init__(self) -> None:
        needed = -(-len(self.token_ids) // self.block_tokens)
        for g, table in enumerate(self.tables):
            if len(table.block_ids) != needed:
                raise InvalidRequestError(
                    f"{len(self.token_ids)} tokens need {needed} blocks of "
                    f"{self.block_tokens} in group {g}, got {len(table.block_ids)}"
                )

    @property
    def total_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def block_ids(self) -> tuple[int, ...]:
        """The first group's table (the only one for models without sliding layers)."""
        return self.tables[0].block_ids

    @property
    def num_blocks(self) -> int:
        """Blocks held over all groups."""
        return sum(len(t.held) for t in self.tables)


def repoint_blocks(handle: CacheHandle, group: int, moves: dict[int, int]) -> None:
    """Re-point ``handle``'s table of ``group`` after the manager moved its blocks
    (``moves``: old id -> new id). Only the manager calls this, after the allocator
    moved them: the handle stays the same object, so every holder sees the new ids."""
    tables = list(handle.tables)
    tables[group] = tables[group].moved(moves)
    object.__setattr__(handle, "tables", tuple(tables))  # frozen for everyone else
