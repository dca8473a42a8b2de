"""mlx-lm interop: export a pool's cache as an mlx-lm prompt cache file, and import one.

Prompt caches hold dense K/V (mlx-lm's ``KVCache`` / ``RotatingKVCache``): a quantized
pool exports its blocks dequantized (the values generation would see) and quantizes what
it imports.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvpool.cache.format import HOST_DTYPES
from kvpool.cache.storage import HostArray, LayerKV, LayerState
from kvpool.cache.tables import CacheHandle
from kvpool.errors import (
    CacheCorruptionError,
    IncompatibleCacheError,
    InvalidRequestError,
)
from kvpool.persist.atomic import _atomic_write
from kvpool.persist.layout import (
    PROMPT_CACHE_FORMAT,
    _canonical,
    _open_cache_file,
    _parse_json,
    _spec_to_json,
)
from kvpool.pool import BlockPool
from kvpool.validation import validate_agent_id, validate_token_ids


def export_prompt_cache(
    path: str | os.PathLike[str],
    pool: BlockPool,
    blocks: CacheHandle,
    *,
    fingerprint: str | None = None,
) -> None:
    """Write ``blocks`` as an mlx-lm prompt cache (``mlx_lm.models.cache.save_prompt_cache``).

    ``load_prompt_cache(path)`` returns one ``KVCache`` per global layer (``offset`` = the
    cache's tokens), one ``RotatingKVCache`` per sliding layer (its window, in temporal
    order) and one ``ArraysCache`` per recurrent layer (its end state), ready for mlx-lm
    generation with the tokens after ``blocks.token_ids``. The token
    ids, agent id, spec and fingerprint go into the file's metadata (``kvpool_*`` keys) so
    :func:`import_prompt_cache` can restore the cache. Atomic, like :func:`save_cache`.
    """
    from kvpool.mlx.mlx_lm import save_prompt_cache_file

    path = Path(path)
    validate_agent_id(blocks.agent_id)
    caches = prompt_cache_layers(pool, blocks)
    metadata = {
        "kvpool_format": PROMPT_CACHE_FORMAT,
        "kvpool_agent_id": blocks.agent_id,
        "kvpool_token_ids": _canonical(list(blocks.token_ids)),
        "kvpool_spec": _spec_to_json(pool.spec),
        "kvpool_model_fingerprint": fingerprint or "",
    }
    _atomic_write(path, lambda tmp: save_prompt_cache_file(str(tmp), caches, metadata))


def prompt_cache_layers(pool: BlockPool, blocks: CacheHandle) -> list[Any]:
    """``blocks`` as mlx-lm's per-layer caches, in memory and evaluated: what
    :func:`export_prompt_cache` writes (``KVCache`` / ``RotatingKVCache`` / ``ArraysCache``
    per layer, batch size 1, at ``blocks.total_tokens``)."""
    import mlx.core as mx

    from kvpool.mlx.mlx_lm import (
        arrays_cache,
        cache_states,
        is_arrays_cache,
        kv_cache,
        rotating_cache,
    )

    pool.check_live(blocks)
    spec, n = pool.spec, blocks.total_tokens
    group_of_layer = spec.group_of_layer()
    caches: list[Any] = []
    for i, layer in enumerate(spec.layers):
        if layer.states:
            (state,) = pool.read_states(blocks, [i])
            states = [
                _host_to_mx(a, st.dtype)[None]
                for a, st in zip(state.arrays, layer.states, strict=True)
            ]
            caches.append(arrays_cache(states))
            continue
        start = 0 if layer.window is None else n - min(n, layer.window)
        held_from = blocks.tables[group_of_layer[i]].valid_from
        if start < held_from:
            raise InvalidRequestError(
                f"the cache of agent {blocks.agent_id!r} no longer holds layer {i}'s window "
                f"(positions from {start}; it holds from {held_from})"
            )
        (kv,) = pool.read_layers(blocks, [i], start, n)
        keys, values = (_host_to_mx(a, spec.dtype)[None] for a in (kv.keys, kv.values))
        cache: Any
        if layer.window is None:
            cache = kv_cache(keys, values, n)
        else:
            cache = rotating_cache(keys, values, n, layer.window)
        caches.append(cache)
    mx.eval([cache_states(c) if is_arrays_cache(c) else [c.keys, c.values] for c in caches])
    return caches


def import_prompt_cache(
    path: str | os.PathLike[str],
    pool: BlockPool,
    *,
    agent_id: str | None = None,
    token_ids: Sequence[int] | None = None,
    fingerprint: str | None = None,
) -> CacheHandle:
    """Load an mlx-lm prompt cache file into fresh blocks of ``pool``.

    Files from :func:`export_prompt_cache` carry their agent id and token ids; for any other
    mlx-lm prompt cache pass ``agent_id`` and the ``token_ids`` the cache holds. With
    ``fingerprint`` given, a file that names another model raises IncompatibleCacheError.
    Layers must match the pool's spec: ``KVCache`` for global layers, ``RotatingKVCache``
    (``keep=0``, the same window) for sliding ones, the spec's heads, head dims and dtype,
    batch size 1, all at offset ``len(token_ids)``; ``ArraysCache`` of the spec's state
    shapes and dtypes for recurrent ones (taken as the state after ``token_ids``: a state
    does not record its length); else IncompatibleCacheError. An
    unreadable file raises CacheCorruptionError. The pool is unchanged when it raises.
    """
    from kvpool.mlx.mlx_lm import (
        cache_states,
        is_arrays_cache,
        is_kv_cache,
        is_rotating_cache,
        load_prompt_cache_file,
        temporal_rows,
    )

    path = Path(path)
    with _open_cache_file(path):  # a FIFO or directory is refused before mlx opens it
        pass
    try:
        caches, metadata = load_prompt_cache_file(str(path))
    except FileNotFoundError:
        raise
    except Exception as exc:  # mlx raises RuntimeError/ValueError on unreadable files
        raise CacheCorruptionError(f"{path}: not a readable mlx-lm prompt cache: {exc}") from exc
    metadata = metadata if isinstance(metadata, dict) else {}

    def incompatible(what: str) -> IncompatibleCacheError:
        return IncompatibleCacheError(f"{path}: {what}")

    saved_fp = metadata.get("kvpool_model_fingerprint")
    if fingerprint is not None and saved_fp and saved_fp != fingerprint:
        raise incompatible(f"written for model {saved_fp}, not this model ({fingerprint})")
    if agent_id is None:
        agent_id = metadata.get("kvpool_agent_id")
        if agent_id is None:
            raise InvalidRequestError(f"{path} names no agent: pass agent_id")
    validate_agent_id(agent_id)
    if token_ids is None:
        if "kvpool_token_ids" not in metadata:
            raise InvalidRequestError(f"{path} holds no token ids: pass token_ids")
        try:
            token_ids = _parse_json(metadata["kvpool_token_ids"])
        except (ValueError, RecursionError) as exc:
            raise CacheCorruptionError(f"{path}: bad kvpool_token_ids ({exc})") from exc
    try:
        tokens = tuple(validate_token_ids(token_ids)) if len(token_ids) else ()
    except (TypeError, InvalidRequestError) as exc:
        raise InvalidRequestError(f"{path}: token_ids are not token ids ({exc})") from exc
    spec, n = pool.spec, len(tokens)
    if n == 0:
        raise InvalidRequestError("token_ids is empty")
    if len(caches) != spec.n_layers:
        raise incompatible(f"{len(caches)} layers, the pool's model has {spec.n_layers}")
    kvs: list[LayerKV | LayerState] = []
    for i, (cache, layer) in enumerate(zip(caches, spec.layers, strict=True)):
        if layer.states:
            if not is_arrays_cache(cache):
                raise incompatible(f"layer {i} is a {type(cache).__name__}, expected ArraysCache")
            arrays = cache_states(cache)
            got = [None if a is None else (tuple(a.shape), a.dtype) for a in arrays]
            want = [((1, *st.shape), _mx_dtype(st.dtype)) for st in layer.states]
            if got != want:
                raise incompatible(f"layer {i}: states {got}, expected {want}")
            kvs.append(LayerState(i, n, tuple(_mx_to_host(a[0]) for a in arrays)))
            continue
        expected, is_expected = (
            ("KVCache", is_kv_cache)
            if layer.window is None
            else ("RotatingKVCache", is_rotating_cache)
        )
        if not is_expected(cache):
            raise incompatible(f"layer {i} is a {type(cache).__name__}, expected {expected}")
        if int(cache.offset) != n:
            raise incompatible(f"layer {i} holds {cache.offset} positions, token_ids has {n}")
        keys, values = cache.keys, cache.values
        if layer.window is None:
            keys, values = keys[..., :n, :], values[..., :n, :]
        else:
            if cache.keep != 0 or cache.max_size != layer.window:
                raise incompatible(
                    f"layer {i}: RotatingKVCache(max_size={cache.max_size}, keep={cache.keep}), "
                    f"expected max_size={layer.window}, keep=0"
                )
            keys, values = temporal_rows(cache)
        for name, array, dim in (
            ("keys", keys, layer.k_head_dim),
            ("values", values, layer.v_head_dim),
        ):
            shape = (1, layer.n_kv_heads, array.shape[2], dim)
            if tuple(array.shape) != shape or array.dtype != _mx_dtype(spec.dtype):
                raise incompatible(
                    f"layer {i} {name}: shape {tuple(array.shape)} {array.dtype}, expected "
                    f"{shape} {spec.dtype}"
                )
        held = int(keys.shape[2])
        if held > n:
            raise incompatible(f"layer {i} holds {held} rows for {n} positions")
        kvs.append(LayerKV(i, n - held, _mx_to_host(keys[0]), _mx_to_host(values[0])))
    # Global layers start at 0; the blocks hold sliding positions from the latest start.
    valid_from = max(
        (kv.start for kv in kvs if isinstance(kv, LayerKV) and spec.layers[kv.layer].window),
        default=0,
    )
    return pool.write_cache(agent_id, tokens, kvs, valid_from=valid_from)


def _mx_dtype(dtype: str) -> Any:
    from kvpool.mlx.dtypes import mx_dtype

    return mx_dtype(dtype)


def _host_to_mx(array: HostArray, dtype: str) -> Any:
    import mlx.core as mx

    assert array.dtype == np.dtype(HOST_DTYPES[dtype]), "host arrays hold the cache dtype"
    out = mx.array(array)
    return out.view(mx.bfloat16) if dtype == "bfloat16" else out


def _mx_to_host(array: Any) -> HostArray:
    import mlx.core as mx

    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    return np.ascontiguousarray(np.asarray(array))
