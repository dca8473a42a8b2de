"""Quant, part 3: what quantized blocks change in generation on a random-weight model, and
how sensitive that is (the record is :mod:`kvpool.benchmarks.quant`)."""

from __future__ import annotations

import dataclasses
import math
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from kvpool.benchmarks.measure import ratio
from kvpool.benchmarks.quant_gather import GROUP_SIZE
from kvpool.blocks import CompletedGeneration
from kvpool.cache.spec import ModelCacheSpec
from kvpool.cache.storage import LayerKV
from kvpool.cache.tables import CacheHandle
from kvpool.engine import BlockPoolBatchEngine
from kvpool.mlx.mlx_lm import kv_cache
from kvpool.models import RECIPES, build_model, load_model
from kvpool.pool import BlockPool

QUALITY_MODEL = "demo"  # llama, 4 layers, 2 KV heads x 64, float32, weights scaled x4
AGREEMENT_TARGET = 0.9  # 8-bit: turns whose greedy tokens equal the dense run's
RANDOM_WEIGHTS_NOTE = (
    "random-weight models (kvpool.models recipe, Linear and embedding weights scaled x4 so "
    "output depends on context), not trained ones: these are agreement and error figures, "
    "not perplexity"
)


@dataclass(frozen=True, slots=True)
class QualityShape:
    agents: int
    turns: int  # turn 0 prefills; turns 1.. resume from the pool's blocks
    first_tokens: int
    turn_tokens: int  # user tokens added each turn
    max_tokens: int


QUALITY_FULL = QualityShape(agents=6, turns=5, first_tokens=400, turn_tokens=60, max_tokens=16)
QUALITY_QUICK = QualityShape(agents=2, turns=2, first_tokens=200, turn_tokens=30, max_tokens=8)


@dataclass(slots=True)
class _Errors:
    """Sums for the relative RMS error of K and V and the logit figures, over resumes."""

    err_k: float = 0.0
    ref_k: float = 0.0
    err_v: float = 0.0
    ref_v: float = 0.0
    logit_max_abs: list[float] = dataclasses.field(default_factory=list)
    kl: list[float] = dataclasses.field(default_factory=list)
    first_token_equal: int = 0

    def result(self, turns_equal: int, resumed: int, first_diff: list[int]) -> FormatQuality:
        n = len(self.kl)
        return FormatQuality(
            turns_equal_to_dense=ratio(turns_equal, resumed, 3),
            num_turns_equal=turns_equal,
            mean_tokens_before_first_difference=round(statistics.fmean(first_diff), 2),
            relative_rms_error_k=round(math.sqrt(self.err_k / self.ref_k), 6),
            relative_rms_error_v=round(math.sqrt(self.err_v / self.ref_v), 6),
            first_logit_max_abs_diff=MeanMax(
                round(statistics.fmean(self.logit_max_abs), 5), round(max(self.logit_max_abs), 5)
            ),
            first_token_kl=MeanMax(round(statistics.fmean(self.kl), 7), round(max(self.kl), 7)),
            first_token_argmax_equal=ratio(self.first_token_equal, n, 3),
            num_resumes=n,
        )


@dataclass(frozen=True, slots=True)
class MeanMax:
    mean: float
    max: float


@dataclass(frozen=True, slots=True)
class FormatQuality:
    """One quantized format vs the dense run: greedy turn agreement, first-token logits
    and the K/V's relative RMS error, over the resumed turns."""

    turns_equal_to_dense: float | None
    num_turns_equal: int
    mean_tokens_before_first_difference: float
    relative_rms_error_k: float
    relative_rms_error_v: float
    first_logit_max_abs_diff: MeanMax
    first_token_kl: MeanMax
    first_token_argmax_equal: float | None
    num_resumes: int


@dataclass(frozen=True, slots=True)
class ScaleSensitivity:
    turns_equal_to_dense: dict[str, float | None]  # by perturbation
    distinct_dense_outputs: int


@dataclass(frozen=True, slots=True)
class Sensitivity:
    model: str
    resume_points: int
    tokens: int
    by_weight_scale: dict[str, ScaleSensitivity]
    note: str


@dataclass(frozen=True, slots=True)
class Quality:
    model: str
    agents: int
    turns: int
    resumed_turns: int
    max_tokens: int
    by_format: dict[str, FormatQuality]
    note: str
    sensitivity: Sensitivity | None = None


def _next_logits(model: Any, kvs: list[LayerKV], offset: int, new: list[int]) -> mx.array:
    """float32 logits of the token after ``new``, fed on a cache of ``kvs``."""
    caches = [kv_cache(mx.array(kv.keys)[None], mx.array(kv.values)[None], offset) for kv in kvs]
    logits: mx.array = model(mx.array([new]), cache=caches)[0, -1]
    return logits.astype(mx.float32)


def _scalar(array: mx.array) -> float:
    value = array.item()
    assert isinstance(value, float)
    return value


def _compare_resume(
    model: Any,
    dense_pool: BlockPool,
    handle: CacheHandle,
    scratch: BlockPool,
    new: list[int],
    errors: _Errors,
) -> None:
    """One resume point: the dense blocks vs the same K/V written into a quantized pool and
    read back (the pool's own quantize / dequantize); logits of the first new token."""
    n = handle.total_tokens
    layers = list(range(dense_pool.spec.n_layers))
    dense_kvs = dense_pool.read_layers(handle, layers, 0, n)
    qhandle = scratch.write_cache("scratch", handle.token_ids, dense_kvs)
    q_kvs = scratch.read_layers(qhandle, layers, 0, n)
    for d, q in zip(dense_kvs, q_kvs, strict=True):
        dk, dv = d.keys.astype(np.float64), d.values.astype(np.float64)
        errors.err_k += float(((q.keys - dk) ** 2).sum())
        errors.ref_k += float((dk**2).sum())
        errors.err_v += float(((q.values - dv) ** 2).sum())
        errors.ref_v += float((dv**2).sum())
    ref = _next_logits(model, dense_kvs, n, new)
    got = _next_logits(model, q_kvs, n, new)
    scratch.release(qhandle)
    log_p, log_q = ref - mx.logsumexp(ref), got - mx.logsumexp(got)
    kl = mx.sum(mx.exp(log_p) * (log_p - log_q))
    errors.logit_max_abs.append(_scalar(mx.max(mx.abs(ref - got))))
    errors.kl.append(max(_scalar(kl), 0.0))
    errors.first_token_equal += int(mx.argmax(ref).item() == mx.argmax(got).item())


def measure_quality(quick: bool, model_ref: str | None = None) -> Quality:
    """Agents x turns on a dense pool and on 8-bit and 4-bit pools, same prompts (each
    turn's prompt is the dense run's context plus new user tokens); ``model_ref``: any model
    reference (default: ``QUALITY_MODEL``)."""
    shape = QUALITY_QUICK if quick else QUALITY_FULL
    model_name = model_ref or QUALITY_MODEL
    model, tokenizer = load_model(model_name)
    dense_spec = ModelCacheSpec.from_model(model)
    fmts = {"dense": None, "q8": 8, "q4": 4}
    engines = {}
    for name, bits in fmts.items():
        spec = dense_spec.with_format(bits, GROUP_SIZE)
        pool = BlockPool(spec, num_blocks=shape.agents * 8)
        engines[name] = BlockPoolBatchEngine(model, tokenizer, pool, spec)
    scratch = {n: BlockPool(dense_spec.with_format(b, GROUP_SIZE), num_blocks=8)
               for n, b in fmts.items() if b}  # fmt: skip
    eos = set(tokenizer.eos_token_ids)
    rng = np.random.default_rng(7)

    def user(n: int) -> list[int]:
        ids = [int(t) for t in rng.integers(3, 500, 2 * n) if int(t) not in eos]
        return ids[:n]

    agents = [f"agent-{i}" for i in range(shape.agents)]
    contexts = {a: user(shape.first_tokens) for a in agents}
    handles: dict[str, dict[str, CacheHandle | None]] = {n: dict.fromkeys(agents) for n in fmts}
    equal = {n: 0 for n in fmts if n != "dense"}
    first_diff: dict[str, list[int]] = {n: [] for n in equal}
    errors = {n: _Errors() for n in equal}
    resumed = 0
    for turn in range(shape.turns):
        outs: dict[str, dict[str, CompletedGeneration]] = {}
        if turn > 0:
            for a in agents:
                held = handles["dense"][a]
                assert held is not None
                new = contexts[a][held.total_tokens :]
                for n in equal:
                    _compare_resume(model, engines["dense"].pool, held, scratch[n], new, errors[n])
        for name, engine in engines.items():
            for a in agents:
                engine.submit(a, contexts[a], handles[name][a], shape.max_tokens)
            done = {c.agent_id: c for c in engine.drain()}
            for a, c in done.items():
                if c.error is not None:
                    raise c.error
                handles[name][a] = c.blocks
            outs[name] = done
        for a in agents:
            blocks = outs["dense"][a].blocks
            assert blocks is not None
            if turn > 0:
                for n in equal:
                    want, got = outs["dense"][a].token_ids, outs[n][a].token_ids
                    equal[n] += int(want == got)
                    first_diff[n].append(
                        next(
                            (i for i, (x, y) in enumerate(zip(want, got, strict=False)) if x != y),
                            len(want),
                        )
                    )
            contexts[a] = [*blocks.token_ids, *user(shape.turn_tokens)]
        if turn > 0:
            resumed += len(agents)
    for engine in engines.values():
        engine.close()
    by_format = {n: errors[n].result(equal[n], resumed, first_diff[n]) for n in equal}
    return Quality(
        model=model_name,
        agents=shape.agents,
        turns=shape.turns,
        resumed_turns=resumed,
        max_tokens=shape.max_tokens,
        by_format=by_format,
        note=RANDOM_WEIGHTS_NOTE,
    )


# --------------------------------------------------------------------------- sensitivity

# Why 8-bit turns disagree: the same resume points decoded greedily from K/V perturbed in
# ways nobody calls lossy (float16, bfloat16 rounding) and by the pool's quantization, on the
# demo recipe with its weights scaled x2, x3 and x4 (x1 repeats one token whatever the
# context). How often a perturbation flips a turn measures the model's chaos as much as the
# perturbation's size.
SENSITIVITY_SCALES = (2.0, 3.0, 4.0)
PERTURBATIONS = ("float16", "bfloat16", "q8", "q4")


def _perturb(x: mx.array, how: str) -> mx.array:
    if how in ("float16", "bfloat16"):
        return x.astype(getattr(mx, how)).astype(x.dtype)
    bits = int(how[1:])
    return mx.dequantize(*mx.quantize(x, GROUP_SIZE, bits), group_size=GROUP_SIZE, bits=bits)


def _greedy(model: Any, caches: list[Any], new: list[int], n: int) -> list[int]:
    out: list[int] = []
    y = mx.array([new])
    for _ in range(n):
        token = mx.argmax(model(y, cache=caches)[0, -1]).item()
        assert isinstance(token, int)
        out.append(token)
        y = mx.array([[token]])
    return out


def measure_sensitivity(quick: bool) -> Sensitivity:
    from mlx_lm.models.cache import make_prompt_cache

    scales, points, tokens = ((4.0,), 3, 8) if quick else (SENSITIVITY_SCALES, 24, 16)
    out: dict[str, ScaleSensitivity] = {}
    with tempfile.TemporaryDirectory(prefix="kvpool-bench-quant-") as tmp:
        for scale in scales:
            recipe = dataclasses.replace(
                RECIPES[QUALITY_MODEL], name=f"{QUALITY_MODEL}-x{scale:g}", weight_scale=scale
            )
            model, _ = load_model(build_model(recipe, Path(tmp) / recipe.name))
            rng = np.random.default_rng(7)
            equal = dict.fromkeys(PERTURBATIONS, 0)
            distinct: set[tuple[int, ...]] = set()
            for k in range(points):
                context = [int(t) for t in rng.integers(3, 500, 400 + 30 * (k % 5))]
                new = [int(t) for t in rng.integers(3, 500, 40)]
                cache = make_prompt_cache(model)
                model(mx.array([context]), cache=cache)
                mx.eval([c.state for c in cache])
                kv = [(c.keys[:, :, : c.offset], c.values[:, :, : c.offset]) for c in cache]
                n = len(context)
                want = _greedy(model, [kv_cache(k_, v_, n) for k_, v_ in kv], new, tokens)
                distinct.add(tuple(want))
                for how in PERTURBATIONS:
                    caches = [kv_cache(_perturb(k_, how), _perturb(v_, how), n) for k_, v_ in kv]
                    equal[how] += int(_greedy(model, caches, new, tokens) == want)
            out[f"x{scale:g}"] = ScaleSensitivity(
                turns_equal_to_dense={h: ratio(equal[h], points, 3) for h in PERTURBATIONS},
                distinct_dense_outputs=len(distinct),
            )
    return Sensitivity(
        model=f"{QUALITY_MODEL} recipe, weights scaled x{', x'.join(f'{s:g}' for s in scales)}",
        resume_points=points,
        tokens=tokens,
        by_weight_scale=out,
        note="greedy decode from each resume point with perturbed K/V vs unperturbed; "
        "float16 / bfloat16: the dense K/V rounded to that dtype and back",
    )


# --------------------------------------------------------------------------- run
