"""How the benchmarks measure: interleaved timing, percentiles, ratios, memory readings.

The dev machine is shared and noisy, so a measurement and its baseline are timed in
alternation (round after round, each method once per round) and summarized by medians and
95th percentiles, never by one run or a mean.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvpool.benchmarks.records import Target

GIB = 1 << 30
MIB = 1 << 20


def interleave(
    fns: Sequence[Callable[[], object]], *, iters: int, warmup: int = 1
) -> list[list[float]]:
    """Seconds per call of each of ``fns``, called in turn ``warmup + iters`` times.

    Round ``i`` calls every function once (starting with function ``i % len(fns)``, so no
    method always runs right after another); only the last ``iters`` rounds are kept.
    """
    samples: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + iters):
        for k in range(len(fns)):
            j = (i + k) % len(fns)
            t0 = time.perf_counter()
            fns[j]()
            elapsed = time.perf_counter() - t0
            if i >= warmup:
                samples[j].append(elapsed)
    return samples


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear interpolation like numpy's default."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary_ms(samples_s: Sequence[float]) -> dict[str, float]:
    """``{"n", "p50_ms", "p95_ms", "min_ms", "max_ms"}`` of samples given in seconds."""
    ms = [s * 1e3 for s in samples_s]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 3),
        "p95_ms": round(percentile(ms, 95), 3),
        "min_ms": round(min(ms), 3),
        "max_ms": round(max(ms), 3),
    }


@dataclass(frozen=True, slots=True)
class Summary:
    """Samples summarized in milliseconds: count, median, 95th percentile, range."""

    n: int
    p50_ms: float
    p95_ms: float
    min_ms: float
    max_ms: float

    @classmethod
    def of(cls, samples_s: Sequence[float]) -> Summary:
        """The summary of samples given in seconds."""
        d = summary_ms(samples_s)
        return cls(int(d["n"]), d["p50_ms"], d["p95_ms"], d["min_ms"], d["max_ms"])


def median(samples: Sequence[float]) -> float:
    return float(statistics.median(samples))


def ratio(numerator: float, denominator: float, digits: int = 2) -> float | None:
    """``numerator / denominator`` rounded, or None when the denominator is 0."""
    return round(numerator / denominator, digits) if denominator else None


# --------------------------------------------------------------------------- memory


def rss_bytes() -> int | None:
    """This process's resident set size now, or None where it cannot be read."""
    try:
        fields = Path("/proc/self/statm").read_text().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


def mlx_memory() -> dict[str, int]:
    """MLX's allocator: active (in arrays), peak active since the last reset, and cached."""
    import mlx.core as mx

    return {
        "active": int(mx.get_active_memory()),
        "peak": int(mx.get_peak_memory()),
        "cache": int(mx.get_cache_memory()),
    }


@contextlib.contextmanager
def mlx_cache_limit(limit_bytes: int) -> Iterator[int]:
    """Set MLX's buffer-cache limit for the block (MLX's default is small: page faults
    would dominate timings); restores the previous limit and empties the cache after."""
    import mlx.core as mx

    previous = mx.set_cache_limit(limit_bytes)
    try:
        yield limit_bytes
    finally:
        mx.set_cache_limit(previous)
        mx.clear_cache()


def round_floats(data: Any, digits: int = 3) -> Any:
    """``data`` with every float rounded (records stay readable)."""
    if isinstance(data, float):
        return round(data, digits)
    if isinstance(data, dict):
        return {k: round_floats(v, digits) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [round_floats(v, digits) for v in data]
    return data


def target(name: str, goal: str, value: float | str | None, met: bool | None) -> dict[str, Any]:
    """One target of a dict record (the transitional records: see
    :mod:`kvpool.benchmarks.records` for typed ones): ``met`` None = not judged."""
    return {"name": name, "target": goal, "value": value, "met": met}


def at_most(name: str, limit: float, value: float | None) -> Target:
    """A typed target ``value <= limit`` (a ratio of times): not judged without a value."""
    return Target(name, f"<= {limit:g}x", value, None if value is None else value <= limit)


def at_least(name: str, limit: float, value: float | None) -> Target:
    """A typed target ``value >= limit`` (a speedup): not judged without a value."""
    return Target(name, f">= {limit:g}x", value, None if value is None else value >= limit)
