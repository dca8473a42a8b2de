"""Prompt-prefix pins: Anthropic ``cache_control`` breakpoints held in the pool for their TTL.

A request whose prompt marks a breakpoint at token ``L`` (``{"type": "ephemeral", "ttl":
"5m" | "1h"}``) pins ``prompt[:L]`` when it finishes: a handle holding the blocks of those
tokens by reference (:meth:`~kvpool.pool.BlockPool.fork` with a length: no K/V copied), so
LRU eviction of cached blocks cannot take them, and any later request of the same tenant
(cache salt) whose prompt starts with them reuses them. The same prefix pinned again is
refreshed (its expiry becomes the later of the two), as Anthropic refreshes a cache entry
on every hit. Pins end at their expiry (:meth:`PrefixPins.expire`, called by the engine
loop), or earlier, oldest expiry first, when a request needs their blocks
(:meth:`PrefixPins.drop_soonest`): a pin never makes a request wait.

Touched only by the engine-loop thread.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from kvpool.cache.tables import CacheHandle
from kvpool.pool import BlockPool

__all__ = ["PrefixPins"]


@dataclass(slots=True)
class _Pin:
    handle: CacheHandle
    expires: float  # monotonic seconds


class PrefixPins:
    """Live pins over ``pool``, by (cache salt, pinned tokens)."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self._pins: dict[tuple[str, tuple[int, ...]], _Pin] = {}
        self._ids = itertools.count()
        self.num_pinned = 0  # pins made (refreshes not counted)
        self.num_dropped = 0  # pins ended early for room

    def __len__(self) -> int:
        return len(self._pins)

    def pin(self, cache: CacheHandle, length: int, ttl_s: float, now: float) -> None:
        """Pin the first ``length`` tokens of the live handle ``cache`` until ``now + ttl_s``
        (or refresh the pin of that prefix). A handle no longer live (the store wrote it to
        disk for its byte budget) pins nothing."""
        length = min(length, cache.total_tokens)
        if length < 1 or not self.pool.is_live(cache):
            return
        key = (cache.salt, cache.token_ids[:length])
        found = self._pins.get(key)
        if found is not None and self.pool.is_live(found.handle):
            found.expires = max(found.expires, now + ttl_s)
            return
        handle = self.pool.fork(cache, f"_pin-{next(self._ids)}", length)
        self._pins[key] = _Pin(handle, now + ttl_s)
        self.num_pinned += 1

    def expire(self, now: float) -> int:
        """Release the pins whose TTL has passed; returns how many."""
        gone = [key for key, pin in self._pins.items() if pin.expires <= now]
        for key in gone:
            self.pool.release(self._pins.pop(key).handle)
        return len(gone)

    def drop_soonest(self) -> bool:
        """Release the pin that would expire first (a request needs room); False if none."""
        if not self._pins:
            return False
        key = min(self._pins, key=lambda k: self._pins[k].expires)
        self.pool.release(self._pins.pop(key).handle)
        self.num_dropped += 1
        return True

    def clear(self) -> None:
        for pin in self._pins.values():
            self.pool.release(pin.handle)
        self._pins.clear()
