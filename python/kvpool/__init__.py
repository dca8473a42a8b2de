"""kvpool: per-agent KV caches in a shared block pool, batched generation on MLX.

Importing kvpool loads its bookkeeping extension (``kvpool._blocks``) but not
MLX; the MLX parts (``kvpool.mlx.slabs``, ``kvpool.mlx.kernels``) load on first use.
"""

from __future__ import annotations

from kvpool import _blocks
from kvpool.blas import blas_info, maybe_enable_from_env, use_fast_cpu_blas
from kvpool.blocks import AgentBlocks, CompletedGeneration, TokenEvent
from kvpool.cache import CacheHandle, CacheUsage, GroupTable
from kvpool.cache.format import BlockFormat, InvalidBlockFormatError
from kvpool.cache.spec import BLOCK_TOKENS, AttentionKind, LayerSpec, ModelCacheSpec, StateSpec
from kvpool.engine import BlockPoolBatchEngine, EngineTimes, RequestTooLargeError
from kvpool.errors import (
    CacheCorruptionError,
    CacheWriteError,
    GenerationError,
    IncompatibleCacheError,
    InvalidRequestError,
    KvpoolError,
    ModelNotFoundError,
    PoolAllocationError,
    PoolExhaustedError,
    UnsupportedModelError,
)
from kvpool.pool import BlockPool
from kvpool.sampling import SamplingParams
from kvpool.store import AgentCacheStore, StoreStats, Tier

maybe_enable_from_env()  # KVPOOL_FAST_BLAS=1: OpenBLAS for MLX, before MLX loads

__version__ = "0.1.0"

__all__ = [
    "BLOCK_TOKENS",
    "AgentBlocks",
    "AgentCacheStore",
    "AttentionKind",
    "BlockFormat",
    "BlockPool",
    "BlockPoolBatchEngine",
    "CacheCorruptionError",
    "CacheHandle",
    "CacheUsage",
    "CacheWriteError",
    "CompletedGeneration",
    "EngineTimes",
    "GenerationError",
    "GroupTable",
    "IncompatibleCacheError",
    "InvalidBlockFormatError",
    "InvalidRequestError",
    "KvpoolError",
    "LayerSpec",
    "ModelCacheSpec",
    "ModelNotFoundError",
    "PoolAllocationError",
    "PoolExhaustedError",
    "RequestTooLargeError",
    "SamplingParams",
    "StateSpec",
    "StoreStats",
    "Tier",
    "TokenEvent",
    "UnsupportedModelError",
    "__version__",
    "_blocks",
    "blas_info",
    "use_fast_cpu_blas",
]
