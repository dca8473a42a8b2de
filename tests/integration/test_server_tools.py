"""Tools on a real ``kvpool serve`` with the trained default model, driven by the official
``openai`` and ``anthropic`` clients: a call, its result, an answer, in both APIs, streamed
and not; the next turn reuses the session's cache; bad tool input is a 400."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from server_process import ServerProcess

TIMEOUT_S = 120.0
PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather",
           "description": "Get the current weather in a city", "parameters": PARAMS}}  # fmt: skip
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "Current time",
         "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}}  # fmt: skip
ANTHROPIC_WEATHER = {"name": "get_weather", "description": "Get the current weather in a city",
                     "input_schema": PARAMS}  # fmt: skip
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
RESULT = json.dumps({"temperature_c": 18, "sky": "sunny"})
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("tools")
    with ServerProcess(tmp / "sessions", tmp / "models", "--model", str(smollm2_dir)) as proc:
        yield proc
        assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def oai(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT_S
    )


@pytest.fixture(scope="module")
def claude(server: ServerProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=server.url, api_key="none", max_retries=0, timeout=TIMEOUT_S
    )


@pytest.fixture(scope="module")
def model(oai: openai.OpenAI) -> str:
    return oai.models.list().data[0].id


def _session(name: str) -> dict[str, str]:
    return {"X-Session-ID": name}


def test_openai_round_trip(oai: openai.OpenAI, model: str) -> None:
    first = oai.chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=60,
        temperature=0, extra_headers=_session("oai-trip"),
    )  # fmt: skip
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather", {"city": "Paris"})  # fmt: skip
    history = [
        *ASK,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": RESULT},
    ]
    answer = oai.chat.completions.create(
        model=model, messages=history, tools=[WEATHER], max_tokens=40, temperature=0,
        extra_headers=_session("oai-trip"),
    )  # fmt: skip
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].message.content
    # the next turn reuses the whole first prompt and the call from the session's cache
    assert first.usage is not None and answer.usage is not None
    details = answer.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    assert details.cached_tokens >= first.usage.prompt_tokens + 10


def test_without_the_constraint_the_same_request_gets_no_call(
    oai: openai.OpenAI, model: str
) -> None:
    """Negative control for the test above: tool_choice auto, the model answers in text."""
    reply = oai.chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER], max_tokens=60, temperature=0
    )
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "stop"


def test_a_named_function_is_the_one_called(oai: openai.OpenAI, model: str) -> None:
    reply = oai.chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER, CLOCK], max_tokens=60, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )  # fmt: skip
    (call,) = reply.choices[0].message.tool_calls or []
    assert call.function.name == "get_time"
    assert isinstance(json.loads(call.function.arguments), dict)


def test_openai_streamed_round_trip(oai: openai.OpenAI, model: str) -> None:
    with oai.chat.completions.stream(
        model=model, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=60,
        temperature=0, extra_headers=_session("oai-stream"),
    ) as stream:  # fmt: skip
        events = list(stream)
        final = stream.get_final_completion()
    deltas = [e for e in events if e.type == "tool_calls.function.arguments.delta"]
    assert len(deltas) > 1  # the arguments arrive in pieces, as they are generated
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather", {"city": "Paris"})  # fmt: skip
    history = [
        *ASK,
        {"role": "assistant", "tool_calls": [{"id": call.id, "type": "function", "function": {
            "name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": RESULT},
    ]  # fmt: skip
    chunks = list(
        oai.chat.completions.create(
            model=model, messages=history, tools=[WEATHER], max_tokens=40, temperature=0,
            stream=True, stream_options={"include_usage": True},
            extra_headers=_session("oai-stream"),
        )
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert (usage.prompt_tokens_details.cached_tokens or 0) > len(ASK[0]["content"]) // 4 + 150


def test_anthropic_round_trip(claude: anthropic.Anthropic, model: str) -> None:
    first = claude.messages.create(
        model=model, messages=ASK, tools=[ANTHROPIC_WEATHER], tool_choice={"type": "any"},
        max_tokens=60, extra_body=GREEDY, extra_headers=_session("claude-trip"),
    )  # fmt: skip
    assert first.stop_reason == "tool_use"
    (use,) = first.content
    assert use.type == "tool_use" and use.id.startswith("toolu_")
    assert (use.name, use.input) == ("get_weather", {"city": "Paris"})
    history: list[Any] = [
        *ASK,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": use.id, "content": RESULT}]},
    ]  # fmt: skip
    answer = claude.messages.create(
        model=model, messages=history, tools=[ANTHROPIC_WEATHER], max_tokens=40,
        extra_body=GREEDY, extra_headers=_session("claude-trip"),
    )  # fmt: skip
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in answer.content] == ["text"]
    prompt_1 = first.usage.input_tokens + (first.usage.cache_read_input_tokens or 0)
    assert (answer.usage.cache_read_input_tokens or 0) >= prompt_1 + 10


def test_anthropic_streamed_round_trip(claude: anthropic.Anthropic, model: str) -> None:
    with claude.messages.stream(
        model=model, messages=ASK, tools=[ANTHROPIC_WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"}, max_tokens=60, extra_body=GREEDY,
        extra_headers=_session("claude-stream"),
    ) as stream:  # fmt: skip
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert kinds.count("input_json") > 1  # input_json_delta pieces
    assert final.stop_reason == "tool_use"
    (use,) = final.content
    assert use.type == "tool_use" and use.input == {"city": "Paris"}
    history: list[Any] = [
        *ASK,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in final.content]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": use.id, "content": RESULT}]},
    ]  # fmt: skip
    with claude.messages.stream(
        model=model, messages=history, tools=[ANTHROPIC_WEATHER], max_tokens=40,
        extra_body=GREEDY, extra_headers=_session("claude-stream"),
    ) as stream:  # fmt: skip
        text = "".join(stream.text_stream)
        answer = stream.get_final_message()
    assert text and [b.type for b in answer.content] == ["text"]
    assert (answer.usage.cache_read_input_tokens or 0) > 150


def test_bad_tool_input_is_a_400_in_each_apis_shape(
    oai: openai.OpenAI, claude: anthropic.Anthropic, model: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(
            model=model, messages=ASK, tools=[WEATHER], max_tokens=5,
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )  # fmt: skip
    body: Any = info.value.body
    assert body["param"] == "tool_choice" and "'nope'" in body["message"]
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=model, messages=ASK, tools=[bad], max_tokens=5)
    body = info.value.body
    assert body["code"] == "invalid_schema" and "Invalid type: foo" in body["message"]
    with pytest.raises(anthropic.BadRequestError) as ainfo:
        claude.messages.create(
            model=model, messages=ASK, tools=[ANTHROPIC_WEATHER], max_tokens=5,
            tool_choice={"type": "tool", "name": "nope"},
        )  # fmt: skip
    error: Any = ainfo.value.body
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert "'nope'" in error["error"]["message"]
