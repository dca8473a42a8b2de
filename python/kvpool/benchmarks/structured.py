"""Structured outputs: decode tokens/s with a JSON schema enforced vs free text, same prompts.

Two engines on the same model and the same chat prompts (``BATCH_SIZES`` agents each): one
decodes under a JSON schema (llguidance's matcher per sequence, applied as a logits
processor, :mod:`kvpool.mlx.constrain`), the other decodes freely. Their steps alternate
(ABBA) so both see the same machine load; only steady decode steps count (every sequence
generated a token, none finished, no prefill), as in ``engine_overhead``. Also recorded:
the one-time cost of llguidance's tokenizer, the per-request cost of compiling the schema,
and whether every finished constrained reply parses and validates.

Target: constrained decode >= 0.9x the free decode rate. ``--quick``: the random-weight
``demo`` model, batch 1, a few steps (a smoke run).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from kvpool.benchmarks.engine_overhead import _is_decode, _Step, _TimedGenerator
from kvpool.benchmarks.measure import GIB, Summary, at_least, median, mlx_cache_limit, percentile
from kvpool.benchmarks.records import BenchRecord, Section
from kvpool.benchmarks.tables import table
from kvpool.benchmarks.turns import load_recipe
from kvpool.cache.spec import ModelCacheSpec
from kvpool.engine import BlockPoolBatchEngine
from kvpool.grammar import GrammarCompiler, json_schema_grammar
from kvpool.pool import BlockPool

MODEL, QUICK_MODEL = "smollm2-135m-instruct", "demo"
BATCH_SIZES, QUICK_BATCH_SIZES = (1, 8), (1,)
MAX_TOKENS, QUICK_MAX_TOKENS = 256, 10
CACHE_LIMIT = 2 * GIB
TARGET_RATIO = 0.9
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "steps": {
            "type": "array",
            "items": {"type": "string", "maxLength": 60},
            "minItems": 6,
            "maxItems": 6,
        },
        "minutes": {"type": "integer"},
    },
    "required": ["title", "steps", "minutes"],
    "additionalProperties": False,
}
TOPICS = ("bake bread", "plant a tree", "fix a bike", "brew tea", "paint a room",
          "learn a song", "pack for a trip", "clean a kitchen")  # fmt: skip


def _prompts(tokenizer: Any, batch: int) -> list[list[int]]:
    out = []
    for i in range(batch):
        ask = f"List six steps to {TOPICS[i % len(TOPICS)]}, one sentence each, as JSON."
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": ask}], add_generation_prompt=True
        )
        out.append([int(t) for t in ids])
    return out


def _measure(
    model: Any, tokenizer: Any, compiler: GrammarCompiler, batch: int, max_tokens: int
) -> BatchResult:
    from kvpool.mlx.constrain import GrammarLogitsProcessor

    spec = ModelCacheSpec.from_model(model)
    prompts = _prompts(tokenizer, batch)
    longest = max(len(p) for p in prompts)
    timed: list[_TimedGenerator] = []

    def factory(model: Any, **kwargs: Any) -> _TimedGenerator:
        from kvpool.mlx.mlx_lm import pool_batch_generator

        timed.append(_TimedGenerator(pool_batch_generator(model, **kwargs)))
        return timed[-1]

    engines = []
    for _ in range(2):
        pool = BlockPool(spec, num_blocks=batch * spec.blocks_for(longest + max_tokens + 4))
        engines.append(
            BlockPoolBatchEngine(model, tokenizer, pool, spec, batch_gen_factory=factory)
        )
    constrained, free = engines
    grammar = json_schema_grammar(SCHEMA)
    compile_s = []
    for i, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        processor = GrammarLogitsProcessor(compiler.matcher(grammar))
        compile_s.append(time.perf_counter() - t0)
        constrained.submit(f"c{i}", prompt, max_tokens=max_tokens, logits_processors=[processor])
        free.submit(f"f{i}", prompt, max_tokens=max_tokens)
    steps: dict[int, list[_Step]] = {0: [], 1: []}
    texts: list[tuple[str, str]] = []

    def step(k: int) -> None:
        t0 = time.perf_counter()
        done = list(engines[k].step())
        wall = time.perf_counter() - t0
        inner = timed[k].last
        steps[k].append(
            _Step(wall, inner.inner_s, inner.num_generated, inner.num_prompt, len(done))
        )
        for c in done:
            if c.error is not None:
                raise c.error
            if k == 0:
                texts.append((c.text, c.finish_reason))

    try:
        i = 0
        while constrained.has_work or free.has_work:
            order = (0, 1) if i % 4 in (0, 3) else (1, 0)
            for k in order:
                if engines[k].has_work:
                    step(k)
            i += 1
    finally:
        for engine in engines:
            engine.close()
    con = [s for s in steps[0] if _is_decode(s, batch)]
    fre = [s for s in steps[1] if _is_decode(s, batch)]
    pairs = list(zip(con, fre, strict=False))
    pair_ratios = [f.wall_s / c.wall_s for c, f in pairs]
    finished = [text for text, reason in texts if reason == "stop"]
    return BatchResult(
        batch=batch,
        decode_steps=len(pairs),
        constrained_tok_s=round(batch / median([s.wall_s for s in con]), 2),
        free_tok_s=round(batch / median([s.wall_s for s in fre]), 2),
        constrained_step=Summary.of([s.wall_s for s in con]),
        free_step=Summary.of([s.wall_s for s in fre]),
        paired_ratio_p50=round(median(pair_ratios), 4),
        paired_ratio_p5_p95=(
            round(percentile(pair_ratios, 5), 4),
            round(percentile(pair_ratios, 95), 4),
        ),
        compile_ms_p50=round(median(compile_s) * 1e3, 3),
        replies_finished=len(finished),
        replies_valid=sum(_valid(text) for text in finished),
    )


def _valid(text: str) -> bool:
    """Parses and has the schema's shape (checked without a schema library)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    return (
        isinstance(value, dict)
        and set(value) == {"title", "steps", "minutes"}
        and isinstance(value["title"], str)
        and isinstance(value["minutes"], int)
        and isinstance(value["steps"], list)
        and len(value["title"]) <= 40
        and len(value["steps"]) == 6
        and all(isinstance(s, str) and len(s) <= 60 for s in value["steps"])
    )


def run(quick: bool, model_ref: str | None = None) -> StructuredRecord:
    """The record; ``model_ref``: any model reference (default: ``MODEL``; ``QUICK_MODEL``
    with ``quick``)."""
    name = model_ref or (QUICK_MODEL if quick else MODEL)
    sizes = QUICK_BATCH_SIZES if quick else BATCH_SIZES
    max_tokens = QUICK_MAX_TOKENS if quick else MAX_TOKENS
    model, tokenizer = load_recipe(name)
    vocab = int(getattr(model.args, "vocab_size", 0) or tokenizer.vocab_size)
    compiler = GrammarCompiler(tokenizer, vocab, tokenizer.eos_token_ids)
    t0 = time.perf_counter()
    compiler.ll_tokenizer()
    tokenizer_ms = (time.perf_counter() - t0) * 1e3
    with mlx_cache_limit(CACHE_LIMIT):
        _measure(model, tokenizer, compiler, 1, 4)  # warm-up: first calls
        results = tuple(_measure(model, tokenizer, compiler, b, max_tokens) for b in sizes)
    return StructuredRecord(
        targets=tuple(
            at_least(
                f"{name} batch {r.batch}: JSON-schema decode tok/s vs free text",
                TARGET_RATIO,
                r.paired_ratio_p50,
            )
            for r in results
        ),
        config=StructuredConfig(
            model=name, max_tokens=max_tokens, batch_sizes=sizes, schema=json.dumps(SCHEMA)
        ),
        tokenizer_build_ms=round(tokenizer_ms, 1),
        results=results,
    )


@dataclass(frozen=True, slots=True)
class BatchResult:
    """One batch size. ``paired_ratio_*``: free step time / constrained step time over the
    pairs of steady decode steps (1.0: the constraint costs nothing); ``compile_ms_p50``:
    one request's schema compiled into a matcher; ``replies_valid`` of
    ``replies_finished``: constrained replies that ended with EOS and validate."""

    batch: int
    decode_steps: int
    constrained_tok_s: float
    free_tok_s: float
    constrained_step: Summary
    free_step: Summary
    paired_ratio_p50: float
    paired_ratio_p5_p95: tuple[float, float]
    compile_ms_p50: float
    replies_finished: int
    replies_valid: int


@dataclass(frozen=True, slots=True)
class StructuredConfig:
    model: str
    max_tokens: int
    batch_sizes: tuple[int, ...]
    schema: str


@dataclass(frozen=True, slots=True)
class StructuredRecord(BenchRecord):
    config: StructuredConfig
    tokenizer_build_ms: float  # llguidance's tokenizer, once per server
    results: tuple[BatchResult, ...]


def render_section(r: StructuredRecord) -> list[str]:
    c = r.config
    return [
        f"{c.model}, up to {c.max_tokens} tokens per reply, JSON schema `{c.schema}`; "
        f"llguidance's tokenizer built once in {r.tokenizer_build_ms:.0f} ms.",
        "",
        *table(
            (
                "batch",
                "constrained tok/s",
                "free tok/s",
                "ratio p50 (p5-p95)",
                "compile",
                "valid replies",
            ),
            [
                (
                    x.batch,
                    x.constrained_tok_s,
                    x.free_tok_s,
                    f"{x.paired_ratio_p50}x ({x.paired_ratio_p5_p95[0]}-"
                    f"{x.paired_ratio_p5_p95[1]})",
                    f"{x.compile_ms_p50:.2f} ms",
                    f"{x.replies_valid}/{x.replies_finished}",
                )
                for x in r.results
            ],
        ),
    ]


RECORD = StructuredRecord
SECTION = Section(RECORD, render_section)
