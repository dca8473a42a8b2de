"""``kvpool bench quality``: what quantized blocks cost a trained model, in perplexity.

For each text (licenses that ship with Debian, else Python's own), the first ``context``
tokens are prefilled once by plain mlx-lm; their K/V is written into a pool of each block
format and read back (the pool's own quantize/dequantize), and the next ``continuation``
tokens are scored on that cache::

    text:    [ context[:-1] ......................... | context[-1] continuation[:-1] ]
             K/V -> pool (dense | q8 | q4) -> cache      fed; predicts continuation[0:]

Reported per format: perplexity of the continuation and its change vs the dense pool, the
mean next-token KL(dense || format) and how often the argmax equals the dense one.
"""

from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvpool.benchmarks.records import BenchRecord, Section, Target
from kvpool.benchmarks.tables import table
from kvpool.errors import InvalidRequestError

if TYPE_CHECKING:  # MLX is imported where the benchmark runs: the report renders without it
    import mlx.core as mx

    from kvpool.cache.storage import LayerKV

__all__ = ["RECORD", "SECTION", "QualityRecord", "run"]

# name -> (bits, group size); None bits: dense blocks of the model's dtype
FORMATS: dict[str, tuple[int | None, int]] = {
    "dense": (None, 64),
    "q8g64": (8, 64),
    "q8g32": (8, 32),
    "q4g64": (4, 64),
    "q4g32": (4, 32),
}
# Perplexity change vs dense, in percent, that each bit width must stay within.
TARGET_PCT = {8: 0.1, 4: 0.5}
LICENSES = Path("/usr/share/common-licenses")
TEXTS = (LICENSES / "GPL-3", LICENSES / "Apache-2.0")


@dataclass(frozen=True, slots=True)
class Shape:
    context: int
    continuation: int
    num_texts: int


FULL = Shape(context=1024, continuation=512, num_texts=2)
QUICK = Shape(context=128, continuation=32, num_texts=1)


@dataclass(frozen=True, slots=True)
class FormatScore:
    perplexity: float
    change_pct: float  # perplexity vs the dense pool's, in percent
    next_token_kl_mnat: float  # mean over the continuation of KL(dense || format), 1e-3 nats
    argmax_equal: float  # fraction of positions whose argmax is the dense one's


@dataclass(frozen=True, slots=True)
class TextScore:
    text: str
    context_tokens: int
    continuation_tokens: int
    by_format: dict[str, FormatScore]


@dataclass(frozen=True, slots=True)
class QualityRecord(BenchRecord):
    model: str
    random_weights: bool  # a kvpool recipe: perplexities say nothing about real text
    texts: tuple[TextScore, ...]


RECORD = QualityRecord


def texts(num_texts: int) -> list[Path]:
    """The first ``num_texts`` English texts found: Debian's licenses, then Python's."""
    found = [p for p in TEXTS if p.is_file()]
    python_license = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if python_license.is_file():
        found.append(python_license)
    if len(found) < num_texts:
        raise InvalidRequestError(
            f"need {num_texts} English texts, found {len(found)}: {[str(p) for p in found]}"
        )
    return found[:num_texts]


def _context_kvs(model: Any, context: list[int]) -> list[LayerKV]:
    """Each layer's K/V after a plain mlx-lm prefill of ``context``, on the host."""
    import mlx.core as mx
    import numpy as np

    from kvpool.cache.storage import LayerKV
    from kvpool.mlx.mlx_lm import prompt_cache

    caches = prompt_cache(model)
    model(mx.array([context]), cache=caches)
    kvs = []
    for layer, cache in enumerate(caches):
        keys, values, n = cache.state  # rows past the offset n are unused capacity
        assert n == len(context), "a prefill fills the cache to its length: this is a bug"
        kvs.append(
            LayerKV(
                layer=layer,
                start=0,
                keys=np.ascontiguousarray(np.array(keys[0, :, :n])),
                values=np.ascontiguousarray(np.array(values[0, :, :n])),
            )
        )
    return kvs


def _log_probs(model: Any, kvs: list[LayerKV], fed: list[int]) -> mx.array:
    import mlx.core as mx

    from kvpool.mlx.mlx_lm import kv_cache

    n = kvs[0].num_tokens
    caches = [kv_cache(mx.array(kv.keys)[None], mx.array(kv.values)[None], n) for kv in kvs]
    logits: mx.array = model(mx.array([fed]), cache=caches)[0].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _scalar(array: mx.array) -> float:
    value = array.item()
    assert isinstance(value, float), "a float32 reduction gives a float: this is a bug"
    return value


def score_text(model: Any, tokenizer: Any, path: Path, shape: Shape) -> TextScore:
    """One text through every format of FORMATS (see the module docstring)."""
    import mlx.core as mx

    from kvpool.cache.spec import ModelCacheSpec
    from kvpool.pool import BlockPool

    ids = [int(t) for t in tokenizer.encode(path.read_text(encoding="utf-8"))]
    if len(ids) < shape.context + shape.continuation:
        raise InvalidRequestError(
            f"{path} has {len(ids)} tokens; {shape.context + shape.continuation} are needed"
        )
    context = ids[: shape.context]
    continuation = ids[shape.context : shape.context + shape.continuation]
    dense_kvs = _context_kvs(model, context[:-1])
    spec = ModelCacheSpec.from_model(model)
    layers = list(range(spec.n_layers))
    targets = mx.array(continuation)
    positions = mx.arange(len(continuation))
    fed = [context[-1], *continuation[:-1]]
    log_probs: dict[str, mx.array] = {}
    for name, (bits, group) in FORMATS.items():
        fmt = spec.with_format(bits, group)
        pool = BlockPool(fmt, num_blocks=fmt.blocks_for(len(context)))
        handle = pool.write_cache("context", context[:-1], dense_kvs)
        back = pool.read_layers(handle, layers, 0, len(context) - 1)
        log_probs[name] = _log_probs(model, back, fed)
        pool.release(handle)
    dense = log_probs["dense"]
    dense_nll = _scalar(-mx.mean(dense[positions, targets]))
    scores = {}
    for name, lp in log_probs.items():
        nll = _scalar(-mx.mean(lp[positions, targets]))
        kl = mx.mean(mx.sum(mx.exp(dense) * (dense - lp), axis=-1))
        same = mx.mean(mx.argmax(lp, axis=-1) == mx.argmax(dense, axis=-1))
        scores[name] = FormatScore(
            perplexity=round(math.exp(nll), 4),
            change_pct=round((math.exp(nll - dense_nll) - 1) * 100, 4),
            next_token_kl_mnat=round(max(_scalar(kl), 0.0) * 1e3, 4),
            argmax_equal=round(_scalar(same), 4),
        )
    return TextScore(path.name, shape.context, shape.continuation, scores)


def run(quick: bool, model: str | None = None) -> QualityRecord:
    """Score the trained default model (or ``model``) on FULL or QUICK."""
    from kvpool.models import MANIFEST_NAME, locate_and_load
    from kvpool.pretrained import DEFAULT_MODEL

    name = model or DEFAULT_MODEL
    path, loaded, tokenizer = locate_and_load(name)
    shape = QUICK if quick else FULL
    scores = tuple(score_text(loaded, tokenizer, p, shape) for p in texts(shape.num_texts))
    targets = []
    for fmt, (bits, _) in FORMATS.items():
        if bits is None:
            continue
        worst = max(s.by_format[fmt].change_pct for s in scores)
        targets.append(
            Target(
                f"{fmt}: perplexity vs the dense pool (worst text)",
                f"<= +{TARGET_PCT[bits]}%",
                worst,
                worst <= TARGET_PCT[bits],
            )
        )
    return QualityRecord(
        targets=tuple(targets),
        model=name,
        random_weights=(path / MANIFEST_NAME).is_file(),
        texts=scores,
    )


def render_section(r: QualityRecord) -> list[str]:
    lines = [
        f"Model {r.model}{' (RANDOM weights: not meaningful)' if r.random_weights else ''}: "
        "perplexity of a continuation whose context went through the pool in each format "
        "(KL and argmax vs the dense pool, per position):",
    ]
    for s in r.texts:
        rows = [
            (
                name,
                f"{f.perplexity:.3f}",
                f"{f.change_pct:+.3f}%",
                f"{f.next_token_kl_mnat:.3f}",
                f"{f.argmax_equal:.3f}",
            )
            for name, f in s.by_format.items()
        ]
        lines += [
            "",
            f"{s.text}: {s.context_tokens} tokens of context, {s.continuation_tokens} scored",
            "",
            *table(("format", "perplexity", "vs dense", "KL (mnat)", "argmax equal"), rows),
        ]
    return lines


SECTION = Section(RECORD, render_section)
