"""The KVStorage protocol: where a pool's K/V bytes live.

The pool does the bookkeeping (which block belongs to whom); a storage holds
the bytes of every block for every layer and converts between blocks and the
per-layer caches a batch generator consumes. :class:`kvpool.slabs.SlabStorage`
is the real one (MLX slabs); :class:`kvpool.testing.FakeStorage` records token
ids instead of K/V so unit tests run without MLX.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from kvpool.spec import ModelCacheSpec


class KVStorage(Protocol):
    """K/V bytes for ``num_blocks`` blocks of every layer of ``spec``."""

    spec: ModelCacheSpec
    num_blocks: int

    @property
    def nbytes(self) -> int:
        """Bytes this storage holds (all blocks, all layers, K and V)."""
        ...

    def load(self, block_table: Sequence[int], num_tokens: int) -> list[Any]:
        """Per-layer caches holding positions ``[0, num_tokens)`` of the table.

        Global layers get every position; a sliding layer with window ``W``
        gets the last ``min(num_tokens, W)`` positions (the caller checked the
        blocks hold them). Returned caches are evaluated: the blocks may be
        rewritten as soon as this returns.
        """
        ...

    def store(self, caches: Sequence[Any], block_table: Sequence[int], start: int) -> int:
        """Write positions ``[start, offset)`` of each layer's cache into the table.

        ``caches`` are a finished sequence's per-layer caches (all at the same
        offset). Sliding layers write only the positions they still hold.
        Returns the first position every sliding layer holds (0 without
        sliding layers) so the caller can record what the blocks now hold.
        """
        ...
