"""The cold-tier interface of :class:`~kvpool.store.AgentCacheStore`.

The store owns agents' handles (hot: blocks in the pool); a *cold tier* keeps their caches
outside the pool, keyed by agent id. Two implementations:

* :class:`~kvpool.tier.local.LocalTier`: one safetensors file per agent in a directory
  (:mod:`kvpool.persist`), private to one process; the default.
* :class:`~kvpool.tier.redis.RedisTier`: content-addressed blocks and small session
  manifests in Redis, shared by every server pointed at it (``shared = True``: another
  server may write an agent at any time, so the store asks the tier about agents it does not
  hold, and the tier can also import published prefix blocks into the pool).

Errors a tier raises to the store, and what the store does:

* :class:`~kvpool.errors.CacheCorruptionError`: the cache failed a check; it is set aside
  and the agent starts over (a miss).
* :class:`~kvpool.errors.IncompatibleCacheError`: another model's cache; left alone, a miss.
* :class:`~kvpool.errors.PoolExhaustedError`: the pool has no room (nothing was taken).
* :class:`TierUnavailableError`: the tier cannot be reached now (Redis down); the request is
  served from the pool or by prefill and the write is retried later.
* :class:`~kvpool.errors.CacheWriteError`: a local write failed (a full disk).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from kvpool.cache.tables import CacheHandle
from kvpool.errors import KvpoolError
from kvpool.pool import BlockPool

__all__ = ["ColdTier", "StoredCache", "TierStats", "TierUnavailableError"]


class TierUnavailableError(KvpoolError):
    """The cold tier cannot be reached now (its error is ``__cause__``); nothing was changed.

    Raised at once, without a network call, while the tier backs off after a failure.
    """


@dataclass(frozen=True, slots=True)
class StoredCache:
    """A cache a tier holds: its agent and size in bytes (what a scan finds).

    ``bad``: not usable as it is (a local entry that is not a regular file): set it aside.
    """

    agent_id: str
    nbytes: int
    bad: bool = False


@dataclass(frozen=True, slots=True)
class TierStats:
    """A tier's own counters (since it was created); zeros where a tier has no such thing."""

    kind: str  # "file" or "redis"
    # num_errors + num_skipped: every operation that raised TierUnavailableError (the store's
    # num_tier_errors counts the same raises as they reach it)
    num_errors: int = 0  # operations that failed (unreachable, timeout, a server error)
    num_skipped: int = 0  # operations refused at once while backing off after an error
    num_blocks_written: int = 0  # blocks the tier lacked and got
    num_blocks_deduplicated: int = 0  # blocks a write found already there (not sent)
    num_blocks_corrupt: int = 0  # blocks that failed their checksum (never loaded)
    num_incomplete: int = 0  # manifests found with a block missing (treated as a miss)
    # hybrid models (Redis): state snapshots (block boundaries, prompt ends) the tier lacked
    # and got, and those a session's load registered in the pool
    num_snapshots_written: int = 0
    num_snapshots_read: int = 0
    num_prefix_imports: int = 0  # requests whose prefix blocks came from the tier
    prefix_tokens_imported: int = 0  # tokens of those blocks
    bytes_sent: int = 0  # bytes written to the tier (blocks and manifests)
    bytes_received: int = 0
    available: bool = True  # False from a failed operation until one succeeds


class ColdTier(Protocol):
    """Agents' caches outside the pool. Every method runs on the store's thread."""

    kind: str
    shared: bool  # other processes may write it: unknown agents are worth asking about
    epoch: int  # bumps when the tier may have lost what it held (a reconnect): rewrite

    def describe(self) -> str:
        """Where the caches are, for logs (a directory, a redacted URL)."""
        ...

    def scan(self) -> list[StoredCache]:
        """The caches the tier holds at start-up, least recently written first
        (a shared tier returns none: it is asked per agent)."""
        ...

    def save(self, pool: BlockPool, handle: CacheHandle) -> int:
        """Store ``handle``'s cache (live in ``pool``, only read) under its agent id,
        replacing the old one atomically; returns the bytes it now takes there."""
        ...

    def load(self, pool: BlockPool, agent_id: str, salt: str = "") -> CacheHandle | None:
        """Load ``agent_id``'s cache into ``pool`` under the tenant salt ``salt`` (its blocks
        are shared only with that salt's requests); None if the tier holds none (or, where
        the tier records the salt it was written under, holds it under another). The pool is
        unchanged when it raises (see the module docstring for the errors)."""
        ...

    def missing(self, pool: BlockPool, handles: Sequence[CacheHandle]) -> set[str]:
        """The agents among ``handles`` (live in ``pool``, each saved here as it is) whose
        copy the tier no longer holds whole (a file deleted, Redis keys evicted or flushed):
        the store writes them again."""
        ...

    def delete(self, agent_id: str) -> None:
        """Forget ``agent_id``'s cache (no error if there is none)."""
        ...

    def set_aside(self, agent_id: str) -> bool:
        """Move a cache that failed its checks out of the way; False if it could not."""
        ...

    def import_prefix(self, pool: BlockPool, tokens: Sequence[int], salt: str, have: int) -> int:
        """Load published blocks of ``tokens``' prefix past the ``have`` tokens the pool
        already supplies into ``pool`` as cached prefix blocks; returns tokens imported."""
        ...

    def stats(self) -> TierStats: ...

    def close(self) -> None: ...
