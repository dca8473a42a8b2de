"""BlockPoolBatchEngine on the fake generator: reuse, allocation, rollback."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
from fakes import SPEC, B, prompt_of

from kvpool import (
    AgentBlocks,
    AttentionKind,
    BlockPool,
    BlockPoolBatchEngine,
    CompletedGeneration,
    GenerationError,
    InvalidRequestError,
    LayerSpec,
    ModelCacheSpec,
    PoolExhaustedError,
    RequestTooLargeError,
    TokenEvent,
)
from kvpool.testing import (
    FakeBatchGenerator,
    FakeModel,
    FakeStorage,
    FakeTokenizer,
    reference_tokens,
)


class Harness:
    """An engine over fakes, plus the generator instances it created."""

    def __init__(
        self,
        spec: ModelCacheSpec = SPEC,
        num_blocks: int = 64,
        gen_class: type[FakeBatchGenerator] = FakeBatchGenerator,
        **kwargs: object,
    ) -> None:
        self.model = FakeModel(spec, vocab_size=1000)
        self.tokenizer = FakeTokenizer(1000)
        self.pool = BlockPool(spec, num_blocks=num_blocks, storage=FakeStorage)
        self.gens: list[FakeBatchGenerator] = []

        def factory(model: FakeModel, **kw: object) -> FakeBatchGenerator:
            gen = gen_class(model, **kw)  # type: ignore[arg-type]
            self.gens.append(gen)
            return gen

        self.engine = BlockPoolBatchEngine(
            self.model, self.tokenizer, self.pool, spec, batch_gen_factory=factory, **kwargs
        )

    @property
    def storage(self) -> FakeStorage:
        assert isinstance(self.pool.storage, FakeStorage)
        return self.pool.storage

    def run(
        self,
        agent_id: str,
        prompt: Sequence[int],
        cache: AgentBlocks | None = None,
        max_tokens: int = 5,
    ) -> CompletedGeneration:
        uid = self.engine.submit(agent_id, list(prompt), cache, max_tokens)
        (done,) = self.engine.drain()
        assert done.uid == uid
        assert done.error is None, done.error
        return done


def test_first_turn_matches_reference_and_frees_unused_blocks() -> None:
    h = Harness(num_blocks=16)
    prompt = prompt_of(10)
    uid = h.engine.submit("a", prompt, max_tokens=5)
    # reserved for 10 + 5 tokens: ceil(15 / 4) = 4 blocks
    assert h.pool.num_used == 4
    (done,) = h.engine.drain()
    assert done.uid == uid
    assert list(done.token_ids) == reference_tokens(h.model, prompt, 5)
    assert (done.prompt_tokens, done.cached_tokens, done.finish_reason) == (10, 0, "length")
    blocks = done.blocks
    assert blocks is not None
    # final cache: 10 prompt + 5 generated = 15 positions in 4 blocks, first allocated first
    assert blocks.token_ids == (*prompt, *done.token_ids)
    assert blocks.block_ids == (0, 1, 2, 3)
    assert h.pool.num_used == 4
    assert done.ttft_s is not None and done.ttft_s >= 0
    h.pool.check_invariants()


def test_multi_turn_reuses_cache_and_matches_reference() -> None:
    h = Harness(num_blocks=32)
    context = prompt_of(9)
    cache = None
    for turn in range(4):
        done = h.run("a", context, cache, max_tokens=6)
        assert list(done.token_ids) == reference_tokens(h.model, context, 6), f"turn {turn}"
        if turn:
            assert cache is not None
            assert done.cached_tokens == cache.total_tokens  # the whole old cache
            assert not h.pool.is_live(cache)  # released once superseded
        cache = done.blocks
        assert cache is not None and h.pool.is_live(cache)
        context = [*context, *done.token_ids, *prompt_of(3 + turn, seed=turn + 5)]
        # only the agent's current cache holds blocks between turns
        assert h.pool.num_used == SPEC.blocks_for(cache.total_tokens)
        h.pool.check_invariants()


def test_full_blocks_of_the_prefix_are_shared_not_rewritten() -> None:
    h = Harness(num_blocks=32)
    first = h.run("a", prompt_of(10), max_tokens=2)  # 12 tokens: 3 full blocks
    assert first.blocks is not None
    old_ids = first.blocks.block_ids
    second = h.run("a", [*first.blocks.token_ids, 7, 8, 9], first.blocks, max_tokens=2)
    assert second.blocks is not None
    assert second.cached_tokens == 12
    # positions 0..11 fill 3 full blocks: shared; the new tail gets fresh blocks
    assert second.blocks.block_ids[:3] == old_ids[:3]
    assert set(second.blocks.block_ids[3:]).isdisjoint(old_ids)


def test_full_hit_refeeds_the_last_token() -> None:
    h = Harness()
    first = h.run("a", prompt_of(8), max_tokens=3)
    assert first.blocks is not None
    tokens = list(first.blocks.token_ids)
    again = h.run("a", tokens, first.blocks, max_tokens=3)
    assert again.cached_tokens == len(tokens) - 1
    assert list(again.token_ids) == reference_tokens(h.model, tokens, 3)


def test_divergence_keeps_only_the_shared_prefix() -> None:
    h = Harness()
    first = h.run("a", prompt_of(13), max_tokens=2)
    assert first.blocks is not None
    changed = [*prompt_of(13)[:6], 999, *prompt_of(5, seed=3)]
    second = h.run("a", changed, first.blocks, max_tokens=4)
    assert second.cached_tokens == 6
    assert list(second.token_ids) == reference_tokens(h.model, changed, 4)


def test_cache_of_another_agent_is_forked_not_released() -> None:
    h = Harness()
    system = h.run("sys", prompt_of(9), max_tokens=1)
    assert system.blocks is not None
    fork = h.run("b", [*system.blocks.token_ids, 5, 6], system.blocks, max_tokens=3)
    assert fork.cached_tokens == 10
    assert h.pool.is_live(system.blocks)  # still the system agent's cache
    assert list(fork.token_ids) == reference_tokens(h.model, [*system.blocks.token_ids, 5, 6], 3)


def test_agents_batched_with_different_lengths_and_late_joiners() -> None:
    h = Harness(num_blocks=64)
    prompts = {"a": prompt_of(3, 1), "b": prompt_of(17, 2), "c": prompt_of(9, 3)}
    uids = {
        aid: h.engine.submit(aid, p, max_tokens=4 + i) for i, (aid, p) in enumerate(prompts.items())
    }
    done: dict[str, CompletedGeneration] = {}
    for c in h.engine.step():
        done[c.agent_id] = c
    late = prompt_of(6, 4)
    h.engine.submit("d", late, max_tokens=3)  # joins the running batch
    for c in h.engine.drain():
        done[c.agent_id] = c
    assert len(h.gens) == 1  # one generator served everyone
    for i, (aid, p) in enumerate(prompts.items()):
        assert done[aid].uid == uids[aid]
        assert list(done[aid].token_ids) == reference_tokens(h.model, p, 4 + i)
    assert list(done["d"].token_ids) == reference_tokens(h.model, late, 3)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("", [1]), {}, "agent_id"),
        (("../x", [1]), {}, "agent_id"),
        (("a", []), {}, "empty"),
        (("a", ""), {}, "empty"),
        (("a", [1]), {"max_tokens": 0}, "max_tokens"),
        (("a", [1, 5000]), {}, "outside"),
        (("a", 42), {}, "prompt must be"),
        (("a", [1]), {"cache": "nope"}, "cache must be"),
    ],
)
def test_invalid_requests_allocate_nothing(
    args: tuple[object, ...], kwargs: dict[str, object], match: str
) -> None:
    h = Harness()
    with pytest.raises(InvalidRequestError, match=match):
        h.engine.submit(*args, **kwargs)  # type: ignore[arg-type]
    assert h.pool.num_used == 0 and not h.engine.has_work


def test_stale_cache_and_agent_in_flight_are_refused() -> None:
    h = Harness()
    first = h.run("a", prompt_of(5), max_tokens=2)
    assert first.blocks is not None
    h.run("a", [*first.blocks.token_ids, 3], first.blocks, max_tokens=2)
    used = h.pool.num_used
    with pytest.raises(InvalidRequestError, match="not live in this pool"):
        h.engine.submit("a", prompt_of(5), first.blocks)
    h.engine.submit("b", prompt_of(5, seed=2), max_tokens=2)
    assert h.engine.is_in_flight("b") and not h.engine.is_in_flight("a")
    assert h.engine.num_in_flight == 1
    with pytest.raises(InvalidRequestError, match="already has a request in flight"):
        h.engine.submit("b", prompt_of(5, seed=2), max_tokens=2)
    assert h.pool.num_used == used + SPEC.blocks_for(5 + 2)


def test_exhaustion_raises_leaks_nothing_and_next_request_succeeds() -> None:
    h = Harness(num_blocks=6)
    a = h.run("a", prompt_of(9), max_tokens=3)  # 12 tokens: 3 blocks held
    assert h.pool.num_used == 3
    with pytest.raises(PoolExhaustedError, match="needs 4 blocks") as info:
        h.engine.submit("b", prompt_of(12, seed=2), max_tokens=4)
    assert not isinstance(info.value, RequestTooLargeError)
    assert h.pool.num_used == 3 and not h.engine.has_work
    with pytest.raises(RequestTooLargeError, match="the pool has 6"):
        h.engine.submit("b", prompt_of(30, seed=2), max_tokens=1)
    assert a.blocks is not None
    h.pool.release(a.blocks)
    b = h.run("b", prompt_of(12, seed=2), max_tokens=4)
    assert b.error is None and h.pool.num_used == 4
    h.pool.check_invariants()


def test_insert_failure_frees_the_request_and_engine_goes_on() -> None:
    h = Harness()
    first = h.run("a", prompt_of(7), max_tokens=2)
    used = h.pool.num_used
    assert first.blocks is not None
    h.engine.submit("a", [*first.blocks.token_ids, 4], first.blocks, max_tokens=3)
    h.gens[0].fail_insert = RuntimeError("insert exploded")
    (failed,) = h.engine.step()
    assert failed.finish_reason == "error"
    assert isinstance(failed.error, GenerationError)
    assert "insert exploded" in str(failed.error)
    assert failed.blocks is first.blocks and h.pool.is_live(first.blocks)
    assert h.pool.num_used == used and not h.engine.has_work
    again = h.run("a", [*first.blocks.token_ids, 4], first.blocks, max_tokens=3)
    assert again.cached_tokens == first.blocks.total_tokens


def test_model_failure_fails_running_requests_and_recovers() -> None:
    h = Harness()
    h.engine.submit("a", prompt_of(5), max_tokens=4)
    h.engine.submit("b", prompt_of(6), max_tokens=4)
    list(h.engine.step())
    h.gens[0].fail_next = RuntimeError("model raised")
    failed = list(h.engine.step())
    assert sorted(c.agent_id for c in failed) == ["a", "b"]
    assert all(c.finish_reason == "error" and c.error is not None for c in failed)
    assert h.pool.num_used == 0 and not h.engine.has_work
    done = h.run("a", prompt_of(5), max_tokens=4)
    assert len(h.gens) == 2  # a fresh generator
    assert list(done.token_ids) == reference_tokens(h.model, prompt_of(5), 4)


def test_streaming_delivers_every_token_in_order() -> None:
    h = Harness()
    events: list[TokenEvent] = []
    h.engine.submit("a", prompt_of(6), max_tokens=5, on_token=events.append)
    (done,) = h.engine.drain()
    assert [e.token for e in events] == list(done.token_ids)
    assert [e.index for e in events] == list(range(5))
    assert "".join(e.text for e in events) == done.text
    assert all(e.uid == done.uid and e.agent_id == "a" for e in events)


def test_cancel_queued_and_running() -> None:
    h = Harness()
    queued = h.engine.submit("a", prompt_of(5), max_tokens=10)
    assert h.engine.cancel(queued) and h.pool.num_used == 0
    running = h.engine.submit("b", prompt_of(5), max_tokens=50)
    list(h.engine.step())
    assert h.engine.cancel(running)
    assert not h.engine.cancel(running)
    assert h.pool.num_used == 0 and not h.engine.has_work
    assert h.gens[0].num_active == 0
    h.run("b", prompt_of(5))  # the agent may submit again


def test_submit_from_other_threads_while_stepping() -> None:
    h = Harness(num_blocks=256)
    prompts = {f"agent{i}": prompt_of(5 + i, i) for i in range(12)}
    done: list[CompletedGeneration] = []
    start = threading.Barrier(len(prompts) + 1)

    def agent(aid: str) -> None:
        start.wait()
        h.engine.submit(aid, prompts[aid], max_tokens=3)

    threads = [threading.Thread(target=agent, args=(aid,)) for aid in prompts]
    for t in threads:
        t.start()
    start.wait()
    while any(t.is_alive() for t in threads) or h.engine.has_work:
        done.extend(h.engine.step())
    for t in threads:
        t.join()
    assert sorted(c.agent_id for c in done) == sorted(prompts)
    for c in done:
        assert list(c.token_ids) == reference_tokens(h.model, prompts[c.agent_id], 3)


def test_pool_returns_to_baseline_after_many_generations() -> None:
    h = Harness(num_blocks=64)
    caches: dict[str, AgentBlocks | None] = {"a": None, "b": None}
    contexts = {"a": prompt_of(5, 1), "b": prompt_of(11, 2)}
    for _ in range(10):
        for aid in caches:
            h.engine.submit(aid, contexts[aid], caches[aid], max_tokens=3)
        for c in h.engine.drain():
            caches[c.agent_id] = c.blocks
            contexts[c.agent_id] = [*contexts[c.agent_id], *c.token_ids, 9]
    held = sum(SPEC.blocks_for(b.total_tokens) for b in caches.values() if b is not None)
    assert h.pool.num_used == held
    for b in caches.values():
        assert b is not None
        h.pool.release(b)
    assert h.pool.num_used == 0 and h.pool.num_handles == 0
    h.pool.check_invariants()


SLIDING = ModelCacheSpec(
    (
        LayerSpec(AttentionKind.SLIDING, 2, 8, 8, window=6),
        LayerSpec(AttentionKind.GLOBAL, 2, 8, 8),
    ),
    "float32",
    B,
)


def test_sliding_window_layers_resume_from_blocks() -> None:
    h = Harness(SLIDING, num_blocks=64)
    context = prompt_of(11)
    cache = None
    for turn in range(4):
        done = h.run("a", context, cache, max_tokens=4)
        assert list(done.token_ids) == reference_tokens(h.model, context, 4), f"turn {turn}"
        if turn:
            assert done.cached_tokens > 0
        cache = done.blocks
        assert cache is not None
        # the sliding group (group 0) holds its last 6 positions, and only their blocks
        sliding = cache.tables[0]
        assert sliding.valid_from == cache.total_tokens - 6
        assert len(sliding.held) == SPEC.blocks_for(cache.total_tokens) - sliding.valid_from // B
        context = [*context, *done.token_ids, *prompt_of(2 + turn, turn)]


def test_sliding_window_full_hit_reuses_all_but_the_last_token() -> None:
    h = Harness(SLIDING)
    first = h.run("a", prompt_of(12), max_tokens=2)
    assert first.blocks is not None
    tokens = list(first.blocks.token_ids)
    # re-feeding the last token needs the 5 positions before it: the window holds them
    again = h.run("a", tokens, first.blocks, max_tokens=3)
    assert again.cached_tokens == len(tokens) - 1
    assert list(again.token_ids) == reference_tokens(h.model, tokens, 3)


def test_engine_rejects_a_pool_of_another_spec() -> None:
    other = ModelCacheSpec.uniform(3, 2, 8, block_tokens=B)
    pool = BlockPool(other, num_blocks=4, storage=FakeStorage)
    with pytest.raises(InvalidRequestError, match="another spec"):
        BlockPoolBatchEngine(
            FakeModel(SPEC), FakeTokenizer(), pool, SPEC, batch_gen_factory=FakeBatchGenerator
        )


def test_a_turn_that_cannot_fit_beside_the_agents_own_cache_is_too_large() -> None:
    h = Harness(num_blocks=5)
    first = h.run("a", prompt_of(7), max_tokens=3)  # 10 tokens: 3 blocks held
    assert first.blocks is not None
    diverged = [*prompt_of(2), *prompt_of(12, seed=9)]  # reuses 2 tokens, shares no block
    # 14 + 6 tokens need 5 fresh blocks while the old 3 stay held: never fits
    with pytest.raises(RequestTooLargeError, match="until the turn ends"):
        h.engine.submit("a", diverged, first.blocks, max_tokens=6)
    assert h.pool.num_used == 3
    h.pool.release(first.blocks)
    assert h.run("a", diverged, max_tokens=6).error is None


def test_prompt_ids_are_bounded_by_the_models_vocabulary_not_the_tokenizers() -> None:
    h = Harness()
    h.tokenizer.vocab_size = 300  # the model (1000 ids) may generate ids the tokenizer lacks
    assert h.run("a", [1, 999, 2], max_tokens=2).error is None
    with pytest.raises(InvalidRequestError, match=r"token 1 is 1000, outside \[0, 1000\)"):
        h.engine.submit("b", [1, 1000])
    unbounded = BlockPoolBatchEngine(
        object(), h.tokenizer, h.pool, SPEC, batch_gen_factory=FakeBatchGenerator
    )
    unbounded.submit("c", [10**6], max_tokens=1)  # a model that does not say: unchecked
    assert unbounded.has_work


def test_logits_processors_reach_the_generator_per_request() -> None:
    """Each request's own processors go to its row of insert_segments; others get none."""
    inserted: list[Any] = []

    class Recording(FakeBatchGenerator):
        def insert_segments(self, *args: Any, **kwargs: Any) -> list[int]:
            inserted.append(kwargs.get("logits_processors"))
            return super().insert_segments(*args, **kwargs)

    model = FakeModel(SPEC, vocab_size=1000)
    pool = BlockPool(SPEC, num_blocks=64, storage=FakeStorage)
    engine = BlockPoolBatchEngine(
        model,
        FakeTokenizer(1000),
        pool,
        SPEC,
        batch_gen_factory=Recording,  # type: ignore[arg-type]
    )

    def processor(tokens: Any, logits: Any) -> Any:
        return logits

    engine.submit("a", prompt_of(5), max_tokens=2, logits_processors=[processor])
    engine.submit("b", prompt_of(6), max_tokens=2)
    done = engine.drain()
    assert sorted(c.agent_id for c in done) == ["a", "b"] and all(c.error is None for c in done)
    assert inserted == [[[processor]], None]
    with pytest.raises(InvalidRequestError, match="logits_processors must be callables"):
        engine.submit("c", prompt_of(5), logits_processors=[42])  # type: ignore[list-item]
    assert not engine.has_work  # the refused request left nothing in flight


class SlowStorage(FakeStorage):
    """FakeStorage whose reads and writes of K/V each take at least ``DELAY_S``."""

    DELAY_S = 0.03

    def load(self, tables: Any, num_tokens: int) -> Any:
        time.sleep(self.DELAY_S)
        return super().load(tables, num_tokens)

    def store(self, caches: Any, tables: Any, start: int) -> Any:
        time.sleep(self.DELAY_S)
        return super().store(caches, tables, start)


def test_engine_times_say_where_the_steps_went() -> None:
    """Each part of EngineTimes gets its own work: a slow read lands in read_s, a slow write
    in write_s, and every batch step is counted once."""
    model, pool = (
        FakeModel(SPEC, vocab_size=1000),
        BlockPool(SPEC, num_blocks=64, storage=SlowStorage),
    )
    nexts = []

    def factory(model: FakeModel, **kw: object) -> FakeBatchGenerator:
        gen = FakeBatchGenerator(model, **kw)  # type: ignore[arg-type]
        step = gen.next

        def counted() -> Any:
            nexts.append(1)
            return step()

        gen.next = counted  # type: ignore[method-assign]
        return gen

    engine = BlockPoolBatchEngine(model, FakeTokenizer(1000), pool, SPEC, batch_gen_factory=factory)
    start = engine.times
    assert (start.read_s, start.generate_s, start.write_s, start.steps) == (0.0, 0.0, 0.0, 0)
    engine.submit("a", prompt_of(10), max_tokens=5)
    (first,) = engine.drain()
    after_first = engine.times
    # a first turn reuses nothing (no load), and writes its cache once
    assert after_first.read_s < SlowStorage.DELAY_S <= after_first.write_s
    assert after_first.steps == len(nexts) > 0
    engine.submit("a", [*prompt_of(10), *first.token_ids, 7, 8], first.blocks, max_tokens=3)
    (second,) = engine.drain()
    turn = engine.times.minus(after_first)
    assert second.error is None and second.cached_tokens > 0
    assert turn.read_s >= SlowStorage.DELAY_S and turn.write_s >= SlowStorage.DELAY_S
    assert turn.steps == len(nexts) - after_first.steps
    assert turn.generate_s > 0
    snapshot = engine.times
    snapshot.steps += 1
    assert engine.times.steps == snapshot.steps - 1  # a copy: the engine's own is untouched


def test_a_resumed_sliding_prompt_stops_only_where_its_windows_are_whole() -> None:
    """A resumed sliding cache holds its last ``window - 1`` rows: a snapshot end whose
    window needs rows before those is not a segment end (the pool would refuse its
    blocks), while a fresh prompt stops at its last block boundary to publish it."""
    seen: list[list[int]] = []

    class Recording(FakeBatchGenerator):
        def insert_segments(self, segments: Any, *args: Any, **kwargs: Any) -> list[int]:
            seen.append([len(s) for s in segments[0]])
            return super().insert_segments(segments, *args, **kwargs)

    h = Harness(SLIDING, gen_class=Recording)
    first = h.run("a", prompt_of(18), max_tokens=4)  # 22 tokens cached
    assert first.blocks is not None
    tokens = [*first.blocks.token_ids, *prompt_of(3, seed=5)]  # 25: last boundary 24
    again = h.run("a", tokens, first.blocks, max_tokens=3)
    # turn 1 stops at 16 (its last block boundary); turn 2 resumes at 22 with rows 17..21,
    # but the window at 24 needs row 19's block from row 16: no stop there
    assert seen == [[16, 2], [3]]
    assert again.cached_tokens == 22
    assert list(again.token_ids) == reference_tokens(h.model, tokens, 3)
