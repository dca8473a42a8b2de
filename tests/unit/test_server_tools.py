"""kvpool.server.tools: rendering, reading calls back, streaming them, enforcing them; the
APIs' tool fields and their errors."""

from __future__ import annotations

import json
from typing import Any

import pytest
from test_grammar import EOS, byte_tokenizer

from kvpool.grammar import GrammarCompiler, GrammarError
from kvpool.server import anthropic_api, openai_api
from kvpool.server.errors import ApiError
from kvpool.server.params import Body
from kvpool.server.tools import (
    HERMES,
    CallArguments,
    CallStart,
    TextPiece,
    Tool,
    ToolCall,
    ToolFormat,
    ToolUse,
)

WEATHER = Tool(
    "get_weather",
    "Weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
CLOCK = Tool("get_time", "", {"type": "object", "properties": {}})
USE = ToolUse((WEATHER, CLOCK))
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


def test_hermes_renders_tools_calls_and_results_as_plain_messages() -> None:
    history: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            ToolCall("c1", "get_weather", '{"city": "Oslo"}'),
            ToolCall("c2", "get_time", "{}"),
        ]},
        {"role": "tool", "content": "12 C", "tool_call_id": "c1"},
        {"role": "tool", "content": "noon", "tool_call_id": "c2"},
    ]  # fmt: skip
    messages, extra = HERMES.render(history, USE)
    assert extra == {}
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert all(set(m) == {"role", "content"} for m in messages)
    system = messages[0]["content"]
    assert system.startswith("Be brief.\n\n# Tools\n")
    assert json.dumps(WEATHER.as_openai()) in system and "<tool_call>" in system
    time_call = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    assert messages[2]["content"] == CALL + "\n" + time_call
    assert messages[3]["content"] == (
        "<tool_response>\n12 C\n</tool_response>\n<tool_response>\nnoon\n</tool_response>"
    )
    # no tools and no tool messages: the messages as they are (the template's default)
    plain = [{"role": "user", "content": "hi"}]
    assert HERMES.render(plain, None) == (plain, {})


def test_a_call_rendered_is_the_text_the_grammar_writes() -> None:
    """The rendered history is a prefix of what the model generated: the session reuses it."""
    compiler = GrammarCompiler(byte_tokenizer(), EOS + 1, [EOS])
    grammar = HERMES.grammar(ToolUse((WEATHER, CLOCK), "get_weather"))
    assert grammar is not None
    matcher = compiler.matcher(grammar)
    mask = matcher.advance(None)
    for b in CALL.encode():
        assert mask[b], chr(b)
        mask = matcher.advance(b)
    assert [i for i in range(EOS + 1) if mask[i]] == [EOS]  # one call, then the end
    (call,) = HERMES.parse(CALL, USE)[1]
    rendered = HERMES.render([{"role": "assistant", "content": "", "tool_calls": [call]}], None)
    assert rendered[0][0]["content"] == CALL
    # required: any tool, and only tools of the request
    required = compiler.matcher(HERMES.grammar(ToolUse((WEATHER, CLOCK), "required")) or "")
    mask = required.advance(None)
    for b in b'<tool_call>\n{"name": "get_':
        mask = required.advance(b)
    assert {chr(i) for i in range(256) if mask[i]} == {"w", "t"}


def test_free_choices_have_no_grammar_and_other_formats_cannot_be_forced() -> None:
    assert HERMES.grammar(ToolUse((WEATHER,), "auto")) is None
    assert HERMES.grammar(ToolUse((WEATHER,), "none")) is None
    other = ToolFormat("template", True, "[TOOL_CALLS]", "</s>")
    with pytest.raises(GrammarError, match="does not support"):
        other.grammar(ToolUse((WEATHER,), "required"))


def test_parse_reads_calls_and_keeps_what_is_not_one() -> None:
    text, calls = HERMES.parse(f"Let me check.\n{CALL}\n", USE)
    assert text == "Let me check."
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Oslo"}')]
    assert calls[0].id.startswith("call_") and calls[0].input == {"city": "Oslo"}
    for kept in [
        "no call here",
        "<tool_call>\nnot json\n</tool_call>",
        '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',  # not a tool of it
        CALL[:-3],  # cut short (max_tokens)
    ]:
        assert HERMES.parse(kept, USE) == (kept, [])


def _stream(text: str, pieces: int) -> list[Any]:
    stream = USE.stream()
    events = []
    for i in range(0, len(text), pieces):
        events += stream.feed(text[i : i + pieces])
    return events + stream.finish()


@pytest.mark.parametrize("pieces", [1, 3, 7, 1000])
def test_the_stream_sends_what_parse_finds(pieces: int) -> None:
    text = f"Checking <tool_call is a tag.\n{CALL}\n{CALL}\n"
    events = _stream(text, pieces)
    content = "".join(e.text for e in events if isinstance(e, TextPiece))
    starts = [e for e in events if isinstance(e, CallStart)]
    args = ["".join(e.text for e in events if isinstance(e, CallArguments) and e.index == i)
            for i in range(len(starts))]  # fmt: skip
    parsed_text, calls = HERMES.parse(text, USE)
    assert content == parsed_text == "Checking <tool_call is a tag."
    assert [(s.index, s.name) for s in starts] == [(0, "get_weather"), (1, "get_weather")]
    assert args == [c.arguments for c in calls]
    # the name comes before the arguments: a client sees the call as it is generated
    assert isinstance(events[[type(e) for e in events].index(CallStart) + 1], CallArguments)


def test_the_stream_without_calls_is_the_text() -> None:
    text = "Plain answer with a < sign and <tool_c"
    assert "".join(e.text for e in _stream(text, 2) if isinstance(e, TextPiece)) == text
    # a call cut short is text at the end, as parse leaves it (control for the test above)
    events = _stream(CALL[:30], 4)
    assert "".join(e.text for e in events if isinstance(e, TextPiece)) == CALL[:30]


class _Template:
    """A tokenizer whose chat template does or does not render tools."""

    def __init__(self, renders_tools: bool, markers: bool) -> None:
        self.renders_tools = renders_tools
        if markers:
            self.tool_call_start, self.tool_call_end = "<tool_call>", "</tool_call>"
            self.tool_parser = lambda text, tools: json.loads(text)

    def apply_chat_template(self, messages: Any, tools: Any = None, **kwargs: Any) -> str:
        return repr(messages) + (repr(tools) if tools and self.renders_tools else "")


def test_the_format_follows_the_template() -> None:
    assert ToolFormat.of(_Template(False, True)) is HERMES
    native = ToolFormat.of(_Template(True, True))
    assert native.native and native.json_calls and native.parser is not None
    messages, extra = native.render(
        [{"role": "assistant", "content": "", "tool_calls": [ToolCall("c", "get_time", "{}")]}],
        USE,
    )
    assert extra == {"tools": [WEATHER.as_openai(), CLOCK.as_openai()]}
    assert messages[0]["tool_calls"][0]["function"] == {"name": "get_time", "arguments": {}}
    assert native.parse(CALL, USE)[1][0].name == "get_weather"  # through its parser
    unmarked = ToolFormat.of(_Template(True, False))
    assert unmarked.native and unmarked.json_calls  # hermes markers by default


_CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
_TOOL = {"type": "function", "function": {"name": "get_weather",
                                          "parameters": WEATHER.parameters}}  # fmt: skip


def test_openai_tools_and_history_parse() -> None:
    gen = openai_api.parse_chat(Body({
        **_CHAT, "tools": [_TOOL], "tool_choice": {"type": "function",
                                                  "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "12 C"},
        ],
    }))  # fmt: skip
    assert gen.tools is not None
    assert (gen.tools.choice, gen.tools.parallel, gen.tools.tools) == ("get_weather", False, (
        Tool("get_weather", "", WEATHER.parameters),))  # fmt: skip
    assert gen.messages is not None
    assert gen.messages[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [ToolCall("c1", "get_weather", '{"city": "Oslo"}')],
    }
    assert gen.messages[2] == {"role": "tool", "content": "12 C", "tool_call_id": "c1"}


@pytest.mark.parametrize(
    ("extra", "fragment", "param"),
    [
        ({"tools": [_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice names the function 'nope', which is not among the tools (get_weather)",
         "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice needs tools", "tool_choice"),
        ({"tools": [_TOOL], "tool_choice": "sometimes"}, "tool_choice 'sometimes'", "tool_choice"),
        ({"tools": [_TOOL, _TOOL]}, "'get_weather' is defined twice", "tools"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "name must be 1-64",
         "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f",
                                                      "parameters": {"type": "foo"}}}]},
         "tools[0].function.parameters: invalid JSON schema: Invalid type: foo", "tools"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type must be 'function'", "tools"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
          "function": {"name": "f", "arguments": "{not json"}}]}]},
         "arguments must be a JSON object in a string", "messages"),
    ],
)  # fmt: skip
def test_openai_tool_errors(extra: dict[str, Any], fragment: str, param: str) -> None:
    with pytest.raises(ApiError) as info:
        openai_api.parse_chat(Body({**_CHAT, **extra}))
    assert info.value.status == 400 and info.value.param == param
    assert fragment in info.value.message, info.value.message


_ATOOL = {"name": "get_weather", "input_schema": WEATHER.parameters}


def test_anthropic_tools_and_history_parse() -> None:
    gen = anthropic_api.parse_messages(Body({
        "model": "m", "max_tokens": 5, "tools": [_ATOOL], "tool_choice": {"type": "any"},
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Oslo"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": "12 C"},
                {"type": "text", "text": "Thanks"},
            ]},
        ],
    }))  # fmt: skip
    assert gen.tools is not None
    assert (gen.tools.choice, gen.tools.id_prefix) == ("required", "toolu_")
    assert gen.messages == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Checking.",
         "tool_calls": [ToolCall("t1", "get_weather", '{"city": "Oslo"}')]},
        {"role": "tool", "content": "12 C", "tool_call_id": "t1"},
        {"role": "user", "content": "Thanks"},
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"tools": [_ATOOL], "tool_choice": {"type": "tool", "name": "nope"}},
         "tool_choice names the function 'nope'"),
        ({"tool_choice": {"type": "any"}}, "tool_choice needs tools"),
        ({"tools": [{"name": "f"}]}, "tools[0] is missing input_schema"),
        ({"tools": [{"name": "f", "input_schema": {"type": "foo"}}]}, "Invalid type: foo"),
        ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "only custom tools"),
        ({"messages": [{"role": "user", "content": [{"type": "tool_use"}]}]},
         "user messages take text and tool_result blocks"),
    ],
)  # fmt: skip
def test_anthropic_tool_errors(extra: dict[str, Any], fragment: str) -> None:
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(ApiError) as info:
        anthropic_api.parse_messages(Body({**body, **extra}))
    assert info.value.status == 400
    assert fragment in info.value.message, info.value.message


def test_responses_carry_the_calls_in_each_apis_shape() -> None:
    from kvpool.blocks import CompletedGeneration

    c = CompletedGeneration(uid=0, agent_id="a", text=CALL, token_ids=(1, 2), blocks=None,
                            finish_reason="stop", prompt_tokens=3, cached_tokens=0)  # fmt: skip
    oai = openai_api.chat_response("id", "m", c, None, token_ids=False, session_id=None, tools=USE)
    choice = oai["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    ant = anthropic_api.message_response("id", "m", c, token_ids=False, session_id=None,
                                         tools=ToolUse((WEATHER,), id_prefix="toolu_"))  # fmt: skip
    assert ant["stop_reason"] == "tool_use"
    (block,) = ant["content"]
    assert block["type"] == "tool_use" and block["input"] == {"city": "Oslo"}
    assert block["id"].startswith("toolu_")
    # control: tool_choice none reads no calls; the text is the reply
    none = openai_api.chat_response("id", "m", c, None, token_ids=False, session_id=None,
                                    tools=ToolUse((WEATHER,), "none"))  # fmt: skip
    assert none["choices"][0]["message"] == {"role": "assistant", "content": CALL}
    assert none["choices"][0]["finish_reason"] == "stop"


def _sse_events(chunks: list[bytes]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for chunk in chunks:
        for event in chunk.decode().split("\n\n"):
            lines = dict(line.split(": ", 1) for line in event.splitlines() if ": " in line)
            if "data" in lines and lines["data"] != "[DONE]":
                out.append((lines.get("event", ""), json.loads(lines["data"])))
    return out


def test_stream_shapers_open_a_block_per_call() -> None:
    from kvpool.blocks import CompletedGeneration
    from kvpool.server.params import Generation
    from kvpool.server.responders import ChatResponder, MessagesResponder

    c = CompletedGeneration(uid=0, agent_id="a", text="", token_ids=(1,), blocks=None,
                            finish_reason="stop", prompt_tokens=3, cached_tokens=0)  # fmt: skip
    gen = Generation(model="m", tools=ToolUse((WEATHER,), id_prefix="toolu_"))
    shaper = MessagesResponder().stream("m", gen, 3, None)
    chunks = [*shaper.open()]
    for piece in ["Sure.", "\n<tool", "_call>\n{\"name\": \"get_weather\", ", '"arguments": {"ci',
                  'ty": "Oslo"}}\n</tool_call>']:  # fmt: skip
        chunks.append(shaper.text(piece, None, []))
    chunks += shaper.close(c)
    events = _sse_events(chunks)
    shape = [(name, e.get("index"), (e.get("content_block") or e.get("delta") or {}).get("type"))
             for name, e in events if name != "ping"]  # fmt: skip
    assert shape == [
        ("message_start", None, None),
        ("content_block_start", 0, "text"),
        ("content_block_delta", 0, "text_delta"),
        ("content_block_stop", 0, None),
        ("content_block_start", 1, "tool_use"),
        ("content_block_delta", 1, "input_json_delta"),
        ("content_block_delta", 1, "input_json_delta"),
        ("content_block_stop", 1, None),
        ("message_delta", None, None),
        ("message_stop", None, None),
    ]
    partial = "".join(
        e["delta"].get("partial_json", "") for n, e in events if n == "content_block_delta"
    )
    assert json.loads(partial) == {"city": "Oslo"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    # OpenAI: the call's name first, then arguments, finish_reason tool_calls
    gen = Generation(model="m", tools=ToolUse((WEATHER,)))
    oshaper = ChatResponder().stream("m", gen, 3, None)
    chunks = [*oshaper.open(), oshaper.text(CALL, None, []), *oshaper.close(c)]
    deltas = [e["choices"][0] for _, e in _sse_events(chunks)]
    calls = [d["delta"]["tool_calls"][0] for d in deltas if d["delta"].get("tool_calls")]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert "".join(x["function"]["arguments"] for x in calls) == '{"city": "Oslo"}'
    assert deltas[-1]["finish_reason"] == "tool_calls"
