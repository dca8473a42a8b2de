"""The KV cache manager: the only owner of blocks (no MLX here).

``format`` (BlockFormat and the dtype table), ``tables`` (handles and per-group block
tables), ``groups`` (full vs sliding-window policies), ``prefix`` (chained block keys),
``manager`` (reserve / commit / rollback / release, lookups, counters).

The names below load on first use (PEP 562): :mod:`kvpool.spec` imports
:mod:`kvpool.cache.format`, and the manager imports the spec, so an eager package import
would make the two depend on which is imported first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from kvpool.cache.tables import NULL_BLOCK, CacheHandle, GroupTable

_NAME_TO_MODULE = {
    "BlockFormat": "kvpool.cache.format",
    "CacheUsage": "kvpool.cache.manager",
    "GroupMatch": "kvpool.cache.manager",
    "GroupUsage": "kvpool.cache.manager",
    "KVCacheManager": "kvpool.cache.manager",
    "PoolFull": "kvpool.cache.manager",
    "PrefixMatch": "kvpool.cache.manager",
    "Reservation": "kvpool.cache.manager",
    "NULL_BLOCK": "kvpool.cache.tables",
    "CacheHandle": "kvpool.cache.tables",
    "GroupTable": "kvpool.cache.tables",
}

__all__ = [
    "NULL_BLOCK",
    "BlockFormat",
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


def __getattr__(name: str) -> Any:
    module = _NAME_TO_MODULE.get(name)
    if module is None:
        raise AttributeError(f"module 'kvpool.cache' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
