"""Quant, part 2: cache files per block format, their size and load time (the record is
:mod:`kvpool.benchmarks.quant`)."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvpool import persist
from kvpool.benchmarks.measure import Summary, interleave, ratio
from kvpool.benchmarks.quant_gather import (
    AGENT_LAYERS,
    AGENT_TOKENS,
    GROUP_SIZE,
    HEAD_DIM,
    KV_HEADS,
)
from kvpool.cache.spec import ModelCacheSpec
from kvpool.cache.storage import LayerKV
from kvpool.cache.tables import CacheHandle
from kvpool.mlx import kernels
from kvpool.pool import BlockPool

FILE_TARGET = 3.0  # a 4-bit file at least 3x smaller than dense
LOAD_TARGET = 2.0  # and its load at least 2x faster
FINGERPRINT = "sha256:" + "5a" * 32  # any constant: no model here


def _fill(pool: BlockPool, tokens: tuple[int, ...], seed: int) -> CacheHandle:
    rng = np.random.default_rng(seed)
    n = len(tokens)
    kvs = []
    for i, layer in enumerate(pool.spec.layers):
        shape = (layer.n_kv_heads, n, layer.k_head_dim)
        keys = rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
        values = rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
        kvs.append(LayerKV(i, 0, keys, values))
    return pool.write_cache("bench-agent", tokens, kvs)


def _same_blocks(pool: BlockPool, a: CacheHandle, other: BlockPool, b: CacheHandle) -> bool:
    """The loaded blocks equal the saved ones bit for bit (codes for quantized pools)."""
    for i in range(pool.spec.n_layers):
        if pool.spec.format.is_quantized:
            (x,) = pool.read_codes(a, [i], 0, a.total_tokens)
            (y,) = other.read_codes(b, [i], 0, b.total_tokens)
            xs = [getattr(r, p) for r in (x.keys, x.values) for p in ("codes", "scales", "biases")]
            ys = [getattr(r, p) for r in (y.keys, y.values) for p in ("codes", "scales", "biases")]
        else:
            (kx,) = pool.read_layers(a, [i], 0, a.total_tokens)
            (ky,) = other.read_layers(b, [i], 0, b.total_tokens)
            xs, ys = [kx.keys, kx.values], [ky.keys, ky.values]
        if any(p.tobytes() != q.tobytes() for p, q in zip(xs, ys, strict=True)):
            return False
    return True


@dataclass(frozen=True, slots=True)
class FormatSaveLoad:
    """One block format's file: size, times, and ratios to dense (dense / this format)."""

    file_bytes: int
    round_trip_equal: bool
    save: Summary
    load: Summary
    file_vs_dense: float | None
    load_speedup_vs_dense: float | None
    save_speedup_vs_dense: float | None


@dataclass(frozen=True, slots=True)
class SaveLoad:
    geometry: str
    num_tokens: int
    rounds: int
    formats: dict[str, FormatSaveLoad]
    scatter_num_copied: int
    note: str


def measure_persist(quick: bool) -> SaveLoad:
    """Save and load of one agent per format, interleaved, into a pool of its own (each load
    under a fresh cache salt, so it reads the file instead of sharing the cached blocks)."""
    n_layers, num_tokens, rounds = (4, 1024, 2) if quick else (AGENT_LAYERS, AGENT_TOKENS, 3)
    dense = ModelCacheSpec.uniform(n_layers, KV_HEADS, HEAD_DIM, dtype="float16")
    tokens = tuple(int(t) for t in np.random.default_rng(0).integers(0, 32000, num_tokens))
    blocks = dense.blocks_for(num_tokens)
    root = Path(tempfile.mkdtemp(prefix="kvpool-bench-quant-"))
    fns: list[Callable[[], None]] = []
    names: list[str] = []
    info: dict[str, tuple[int, bool]] = {}
    salts = itertools.count()
    try:
        for name, bits in (("dense", None), ("q8", 8), ("q4", 4)):
            spec = dense.with_format(bits, GROUP_SIZE)
            source = BlockPool(spec, num_blocks=blocks)
            handle = _fill(source, tokens, seed=1)
            target_pool = BlockPool(spec, num_blocks=blocks)
            path = root / f"{name}.kvcache.safetensors"
            size = persist.save_cache(path, source, handle, fingerprint=FINGERPRINT)
            loaded = persist.load_cache(path, target_pool, fingerprint=FINGERPRINT)
            equal = _same_blocks(source, handle, target_pool, loaded)
            target_pool.release(loaded)
            info[name] = (size, equal)

            def save(source: BlockPool = source, handle: CacheHandle = handle,
                     path: Path = path) -> None:  # fmt: skip
                persist.save_cache(path, source, handle, fingerprint=FINGERPRINT)

            def load(target_pool: BlockPool = target_pool, path: Path = path) -> None:
                got = persist.load_cache(
                    path, target_pool, fingerprint=FINGERPRINT, cache_salt=str(next(salts))
                )
                target_pool.release(got)

            fns += [save, load]
            names += [f"save_{name}", f"load_{name}"]
        kernels.reset_scatter_stats()
        samples = interleave(fns, iters=rounds, warmup=1 if not quick else 0)
        copied = kernels.scatter_stats()["num_copied"]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summaries = {n: Summary.of(s) for n, s in zip(names, samples, strict=True)}
    formats = {}
    for name in ("dense", "q8", "q4"):
        saving, loading = summaries[f"save_{name}"], summaries[f"load_{name}"]
        formats[name] = FormatSaveLoad(
            file_bytes=info[name][0],
            round_trip_equal=info[name][1],
            save=saving,
            load=loading,
            file_vs_dense=ratio(info["dense"][0], info[name][0], 3),
            load_speedup_vs_dense=ratio(summaries["load_dense"].p50_ms, loading.p50_ms, 3),
            save_speedup_vs_dense=ratio(summaries["save_dense"].p50_ms, saving.p50_ms, 3),
        )
    return SaveLoad(
        geometry=f"{n_layers} layers x {KV_HEADS} KV heads x {HEAD_DIM}, float16",
        num_tokens=num_tokens,
        rounds=rounds,
        formats=formats,
        scatter_num_copied=int(copied),
        note="page cache warm (the file was just written); save = temp file, fsync, rename",
    )


# --------------------------------------------------------------------------- quality
