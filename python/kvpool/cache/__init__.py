"""The KV cache manager: the only owner of blocks (no MLX here).

``tables`` (handles and per-group block tables), ``groups`` (full vs
sliding-window policies), ``prefix`` (chained block keys), ``manager``
(reserve / commit / rollback / release, lookups, counters).
"""

from __future__ import annotations

from kvpool.cache.manager import (
    CacheUsage,
    GroupMatch,
    GroupUsage,
    KVCacheManager,
    PoolFull,
    PrefixMatch,
    Reservation,
)
from kvpool.cache.tables import NULL_BLOCK, CacheHandle, GroupTable

__all__ = [
    "NULL_BLOCK",
    "CacheHandle",
    "CacheUsage",
    "GroupMatch",
    "GroupTable",
    "GroupUsage",
    "KVCacheManager",
    "PoolFull",
    "PrefixMatch",
    "Reservation",
]
