"""Resume: time to first token of an agent's next turn, by where its cache is.

An agent has ``context`` tokens of history (512, 2K, 8K) and sends a next turn of 32 new
tokens (greedy, one generated token). Time to first token (TTFT) when its cache is

* ``pool``: in kvpool's block pool (gather the blocks, prefill the 32 new tokens);
* ``disk``: in a file written by ``kvpool.persist.save_cache``, dropped from the OS page
  cache first (``posix_fadvise(DONTNEED)``) so the load reads the disk: ``load_cache``
  (checks every tensor's sha256, writes the blocks) and then as ``pool``; ``load_ms`` is the
  load alone;
* ``reprefill``: nowhere, so plain mlx-lm ``BatchGenerator`` prefills the whole context plus
  the new tokens (what a user without kvpool runs).

The agent's cache is made without a model (random K/V written into its blocks, see
``turns.fill_agent_cache``): resuming costs the same whatever the values, and no long
prefill is needed just to produce it. The three variants are measured in rotation (pool,
disk, re-prefill, then disk, re-prefill, pool, ...); re-prefill gets fewer repetitions at
long contexts (one 8K prefill takes minutes on the 2-core CPU).

Target: from the pool >= 10x faster than re-prefill at 2K tokens.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvpool.benchmarks.measure import GIB, mlx_cache_limit, ratio, summary_ms, target
from kvpool.benchmarks.turns import (
    TurnRequest,
    cache_bytes,
    fill_agent_cache,
    load_recipe,
    plain_generator,
    random_tokens,
    run_kvpool_turn,
    run_plain_turn,
)
from kvpool.engine import BlockPoolBatchEngine
from kvpool.pool import BlockPool
from kvpool.spec import ModelCacheSpec

MODEL = "llama-8x128"
CONTEXTS = (512, 2048, 8192)
QUICK_CONTEXTS = (512, 2048)
NEW_TOKENS = 32
# repetitions: (pool and disk, re-prefill) per context
REPS = {512: (7, 3), 2048: (5, 2), 8192: (3, 1)}
QUICK_REPS = (2, 1)
WARMUP_CONTEXT = 256
CACHE_LIMIT = 2 * GIB
TARGET_CONTEXT = 2048
TARGET_SPEEDUP = 10.0
PENDING = "pending (persist module)"
DISK_SALT = "resume-from-disk"


def _persist() -> tuple[Any, str | None]:
    """kvpool.persist if it offers save/load, else (None, why)."""
    try:
        from kvpool import persist
        from kvpool.persist import load_cache, model_fingerprint, save_cache  # noqa: F401
    except ImportError as exc:
        return None, f"{PENDING}: {exc}"
    return persist, None


def _drop_page_cache(path: Path) -> bool:
    """Ask the OS to forget ``path``'s cached pages; False where it cannot be asked."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


class _Context:
    """One context length: a pool holding the agent's cache, an engine, the file on disk."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        plain: Any,
        persist: Any,
        fingerprint: str | None,
        directory: Path,
        context: int,
    ) -> None:
        spec = ModelCacheSpec.from_model(model)
        blocks = spec.blocks_for(context + NEW_TOKENS + 1)
        # the agent's cache + a cache loaded from disk + the lease of the turn being resumed
        self.pool = BlockPool(spec, num_blocks=3 * blocks + 1)
        # Every repetition sends the same prompt: with prefix sharing the second one would
        # find the first one's blocks (a full hit) instead of prefilling the new tokens.
        self.engine = BlockPoolBatchEngine(model, tokenizer, self.pool, spec, prefix_sharing=False)
        self.plain = plain
        self.persist, self.fingerprint = persist, fingerprint
        rng = random.Random(context)
        history = random_tokens(rng, context)
        self.prompt = history + random_tokens(rng, NEW_TOKENS)
        self.agent = fill_agent_cache(self.pool, "agent", history, seed=context)
        self.cache_bytes = cache_bytes(self.pool, context)
        self.path = directory / f"agent-{context}.kvcache.safetensors"
        self.save_s: float | None = None
        self.file_bytes: int | None = None
        self.page_cache_dropped = False
        self.load_s: list[float] = []
        self._uid = 0
        if persist is not None:
            t0 = time.perf_counter()
            self.file_bytes = persist.save_cache(
                self.path, self.pool, self.agent, fingerprint=fingerprint
            )
            self.save_s = time.perf_counter() - t0

    def from_pool(self) -> float:
        self._uid += 1
        # Another agent id: the engine leaves the original cache alone (it releases only the
        # superseded cache of the same agent), so every repetition resumes the same blocks.
        request = TurnRequest(f"pool-{self._uid}", self.prompt, 1, self.agent)
        result = run_kvpool_turn(self.engine, [request])
        self._release(result.completions.values())
        return result.ttft_s[request.agent_id]

    def from_disk(self) -> float:
        self.page_cache_dropped = _drop_page_cache(self.path)
        t0 = time.perf_counter()
        # Under a salt of its own: else the load would share the agent's live blocks
        # instead of writing what it reads.
        loaded = self.persist.load_cache(
            self.path, self.pool, fingerprint=self.fingerprint, cache_salt=DISK_SALT
        )
        self.load_s.append(time.perf_counter() - t0)
        # Same agent id as the file's: finishing the turn releases the loaded cache.
        request = TurnRequest(loaded.agent_id, self.prompt, 1, loaded, cache_salt=DISK_SALT)
        result = run_kvpool_turn(self.engine, [request], t0=t0)
        self._release(result.completions.values())
        return result.ttft_s[request.agent_id]

    def reprefill(self) -> float:
        result = run_plain_turn(self.plain, [TurnRequest("plain", self.prompt, 1)])
        return result.ttft_s["plain"]

    def _release(self, completions: Any) -> None:
        for c in completions:
            if c.blocks is not None and self.pool.is_live(c.blocks):
                self.pool.release(c.blocks)

    def close(self) -> None:
        self.engine.close()
        self.path.unlink(missing_ok=True)


def _measure(ctx: _Context, reps_fast: int, reps_prefill: int) -> dict[str, list[float]]:
    """TTFT samples (seconds) per variant, measured in rotation."""
    variants: list[tuple[str, Callable[[], float], int]] = [("pool", ctx.from_pool, reps_fast)]
    if ctx.persist is not None:
        variants.append(("disk", ctx.from_disk, reps_fast))
    variants.append(("reprefill", ctx.reprefill, reps_prefill))
    samples: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for i in range(max(reps_fast, reps_prefill)):
        for k in range(len(variants)):
            name, fn, reps = variants[(i + k) % len(variants)]
            if len(samples[name]) < reps:
                samples[name].append(fn())
    return samples


def run(quick: bool) -> dict[str, Any]:
    contexts = QUICK_CONTEXTS if quick else CONTEXTS
    model, tokenizer = load_recipe(MODEL)
    persist, pending = _persist()
    fingerprint = persist.model_fingerprint(model) if persist is not None else None
    plain = plain_generator(model, tokenizer)
    rows = []
    with mlx_cache_limit(CACHE_LIMIT), tempfile.TemporaryDirectory(prefix="kvpool-bench-") as d:
        directory = Path(d)
        warm = _Context(model, tokenizer, plain, persist, fingerprint, directory, WARMUP_CONTEXT)
        _measure(warm, 1, 1)
        warm.close()
        for context in contexts:
            reps_fast, reps_prefill = QUICK_REPS if quick else REPS[context]
            ctx = _Context(model, tokenizer, plain, persist, fingerprint, directory, context)
            try:
                samples = _measure(ctx, reps_fast, reps_prefill)
            finally:
                ctx.close()
            rows.append(_row(ctx, context, samples))
            del ctx
    plain.close()
    at_target = next((r for r in rows if r["context_tokens"] == TARGET_CONTEXT), None)
    speedup = at_target["speedup_pool_vs_reprefill"] if at_target is not None else None
    return {
        "bench": "resume",
        "quick": quick,
        "config": {
            "model": MODEL,
            "contexts": list(contexts),
            "new_tokens": NEW_TOKENS,
            "max_tokens": 1,
            "cache_limit_bytes": CACHE_LIMIT,
            "cache": "random K/V written into the pool (turns.fill_agent_cache)",
        },
        "disk": "persist.save_cache / load_cache" if pending is None else pending,
        "results": rows,
        "targets": [
            target(
                f"TTFT from the pool vs re-prefill at {TARGET_CONTEXT} tokens",
                f">= {TARGET_SPEEDUP:g}x faster",
                speedup,
                None if speedup is None else speedup >= TARGET_SPEEDUP,
            )
        ],
    }


def _row(ctx: _Context, context: int, samples: dict[str, list[float]]) -> dict[str, Any]:
    pool = summary_ms(samples["pool"])
    reprefill = summary_ms(samples["reprefill"])
    row: dict[str, Any] = {
        "context_tokens": context,
        "cache_bytes": ctx.cache_bytes,
        "pool": pool,
        "reprefill": reprefill,
        "speedup_pool_vs_reprefill": ratio(reprefill["p50_ms"], pool["p50_ms"], 1),
    }
    if "disk" in samples:
        disk = summary_ms(samples["disk"])
        row["disk"] = disk
        row["disk_load"] = summary_ms(ctx.load_s)
        row["disk_page_cache_dropped"] = ctx.page_cache_dropped
        row["save_ms"] = None if ctx.save_s is None else round(ctx.save_s * 1e3, 1)
        row["file_bytes"] = ctx.file_bytes
        row["speedup_disk_vs_reprefill"] = ratio(reprefill["p50_ms"], disk["p50_ms"], 1)
        row["speedup_pool_vs_disk"] = ratio(disk["p50_ms"], pool["p50_ms"], 1)
    else:
        row["disk"] = PENDING
    return row
