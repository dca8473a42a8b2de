"""Agent caches on disk: one safetensors file per agent, written atomically, checked on load.

A file holds an agent's token ids and, for every layer, the blocks' K/V of the positions
they hold *as they are at rest* (dense values, or the codes, scales and biases of quantized
blocks), plus (in the safetensors metadata) the format version, the cache spec with its
block format, the model fingerprint, a sha256 per tensor and a sha256 of the header.
``docs/CACHE_FORMAT.md`` describes it byte by byte. In short::

    u64 header length | JSON header (padded with spaces to 8 bytes) | tensor data
    tensors, in file order:  token_ids                   U32 [num_tokens]
      dense blocks:          layers.{i}.keys             F32|F16|BF16 [n_kv_heads, T_i, k_head_dim]
                             layers.{i}.values           F32|F16|BF16 [n_kv_heads, T_i, v_head_dim]
      quantized (v2):        layers.{i}.keys.codes       U32 [n_kv_heads, T_i, k_head_dim*bits/32]
                             layers.{i}.keys.scales      dtype [n_kv_heads, T_i, k_head_dim/group]
                             layers.{i}.keys.biases      (same), then values.codes/scales/biases
    T_i = num_tokens (global layer) or num_tokens - sliding_valid_from (sliding layer)

Version 2 files carry the block format in the spec; version 1 files (dense only) still
load. A file loads only into a pool of the same spec, block format included: files are not
converted on load (IncompatibleCacheError before any block is taken).

Modules, one concept each: :mod:`~kvpool.persist.layout` (names, tensor table, header,
:class:`CacheInfo`), :mod:`~kvpool.persist.atomic` (atomic files),
:mod:`~kvpool.persist.codec` (tensors per block format), :mod:`~kvpool.persist.hashing`,
:mod:`~kvpool.persist.files` (save, load, verify), :mod:`~kvpool.persist.fingerprint`,
:mod:`~kvpool.persist.prompt_cache` (mlx-lm prompt-cache interop).

MLX is imported only by :func:`model_fingerprint`, :func:`export_prompt_cache`,
:func:`prompt_cache_layers` and :func:`import_prompt_cache` (the first three need a model or
real arrays anyway): saving and loading run on any :class:`~kvpool.cache.storage.KVStorage`,
including the MLX-free fake.
"""

from __future__ import annotations

from kvpool.persist.atomic import remove_stale_temp_files
from kvpool.persist.files import (
    load_cache,
    save_cache,
    sliding_valid_from,
    verify_cache,
)
from kvpool.persist.fingerprint import model_fingerprint
from kvpool.persist.layout import (
    FILE_SUFFIX,
    FORMAT,
    FORMAT_VERSION,
    PROMPT_CACHE_FORMAT,
    CacheInfo,
    _header_digest,  # tests recompute a tampered header's checksum
    agent_id_of,
    cache_path,
    read_cache_info,
)
from kvpool.persist.prompt_cache import (
    export_prompt_cache,
    import_prompt_cache,
    prompt_cache_layers,
)

__all__ = [
    "FILE_SUFFIX",
    "FORMAT",
    "FORMAT_VERSION",
    "PROMPT_CACHE_FORMAT",
    "CacheInfo",
    "_header_digest",
    "agent_id_of",
    "cache_path",
    "export_prompt_cache",
    "import_prompt_cache",
    "load_cache",
    "model_fingerprint",
    "prompt_cache_layers",
    "read_cache_info",
    "remove_stale_temp_files",
    "save_cache",
    "sliding_valid_from",
    "verify_cache",
]
