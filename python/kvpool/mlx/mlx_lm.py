"""Everything kvpool takes from mlx-lm, through its public API (the only importer of mlx-lm).

* caches: mlx-lm's ``KVCache`` / ``RotatingKVCache`` / ``ArraysCache`` built from their
  ``state`` (never by setting private fields), told apart by type, saved and loaded in
  mlx-lm's own format;
* the cache geometry of a loaded model (one token through a fresh cache);
* the ``BatchGenerator`` the engine drives (``kvpool.testing.FakeBatchGenerator`` mirrors
  the same interface), its samplers and stop sequences; the engine's one hands gathered
  caches to it as :class:`PoolKVCache`, so a batch of one resume takes the gathered arrays
  as they are instead of copying them (see that class);
* loading a model directory and an architecture's module.

Importing this module imports mlx-lm (and so MLX): import it where MLX runs, never from code
the unit tests load.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.models.cache import (
    ArraysCache,
    BatchKVCache,
    KVCache,
    LRUPromptCache,
    RotatingKVCache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
)
from mlx_lm.sample_utils import make_sampler

from kvpool.cache.spec import StateSpec

__all__ = [
    "KV_CACHE_STEP",
    "PoolBatchGenerator",
    "PoolBatchKVCache",
    "PoolKVCache",
    "ProbedLayer",
    "arrays_cache",
    "batch_generator",
    "cache_states",
    "hub_snapshot_path",
    "is_arrays_cache",
    "is_kv_cache",
    "is_rotating_cache",
    "kv_cache",
    "load",
    "load_prompt_cache_file",
    "lru_prompt_cache",
    "model_module",
    "pool_batch_generator",
    "probe_layers",
    "prompt_cache",
    "rotating_cache",
    "sampler",
    "save_prompt_cache_file",
    "stop_sequences",
    "temporal_rows",
]

KV_CACHE_STEP = int(KVCache.step)
"""Rows mlx-lm's KVCache grows by: gathers allocate past the length to a multiple of it."""


# -- caches -------------------------------------------------------------------


def kv_cache(keys: mx.array, values: mx.array, offset: int) -> Any:
    """A ``KVCache`` holding ``keys``/``values`` ``[B, H, rows, D]`` (rows >= offset)."""
    return KVCache.from_state((keys, values, offset))


def rotating_cache(keys: mx.array, values: mx.array, offset: int, window: int) -> Any:
    """A ``RotatingKVCache`` (keep 0) of ``window`` whose rows, in temporal order, end at
    position ``offset``."""
    rows = int(keys.shape[2])
    return RotatingKVCache.from_state((keys, values, offset, 0, window, rows))


def arrays_cache(states: Sequence[mx.array]) -> Any:
    """An ``ArraysCache`` holding ``states`` (each ``[1, ...]``), set through its ``state``."""
    cache = ArraysCache(len(states))
    cache.state = (list(states), None, None)
    return cache


def is_arrays_cache(cache: object) -> bool:
    return type(cache) is ArraysCache


def cache_states(cache: Any) -> list[mx.array]:
    """The arrays an ``ArraysCache`` holds (through its ``state``)."""
    arrays, _, _ = cache.state
    return list(arrays)


def is_kv_cache(cache: object) -> bool:
    return type(cache) is KVCache


def is_rotating_cache(cache: object) -> bool:
    return type(cache) is RotatingKVCache


def temporal_rows(cache: Any) -> tuple[mx.array, mx.array]:
    """A ``RotatingKVCache``'s keys and values, oldest row first (as its own update does)."""
    keys, values, offset, keep, _, idx = cache.state
    return _temporal(keys, int(offset), int(keep), int(idx)), _temporal(
        values, int(offset), int(keep), int(idx)
    )


def _temporal(v: mx.array, offset: int, keep: int, idx: int) -> mx.array:
    if idx == v.shape[2]:
        return v
    if idx < offset:
        return mx.concatenate([v[..., :keep, :], v[..., idx:, :], v[..., keep:idx, :]], axis=2)
    return v[..., :idx, :]


def prompt_cache(model: Any) -> list[Any]:
    """A fresh, empty per-layer cache list for ``model`` (mlx-lm's ``make_prompt_cache``)."""
    return list(make_prompt_cache(model))


def save_prompt_cache_file(path: str, caches: Sequence[Any], metadata: dict[str, str]) -> None:
    """mlx-lm's own prompt-cache file (``load_prompt_cache`` reads it back)."""
    save_prompt_cache(path, list(caches), metadata)


def load_prompt_cache_file(path: str) -> tuple[list[Any], dict[str, str]]:
    caches, metadata = load_prompt_cache(path, return_metadata=True)
    return list(caches), dict(metadata)


# -- model geometry -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProbedLayer:
    """One layer's cache as a fresh mlx-lm cache shows it after one token."""

    cache_type: str  # "KVCache", "RotatingKVCache", or another class name
    n_kv_heads: int
    k_head_dim: int
    v_head_dim: int
    dtype: str  # "float16", "bfloat16", "float32", ...
    window: int | None  # RotatingKVCache.max_size
    keep: int  # RotatingKVCache.keep (0 elsewhere)
    states: tuple[StateSpec, ...] = ()  # an ArraysCache's arrays (batch axis left out)


def probe_layers(model: Any) -> list[ProbedLayer]:
    """Run one token through a fresh prompt cache of ``model`` and read each layer back."""
    caches = make_prompt_cache(model)
    model(mx.array([[0]]), cache=caches)
    out = []
    for cache in caches:
        if is_arrays_cache(cache):
            arrays = [a for a in cache_states(cache) if a is not None]
            mx.eval(arrays)
            states = tuple(
                StateSpec(tuple(int(d) for d in a.shape[1:]), _dtype_name(a.dtype)) for a in arrays
            )
            if len(arrays) != len(cache_states(cache)):
                states = ()  # a state left unset after a token: not something kvpool can hold
            out.append(ProbedLayer("ArraysCache", 0, 0, 0, "", None, 0, states))
            continue
        keys, values = getattr(cache, "keys", None), getattr(cache, "values", None)
        if keys is None or values is None:
            out.append(ProbedLayer(type(cache).__name__, 0, 0, 0, "", None, 0))
            continue
        mx.eval(keys, values)
        rotating = is_rotating_cache(cache)
        out.append(
            ProbedLayer(
                type(cache).__name__,
                int(keys.shape[1]),
                int(keys.shape[3]),
                int(values.shape[3]),
                _dtype_name(keys.dtype),
                int(cache.max_size) if rotating else None,
                int(cache.keep) if rotating else 0,
            )
        )
    return out


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("mlx.core.")


# -- generation ---------------------------------------------------------------


def batch_generator(model: Any, **kwargs: Any) -> Any:
    """mlx-lm's ``BatchGenerator``: ``insert_segments``, ``next``, ``extract_cache``, ``remove``."""
    return BatchGenerator(model, **kwargs)


def lru_prompt_cache(max_size: int = 10) -> Any:
    """mlx-lm's ``LRUPromptCache`` (the token trie ``mlx_lm.server`` resumes from):
    ``fetch_nearest_cache(key, tokens)``, ``insert_cache(key, tokens, cache, cache_type=)``."""
    return LRUPromptCache(max_size)


def sampler(temperature: float, top_p: float, min_p: float, top_k: int) -> Any:
    """mlx-lm's sampler for these settings (``top_p`` 1 disables it)."""
    return make_sampler(
        temp=temperature, top_p=top_p if top_p < 1 else 0.0, min_p=min_p, top_k=top_k
    )


def stop_sequences(stop_token_ids: Iterable[int]) -> Any:
    """mlx-lm's stop sequences: generation stops at any of these single tokens."""
    return StopSequences([[int(t)] for t in sorted(set(stop_token_ids))])


# -- batches of gathered caches ----------------------------------------------


class PoolKVCache(KVCache):  # type: ignore[misc]
    """A ``KVCache`` gathered from the pool: rows past ``offset`` are headroom.

    mlx-lm batches caches through their class's ``merge``; ``KVCache.merge``
    copies every row into a fresh ``BatchKVCache`` exactly ``offset`` rows long,
    which the first prefill step then reallocates to grow: one resume peaked at
    twice its cache. A batch of one ``PoolKVCache`` takes its arrays as they are
    (headroom included, so the first steps write in place); larger batches merge
    as mlx-lm does, into a :class:`PoolBatchKVCache`.
    """

    @classmethod
    def merge(cls, caches: list[Any]) -> Any:
        if len(caches) == 1 and caches[0].keys is not None:
            keys, values, offset = caches[0].state
            batch = PoolBatchKVCache([0])
            batch.state = (keys, values, mx.array([offset]), mx.array([0]), int(offset))
            return batch
        return PoolBatchKVCache.merge(caches)


class PoolBatchKVCache(BatchKVCache):  # type: ignore[misc]
    """mlx-lm's ``BatchKVCache`` minus two copies that kvpool does not need:

    * ``filter`` keeping every row in order (a batch of one moving from prefill to
      decode) leaves the arrays as they are instead of gathering them anew;
    * ``extract`` returns a view of the row (the engine writes it into the pool
      at once) instead of a contiguous copy.
    """

    def filter(self, batch_indices: Sequence[int]) -> None:
        keep = [int(i) for i in batch_indices]
        keys, _, _, left_padding, _ = self.state
        every_row = keys is not None and keep == list(range(keys.shape[0]))
        if every_row and min(left_padding.tolist()) == 0:  # nothing to trim either
            return
        super().filter(batch_indices)

    def extract(self, idx: int) -> KVCache:
        keys, values, _, left_padding, end = self.state
        start = int(left_padding.tolist()[idx])  # no new lazy node: no wait on the stream
        cache = KVCache()
        cache.state = (
            keys[idx : idx + 1, :, start:end],
            values[idx : idx + 1, :, start:end],
            end - start,
        )
        return cache


def _batchable(cache: Any) -> Any:
    """``cache`` as a :class:`PoolKVCache` if it is a filled ``KVCache`` (same arrays)."""
    if type(cache) is not KVCache or cache.keys is None:
        return cache
    out = PoolKVCache()
    out.state = cache.state
    return out


class PoolBatchGenerator(BatchGenerator):  # type: ignore[misc]
    """mlx-lm's ``BatchGenerator`` that batches inserted ``KVCache`` s as
    :class:`PoolKVCache` (everything else is mlx-lm's own)."""

    def insert_segments(
        self,
        segments: list[list[list[int]]],
        max_tokens: list[int] | None = None,
        caches: list[Any] | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> list[int]:
        if caches is not None:
            caches = [None if c is None else [_batchable(layer) for layer in c] for c in caches]
        return list(super().insert_segments(segments, max_tokens, caches, *args, **kwargs))


def pool_batch_generator(model: Any, **kwargs: Any) -> Any:
    """The engine's generator: :class:`PoolBatchGenerator` (``batch_generator``'s API)."""
    return PoolBatchGenerator(model, **kwargs)


# -- models -------------------------------------------------------------------


def load(path: str) -> tuple[Any, Any]:
    """``mlx_lm.load`` of a local model directory or a Hugging Face repo id: (model, tokenizer)."""
    import mlx_lm

    model, tokenizer = mlx_lm.load(path)[:2]
    return model, tokenizer


def hub_snapshot_path(repo_id: str) -> Path:
    """The local snapshot directory of a Hugging Face repo ``mlx_lm.load`` fetched or found."""
    from mlx_lm.utils import hf_repo_to_path

    return Path(hf_repo_to_path(repo_id))


def model_module(model_type: str) -> ModuleType:
    """mlx-lm's module of an architecture (``Model``, ``ModelArgs``)."""
    return importlib.import_module(f"mlx_lm.models.{model_type}")
