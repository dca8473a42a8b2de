"""Session fork: time and K/V bytes copied to fork an 8K-token session, vs a deep copy.

A session of 8192 + 5 tokens (so its last block is partial, the case a fork must share
without letting either branch write into it) with the cache geometry of the default model
(SmolLM2-135M: 30 layers x 3 KV heads x 64, float16, blocks of 256 tokens) is filled with
random K/V in a real pool. Then, many times: ``BlockPool.fork`` (a new handle holding every
block by reference), and release of the child. Reported: the median and worst fork time, the
blocks the fork took from the pool and the K/V bytes it copied (blocks taken x bytes per
block: a fork that copied anything would need fresh blocks to copy into), and that the
parent's K/V reads back unchanged.

Baseline in the same run: a *deep* copy of the same session (read every layer to the host,
write it into fresh blocks under another salt so nothing is shared), the cost a fork without
shared blocks would pay.

    kvpool bench fork [--quick]

``--quick``: 1024 + 5 tokens, 4 layers, fewer rounds (seconds).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np

from kvpool.benchmarks.measure import ratio
from kvpool.benchmarks.records import BenchRecord, Section, Target
from kvpool.benchmarks.tables import table

KV_HEADS = 3
HEAD_DIM = 64
DTYPE = "float16"
TARGET_MS = 5.0


@dataclass(frozen=True, slots=True)
class ForkRecord(BenchRecord):
    """Fork vs deep copy of one session (times in ms over ``rounds``)."""

    geometry: str
    num_tokens: int
    num_blocks: int  # blocks the session holds
    kv_bytes: int  # K/V bytes the session holds
    rounds: int
    fork_median_ms: float
    fork_max_ms: float
    fork_blocks_taken: int  # over all rounds
    fork_bytes_copied: int  # over all rounds
    parent_unchanged: bool
    copy_rounds: int
    copy_median_ms: float
    copy_bytes: int  # per copy
    speedup: float | None  # deep copy median / fork median


RECORD = ForkRecord


def run(quick: bool) -> ForkRecord:
    from kvpool.cache.spec import ModelCacheSpec
    from kvpool.cache.storage import LayerKV, host_dtype
    from kvpool.pool import BlockPool

    n_layers, num_tokens = (4, 1024 + 5) if quick else (30, 8192 + 5)
    rounds, copy_rounds = (20, 2) if quick else (200, 5)
    spec = ModelCacheSpec.uniform(n_layers, KV_HEADS, HEAD_DIM, dtype=DTYPE)
    per_session = -(-num_tokens // spec.block_tokens)
    pool = BlockPool(spec, num_blocks=2 * per_session + 2)
    rng = np.random.default_rng(0)
    tokens = tuple(int(t) for t in rng.integers(1, 50_000, num_tokens))
    kvs = []
    for layer in range(n_layers):
        shape = (KV_HEADS, num_tokens, HEAD_DIM)
        keys = rng.standard_normal(shape, dtype=np.float32).astype(host_dtype(DTYPE))
        values = rng.standard_normal(shape, dtype=np.float32).astype(host_dtype(DTYPE))
        kvs.append(LayerKV(layer, 0, keys, values))
    parent = pool.write_cache("parent", tokens, kvs)

    fork_s, taken = [], 0
    for _ in range(rounds):
        used = pool.num_used
        t0 = time.perf_counter()
        child = pool.fork(parent, "child")
        fork_s.append(time.perf_counter() - t0)
        taken += pool.num_used - used
        pool.release(child)
    pool.check_invariants()
    back = pool.read_layers(parent, range(n_layers), 0, num_tokens)
    unchanged = all(
        np.array_equal(a.keys, b.keys) and np.array_equal(a.values, b.values)
        for a, b in zip(back, kvs, strict=True)
    )

    copy_s = []
    for i in range(copy_rounds):
        t0 = time.perf_counter()
        rows = pool.read_layers(parent, range(n_layers), 0, num_tokens)
        copy = pool.write_cache(f"copy-{i}", tokens, rows, salt="deep-copy")
        copy_s.append(time.perf_counter() - t0)
        pool.release(copy)
    pool.release(parent)

    fork_ms = statistics.median(fork_s) * 1e3
    copy_ms = statistics.median(copy_s) * 1e3
    copied = taken * spec.bytes_per_block
    return ForkRecord(
        targets=(
            Target(
                f"fork of a {num_tokens}-token session (median)",
                f"< {TARGET_MS} ms",
                round(fork_ms, 4),
                fork_ms < TARGET_MS,
            ),
            Target("K/V bytes copied by a fork", "0", copied, copied == 0),
            Target("parent's K/V unchanged after the forks", "yes", str(unchanged), unchanged),
        ),
        geometry=f"{n_layers} layers x {KV_HEADS} KV heads x {HEAD_DIM}, {DTYPE}, "
        f"blocks of {spec.block_tokens}",
        num_tokens=num_tokens,
        num_blocks=per_session,
        kv_bytes=num_tokens * n_layers * KV_HEADS * HEAD_DIM * 2 * 2,
        rounds=rounds,
        fork_median_ms=round(fork_ms, 4),
        fork_max_ms=round(max(fork_s) * 1e3, 4),
        fork_blocks_taken=taken,
        fork_bytes_copied=copied,
        parent_unchanged=unchanged,
        copy_rounds=copy_rounds,
        copy_median_ms=round(copy_ms, 2),
        copy_bytes=per_session * spec.bytes_per_block,
        speedup=ratio(copy_ms, fork_ms, 0),
    )


def render_section(r: ForkRecord) -> list[str]:
    rows = [
        ("fork (shared by reference)", f"{r.fork_median_ms:.4f}", f"{r.fork_bytes_copied}"),
        ("deep copy (baseline)", f"{r.copy_median_ms:.2f}", f"{r.copy_bytes}"),
    ]
    return [
        f"One session of {r.num_tokens} tokens ({r.num_blocks} blocks, {r.geometry}, "
        f"{r.kv_bytes / 1e6:.1f} MB of K/V); {r.rounds} forks (worst "
        f"{r.fork_max_ms:.4f} ms), {r.copy_rounds} deep copies; fork is {r.speedup}x "
        f"faster; parent unchanged: {r.parent_unchanged}.",
        "",
        *table(("operation", "median ms", "K/V bytes copied"), rows),
    ]


SECTION = Section(RECORD, render_section)
