"""MLX on the CPU with its bundled reference BLAS vs OpenBLAS through kvpool.blas.

Each measurement runs in three fresh interpreters in the same invocation (the BLAS is chosen
once per process, before mlx.core loads): MLX as it comes ("reference"), after
``kvpool.blas.use_fast_cpu_blas()`` with its default of one OpenBLAS thread ("openblas"), and
with one thread per core (``OPENBLAS_NUM_THREADS``, "openblas_all_cores"). Measured:

- a float32 1024x1024 @ 1024x1024 matmul (median seconds);
- prefill and decode tokens/s of the ``smollm2-135m`` recipe (SmolLM2-135M's geometry with
  random weights, float32, batch 1): prefill as mlx-lm does it (the prompt through the model,
  evaluating the KV cache only), decode as greedy steps of one token each.

Usage: ``kvpool bench blas [--quick]`` (or ``python bench/bench_blas.py [--quick]``). The
workers are ``python -m kvpool.benchmarks.blas --worker ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from kvpool.benchmarks.records import BenchRecord, Section, Target
from kvpool.benchmarks.tables import table, times

MODEL = "smollm2-135m"
MATMUL_SIZE = 1024

# variant -> (use_fast_cpu_blas() first, OPENBLAS_NUM_THREADS or None for OpenBLAS's default)
VARIANTS: dict[str, tuple[bool, str | None]] = {
    "reference": (False, None),
    "openblas": (True, None),  # kvpool's default: 1 thread
    "openblas_all_cores": (True, str(os.cpu_count() or 1)),
}
# measured value -> lower is better
METRICS = {"matmul_1024_f32_s": True, "prefill_tok_s": False, "decode_tok_s": False}


@dataclass(frozen=True, slots=True)
class BlasRecord(BenchRecord):
    """Each metric maps a variant to its value, and ``speedup_<variant>`` to that OpenBLAS
    variant's speedup over the reference BLAS (> 1 is faster)."""

    model: str
    cpu_count: int | None
    matmul_repeats: int
    prompt_tokens: int
    decode_tokens: int
    blas: dict[str, str]  # variant -> the BLAS it ran with
    matmul_1024_f32_s: dict[str, float]
    prefill_tok_s: dict[str, float]
    decode_tok_s: dict[str, float]


RECORD = BlasRecord


def run(quick: bool, model_ref: str | None = None) -> BlasRecord:
    """Every measurement under each variant, and each OpenBLAS variant's speedup over the
    reference BLAS (>1 is faster). The parent's own BLAS does not matter: each variant
    runs in its own interpreter. ``model_ref``: any model reference (default: ``MODEL``)."""
    name = model_ref or MODEL
    model_dir = _model_dir(name)  # built or fetched once here, not timed in the workers
    sizes = {
        "matmul_repeats": 3 if quick else 10,
        "prompt_tokens": 128 if quick else 512,
        "decode_tokens": 16 if quick else 64,
    }
    variant_to_result = {
        variant: _worker(fast_blas, threads, sizes, model_dir)
        for variant, (fast_blas, threads) in VARIANTS.items()
    }
    reference = variant_to_result["reference"]
    metrics: dict[str, dict[str, float]] = {}
    for key, lower_is_better in METRICS.items():
        values = {variant: result[key] for variant, result in variant_to_result.items()}
        speedups = {
            f"speedup_{variant}": (
                reference[key] / value if lower_is_better else value / reference[key]
            )
            for variant, value in values.items()
            if variant != "reference"
        }
        metrics[key] = values | speedups
    openblas = metrics["decode_tok_s"]["speedup_openblas"]
    return BlasRecord(
        model=name,
        cpu_count=os.cpu_count(),
        **sizes,
        blas={
            variant: f"{result['blas']}, {result['openblas_threads']} OpenBLAS threads"
            if result["openblas_threads"] is not None
            else result["blas"]
            for variant, result in variant_to_result.items()
        },
        matmul_1024_f32_s=metrics["matmul_1024_f32_s"],
        prefill_tok_s=metrics["prefill_tok_s"],
        decode_tok_s=metrics["decode_tok_s"],
        targets=(
            Target(
                "decode with OpenBLAS (kvpool's default) vs reference BLAS",
                "not slower (>= 1x)",
                round(openblas, 2),
                openblas >= 1.0,
            ),
        ),
    )


def render_section(r: BlasRecord) -> list[str]:
    variants = list(r.blas)
    rows = []
    for key in METRICS:
        values: dict[str, float] = getattr(r, key)
        rows.append(
            (
                key,
                *(values[v] for v in variants),
                *(times(values.get(f"speedup_{v}")) for v in variants[1:]),
            )
        )
    return [
        f"Model {r.model}, prompt {r.prompt_tokens} tokens, {r.decode_tokens} decode "
        "steps; each variant in its own interpreter:",
        "",
        *table(("metric", *variants, *(f"speedup {v}" for v in variants[1:])), rows),
        "",
        *(f"- {v}: {r.blas[v]}" for v in variants),
    ]


SECTION = Section(RECORD, render_section)


def _model_dir(name: str) -> str:
    """The directory the workers load: a recipe is built (no MLX needed), anything else is
    located (fetched or converted if it must be) by kvpool's loader."""
    from kvpool.models import RECIPES, ensure_model, locate_and_load

    if name in RECIPES:
        return str(ensure_model(name))
    path, _, _ = locate_and_load(name)
    return str(path)


def _worker(
    fast_blas: bool, threads: str | None, sizes: dict[str, int], model_dir: str
) -> dict[str, Any]:
    argv = [sys.executable, "-m", "kvpool.benchmarks.blas", "--worker", f"--model={model_dir}"]
    argv += [f"--{name.replace('_', '-')}={value}" for name, value in sizes.items()]
    if fast_blas:
        argv.append("--fast-blas")
    env = dict(os.environ)
    env.pop("KVPOOL_FAST_BLAS", None)
    env.pop("OPENBLAS_NUM_THREADS", None)
    if threads is not None:
        env["OPENBLAS_NUM_THREADS"] = threads
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {argv} failed ({proc.returncode}):\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


def _measure(
    *,
    fast_blas: bool,
    matmul_repeats: int,
    prompt_tokens: int,
    decode_tokens: int,
    model_dir: str = MODEL,
) -> dict[str, Any]:
    """In the worker process: choose the BLAS, then import mlx and measure."""
    from kvpool.blas import blas_info, use_fast_cpu_blas

    if fast_blas and not use_fast_cpu_blas():
        raise RuntimeError("use_fast_cpu_blas() refused (see the warning above)")

    import mlx.core as mx

    from kvpool.mlx.mlx_lm import prompt_cache
    from kvpool.models import load_model

    a = mx.random.normal((MATMUL_SIZE, MATMUL_SIZE), key=mx.random.key(0))
    b = mx.random.normal((MATMUL_SIZE, MATMUL_SIZE), key=mx.random.key(1))
    mx.eval(a, b, a @ b)  # warm up
    matmul_s = []
    for _ in range(matmul_repeats):
        start = time.perf_counter()
        mx.eval(a @ b)
        matmul_s.append(time.perf_counter() - start)

    model, _ = load_model(model_dir)
    vocab_size = model.args.vocab_size
    prompt = mx.random.randint(0, vocab_size, (1, prompt_tokens), key=mx.random.key(2))
    _prefill(model, prompt_cache(model), prompt[:, :16])  # warm up

    cache = prompt_cache(model)
    start = time.perf_counter()
    logits = _prefill(model, cache, prompt)
    prefill_s = time.perf_counter() - start

    token = mx.argmax(logits[:, -1, :], axis=-1)
    start = time.perf_counter()
    for _ in range(decode_tokens):
        token = mx.argmax(model(token[:, None], cache=cache)[:, -1, :], axis=-1)
        mx.eval(token)
    decode_s = time.perf_counter() - start

    return {
        "blas": blas_info()["blas"],
        "openblas_threads": blas_info()["openblas_threads"],
        "matmul_1024_f32_s": statistics.median(matmul_s),
        "prefill_tok_s": prompt_tokens / prefill_s,
        "decode_tok_s": decode_tokens / decode_s,
    }


def _prefill(model: Any, cache: list[Any], prompt: Any) -> Any:
    """mlx-lm's prefill: all but the last token update the cache only (no lm_head); the last
    one gives the logits."""
    import mlx.core as mx

    model(prompt[:, :-1], cache=cache)
    mx.eval([c.state for c in cache])
    logits = model(prompt[:, -1:], cache=cache)
    mx.eval(logits)
    return logits


def main(argv: list[str] | None = None) -> None:
    """The worker's entry point (``python -m kvpool.benchmarks.blas --worker ...``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--worker", action="store_true", required=True, help=argparse.SUPPRESS)
    parser.add_argument("--fast-blas", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--matmul-repeats", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--prompt-tokens", type=int, default=512, help=argparse.SUPPRESS)
    parser.add_argument("--decode-tokens", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=MODEL, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    result = _measure(
        fast_blas=args.fast_blas,
        matmul_repeats=args.matmul_repeats,
        prompt_tokens=args.prompt_tokens,
        decode_tokens=args.decode_tokens,
        model_dir=args.model,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
