"""Save and load one agent's cache to and from disk (kvpool.persist).

A 4096-token agent of a 32-layer model with 8 KV heads x head_dim 128 in float16 (the cache
geometry of Llama-3-8B: 128 KiB per token, 512 MiB for the agent) is filled with random K/V
in a SlabStorage pool, then saved with ``save_cache`` (temp file, fsync, rename, directory
fsync) and loaded back into fresh blocks with ``load_cache`` (header check, sha256 of every
tensor, in-place scatter), several times. No model is needed: the spec and pool are built
directly and the fingerprint is a constant. Reports the median and best times, the file size
and MB/s (MB = 10^6 bytes), the checks that the loaded blocks equal the saved ones, and that
every scatter wrote in place (its two targets: equal, and 0 slab copies).

In the same run, for scale: ``raw_write`` writes the same number of bytes from one numpy
buffer with the same atomic steps (temp file, fsync, rename, directory fsync) but no gather
and no hashing; ``raw_read`` reads them back into a buffer. ``load_cold`` first drops the
file from the page cache (``posix_fadvise(DONTNEED)``, where available), so it reads the disk.

    kvpool bench persist [--quick]        (or: python bench/bench_persist.py)

``--quick``: 1024 tokens, 8 layers, 2 rounds (a smoke test). ``run(quick, directory)``:
where the files go (default: a temporary directory under /tmp; the device the directory is
on sets the fsync cost).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from kvpool import persist
from kvpool.benchmarks.records import BenchRecord, Section, Target
from kvpool.benchmarks.tables import table
from kvpool.cache.spec import ModelCacheSpec
from kvpool.cache.storage import LayerKV, host_dtype
from kvpool.cache.tables import CacheHandle
from kvpool.mlx import kernels
from kvpool.pool import BlockPool

KV_HEADS = 8
HEAD_DIM = 128
DTYPE = "float16"
FINGERPRINT = "sha256:" + "ab" * 32  # any constant: no model here


def _fill(pool: BlockPool, agent_id: str, tokens: tuple[int, ...], seed: int) -> CacheHandle:
    """A handle of ``tokens`` with random K/V at every position."""
    rng = np.random.default_rng(seed)
    n = len(tokens)
    kvs = []
    for i, layer in enumerate(pool.spec.layers):
        shape = (layer.n_kv_heads, n, layer.k_head_dim)
        keys = rng.standard_normal(shape, dtype=np.float32).astype(host_dtype(DTYPE))
        values = rng.standard_normal(shape, dtype=np.float32).astype(host_dtype(DTYPE))
        kvs.append(LayerKV(i, 0, keys, values))
    return pool.write_cache(agent_id, tokens, kvs)


def _same(pool: BlockPool, a: CacheHandle, other: BlockPool, b: CacheHandle) -> bool:
    layers = list(range(pool.spec.n_layers))
    for i in layers:
        (x,) = pool.read_layers(a, [i], 0, a.total_tokens)
        (y,) = other.read_layers(b, [i], 0, b.total_tokens)
        if x.keys.tobytes() != y.keys.tobytes() or x.values.tobytes() != y.values.tobytes():
            return False
    return True


def _raw_write(path: Path, data: np.ndarray[Any, np.dtype[np.uint8]]) -> None:
    tmp = path.with_name(path.name + ".raw-tmp")
    with tmp.open("wb") as f:
        for i in range(0, data.size, 8 << 20):
            f.write(data[i : i + (8 << 20)].data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def _raw_read(path: Path, out: np.ndarray[Any, np.dtype[np.uint8]]) -> None:
    with path.open("rb", buffering=0) as f:
        view, done = out.data, 0
        while done < out.size:
            done += f.readinto(view[done : done + (8 << 20)]) or 0


def _drop_page_cache(path: Path) -> bool:
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def run(quick: bool, directory: Path | None = None) -> PersistRecord:
    """Time save and load of one agent."""
    n_layers, num_tokens, rounds = (8, 1024, 2) if quick else (32, 4096, 5)
    spec = ModelCacheSpec.uniform(n_layers, KV_HEADS, HEAD_DIM, dtype=DTYPE)
    agent_blocks = spec.blocks_for(num_tokens)
    mx.set_cache_limit(4 << 30)
    pool = BlockPool(spec, num_blocks=agent_blocks)
    rng = np.random.default_rng(0)
    tokens = tuple(int(t) for t in rng.integers(0, 32000, num_tokens))
    blocks = _fill(pool, "bench-agent", tokens, seed=1)
    kv_bytes = num_tokens * spec.bytes_per_block // spec.block_tokens

    own_dir = directory is None
    root = Path(tempfile.mkdtemp(prefix="kvpool-bench-")) if directory is None else directory
    root.mkdir(parents=True, exist_ok=True)
    path = persist.cache_path(root, blocks.agent_id)
    save_s: list[float] = []
    load_s: list[float] = []
    cold_s: list[float] = []
    raw_write_s: list[float] = []
    raw_read_s: list[float] = []
    raw = np.random.default_rng(2).integers(0, 256, kv_bytes, dtype=np.uint8)
    raw_back = np.zeros_like(raw)
    raw_path = root / "raw.bin"
    equal = True
    kernels.reset_scatter_stats()
    try:
        for _ in range(rounds):
            t0 = time.perf_counter()
            file_bytes = persist.save_cache(path, pool, blocks, fingerprint=FINGERPRINT)
            save_s.append(time.perf_counter() - t0)
            # Each load goes into a pool of its own: in the saving pool the blocks are
            # still there, and loading would share them instead of reading the file.
            target = BlockPool(spec, num_blocks=agent_blocks)
            t0 = time.perf_counter()
            loaded = persist.load_cache(path, target, fingerprint=FINGERPRINT)
            load_s.append(time.perf_counter() - t0)
            equal = equal and loaded.token_ids == tokens and _same(pool, blocks, target, loaded)
            del loaded, target
            if _drop_page_cache(path):
                target = BlockPool(spec, num_blocks=agent_blocks)
                t0 = time.perf_counter()
                persist.load_cache(path, target, fingerprint=FINGERPRINT)
                cold_s.append(time.perf_counter() - t0)
                del target
            t0 = time.perf_counter()
            _raw_write(raw_path, raw)
            raw_write_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _raw_read(raw_path, raw_back)
            raw_read_s.append(time.perf_counter() - t0)
    finally:
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)
    stats = kernels.scatter_stats()

    def summary(samples: list[float]) -> OpTimes | None:
        if not samples:
            return None
        median, best = statistics.median(samples), min(samples)
        return OpTimes(
            median_ms=round(median * 1e3, 1),
            best_ms=round(best * 1e3, 1),
            first_ms=round(samples[0] * 1e3, 1),
            median_MB_per_s=round(file_bytes / median / 1e6, 1),
        )

    copied = int(stats["num_copied"])
    return PersistRecord(
        targets=_targets(equal, copied),
        geometry=f"{n_layers} layers x {KV_HEADS} KV heads x {HEAD_DIM} head_dim, {DTYPE}",
        num_tokens=num_tokens,
        kv_bytes=kv_bytes,
        file_bytes=file_bytes,
        file_MB=round(file_bytes / 1e6, 1),
        rounds=rounds,
        save=summary(save_s),
        load=summary(load_s),
        load_cold=summary(cold_s),
        raw_write=summary(raw_write_s),
        raw_read=summary(raw_read_s),
        round_trip_equal=equal,
        scatter_num_copied=copied,
    )


def _targets(equal: bool, copied: int) -> tuple[Target, ...]:
    """The checks the benchmark judges: loaded blocks equal the saved ones, every scatter
    of a load wrote into the slabs in place (no slab copies)."""
    return (
        Target("loaded blocks equal the saved ones", "yes", str(equal), equal),
        Target("slab copies while loading (in-place scatter)", "0", copied, copied == 0),
    )


@dataclass(frozen=True, slots=True)
class OpTimes:
    """One operation over the rounds; MB = 10^6 bytes of the file."""

    median_ms: float
    best_ms: float
    first_ms: float
    median_MB_per_s: float  # (the unit's spelling)


@dataclass(frozen=True, slots=True)
class PersistRecord(BenchRecord):
    """Save / load of one agent; ``load_cold`` None where the page cache cannot be dropped."""

    geometry: str
    num_tokens: int
    kv_bytes: int
    file_bytes: int
    file_MB: float
    rounds: int
    save: OpTimes | None
    load: OpTimes | None
    load_cold: OpTimes | None
    raw_write: OpTimes | None
    raw_read: OpTimes | None
    round_trip_equal: bool
    scatter_num_copied: int


RECORD = PersistRecord


# --------------------------------------------------------------------------- report

OPS = ("save", "raw_write", "load", "load_cold", "raw_read")


def render_section(r: PersistRecord) -> list[str]:
    rows = []
    for op in OPS:
        t: OpTimes | None = getattr(r, op)
        if t is None:
            rows.append((op, "-", "-", "-"))
        else:
            rows.append((op, f"{t.median_ms:.1f}", f"{t.best_ms:.1f}", f"{t.median_MB_per_s:.0f}"))
    return [
        f"One agent of {r.num_tokens} tokens, {r.geometry}: {r.file_MB} MB file, "
        f"{r.rounds} rounds; loaded blocks equal the saved ones: {r.round_trip_equal}, "
        f"slab copies: {r.scatter_num_copied}.",
        "",
        *table(("operation", "median ms", "best ms", "MB/s (median)"), rows),
    ]


SECTION = Section(RECORD, render_section)
