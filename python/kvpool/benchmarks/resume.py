"""Resume: time to first token of an agent's next turn, by where its cache is.

An agent has ``context`` tokens of history (512, 2K, 8K) and sends a next turn of 32 new
tokens (greedy, one generated token). Time to first token (TTFT) when its cache is

* ``pool``: in kvpool's block pool (gather the blocks, prefill the 32 new tokens);
* ``disk``: in a file written by ``kvpool.persist.save_cache``, dropped from the OS page
  cache first (``posix_fadvise(DONTNEED)``) so the load reads the disk: ``load_cache``
  (checks every tensor's sha256, writes the blocks) and then as ``pool``; ``load_ms`` is the
  load alone;
* ``lru``: in mlx-lm's ``LRUPromptCache``, resumed the way ``mlx_lm.server`` does
  (:mod:`kvpool.benchmarks.peer`: fetch the nearest cache, a deep copy, and prefill the new
  tokens into ``BatchGenerator`` with it), holding the same K/V as the pool;
* ``reprefill``: nowhere, so plain mlx-lm ``BatchGenerator`` prefills the whole context plus
  the new tokens;
* ``model_only``: the physical limit, the model's own forward over the new tokens on an
  mlx-lm cache already in place (no gather, no copy, no batching) up to the first token.

kvpool's and the LRU way's generated tokens are compared (same K/V, same new tokens); the
re-prefill computes its own K/V from the model, so its token is not comparable.

The agent's cache is made without a model (random K/V written into its blocks, see
``turns.fill_agent_cache``): resuming costs the same whatever the values, and no long
prefill is needed just to produce it. The variants are measured in rotation (pool, disk,
lru, re-prefill, then disk, lru, re-prefill, pool, ...); re-prefill gets fewer repetitions
at long contexts (one 8K prefill takes minutes on the 2-core CPU).

Target: from the pool >= 10x faster than re-prefill at 2K tokens (the LRU way's ratio is
reported beside it, not judged).
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvpool.benchmarks.measure import GIB, Summary, at_least, mlx_cache_limit, ratio
from kvpool.benchmarks.peer import LruPromptCacheWay, caches_from_pool
from kvpool.benchmarks.records import BenchRecord, Section
from kvpool.benchmarks.tables import mib, table, times
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
from kvpool.cache.spec import ModelCacheSpec
from kvpool.engine import BlockPoolBatchEngine
from kvpool.pool import BlockPool

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
        lru: LruPromptCacheWay,
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
        self.lru = lru
        self.persist, self.fingerprint = persist, fingerprint
        rng = random.Random(context)
        history = random_tokens(rng, context)
        self.prompt = history + random_tokens(rng, NEW_TOKENS)
        self.agent = fill_agent_cache(self.pool, "agent", history, seed=context)
        self.cache_bytes = cache_bytes(self.pool, context)
        self.history = history
        self.lru_held = caches_from_pool(self.pool, self.agent)
        self.model = model
        self.context = context
        self.floor_caches = caches_from_pool(self.pool, self.agent)
        self.floor_tokens: set[tuple[int, ...]] = set()
        self.model_only()  # grows the caches' buffers once (mlx-lm allocates in steps)
        self.floor_tokens.clear()
        self.pool_tokens: set[tuple[int, ...]] = set()
        self.lru_tokens: set[tuple[int, ...]] = set()
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
        self.pool_tokens.add(result.tokens[request.agent_id])
        return result.ttft_s[request.agent_id]

    def from_lru(self) -> float:
        # The prompt cache holds the history only, every repetition: the entry a previous
        # repetition stored (prompt + generated token) would make this one a full hit.
        # (``fetch_nearest_cache`` deep-copies what it returns: the held caches stay as is.)
        self.lru.forget()
        self.lru.hold(self.history, self.lru_held)
        result = self.lru.run_turn([TurnRequest("lru", self.prompt, 1)])
        assert result.cached_tokens["lru"] == len(self.history), "this indicates a bug"
        self.lru_tokens.add(result.tokens["lru"])
        return result.ttft_s["lru"]

    def model_only(self) -> float:
        """The model's forward over the new tokens on caches in place, to the first token;
        the caches are trimmed back after, so every call sees the same context."""
        import mlx.core as mx

        new = mx.array([list(self.prompt[self.context :])])
        t0 = time.perf_counter()
        logits = self.model(new, cache=self.floor_caches)
        token = mx.argmax(logits[:, -1, :], axis=-1)
        mx.eval(token)
        elapsed = time.perf_counter() - t0
        for cache in self.floor_caches:
            cache.trim(NEW_TOKENS)
        self.floor_tokens.add((int(token.tolist()[0]),))  # type: ignore[index, arg-type]
        return elapsed

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
    variants.append(("lru", ctx.from_lru, reps_fast))
    variants.append(("reprefill", ctx.reprefill, reps_prefill))
    variants.append(("model_only", ctx.model_only, reps_fast))
    samples: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for i in range(max(reps_fast, reps_prefill)):
        for k in range(len(variants)):
            name, fn, reps = variants[(i + k) % len(variants)]
            if len(samples[name]) < reps:
                samples[name].append(fn())
    return samples


def run(quick: bool, model_ref: str | None = None) -> ResumeRecord:
    """The record; ``model_ref``: any model reference (default: ``MODEL``, as in the
    committed record)."""
    name = model_ref or MODEL
    contexts = QUICK_CONTEXTS if quick else CONTEXTS
    model, tokenizer = load_recipe(name)
    persist, pending = _persist()
    fingerprint = persist.model_fingerprint(model) if persist is not None else None
    plain = plain_generator(model, tokenizer)
    rows = []
    with mlx_cache_limit(CACHE_LIMIT), tempfile.TemporaryDirectory(prefix="kvpool-bench-") as d:
        directory = Path(d)
        args = (model, tokenizer, plain)
        lru = LruPromptCacheWay(model, tokenizer)
        warm = _Context(*args, lru, persist, fingerprint, directory, WARMUP_CONTEXT)
        _measure(warm, 1, 1)
        warm.close()
        lru.close()
        for context in contexts:
            reps_fast, reps_prefill = QUICK_REPS if quick else REPS[context]
            # a prompt cache of its own per context: it holds this agent only
            lru = LruPromptCacheWay(model, tokenizer)
            ctx = _Context(*args, lru, persist, fingerprint, directory, context)
            try:
                samples = _measure(ctx, reps_fast, reps_prefill)
            finally:
                ctx.close()
                lru.close()
            rows.append(_row(ctx, context, samples))
            del ctx, lru
    plain.close()
    at_target = next((r for r in rows if r.context_tokens == TARGET_CONTEXT), None)
    speedup = at_target.speedup_pool_vs_reprefill if at_target is not None else None
    return ResumeRecord(
        config=ResumeConfig(
            model=name,
            contexts=contexts,
            new_tokens=NEW_TOKENS,
            max_tokens=1,
            cache_limit_bytes=CACHE_LIMIT,
            cache="random K/V written into the pool (turns.fill_agent_cache)",
        ),
        disk="persist.save_cache / load_cache" if pending is None else pending,
        results=tuple(rows),
        targets=(
            at_least(
                f"TTFT from the pool vs re-prefill at {TARGET_CONTEXT} tokens",
                TARGET_SPEEDUP,
                speedup,
            ),
        ),
    )


@dataclass(frozen=True, slots=True)
class DiskResult:
    """Resuming from a file: TTFT (load included), the load alone, the save."""

    ttft: Summary
    load: Summary
    page_cache_dropped: bool
    save_ms: float | None
    file_bytes: int | None
    speedup_vs_reprefill: float | None
    pool_speedup_vs_disk: float | None


@dataclass(frozen=True, slots=True)
class ContextResult:
    """One context length. ``speedup_*``: the baseline's TTFT p50 / kvpool's from the pool;
    ``pool_vs_lru``: kvpool's TTFT / the LRU way's (< 1: kvpool is faster)."""

    context_tokens: int
    cache_bytes: int
    pool: Summary
    lru: Summary
    reprefill: Summary
    speedup_pool_vs_reprefill: float | None
    speedup_pool_vs_lru: float | None
    pool_vs_lru: float | None
    lru_tokens_equal: bool  # the LRU way generated kvpool's token in every repetition
    disk: DiskResult | None
    model_only: Summary | None = None  # the physical limit (absent in older records)
    model_only_tokens_equal: bool | None = None


@dataclass(frozen=True, slots=True)
class ResumeConfig:
    model: str
    contexts: tuple[int, ...]
    new_tokens: int
    max_tokens: int
    cache_limit_bytes: int
    cache: str


@dataclass(frozen=True, slots=True)
class ResumeRecord(BenchRecord):
    config: ResumeConfig
    disk: str  # how the disk variant ran, or why it did not
    results: tuple[ContextResult, ...]


RECORD = ResumeRecord


def _row(ctx: _Context, context: int, samples: dict[str, list[float]]) -> ContextResult:
    pool = Summary.of(samples["pool"])
    lru = Summary.of(samples["lru"])
    reprefill = Summary.of(samples["reprefill"])
    disk = None
    if "disk" in samples:
        on_disk = Summary.of(samples["disk"])
        disk = DiskResult(
            ttft=on_disk,
            load=Summary.of(ctx.load_s),
            page_cache_dropped=ctx.page_cache_dropped,
            save_ms=None if ctx.save_s is None else round(ctx.save_s * 1e3, 1),
            file_bytes=ctx.file_bytes,
            speedup_vs_reprefill=ratio(reprefill.p50_ms, on_disk.p50_ms, 1),
            pool_speedup_vs_disk=ratio(on_disk.p50_ms, pool.p50_ms, 1),
        )
    return ContextResult(
        context_tokens=context,
        cache_bytes=ctx.cache_bytes,
        pool=pool,
        lru=lru,
        reprefill=reprefill,
        speedup_pool_vs_reprefill=ratio(reprefill.p50_ms, pool.p50_ms, 1),
        speedup_pool_vs_lru=ratio(lru.p50_ms, pool.p50_ms, 2),
        pool_vs_lru=ratio(pool.p50_ms, lru.p50_ms, 2),
        lru_tokens_equal=len(ctx.pool_tokens) == 1 and ctx.lru_tokens == ctx.pool_tokens,
        disk=disk,
        model_only=Summary.of(samples["model_only"]),
        model_only_tokens_equal=ctx.floor_tokens == ctx.pool_tokens,
    )


# --------------------------------------------------------------------------- report


def render_section(r: ResumeRecord) -> list[str]:
    rows = []
    for x in r.results:
        d = x.disk
        rows.append(
            (
                x.context_tokens,
                mib(x.cache_bytes),
                f"{x.pool.p50_ms:.1f} ({x.pool.n})",
                f"{x.lru.p50_ms:.1f} ({x.lru.n})",
                "-" if d is None else f"{d.ttft.p50_ms:.1f} ({d.ttft.n})",
                "-" if d is None else f"{d.load.p50_ms:.1f}",
                f"{x.reprefill.p50_ms:.0f} ({x.reprefill.n})",
                "-" if x.model_only is None else f"{x.model_only.p50_ms:.1f}",
                times(x.pool_vs_lru),
                times(x.speedup_pool_vs_reprefill),
                "-" if d is None else times(d.speedup_vs_reprefill),
                x.lru_tokens_equal,
            )
        )
    c = r.config
    return [
        f"Model {c.model}; next turn = {c.new_tokens} new tokens, TTFT p50 in ms (samples). "
        "LRU: mlx-lm's LRUPromptCache as mlx_lm.server resumes from it. Disk: page cache "
        f"dropped before each load ({r.disk}); load = `load_cache` alone. Model only: the "
        "model's forward over the new tokens on a cache in place (the physical limit).",
        "",
        *table(
            ("context", "cache", "pool ms", "LRU ms", "disk ms", "load ms", "re-prefill ms",
             "model only ms", "pool / LRU", "re-prefill / pool", "re-prefill / disk",
             "LRU tokens = kvpool"),
            rows,
        ),
    ]  # fmt: skip


def plot(figure: Any, r: ResumeRecord) -> None:
    ax = figure.add_subplot(1, 1, 1)
    xs = [x.context_tokens for x in r.results]
    ax.plot(xs, [x.pool.p50_ms for x in r.results], marker="o", label="kvpool, from the pool")
    disks = [x.disk for x in r.results]
    if all(d is not None for d in disks):
        ax.plot(xs, [d.ttft.p50_ms for d in disks if d], marker="o", label="kvpool, from disk")
    ax.plot(xs, [x.lru.p50_ms for x in r.results], marker="o", label="mlx-lm LRUPromptCache")
    ax.plot(xs, [x.reprefill.p50_ms for x in r.results], marker="o", label="re-prefill (mlx-lm)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context tokens")
    ax.set_ylabel("time to first token, ms (median)")
    ax.set_title(f"resume: TTFT of the next turn ({r.config.model})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


SECTION = Section(RECORD, render_section, plot)
