"""The KV cache manager: the only owner of blocks (no MLX here).

``format`` (BlockFormat and the dtype table), ``spec`` (a model's layer groups and block
format), ``storage`` (the KVStorage protocol: where K/V bytes live), ``tables`` (handles and
per-group block tables), ``groups`` (full vs sliding-window policies), ``prefix`` (chained
block keys), ``manager`` (reserve / commit / rollback / release, lookups, counters),
``sequence`` (one in-flight sequence's cache and the host-write path).
"""

from __future__ import annotations

from kvpool.cache.format import BlockFormat
from kvpool.cache.manager import (
    CacheUsage,
    GroupMatch,
    GroupUsage,
    KVCacheManager,
    PoolFull,
    PrefixMatch,
    Reservation,
)
from kvpool.cache.sequence import HostWrite, SequenceCache
from kvpool.cache.spec import AttentionKind, LayerSpec, ModelCacheSpec, StateSpec
from kvpool.cache.tables import NULL_BLOCK, CacheHandle, GroupTable

__all__ = [
    "NULL_BLOCK",
    "AttentionKind",
    "BlockFormat",
    "CacheHandle",
    "CacheUsage",
    "GroupMatch",
    "GroupTable",
    "GroupUsage",
    "HostWrite",
    "KVCacheManager",
    "LayerSpec",
    "ModelCacheSpec",
    "PoolFull",
    "PrefixMatch",
    "Reservation",
    "SequenceCache",
    "StateSpec",
]
