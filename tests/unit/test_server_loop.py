"""The server's engine loop and request parsing, on fakes (no MLX, no HTTP)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fakes import SPEC

from kvpool import BlockPool, BlockPoolBatchEngine
from kvpool.sampling import GREEDY
from kvpool.server import anthropic_api, openai_api
from kvpool.server.errors import ApiError, anthropic_body, openai_body
from kvpool.server.loop import Admitted, Channel, EngineLoop, Finished, Refused, Token, WorkItem
from kvpool.server.metrics import ServerMetrics
from kvpool.server.params import Body, Limits
from kvpool.server.sessions import SessionRegistry, ephemeral_agent_id, validate_session_id
from kvpool.store import AgentCacheStore
from kvpool.testing import (
    FakeBatchGenerator,
    FakeModel,
    FakeStorage,
    FakeTokenizer,
    reference_tokens,
)

TIMEOUT_S = 10.0


class SlowGenerator(FakeBatchGenerator):
    """A fake batch generator whose steps take 2 ms (so a long request is still running
    when a test acts on it)."""

    def next(self) -> Any:
        time.sleep(0.002)
        return super().next()


def make_loop(tmp_path: Path, num_blocks: int = 64, max_queue: int = 8) -> EngineLoop:
    pool = BlockPool(SPEC, num_blocks=num_blocks, storage=FakeStorage)
    engine = BlockPoolBatchEngine(
        FakeModel(SPEC), FakeTokenizer(), pool, SPEC, batch_gen_factory=SlowGenerator
    )
    store = AgentCacheStore(engine, tmp_path, fingerprint="sha256:fake")
    loop = EngineLoop(
        engine, store, pool, SessionRegistry(tmp_path), ServerMetrics(), max_queue=max_queue
    )
    loop.start()
    return loop


def prompt_of(n: int, seed: int = 1) -> tuple[int, ...]:
    return tuple(1 + (seed * 7919 + i * 104729) % 997 for i in range(n))


def item(channel: Channel, session: str | None, prompt: tuple[int, ...], n: int = 3) -> WorkItem:
    return WorkItem(
        agent_id=session or ephemeral_agent_id(),
        session_id=session,
        prompt=prompt,
        max_tokens=n,
        sampling=GREEDY,
        channel=channel,
        t_received=time.perf_counter(),
    )


async def until_end(channel: Channel) -> list[Any]:
    events = []
    while True:
        event = await asyncio.wait_for(channel.get(), TIMEOUT_S)
        events.append(event)
        if isinstance(event, Finished | Refused):
            return events


def on_loop(loop: EngineLoop, fn: Callable[[], Any]) -> Any:
    return loop.call(fn).result(TIMEOUT_S)


def test_a_session_turn_streams_tokens_and_its_second_turn_is_cached(tmp_path: Path) -> None:
    loop = make_loop(tmp_path)
    prompt = prompt_of(10)

    async def main() -> tuple[list[Any], list[Any]]:
        ch = Channel(asyncio.get_running_loop())
        loop.submit(item(ch, "s1", prompt))
        first = await until_end(ch)
        done = first[-1].completion
        loop.submit(item(ch, "s1", (*prompt, *done.token_ids, 5, 6)))
        return first, await until_end(ch)

    first, second = asyncio.run(main())
    loop.stop()
    assert isinstance(first[0], Admitted)
    tokens = [e.token for e in first if isinstance(e, Token)]
    assert tokens == list(first[-1].completion.token_ids)
    assert tokens == reference_tokens(FakeModel(SPEC), prompt, 3)
    assert first[-1].completion.cached_tokens == 0
    assert second[-1].completion.cached_tokens >= len(prompt)
    assert loop.sessions.get("s1") is not None and loop.sessions.get("s1").turns == 2  # type: ignore[union-attr]
    assert list(tmp_path.glob("s1.*"))  # stop wrote the session to disk


def test_busy_session_is_refused_with_409_and_cancel_frees_blocks(tmp_path: Path) -> None:
    loop = make_loop(tmp_path)
    baseline = on_loop(loop, lambda: loop.pool.num_free)

    async def main() -> tuple[list[Any], list[Any]]:
        ch1, ch2 = Channel(asyncio.get_running_loop()), Channel(asyncio.get_running_loop())
        long = item(ch1, "busy", prompt_of(8), n=200)  # 52 of 64 blocks, 0.4 s
        loop.submit(long)
        assert isinstance(await asyncio.wait_for(ch1.get(), TIMEOUT_S), Admitted)
        assert on_loop(loop, lambda: loop.pool.num_free) < baseline  # the control: held
        loop.submit(item(ch2, "busy", prompt_of(8)))
        refused = await until_end(ch2)
        loop.cancel(long)
        return refused, []

    refused, _ = asyncio.run(main())
    (event,) = refused
    assert isinstance(event, Refused) and event.error.status == 409
    deadline = time.monotonic() + TIMEOUT_S
    while on_loop(loop, lambda: loop.pool.num_free) != baseline:
        assert time.monotonic() < deadline, "the cancelled request's blocks were not freed"
        time.sleep(0.01)
    assert on_loop(loop, lambda: loop.in_flight("busy")) is False
    loop.stop()


def test_ephemeral_agents_are_forgotten_and_a_full_queue_is_503(tmp_path: Path) -> None:
    loop = make_loop(tmp_path, num_blocks=4, max_queue=0)

    async def main() -> tuple[list[Any], list[Any], str]:
        ch1, ch2 = Channel(asyncio.get_running_loop()), Channel(asyncio.get_running_loop())
        big = item(ch1, None, prompt_of(4), n=11)  # 15 tokens: all 4 blocks
        loop.submit(big)
        assert isinstance(await asyncio.wait_for(ch1.get(), TIMEOUT_S), Admitted)
        loop.submit(item(ch2, "other", prompt_of(4), n=4))
        second = await until_end(ch2)
        return await until_end(ch1), second, big.agent_id

    first, second, agent = asyncio.run(main())
    assert isinstance(first[-1], Finished)
    (event,) = second
    assert isinstance(event, Refused) and event.error.status == 503
    assert event.error.headers["Retry-After"] == "1"
    assert on_loop(loop, lambda: loop.store.tier(agent)) is None  # forgotten
    assert on_loop(loop, lambda: loop.pool.num_free) == 4
    loop.stop()


def test_calls_after_stop_are_refused(tmp_path: Path) -> None:
    loop = make_loop(tmp_path)
    loop.stop()
    with pytest.raises(ApiError, match="shutting down"):
        loop.call(lambda: 1).result(TIMEOUT_S)


# -- parsing -----------------------------------------------------------------------------


def test_chat_parsing_maps_fields_and_refuses_what_it_cannot_do() -> None:
    gen = openai_api.parse_chat(
        Body(
            {
                "model": "m",
                "messages": [
                    {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
                    {"role": "user", "content": "hi"},
                ],
                "max_completion_tokens": 7,
                "temperature": 0,
                "stop": "x",
                "stream": True,
                "stream_options": {"include_usage": True},
                "user": "u1",
            }
        )
    )
    assert gen.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    assert (gen.max_tokens, gen.max_tokens_param, gen.temperature) == (
        7, "max_completion_tokens", 0.0
    )  # fmt: skip
    assert gen.stop == ["x"] and gen.stream and gen.include_usage
    for bad, fragment in [
        ({"n": 2}, "n=2 is not supported"),
        ({"top_logprobs": 2}, "top_logprobs requires logprobs: true"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs must be <= 20"),
        ({"logprobs": 1}, "logprobs must be a boolean"),
        ({"stop": ["x" * 257]}, "at most 256"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
        ({"stop": [""]}, "non-empty string"),
        ({"tools": [{}]}, "tools[0].type must be 'function'"),
        ({"temperature": 3}, "temperature must be in [0.0, 2.0]"),
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"messages": [{"role": "function", "content": "x"}]}, "role 'function' is not supported"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id must be a string"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text"),
        ({"bogus": 1}, "unsupported field(s): bogus"),
    ]:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **bad}
        with pytest.raises(ApiError, match=None) as info:
            openai_api.parse_chat(Body(body))
        assert fragment in info.value.message, (bad, info.value.message)
        assert info.value.status == 400


def test_messages_parsing_and_error_shapes() -> None:
    gen = anthropic_api.parse_messages(
        Body({"model": "m", "max_tokens": 5, "system": "s", "top_k": 3,
              "messages": [{"role": "user", "content": "hi"}], "stop_sequences": ["a"]})
    )  # fmt: skip
    assert gen.messages == [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
    assert (gen.max_tokens, gen.top_k, gen.stop) == (5, 3, ["a"])
    with pytest.raises(ApiError) as info:
        anthropic_api.parse_messages(Body({"model": "m", "messages": []}))
    error = info.value
    assert anthropic_body(error) == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "missing required field 'max_tokens'",
        },
    }
    assert openai_body(error)["error"]["param"] == "max_tokens"


def test_limits_and_session_ids() -> None:
    limits = Limits(max_context_tokens=100, max_tokens_cap=50)
    limits.check(10, 50, "max_tokens", "prompt")
    with pytest.raises(ApiError, match="the prompt is 100 tokens"):
        limits.check(100, 1, "max_tokens", "prompt")
    with pytest.raises(ApiError, match="max_tokens=51 is too large"):
        limits.check(10, 51, "max_tokens", "prompt")
    with pytest.raises(ApiError, match="max_tokens=60 is too large"):
        Limits(max_context_tokens=100, max_tokens_cap=500).check(41, 60, "max_tokens", "prompt")
    assert validate_session_id("a.b-c_9", "h") == "a.b-c_9"
    for bad in ["", "-x", "_x", "a/b", "x" * 129, "é"]:
        with pytest.raises(ApiError):
            validate_session_id(bad, "h")
    assert ephemeral_agent_id().startswith("_")  # never a valid session id
