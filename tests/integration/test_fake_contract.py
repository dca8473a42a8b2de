"""The fake BatchGenerator follows the real one: same scenario, same protocol trace.

Token values differ (the fake model is a hash); everything the engine relies on
must not: uids, when prompt and generation responses arrive, finish reasons,
the final cache's offsets and ``all_tokens`` (appended in place), remove().
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvpool import ModelCacheSpec
from kvpool.testing import FakeBatchGenerator, FakeCache, FakeModel

LoadedModel = tuple[Any, Any, Path]
Trace = list[tuple[object, ...]]


def real_parts(
    loaded: LoadedModel,
) -> tuple[Any, Callable[..., Any], Callable[[list[int]], list[Any]]]:
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.models.cache import make_prompt_cache

    model = loaded[0]

    def cache_for(tokens: list[int]) -> list[Any]:
        cache = make_prompt_cache(model)
        model(mx.array([tokens]), cache=cache)
        mx.eval([c.state for c in cache])
        return cache

    return model, BatchGenerator, cache_for


def fake_parts(
    loaded: LoadedModel,
) -> tuple[Any, Callable[..., Any], Callable[[list[int]], list[Any]]]:
    spec = ModelCacheSpec.from_model(loaded[0])
    model = FakeModel(spec, vocab_size=512)

    def cache_for(tokens: list[int]) -> list[Any]:
        return [FakeCache(list(tokens), len(tokens), layer.window) for layer in spec.layers]

    return model, FakeBatchGenerator, cache_for


def scenario(
    model: Any, factory: Callable[..., Any], cache_for: Callable[[list[int]], list[Any]]
) -> Trace:
    gen = factory(
        model, stop_tokens=None, prefill_step_size=8, prefill_batch_size=2, completion_batch_size=4
    )
    trace: Trace = []
    history = [5, 6, 7, 8, 9, 10]
    passed = [list(history), [], []]
    uids = gen.insert(
        [[11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31], [40]],
        max_tokens=[3, 2, 4],
        caches=[cache_for(history), None, None],
        all_tokens=passed,
    )
    trace.append(("insert", tuple(uids)))
    for name, bad in (("empty", [[]]), ("max_tokens", [[1]])):
        with pytest.raises(ValueError):
            gen.insert(bad, max_tokens=[0] if name == "max_tokens" else [2])
    for call in range(12):
        if call == 2:
            trace.append(("insert", tuple(gen.insert([[50, 51]], max_tokens=[5]))))
        if call == 4:
            gen.remove([uids[2]])
            trace.append(("remove", uids[2]))
        prompt_responses, generation_responses = gen.next()
        trace.append(
            (
                "prompt",
                call,
                tuple(
                    (r.uid, tuple(r.progress), r.end_of_segment, r.end_of_prompt)
                    for r in prompt_responses
                ),
            )
        )
        for r in generation_responses:
            entry: tuple[object, ...] = ("gen", call, r.uid, r.finish_reason)
            if r.finish_reason is not None:
                offsets = {int(c.offset) for c in r.prompt_cache}
                in_place = any(r.all_tokens is p for p in passed)
                entry += (
                    len(r.prompt_cache),
                    tuple(offsets),
                    len(r.all_tokens),
                    in_place,
                    tuple(r.all_tokens[: len(history) + 3]) if r.uid == uids[0] else (),
                )
            trace.append(entry)
    trace.append(("empty", gen.next()))
    return trace


def test_fake_generator_follows_the_real_protocol(tiny_model: LoadedModel) -> None:
    real = scenario(*real_parts(tiny_model))
    fake = scenario(*fake_parts(tiny_model))
    assert fake == real
    finished = [e for e in real if e[0] == "gen" and e[3] is not None]
    assert {e[2] for e in finished} == {0, 1, 3}  # uid 2 was removed
    first = next(e for e in finished if e[2] == 0)
    # history 6 + prompt 3 + generated 3: the cache and all_tokens agree
    assert first[5] == (12,) and first[6] == 12 and first[7] is True


def segments_scenario(
    model: Any, factory: Callable[..., Any], cache_for: Callable[[list[int]], list[Any]]
) -> Trace:
    """insert_segments: where prefill stops, what end_of_segment says, and what
    extract_cache holds there (the engine publishes a shared prefix at that point)."""
    gen = factory(model, stop_tokens=None, prefill_step_size=4, prefill_batch_size=2)
    trace: Trace = []
    uids = gen.insert_segments([[[1, 2, 3, 4, 5, 6], [7, 8, 9]], [[20, 21, 22]]], max_tokens=[2, 2])
    for call in range(8):
        prompt_responses, generation_responses = gen.next()
        for r in prompt_responses:
            entry: tuple[object, ...] = ("prompt", call, r.uid, tuple(r.progress))
            entry += (r.end_of_segment, r.end_of_prompt)
            if r.end_of_segment and not r.end_of_prompt:
                caches, tokens = gen.extract_cache([r.uid])[r.uid]
                entry += (tuple({int(c.offset) for c in caches}), len(tokens))
            trace.append(entry)
        trace += [("gen", call, r.uid, r.finish_reason) for r in generation_responses]
    del uids
    return trace


def test_fake_generator_follows_the_real_segments_protocol(tiny_model: LoadedModel) -> None:
    real = segments_scenario(*real_parts(tiny_model))
    fake = segments_scenario(*fake_parts(tiny_model))
    assert fake == real
    # The first segment (6 tokens) ends after chunks of 4 and 2; the cache holds it.
    assert ("prompt", 1, 0, (6, 9), True, False, (6,), 6) in real


def test_the_engines_generator_follows_mlx_lms_own(tiny_model: LoadedModel) -> None:
    """PoolBatchGenerator (what the engine drives) gives mlx-lm's traces, tokens included."""
    from kvpool.mlx.mlx_lm import PoolBatchGenerator

    model, real, cache_for = real_parts(tiny_model)
    assert scenario(model, PoolBatchGenerator, cache_for) == scenario(model, real, cache_for)
    ours = segments_scenario(model, PoolBatchGenerator, cache_for)
    assert ours == segments_scenario(model, real, cache_for)


def _rows(cache: Any) -> int:
    """Positions a layer's cache holds: a fake's token ids, an mlx-lm cache's K rows."""
    if isinstance(cache, FakeCache):
        return len(cache.tokens)
    keys = cache.state[0]
    return int(keys.shape[2])


def window_scenario(model: Any, factory: Callable[..., Any]) -> Trace:
    """Rows each layer's cache holds where a segment ends and where a request finishes:
    a sliding layer keeps ``window - 1`` old rows and all of a prefill chunk's, then
    ``window`` once decoding (what the engine's store and publish read)."""
    gen = factory(model, stop_tokens=None, prefill_step_size=48, prefill_batch_size=2)
    prompt = [1 + (i * 7) % 500 for i in range(150)]
    gen.insert_segments([[prompt[:100], prompt[100:]], [prompt[:60]]], max_tokens=[5, 12])
    trace: Trace = []
    for call in range(30):
        prompt_responses, generation_responses = gen.next()
        for r in prompt_responses:
            if r.end_of_segment and not r.end_of_prompt:
                caches, _ = gen.extract_cache([r.uid])[r.uid]
                trace.append(("segment", call, r.uid, tuple(_rows(c) for c in caches)))
        for r in generation_responses:
            if r.finish_reason is not None:
                trace.append(("finish", call, r.uid, tuple(_rows(c) for c in r.prompt_cache)))
    return trace


def test_fake_sliding_caches_hold_the_rows_mlx_lms_hold(tiny_swa_model: LoadedModel) -> None:
    model, real, _ = real_parts(tiny_swa_model)
    fake_model, fake, _ = fake_parts(tiny_swa_model)
    trace = window_scenario(model, real)
    assert window_scenario(fake_model, fake) == trace
    # window 64: the segment ending at 100 after chunks of 48, 48 and 4 holds 63 + 4 rows
    # in its sliding layers, all 100 in its global ones; decoding leaves exactly 64
    assert ("segment", 2, 0, (67, 100, 67, 100)) in trace
    assert any(e[0] == "finish" and e[3][0] == 64 for e in trace)
