"""Hardening (issue 11) of the engine on the fakes: callbacks that raise or cancel, bad
sampling and prompt types refused at submit, interrupts, the driving thread."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
from fakes import SPEC, prompt_of

from kvpool import (
    BlockPool,
    BlockPoolBatchEngine,
    CompletedGeneration,
    GenerationError,
    InvalidRequestError,
    SamplingParams,
    TokenEvent,
)
from kvpool.testing import (
    FakeBatchGenerator,
    FakeModel,
    FakeStorage,
    FakeTokenizer,
    reference_tokens,
)

VOCAB = 1000


class Harness:
    """An engine over fakes (vocabulary of 1000) and the generators it made."""

    def __init__(self, num_blocks: int = 64, vocab_size: int | None = None) -> None:
        self.model = FakeModel(SPEC, vocab_size=VOCAB)
        self.pool = BlockPool(SPEC, num_blocks=num_blocks, storage=FakeStorage)
        self.gens: list[FakeBatchGenerator] = []

        def factory(model: FakeModel, **kw: Any) -> FakeBatchGenerator:
            gen = FakeBatchGenerator(model, **kw)
            self.gens.append(gen)
            return gen

        self.engine = BlockPoolBatchEngine(
            self.model,
            FakeTokenizer(VOCAB),
            self.pool,
            SPEC,
            batch_gen_factory=factory,
            vocab_size=vocab_size,
        )

    def steps(self, limit: int = 100) -> list[CompletedGeneration]:
        """drain(), bounded: a wedged engine fails the test instead of hanging it."""
        done: list[CompletedGeneration] = []
        for _ in range(limit):
            if not self.engine.has_work:
                return done
            done.extend(self.engine.step())
        raise AssertionError(f"still has work after {limit} steps: the engine is wedged")


def by_agent(done: Sequence[CompletedGeneration]) -> dict[str, CompletedGeneration]:
    out = {c.agent_id: c for c in done}
    assert len(out) == len(done), done
    return out


def recorder() -> tuple[list[TokenEvent], Callable[[TokenEvent], None]]:
    events: list[TokenEvent] = []
    return events, events.append


def raise_at(index: int, exc: BaseException) -> Callable[[TokenEvent], None]:
    def callback(event: TokenEvent) -> None:
        if event.index == index:
            raise exc

    return callback


# --------------------------------------------------------------------------- item 2


def test_a_raising_callback_ends_only_its_own_request() -> None:
    """a's callback raises on its 2nd token, in the step where b finishes (b's last token
    comes after a's in that step's responses) and c goes on: b and c lose nothing."""
    h = Harness()
    first = h.engine.submit("a", prompt_of(6), max_tokens=2)
    (a1,) = h.steps()
    assert a1.blocks is not None
    a_context = [*a1.blocks.token_ids, 5, 6]
    b_events, b_record = recorder()
    c_events, c_record = recorder()
    h.engine.submit("a", a_context, a1.blocks, 6, on_token=raise_at(1, RuntimeError("boom")))
    h.engine.submit("b", prompt_of(7, 2), max_tokens=2, on_token=b_record)
    h.engine.submit("c", prompt_of(9, 3), max_tokens=5, on_token=c_record)
    done = by_agent(h.steps())

    a, b, c = done["a"], done["b"], done["c"]
    assert a.finish_reason == "error" and isinstance(a.error, GenerationError)
    assert isinstance(a.error.__cause__, RuntimeError) and "on_token" in str(a.error)
    assert a.blocks == a1.blocks and h.pool.is_live(a1.blocks)  # the old cache stays valid
    for completion, prompt, n, events in ((b, prompt_of(7, 2), 2, b_events),
                                          (c, prompt_of(9, 3), 5, c_events)):  # fmt: skip
        assert completion.error is None
        assert list(completion.token_ids) == reference_tokens(h.model, prompt, n)
        assert [e.token for e in events] == list(completion.token_ids)
    assert b.blocks is not None and c.blocks is not None
    # a's turn took its blocks back: only the three caches are held
    held = {*a1.blocks.block_ids, *b.blocks.block_ids, *c.blocks.block_ids}
    assert h.pool.num_used == len(held) and h.pool.num_handles == 3
    assert h.gens[-1].num_active == 0  # a was removed from the batch generator
    h.pool.check_invariants()
    assert first != a.uid
    # the agent can go on from its old cache
    h.engine.submit("a", a_context, a1.blocks, 3)
    (again,) = h.steps()
    assert again.error is None and again.cached_tokens == len(a1.blocks.token_ids)


def test_a_callback_raising_on_the_last_token_frees_the_request() -> None:
    h = Harness()
    h.engine.submit("a", prompt_of(6), max_tokens=3, on_token=raise_at(2, ValueError("late")))
    h.engine.submit("b", prompt_of(6, 2), max_tokens=3)
    done = by_agent(h.steps())
    assert done["a"].finish_reason == "error" and done["a"].blocks is None
    assert done["a"].token_ids == tuple(reference_tokens(h.model, prompt_of(6), 3))
    assert done["b"].error is None and done["b"].blocks is not None
    assert h.pool.num_used == len(done["b"].blocks.block_ids) and h.pool.num_handles == 1
    assert not h.engine.is_in_flight("a")


@pytest.mark.parametrize("index", [0, 1, 3], ids=["first", "middle", "last"])
def test_a_callback_may_cancel_its_own_request(index: int) -> None:
    h = Harness()
    uids: dict[str, int] = {}

    def cancel_self(event: TokenEvent) -> None:
        if event.index == index:
            assert h.engine.cancel(uids["a"])

    uids["a"] = h.engine.submit("a", prompt_of(6), max_tokens=4, on_token=cancel_self)
    h.engine.submit("b", prompt_of(6, 2), max_tokens=4)
    done = by_agent(h.steps())
    assert sorted(done) == ["b"]  # a cancelled request reports no completion
    assert done["b"].error is None
    assert list(done["b"].token_ids) == reference_tokens(h.model, prompt_of(6, 2), 4)
    assert done["b"].blocks is not None
    assert h.pool.num_used == len(done["b"].blocks.block_ids) and h.pool.num_handles == 1
    assert h.gens[-1].num_active == 0
    h.engine.submit("a", prompt_of(6), max_tokens=2)  # the agent is free again
    assert h.steps()[0].error is None


def test_a_callback_may_cancel_another_request_of_the_same_step() -> None:
    h = Harness()
    uids: dict[str, int] = {}

    def cancel_b(event: TokenEvent) -> None:
        if event.index == 1:
            h.engine.cancel(uids["b"])

    uids["a"] = h.engine.submit("a", prompt_of(6), max_tokens=3, on_token=cancel_b)
    uids["b"] = h.engine.submit("b", prompt_of(6, 2), max_tokens=2)  # finishes in that step
    done = by_agent(h.steps())
    assert sorted(done) == ["a"] and done["a"].error is None
    assert done["a"].blocks is not None and h.pool.num_handles == 1


def test_a_failure_after_the_final_scatter_ends_only_that_request() -> None:
    """The text of a completion is decoded last; a tokenizer that cannot decode one agent's
    tokens fails that agent alone (its blocks are freed), not the step."""
    h = Harness()

    class PickyTokenizer(FakeTokenizer):
        def decode(self, ids: Sequence[int]) -> str:
            if len(ids) == 3:
                raise KeyError("no text for these ids")
            return super().decode(ids)

    h.engine.tokenizer = PickyTokenizer(VOCAB)
    h.engine.submit("a", prompt_of(6), max_tokens=3)
    h.engine.submit("b", prompt_of(6, 2), max_tokens=2)
    h.engine.submit("c", prompt_of(6, 3), max_tokens=3)  # finishes in the same step as a
    done = by_agent(h.steps())
    assert done["a"].finish_reason == done["c"].finish_reason == "error"
    assert done["b"].error is None and done["b"].blocks is not None
    assert h.pool.num_used == len(done["b"].blocks.block_ids) and h.pool.num_handles == 1
    h.pool.check_invariants()


def test_a_callback_cannot_step_the_engine_again() -> None:
    h = Harness()
    h.engine.submit("a", prompt_of(6), max_tokens=3, on_token=lambda e: h.engine.drain() and None)
    h.engine.submit("b", prompt_of(6, 2), max_tokens=3)
    done = by_agent(h.steps())
    assert isinstance(done["a"].error, InvalidRequestError)
    assert "inside a step" in str(done["a"].error)
    assert done["b"].error is None


def test_keyboard_interrupt_in_a_callback_loses_no_other_request() -> None:
    h = Harness()
    h.engine.submit("a", prompt_of(6), max_tokens=4, on_token=raise_at(1, KeyboardInterrupt()))
    h.engine.submit("b", prompt_of(6, 2), max_tokens=2)  # b finishes in the interrupted step
    done: list[CompletedGeneration] = []
    with pytest.raises(KeyboardInterrupt):
        for _ in range(20):
            done.extend(h.engine.step())
    assert done == []
    done = by_agent(h.steps())  # the interrupted step's endings come back now
    assert sorted(done) == ["a", "b"]
    assert done["a"].finish_reason == "error" and done["b"].error is None
    assert done["b"].blocks is not None
    assert h.pool.num_used == len(done["b"].blocks.block_ids) and h.pool.num_handles == 1


def test_keyboard_interrupt_in_the_batch_step_ends_the_batch_cleanly() -> None:
    h = Harness()
    h.engine.submit("a", prompt_of(6), max_tokens=4)
    h.engine.submit("b", prompt_of(6, 2), max_tokens=4)
    list(h.engine.step())  # started
    h.gens[-1].fail_next = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        list(h.engine.step())
    done = by_agent(h.engine.drain())
    assert sorted(done) == ["a", "b"] and all(c.finish_reason == "error" for c in done.values())
    assert h.pool.num_used == 0 and h.pool.num_handles == 0 and not h.engine.has_work
    h.engine.submit("a", prompt_of(6), max_tokens=2)  # a fresh generator serves the next ones
    assert h.steps()[0].error is None and len(h.gens) == 2


def test_driving_the_engine_from_a_second_thread_is_refused() -> None:
    h = Harness()
    h.engine.submit("a", prompt_of(6), max_tokens=2)
    list(h.engine.step())  # this thread drives the engine now
    errors: list[BaseException] = []

    def other() -> None:
        h.engine.submit("b", prompt_of(6, 2), max_tokens=2)  # allowed from any thread
        for call in (h.engine.step, h.engine.drain, lambda: h.engine.cancel(0), h.engine.close):
            try:
                call()
            except InvalidRequestError as exc:
                errors.append(exc)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert len(errors) == 4 and all("drives this engine" in str(e) for e in errors)
    done = by_agent(h.steps())
    assert sorted(done) == ["a", "b"] and all(c.error is None for c in done.values())


# --------------------------------------------------------------------------- item 4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 1.0, "top_k": 2.5},
        {"temperature": 1.0, "top_k": True},
        {"temperature": 1.0, "top_k": "5"},
        {"temperature": "hot"},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"temperature": None},
        {"top_p": "0.5"},
        {"min_p": float("nan")},
        {"stop_token_ids": (1.5,)},
        {"stop_token_ids": 5},
        {"stop_token_ids": "12"},
        {"stop_token_ids": (True,)},
    ],
)
def test_sampling_params_check_their_types(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequestError):
        SamplingParams(**kwargs)


def test_sampling_params_normalise_numpy_numbers() -> None:
    params = SamplingParams(
        temperature=np.float32(0.5), top_k=np.int64(5), stop_token_ids=[np.int32(3), 4]
    )
    assert type(params.top_k) is int and params.top_k == 5  # mlx-lm insists on an int
    assert type(params.temperature) is float and params.temperature == 0.5
    assert params.stop_token_ids == (3, 4) and all(type(t) is int for t in params.stop_token_ids)
    assert hash(params) == hash(SamplingParams(temperature=0.5, top_k=5, stop_token_ids=(3, 4)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sampling": "greedy"}, "sampling must be a SamplingParams"),
        ({"sampling": {"temperature": 1.0}}, "sampling must be a SamplingParams"),
        ({"sampling": SamplingParams(temperature=1.0, top_k=VOCAB)}, "top_k 1000"),
        ({"sampling": SamplingParams(temperature=1.0, top_k=5000)}, "top_k 5000"),
        ({"sampling": SamplingParams(stop_token_ids=(VOCAB,))}, "stop_token_ids"),
        ({"on_token": 5}, "on_token must be callable"),
        ({"on_token": "print"}, "on_token must be callable"),
    ],
)
def test_bad_sampling_and_callbacks_are_refused_at_submit(
    kwargs: dict[str, Any], match: str
) -> None:
    h = Harness()
    h.engine.submit("good-1", prompt_of(6), max_tokens=4)
    list(h.engine.step())  # running
    used = h.pool.num_used
    with pytest.raises(InvalidRequestError, match=match):
        h.engine.submit("bad", prompt_of(6, 2), max_tokens=4, **kwargs)
    assert h.pool.num_used == used and not h.engine.is_in_flight("bad")
    h.engine.submit("good-2", prompt_of(7, 3), max_tokens=4)
    done = by_agent(h.steps())
    assert sorted(done) == ["good-1", "good-2"]
    assert list(done["good-1"].token_ids) == reference_tokens(h.model, prompt_of(6), 4)
    assert list(done["good-2"].token_ids) == reference_tokens(h.model, prompt_of(7, 3), 4)


def test_sampling_bounds_that_fit_the_vocabulary_are_accepted() -> None:
    h = Harness()
    h.engine.submit("a", prompt_of(6), max_tokens=2, sampling=SamplingParams(top_k=VOCAB))
    h.engine.submit(  # greedy ignores top_k; non-greedy needs top_k < vocabulary
        "b", prompt_of(6, 2), max_tokens=2, sampling=SamplingParams(temperature=0, top_k=5000)
    )
    assert h.engine.num_in_flight == 2
    h.engine.close()
    unknown = Harness(vocab_size=None)
    unknown.model.vocab_size = VOCAB
    assert unknown.engine._check_sampling(SamplingParams(top_k=VOCAB - 1)).top_k == VOCAB - 1


# --------------------------------------------------------------------------- item 6: prompts


@pytest.mark.parametrize("prompt", [b"\x01\x02\x03", bytearray(b"\x01\x02"), memoryview(b"ab")])
def test_bytes_prompts_are_refused_as_ambiguous(prompt: Any) -> None:
    h = Harness()
    with pytest.raises(InvalidRequestError, match="text or token ids"):
        h.engine.submit("a", prompt, max_tokens=2)
    assert h.pool.num_used == 0


@pytest.mark.parametrize(
    "prompt",
    [
        range(1, 8),
        np.arange(1, 8, dtype=np.int64),
        np.arange(1, 8, dtype=np.int32),
        np.arange(1, 8, dtype=np.uint16),
        [np.int64(t) for t in range(1, 8)],
        tuple(range(1, 8)),
    ],
    ids=["range", "int64", "int32", "uint16", "list-of-np-ints", "tuple"],
)
def test_ranges_and_numpy_integer_prompts_are_token_ids(prompt: Any) -> None:
    h = Harness()
    h.engine.submit("a", prompt, max_tokens=3)
    (done,) = h.steps()
    assert done.error is None and done.prompt_tokens == 7
    assert list(done.token_ids) == reference_tokens(h.model, list(range(1, 8)), 3)
    assert done.blocks is not None and all(type(t) is int for t in done.blocks.token_ids)


@pytest.mark.parametrize(
    "prompt",
    [
        np.arange(1, 9).reshape(2, 4),
        np.array(5),
        np.array([1.0, 2.0]),
        np.array([True, False]),
        np.array([], dtype=np.int64),
        np.array([1, VOCAB]),
        [1, np.float64(2.0)],
    ],
    ids=["2-d", "0-d", "float", "bool", "empty", "out-of-vocab", "np-float-in-list"],
)
def test_other_arrays_are_refused(prompt: Any) -> None:
    h = Harness()
    with pytest.raises(InvalidRequestError):
        h.engine.submit("a", prompt, max_tokens=2)
    assert h.pool.num_used == 0


def test_text_prompts_are_bounded_by_the_models_vocabulary_too() -> None:
    """The tokenizer (1000 ids) is larger than this model's embedding (100)."""
    h = Harness(vocab_size=100)
    with pytest.raises(InvalidRequestError, match=r"outside \[0, 100\)"):
        h.engine.submit("a", "zzz", max_tokens=2)  # ord("z") == 122
    h.engine.submit("a", "!!!", max_tokens=2)  # ord("!") == 33
    assert h.steps()[0].error is None


@pytest.mark.parametrize("max_tokens", [np.int64(3), 3])
def test_numpy_integer_counts_are_accepted(max_tokens: Any) -> None:
    h = Harness()
    h.engine.submit("a", prompt_of(5), max_tokens=max_tokens)
    (done,) = h.steps()
    assert done.error is None and len(done.token_ids) == 3


@pytest.mark.parametrize("max_tokens", [2.5, "3", True, 0, None])
def test_counts_that_are_not_positive_ints_are_refused(max_tokens: Any) -> None:
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        Harness().engine.submit("a", prompt_of(5), max_tokens=max_tokens)
