"""Stop strings and logprobs through the real engine over the fakes."""

from __future__ import annotations

from fakes import fake_engine, prompt_of

from kvpool import BlockPoolBatchEngine, CompletedGeneration, TokenEvent
from kvpool.sampling import SamplingParams
from kvpool.testing import fake_logprobs


def _run(
    engine: BlockPoolBatchEngine,
    agent: str,
    prompt: list[int],
    max_tokens: int,
    sampling: SamplingParams | None = None,
    cache: object = None,
) -> tuple[CompletedGeneration, list[TokenEvent]]:
    events: list[TokenEvent] = []
    engine.submit(agent, prompt, cache, max_tokens, sampling=sampling, on_token=events.append)  # type: ignore[arg-type]
    (done,) = engine.drain()
    assert done.error is None, done.error
    return done, events


def _reference(prompt: list[int], max_tokens: int) -> CompletedGeneration:
    done, _ = _run(fake_engine(), "ref", prompt, max_tokens)
    assert done.finish_reason == "length"
    return done


def test_a_two_token_stop_string_ends_the_turn_before_it() -> None:
    prompt = prompt_of(9)
    ref = _reference(prompt, 12)
    stop = ref.text[4:6]  # two tokens of the fake (one character each)
    cut = ref.text.find(stop)
    engine = fake_engine()
    done, events = _run(engine, "a", prompt, 12, SamplingParams(stop=(stop,)))
    assert (done.text, done.stop, done.finish_reason) == (ref.text[:cut], stop, "stop")
    # generation ended at the token that completed the match
    assert done.token_ids == ref.token_ids[: cut + len(stop)]
    assert "".join(e.text for e in events) == done.text
    assert not any(stop[0] in e.text and e.index >= cut for e in events)
    # the turn's cache is kept: the next turn reuses the prompt and what was generated
    assert done.blocks is not None and done.blocks.total_tokens >= len(prompt) + cut
    follow = [*prompt, *done.token_ids, 5, 6]
    nxt, _ = _run(engine, "a", follow, 2, cache=done.blocks)
    assert nxt.cached_tokens >= len(prompt) + cut
    engine.pool.release(nxt.blocks)  # type: ignore[arg-type]
    assert engine.pool.num_used == 0  # nothing leaked by the early end
    # negative control: without the stop string the same request runs to max_tokens
    plain, _ = _run(fake_engine(), "a", prompt, 12)
    assert plain.text == ref.text and plain.stop is None


def test_a_stop_string_ends_only_its_own_request() -> None:
    ref_a, ref_b = _reference(prompt_of(9), 12), _reference(prompt_of(7, 2), 12)
    engine = fake_engine()
    stop = ref_a.text[3:5]
    engine.submit("a", prompt_of(9), None, 12, sampling=SamplingParams(stop=(stop,)))
    engine.submit("b", prompt_of(7, 2), None, 12)
    done = {c.agent_id: c for c in engine.drain()}
    assert done["a"].stop == stop and done["a"].text == ref_a.text[: ref_a.text.find(stop)]
    assert done["b"].token_ids == ref_b.token_ids and done["b"].stop is None


def test_a_stop_string_that_never_appears_changes_nothing() -> None:
    ref = _reference(prompt_of(9), 12)
    done, events = _run(fake_engine(), "a", prompt_of(9), 12, SamplingParams(stop=("\x00\x01",)))
    assert (done.text, done.token_ids, done.stop) == (ref.text, ref.token_ids, None)
    assert "".join(e.text for e in events) == ref.text


def test_logprobs_are_the_generators_and_only_when_asked() -> None:
    vocab = 1000
    done, events = _run(fake_engine(), "a", prompt_of(9), 6, SamplingParams(logprobs=2))
    assert done.logprobs is not None and len(done.logprobs) == done.token_count == 6
    for entry, token, event in zip(done.logprobs, done.token_ids, events, strict=True):
        row = fake_logprobs(token, vocab)
        assert entry.token == token and entry.logprob == float(row[token])
        assert [t for t, _ in entry.top] == [token, (7 * token + 1) % vocab]
        assert [lp for _, lp in entry.top] == [
            float(row[token]),
            float(row[(7 * token + 1) % vocab]),
        ]
        assert event.logprob == entry
    plain, events = _run(fake_engine(), "a", prompt_of(9), 6)
    assert plain.logprobs is None and all(e.logprob is None for e in events)
    zero, _ = _run(fake_engine(), "a", prompt_of(9), 6, SamplingParams(logprobs=0))
    assert zero.logprobs is not None and all(e.top == () for e in zero.logprobs)


def test_logprobs_stop_with_the_text() -> None:
    ref = _reference(prompt_of(9), 12)
    stop = ref.text[4:6]
    cut = ref.text.find(stop)
    done, _ = _run(fake_engine(), "a", prompt_of(9), 12, SamplingParams(stop=(stop,), logprobs=1))
    assert done.logprobs is not None
    assert [e.token for e in done.logprobs] == list(ref.token_ids[:cut])
