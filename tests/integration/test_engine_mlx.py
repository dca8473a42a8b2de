"""BlockPoolBatchEngine on real mlx-lm: cached turns equal fresh, uncached runs."""

from __future__ import annotations

import gc
import itertools
import random
import statistics
from typing import Any

import pytest
from helpers import LoadedModel, Reference, fresh, make_engine, words

from kvpool import (
    AgentBlocks,
    BlockPool,
    BlockPoolBatchEngine,
    CompletedGeneration,
    ModelCacheSpec,
    PoolExhaustedError,
)
from kvpool.mlx import kernels


def run_turns(
    loaded: LoadedModel,
    reference: Reference,
    first_lengths: dict[str, int],
    added_lengths: list[int],
    max_tokens: int,
    num_blocks: int = 64,
) -> list[dict[str, CompletedGeneration]]:
    """Agents take turns, batched together; every turn is checked against a fresh run."""
    _, tokenizer, _ = loaded
    engine, pool = make_engine(loaded, num_blocks)
    rng = random.Random(7)
    contexts = {a: words(rng, tokenizer, n) for a, n in first_lengths.items()}
    caches: dict[str, AgentBlocks | None] = dict.fromkeys(first_lengths)
    turns: list[dict[str, CompletedGeneration]] = []
    for turn, added in enumerate(added_lengths):
        for agent, context in contexts.items():
            engine.submit(agent, context, caches[agent], max_tokens)
        done = {c.agent_id: c for c in engine.drain()}
        assert sorted(done) == sorted(contexts)
        for agent, c in done.items():
            assert c.error is None, c.error
            expected = fresh(reference, loaded, contexts[agent], max_tokens)
            assert list(c.token_ids) == expected, f"turn {turn} agent {agent}"
            assert c.prompt_tokens == len(contexts[agent])
            if turn:
                assert c.cached_tokens > 0
            caches[agent] = c.blocks
            contexts[agent] = [*contexts[agent], *c.token_ids, *words(rng, tokenizer, added + turn)]
        turns.append(done)
        pool.check_invariants()
    return turns


def test_greedy_turns_equal_fresh_runs(
    tiny_model: LoadedModel, reference_generate: Reference
) -> None:
    # contexts start at 300 / 530 / 140 tokens and grow past 1000: several
    # 256-token blocks, offsets that are not multiples of 256.
    turns = run_turns(
        tiny_model, reference_generate, {"a": 300, "b": 530, "c": 140}, [3, 150, 300, 45], 12
    )
    last = turns[-1]
    assert max(c.prompt_tokens for c in last.values()) > 1000
    assert any(c.cached_tokens % 256 for c in last.values())
    # from turn 2 on, the whole previous context (prompt + completion) came from the cache
    for prev, cur in itertools.pairwise(turns):
        for agent, c in cur.items():
            assert prev[agent].blocks is not None
            assert c.cached_tokens == prev[agent].blocks.total_tokens


def test_negative_control_a_corrupted_block_changes_the_output(
    tiny_model: LoadedModel, reference_generate: Reference
) -> None:
    """The equality test can fail: zeroing one cached block breaks it."""
    import mlx.core as mx

    _, tokenizer, _ = tiny_model
    engine, pool = make_engine(tiny_model, 32)
    rng = random.Random(3)
    context = words(rng, tokenizer, 600)
    engine.submit("a", context, max_tokens=8)
    (first,) = engine.drain()
    assert first.blocks is not None
    storage = pool.storage
    victim = first.blocks.block_ids[1]
    for layer in range(len(storage.k)):  # type: ignore[attr-defined]
        storage.k[layer][victim] = mx.zeros_like(storage.k[layer][victim])  # type: ignore[attr-defined]
    nxt = [*first.blocks.token_ids, *words(rng, tokenizer, 20)]
    engine.submit("a", nxt, first.blocks, max_tokens=8)
    (second,) = engine.drain()
    assert list(second.token_ids) != fresh(reference_generate, tiny_model, nxt, 8)


def test_sliding_window_model_resumes(
    tiny_swa_model: LoadedModel, reference_generate: Reference
) -> None:
    spec = ModelCacheSpec.from_model(tiny_swa_model[0])
    assert spec.max_window is not None and spec.max_window < 256
    turns = run_turns(tiny_swa_model, reference_generate, {"a": 200, "b": 330}, [3, 70, 150], 10)
    assert all(c.cached_tokens > 0 for c in turns[-1].values())


@pytest.mark.parametrize(
    ("block_tokens", "every", "shared"), [(256, None, 768), (16, 4, 900), (16, None, 0)]
)
def test_agents_arriving_one_by_one_share_a_system_prompt_on_a_sliding_window_model(
    tiny_swa_model: LoadedModel,
    reference_generate: Reference,
    block_tokens: int,
    every: int | None,
    shared: int,
) -> None:
    """gemma3 (window 64): agents on a 900-token system prompt, served one at a time. A
    sliding group keeps only its last window when a request ends, so each prefill also
    publishes the window at its prompt's last block boundary (768 with blocks of 256: inside
    the system prompt) and, with ``state_snapshot_blocks``, every so many blocks (64
    tokens): the next agent resumes there (with blocks of 16, at the whole system prompt:
    the window at 896 plus the block the prompt's end published, read token-granular),
    token-equal to a fresh mlx-lm run. With blocks of 16 and no snapshots the prompt's last
    boundary (912) is past the system prompt: nothing is reused (the control)."""
    model, tokenizer, _ = tiny_swa_model
    spec = ModelCacheSpec.from_model(model, block_tokens=block_tokens)
    pool = BlockPool(spec, num_blocks=24 * 4096 // block_tokens)
    engine = BlockPoolBatchEngine(model, tokenizer, pool, spec, state_snapshot_blocks=every)
    rng = random.Random(11)
    tokenizer = tiny_swa_model[1]
    system = words(rng, tokenizer, 900)
    for i in range(3):
        prompt = [*system, *words(rng, tokenizer, 25)]
        engine.submit(f"a{i}", prompt, None, 6)
        (done,) = engine.drain()
        assert done.error is None, done.error
        assert done.cached_tokens == (shared if i else 0)
        assert list(done.token_ids) == fresh(reference_generate, tiny_swa_model, prompt, 6)
    pool.check_invariants()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_pool_is_stable_over_many_generations(tiny_model: LoadedModel) -> None:
    _, tokenizer, _ = tiny_model
    engine, pool = make_engine(tiny_model, 48)
    start_free = pool.num_free
    rng = random.Random(11)
    kernels.reset_scatter_stats()
    rss: list[int] = []
    cache: AgentBlocks | None = None
    context = words(rng, tokenizer, 200)
    for _ in range(20):
        engine.submit("a", context, cache, max_tokens=6)
        (done,) = engine.drain()
        assert done.error is None
        cache = done.blocks
        assert cache is not None
        context = [*context, *done.token_ids, *words(rng, tokenizer, 30)]
        if len(context) > 1500:  # start over so the context stays bounded
            pool.release(cache)
            cache, context = None, words(rng, tokenizer, 200)
        gc.collect()
        rss.append(rss_bytes())
    if cache is not None:
        pool.release(cache)
    assert pool.num_free == start_free and pool.num_handles == 0
    stats = kernels.scatter_stats()
    assert stats["num_copied"] == 0 and stats["num_in_place"] > 0
    # Medians of five readings: a growing process shows it, one transient spike of
    # MLX's buffer cache does not.
    warm, last = statistics.median(rss[5:10]), statistics.median(rss[15:])
    growth = (last - warm) / warm
    print(
        f"RSS median of generations 6-10 {warm / 2**20:.1f} MiB, of 16-20 "
        f"{last / 2**20:.1f} MiB ({growth:+.2%}); max {max(rss) / 2**20:.1f} MiB"
    )
    assert growth < 0.05


def test_exhaustion_with_real_model(tiny_model: LoadedModel) -> None:
    _, tokenizer, _ = tiny_model
    engine, pool = make_engine(tiny_model, 4)
    rng = random.Random(5)
    engine.submit("a", words(rng, tokenizer, 500), max_tokens=4)  # 2 blocks
    (a,) = engine.drain()
    assert a.blocks is not None and pool.num_used == 2
    with pytest.raises(PoolExhaustedError):
        engine.submit("b", words(rng, tokenizer, 700), max_tokens=4)  # needs 3
    assert pool.num_used == 2
    pool.release(a.blocks)
    engine.submit("b", words(rng, tokenizer, 700), max_tokens=4)
    (b,) = engine.drain()
    assert b.error is None and b.token_count == 4
    assert pool.num_used == 3


def test_sampling_params_on_real_model(
    tiny_model: LoadedModel, reference_generate: Reference
) -> None:
    from kvpool import SamplingParams, TokenEvent

    _, tokenizer, _ = tiny_model
    engine, pool = make_engine(tiny_model, 32)
    prompt = words(random.Random(9), tokenizer, 120)
    greedy = fresh(reference_generate, tiny_model, prompt, 12)

    def run(sampling: SamplingParams, **kw: Any) -> CompletedGeneration:
        engine.submit("s", prompt, max_tokens=12, sampling=sampling, **kw)
        (done,) = engine.drain()
        assert done.error is None and done.blocks is not None
        pool.release(done.blocks)
        return done

    # top-k 1 and a tiny top-p keep only the most likely token: greedy again
    assert list(run(SamplingParams(temperature=1.0, top_k=1)).token_ids) == greedy
    assert list(run(SamplingParams(temperature=0.7, top_p=1e-6)).token_ids) == greedy
    # a hot temperature samples something else
    hot = [run(SamplingParams(temperature=5.0)).token_ids for _ in range(3)]
    assert any(list(h) != greedy for h in hot)
    # an extra stop token ends the generation where greedy first emits it
    stop_at = 5
    stop_events: list[TokenEvent] = []
    stop = run(SamplingParams(stop_token_ids=(greedy[stop_at],)), on_token=stop_events.append)
    first = greedy.index(greedy[stop_at])
    assert list(stop.token_ids) == greedy[: first + 1] and stop.finish_reason == "stop"
    # the stop token is streamed as a token but is no part of the text (its event only
    # flushes what the detokenizer held back)
    assert [e.token for e in stop_events] == greedy[: first + 1]
    assert "".join(e.text for e in stop_events) == stop.text == tokenizer.decode(greedy[:first])
    # streaming: every token arrives in order and the pieces spell the text
    events: list[TokenEvent] = []
    streamed = run(SamplingParams(), on_token=events.append)
    assert [e.token for e in events] == greedy
    assert "".join(e.text for e in events) == tokenizer.decode(greedy)
    assert streamed.text == tokenizer.decode(greedy)
    assert pool.num_used == 0
