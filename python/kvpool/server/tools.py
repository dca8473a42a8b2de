"""Tools: definitions, the tool-call format a model writes, and what a request asks of them.

Both APIs' tools become :class:`Tool` s and their ``tool_choice`` a :class:`ToolUse`;
history messages that carry calls or results become neutral messages::

    {"role": "assistant", "content": "text", "tool_calls": [ToolCall, ...]}
    {"role": "tool", "content": "result text", "tool_call_id": "call_1"}

A :class:`ToolFormat` renders them for the model's chat template and reads calls back from
the generated text. Two formats:

* the template's own (it renders ``tools`` and ``tool_calls`` itself): calls are read
  between mlx-lm's ``tool_call_start`` / ``tool_call_end`` markers with its ``tool_parser``;
* ``hermes`` (templates that ignore ``tools``, such as SmolLM2's): the tools are written
  into the system message, a call is ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n
  </tool_call>`` and a result a user turn ``<tool_response>\\n...\\n</tool_response>``.

``tool_choice`` "required" or a named function is enforced with a grammar (one or more
calls of the allowed tools, each with its parameters' schema) where calls are JSON between
``<tool_call>`` markers (hermes, and templates of that family).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvpool.grammar import GrammarError, json_schema_grammar, lark_grammar, lark_json, lark_literal

__all__ = [
    "HERMES",
    "CallArguments",
    "CallStart",
    "TextPiece",
    "Tool",
    "ToolCall",
    "ToolCallStream",
    "ToolFormat",
    "ToolUse",
    "call_id",
    "check_parameters",
]

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
START, END = "<tool_call>", "</tool_call>"


def call_id(prefix: str = "call_") -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call; ``parameters`` is a JSON schema (an object's)."""

    name: str
    description: str
    parameters: dict[str, Any]

    def as_openai(self) -> dict[str, Any]:
        """The OpenAI / Hugging Face chat-template form."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call: ``arguments`` is JSON text (an object) in :data:`~kvpool.grammar.JSON_LAYOUT`."""

    id: str
    name: str
    arguments: str

    @property
    def input(self) -> dict[str, Any]:
        value = json.loads(self.arguments)
        return value if isinstance(value, dict) else {}


@dataclass(slots=True)
class ToolUse:
    """A request's tools and what it asks: ``choice`` is "auto", "none", "required" or a
    tool's name; ``parallel`` allows more than one call in a reply."""

    tools: tuple[Tool, ...]
    choice: str = "auto"
    parallel: bool = True
    id_prefix: str = "call_"  # OpenAI's call ids; Anthropic's are "toolu_..."
    format: ToolFormat | None = None  # the model's (set by the server); None: hermes

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """The reply's text and calls (see :meth:`ToolFormat.parse`)."""
        return (self.format or HERMES).parse(text, self)

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self.format or HERMES, self)

    @property
    def parses_calls(self) -> bool:
        return self.choice != "none"

    @property
    def forced(self) -> tuple[Tool, ...]:
        """The tools a reply must call one of (none: the reply is free)."""
        if self.choice == "required":
            return self.tools
        if self.choice in ("auto", "none"):
            return ()
        return tuple(t for t in self.tools if t.name == self.choice)

    @classmethod
    def build(
        cls,
        tools: Sequence[Tool],
        choice: str,
        parallel: bool,
        error: Callable[[str, str], Exception],
        id_prefix: str = "call_",
    ) -> ToolUse:
        """Checks names (unique) and the choice; ``error(message, field)`` is what is raised
        (``field``: "tools" or "tool_choice")."""
        names = [t.name for t in tools]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise error(f"tool name {dup!r} is defined twice", "tools")
        if choice not in ("auto", "none", "required") and choice not in names:
            raise error(
                f"tool_choice names the function {choice!r}, which is not among the tools "
                f"({', '.join(names) or 'none'})",
                "tool_choice",
            )
        return cls(tuple(tools), choice, parallel, id_prefix)


def check_parameters(
    schema: object, where: str, error: Callable[[str], Exception]
) -> dict[str, Any]:
    """A tool's parameter schema: an object schema llguidance accepts."""
    if schema is None:
        return {"type": "object", "properties": {}}
    if not isinstance(schema, dict):
        raise error(f"{where} must be a JSON schema object")
    try:
        json_schema_grammar(schema)
    except GrammarError as exc:
        raise error(f"{where}: {exc}") from None
    return schema


# -- formats -------------------------------------------------------------------------------


_HERMES_SYSTEM = (
    "# Tools\n\n"
    "You can call functions to help with the user's request. Their signatures, one JSON "
    "object per line:\n<tools>\n{tools}\n</tools>\n\n"
    "To call a function, reply with a JSON object holding its name and arguments between "
    "<tool_call> and </tool_call> tags:\n"
    '<tool_call>\n{{"name": "function name", "arguments": {{"arg": "value"}}}}\n</tool_call>'
)


def hermes_call_text(call: ToolCall) -> str:
    """A call as the hermes format writes it (the grammar writes exactly this)."""
    return f'{START}\n{{"name": {json.dumps(call.name)}, "arguments": {call.arguments}}}\n{END}'


@dataclass(frozen=True, slots=True)
class ToolFormat:
    """How one model's chat template takes tools and how its calls are read back.

    ``native``: the template renders ``tools`` / ``tool_calls`` / ``tool`` messages
    itself; else the hermes rendering above. ``start`` / ``end``: the markers around a
    call; ``parser(text, tools)``: mlx-lm's parser of the text between them (None: JSON
    ``{"name", "arguments"}``).
    """

    name: str
    native: bool
    start: str = START
    end: str = END
    parser: Callable[..., Any] | None = field(default=None, compare=False)

    @classmethod
    def of(cls, tokenizer: Any) -> ToolFormat:
        """The format of ``tokenizer``'s chat template: its own if rendering a tool changes
        its output (then mlx-lm's markers and parser, public on its TokenizerWrapper, when
        it has them), else hermes."""
        probe = [{"role": "user", "content": "x"}]
        tool = Tool("probe_tool", "", {"type": "object", "properties": {}}).as_openai()
        try:
            plain = tokenizer.apply_chat_template(probe, tokenize=False)
            with_tools = tokenizer.apply_chat_template(probe, tools=[tool], tokenize=False)
        except Exception:  # no template, or one that refuses tools
            return HERMES
        if plain == with_tools:
            return HERMES
        start = getattr(tokenizer, "tool_call_start", None)
        end = getattr(tokenizer, "tool_call_end", None)
        parser = getattr(tokenizer, "tool_parser", None)
        if isinstance(start, str) and isinstance(end, str) and start:
            return cls("template", True, start, end, parser)
        return cls("template", True)

    @property
    def json_calls(self) -> bool:
        """Calls are ``{"name", "arguments"}`` JSON between ``<tool_call>`` markers: the
        form a grammar can enforce."""
        return self.start == START and self.end == END

    # -- rendering -----------------------------------------------------------------

    def render(
        self, messages: list[dict[str, Any]], tools: ToolUse | None
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """(messages, extra chat-template arguments) for the chat template."""
        has_tool_messages = any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
        if tools is None and not has_tool_messages:
            return messages, {}
        if self.native:
            return self._render_native(messages), (
                {"tools": [t.as_openai() for t in tools.tools]} if tools else {}
            )
        return self._render_hermes(messages, tools), {}

    def _render_native(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for m in messages:
            calls = m.get("tool_calls")
            if calls:
                rendered = [
                    {"id": c.id, "type": "function",
                     "function": {"name": c.name, "arguments": c.input}}
                    for c in calls
                ]  # fmt: skip
                out.append({"role": "assistant", "content": m["content"], "tool_calls": rendered})
            else:
                out.append(m)
        return out

    def _render_hermes(
        self, messages: list[dict[str, Any]], tools: ToolUse | None
    ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if tools is not None and tools.tools:
            lines = "\n".join(json.dumps(t.as_openai(), ensure_ascii=False) for t in tools.tools)
            block = _HERMES_SYSTEM.format(tools=lines)
            if messages and messages[0]["role"] == "system":
                out.append({"role": "system", "content": f"{messages[0]['content']}\n\n{block}"})
                messages = messages[1:]
            else:
                out.append({"role": "system", "content": block})
        for m in messages:
            if m["role"] == "tool":
                text = f"<tool_response>\n{m['content']}\n</tool_response>"
                if out and out[-1].get("tool_results"):
                    out[-1]["content"] += "\n" + text
                else:
                    out.append({"role": "user", "content": text, "tool_results": True})
            elif m.get("tool_calls"):
                calls = "\n".join(hermes_call_text(c) for c in m["tool_calls"])
                text = f"{m['content']}\n{calls}" if m["content"] else calls
                out.append({"role": "assistant", "content": text})
            else:
                out.append(m)
        return [{"role": m["role"], "content": m["content"]} for m in out]

    # -- reading calls back ---------------------------------------------------------

    def parse(self, text: str, tools: ToolUse) -> tuple[str, list[ToolCall]]:
        """(the text outside complete calls, the calls). A call that does not parse, or
        names no tool of the request, stays in the text."""
        calls: list[ToolCall] = []
        kept: list[str] = []
        pos = 0
        while True:
            i = text.find(self.start, pos)
            j = text.find(self.end, i + len(self.start)) if i >= 0 else -1
            if i < 0 or j < 0:
                kept.append(text[pos:])
                break
            call = self.read_call(text[i + len(self.start) : j], tools)
            if call is None:
                kept.append(text[pos : j + len(self.end)])
            else:
                kept.append(text[pos:i])
                calls.append(call)
            pos = j + len(self.end)
        return "".join(kept).strip() if calls else "".join(kept), calls

    def read_call(self, inner: str, tools: ToolUse) -> ToolCall | None:
        """One call from the text between the markers (None if it is not one)."""
        try:
            if self.parser is not None:
                found = self.parser(inner, [t.as_openai() for t in tools.tools])
            else:
                found = json.loads(inner.strip())
        except Exception:  # not a call: the text stays text
            return None
        if isinstance(found, list) and len(found) == 1:
            found = found[0]
        if not isinstance(found, dict) or not isinstance(found.get("name"), str):
            return None
        arguments = found.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict) or found["name"] not in {t.name for t in tools.tools}:
            return None
        name = found["name"]
        return ToolCall(call_id(tools.id_prefix), name, json.dumps(arguments, ensure_ascii=False))

    # -- enforcing a call ---------------------------------------------------------------

    def grammar(self, tools: ToolUse) -> str | None:
        """The grammar of a reply that is one call of one of ``tools.forced``, then EOS, or
        None when the reply is free. GrammarError if this format's calls cannot be enforced.

        One call, even with ``parallel``: a small model asked for "one or more" repeats its
        call until max_tokens; parallel calls come with ``auto``."""
        forced = tools.forced
        if not forced:
            return None
        if not self.json_calls:
            raise GrammarError(
                f"tool_choice {tools.choice!r} needs constrained decoding of tool calls, which "
                f"this model's format ({self.start}...{self.end}) does not support; use auto"
            )
        rules = []
        for i, tool in enumerate(forced):
            head = f'{START}\n{{"name": {json.dumps(tool.name)}, "arguments": '
            rules.append(
                f"call_{i}: {lark_literal(head)} args_{i} {lark_literal('}' + chr(10) + END)}\n"
                f"args_{i}: {lark_json(tool.parameters)}\n"
            )
        calls = " | ".join(f"call_{i}" for i in range(len(forced)))
        return lark_grammar(f"start: {calls}\n" + "".join(rules), "tools")


HERMES = ToolFormat("hermes", False)


# -- streaming -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TextPiece:
    text: str


@dataclass(frozen=True, slots=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class CallArguments:
    index: int
    text: str  # the next piece of the call's arguments (JSON text)


StreamEvent = TextPiece | CallStart | CallArguments

_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_MAX_HEAD = 256  # characters after the start marker within which the head must match


class ToolCallStream:
    """Splits streamed text into text and tool calls, as the stream arrives.

    Text that may begin a call marker is held back until it is known not to. In the JSON
    format a call's name is sent as soon as it is read and its arguments as they are
    generated (a small scanner finds where the arguments object closes); other formats send
    a call whole once its end marker arrives. Whitespace-only text is held back while it
    may separate calls; a reply with calls drops it, as :meth:`ToolFormat.parse` does.
    """

    def __init__(self, fmt: ToolFormat, tools: ToolUse) -> None:
        self.fmt, self.tools = fmt, tools
        self.names = {t.name for t in tools.tools}
        self.num_calls = 0
        self._buf = ""
        self._mode = "text"  # text | head | args | tail | raw
        self._held = ""  # whitespace not sent yet: it may separate calls
        self._depth = 0
        self._in_string = self._escape = False

    def feed(self, text: str) -> list[StreamEvent]:
        self._buf += text
        out: list[StreamEvent] = []
        while self._step(out):
            pass
        return out

    def finish(self) -> list[StreamEvent]:
        """What is still held back, at the end of the reply."""
        rest, self._buf = self._buf, ""
        if self._mode in ("head", "raw"):  # a call cut short: its text, as parse leaves it
            rest = self.fmt.start + rest
        elif self._mode != "text":
            return []
        text = self._held + rest
        if self.num_calls:
            text = self._held + rest.rstrip() if rest.strip() else ""
        return [TextPiece(text)] if text else []

    def _step(self, out: list[StreamEvent]) -> bool:
        """Consume what can be decided now; True if more may be."""
        buf, start, end = self._buf, self.fmt.start, self.fmt.end
        if self._mode == "text":
            i = buf.find(start)
            if i >= 0:
                self._text(out, buf[:i])
                self._held = ""
                self._buf = buf[i + len(start) :]
                self._mode = "head" if self.fmt.json_calls else "raw"
                return True
            keep = _partial_suffix(buf, start)
            self._text(out, buf[: len(buf) - keep])
            self._buf = buf[len(buf) - keep :]
            return False
        if self._mode == "head":
            m = _HEAD.match(buf)
            if m is None:
                if end in buf or len(buf) > _MAX_HEAD:
                    self._mode = "raw"
                    return True
                return False
            try:
                name = json.loads(f'"{m.group(1)}"')
            except json.JSONDecodeError:
                name = None
            if name not in self.names:
                self._mode = "raw"
                return True
            out.append(CallStart(self.num_calls, call_id(self.tools.id_prefix), name))
            self._buf, self._mode = buf[m.end() :], "args"
            self._depth, self._in_string, self._escape = 0, False, False
            return True
        if self._mode == "args":
            if self._depth == 0:  # before the object opens
                buf = buf.lstrip()
            n = self._scan(buf)
            if n == 0 and buf and self._depth == 0:  # arguments that are not an object
                self._buf, self._mode = buf, "tail"
                return True
            if n:
                out.append(CallArguments(self.num_calls, buf[:n]))
            self._buf = buf[n:]
            if self._depth == 0 and n and not self._in_string:
                self._mode = "tail"
                return True
            return False
        j = buf.find(end)
        if j < 0:
            return False
        if self._mode == "raw":
            call = self.fmt.read_call(buf[:j], self.tools)
            if call is None:
                self._text(out, start + buf[: j + len(end)])
            else:
                out.append(CallStart(self.num_calls, call.id, call.name))
                out.append(CallArguments(self.num_calls, call.arguments))
                self.num_calls += 1
        else:  # tail: the call's closing brace and end marker
            self.num_calls += 1
        self._buf, self._mode = buf[j + len(end) :], "text"
        return True

    def _scan(self, buf: str) -> int:
        """How many characters of ``buf`` belong to the arguments object (it is complete
        when the depth is back to 0)."""
        for i, ch in enumerate(buf):
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
            elif self._depth == 0 and not ch.isspace():
                return i  # not an object: the tail decides
        return len(buf)

    def _text(self, out: list[StreamEvent], text: str) -> None:
        """Send text known to be no marker, holding back its trailing whitespace."""
        body = text.rstrip()
        if body:
            out.append(TextPiece(self._held + body))
            self._held = text[len(body) :]
        else:
            self._held += text


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
