"""The benchmark registry: every ``kvpool bench`` benchmark by name.

A :class:`Benchmark` names its module; ``kvpool.benchmarks.<module>.run(quick)`` returns its
typed record (a :class:`~kvpool.benchmarks.records.BenchRecord`). A module is imported only
when it runs (MLX must not load before the BLAS is chosen). The runner and the report both
read this table; neither imports the other.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from kvpool.benchmarks.records import BenchRecord, to_json

RunFn = Callable[[bool], "BenchRecord | dict[str, Any]"]
ModelRunFn = Callable[[bool, "str | None"], "BenchRecord | dict[str, Any]"]


@dataclass(frozen=True, slots=True)
class Benchmark:
    """A registered benchmark: ``kvpool.benchmarks.<module>.run(quick)``."""

    name: str
    module: str
    summary: str
    uses_mlx: bool = True
    takes_model: bool = False  # run(quick, model): ``kvpool bench --model`` applies

    # A benchmark that runs a model takes one: ``run(quick, model)`` with ``model=None``
    # keeps its own fixed model (the one its committed record ran), and the record's config
    # names the model that ran.

    def run(self, quick: bool, model: str | None = None) -> dict[str, Any]:
        """The benchmark's record as JSON-ready values; ``model`` only if it takes one."""
        module = importlib.import_module(f"kvpool.benchmarks.{self.module}")
        if model is not None and not self.takes_model:
            raise ValueError(f"benchmark {self.name!r} does not take a model: this is a bug")
        if self.takes_model:
            result = cast(ModelRunFn, module.run)(quick, model)
        else:
            result = cast(RunFn, module.run)(quick)
        if isinstance(result, BenchRecord):
            return cast(dict[str, Any], to_json(result))
        return result  # transitional: a benchmark still returning a dict record


REGISTRY: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "reconstruct",
            "reconstruct",
            "gather of pool blocks into contiguous caches vs memcpy and mx.concatenate",
        ),
        Benchmark(
            "engine_overhead",
            "engine_overhead",
            "decode tokens/s, BlockPoolBatchEngine vs plain mlx-lm BatchGenerator",
            takes_model=True,
        ),
        Benchmark(
            "mixed_prefill",
            "mixed_prefill",
            "a long new prompt with short resumes in one step: resumes' TTFT, prefill waves on/off",
            takes_model=True,
        ),
        Benchmark(
            "resume",
            "resume",
            "time to first token of a next turn: cache in the pool, on disk, in mlx-lm's LRU "
            "prompt cache, re-prefilled",
            takes_model=True,
        ),
        Benchmark(
            "workload",
            "workload",
            "N agents x T turns end to end, kvpool vs mlx-lm's LRU prompt cache vs re-prefill",
            takes_model=True,
        ),
        Benchmark(
            "multiround",
            "multiround",
            "multi-round QA (users share a system prompt, arrive staggered): kvpool vs LRU",
            takes_model=True,
        ),
        Benchmark(
            "prefix",
            "prefix",
            "agents sharing a system prompt: blocks held, new-agent TTFT, prefill once, windows",
            takes_model=True,
        ),
        Benchmark(
            "memory",
            "memory",
            "pool bytes, RSS and MLX memory over 100 turns; extra memory of one resume",
            takes_model=True,
        ),
        Benchmark(
            "persist",
            "persist",
            "save and load of a 4K-token agent (32 layers x 8 KV heads x 128) vs raw file I/O",
        ),
        Benchmark(
            "fork",
            "fork",
            "fork of an 8K-token session: time and K/V bytes copied, vs a deep copy",
        ),
        Benchmark(
            "bookkeeping",
            "bookkeeping",
            "block allocator ns per block, from Python and from C++",
            uses_mlx=False,
        ),
        Benchmark(
            "blas",
            "blas",
            "MLX's bundled reference BLAS vs OpenBLAS (matmul, prefill, decode)",
            takes_model=True,
        ),
        Benchmark(
            "serve",
            "serve",
            "kvpool serve vs mlx_lm.server: multi-session multi-turn chat over HTTP",
            takes_model=True,
        ),
        Benchmark(
            "responses",
            "responses",
            "a /v1/responses chain: tokens prefilled per turn, TTFT vs full history to mlx_lm",
            takes_model=True,
        ),
        Benchmark(
            "quant",
            "quant",
            "quantized blocks: gather, capacity, save/load and quality per format",
            takes_model=True,
        ),
        Benchmark(
            "quality",
            "quality",
            "quantized blocks on a trained model: perplexity, next-token KL per format",
            takes_model=True,
        ),
        Benchmark(
            "redis",
            "redis_tier",
            "a session resumed on another engine from Redis vs prefill; bytes of a shared prompt",
            takes_model=True,
        ),
        Benchmark(
            "structured",
            "structured",
            "decode tokens/s under a JSON schema (llguidance) vs free text, same prompts",
            takes_model=True,
        ),
        Benchmark(
            "hybrid",
            "hybrid",
            "a Qwen3-Next-shaped hybrid: bytes per agent, resume vs re-prefill, state snapshots",
            takes_model=True,
        ),
    )
}
