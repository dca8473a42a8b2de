"""Anthropic's Messages API: request parsing, the response and the stream's events.

Usage: ``input_tokens`` counts the prompt tokens that were prefilled,
``cache_read_input_tokens`` those taken from the session's cache (their sum is the prompt),
``cache_creation_input_tokens`` is 0; with ``cache_control`` breakpoints, Anthropic's split
(:mod:`kvpool.server.cache_control`). In a stream, ``message_start`` carries the prompt size
(the split is known only when the turn ends) and ``message_delta`` the final usage.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from kvpool.blocks import CompletedGeneration
from kvpool.server.cache_control import CacheBreakpoint, parse_cache_control, usage_split
from kvpool.server.errors import bad_request
from kvpool.server.params import Body, Generation, parse_cache_salt, parse_stop
from kvpool.server.tools import NAME, Tool, ToolCall, ToolUse, check_parameters

__all__ = ["message_response", "parse_messages", "stop_reason", "tool_use_json", "usage"]


def _text_of(content: object, where: str, marks: list[tuple[str, float]] | None = None) -> str:
    """The text of a string or of text blocks; each block's ``cache_control`` appends
    (text up to and including it, TTL in seconds) to ``marks``."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, block in enumerate(content):
            if not isinstance(block, dict) or block.get("type") != "text":
                kind = block.get("type") if isinstance(block, dict) else type(block).__name__
                raise bad_request(
                    f"{where}.content[{i}] is of type {kind!r}; only text blocks are supported"
                )
            text = block.get("text")
            if not isinstance(text, str):
                raise bad_request(f"{where}.content[{i}].text must be a string")
            parts.append(text)
            control = block.get("cache_control")
            if control is not None and marks is not None:
                marks.append(("".join(parts), parse_cache_control(control, f"{where}[{i}]")))
        return "".join(parts)
    raise bad_request(f"{where}.content must be a string or an array of text blocks")


def _blocks(
    role: str, content: object, where: str, marks: list[tuple[str, float]]
) -> list[dict[str, Any]]:
    """One message as chat messages: text, ``tool_use`` blocks (an assistant's calls) and
    ``tool_result`` blocks (a user turn's results, each a ``tool`` message). The
    ``cache_control`` of a text-only message's blocks go to ``marks`` (see :func:`_text_of`);
    a message with tool blocks sets no breakpoint (its blocks' ``cache_control`` is a hint
    this server does not pin)."""
    if not isinstance(content, list) or all(
        isinstance(b, dict) and b.get("type") == "text" for b in content
    ):
        return [{"role": role, "content": _text_of(content, where, marks)}]
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    calls: list[ToolCall] = []
    for i, block in enumerate(content):
        at = f"{where}.content[{i}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(_text_of([block], where))
        elif kind == "tool_use" and role == "assistant":
            assert isinstance(block, dict)
            name, call_id, value = block.get("name"), block.get("id"), block.get("input")
            if not (isinstance(name, str) and isinstance(call_id, str) and isinstance(value, dict)):
                raise bad_request(f"{at}: a tool_use block needs id, name and an input object")
            calls.append(ToolCall(call_id, name, json.dumps(value, ensure_ascii=False)))
        elif kind == "tool_result" and role == "user":
            assert isinstance(block, dict)
            call_id, result = block.get("tool_use_id"), block.get("content", "")
            if not isinstance(call_id, str):
                raise bad_request(f"{at}.tool_use_id must be a string")
            text = _text_of(result, at)
            if block.get("is_error"):
                text = f"error: {text}"
            out.append({"role": "tool", "content": text, "tool_call_id": call_id})
        else:
            raise bad_request(
                f"{at} is of type {kind!r}; {role} messages take text"
                + (" and tool_use" if role == "assistant" else " and tool_result")
                + " blocks"
            )
    if role == "assistant":
        message: dict[str, Any] = {"role": role, "content": "".join(texts)}
        if calls:
            message["tool_calls"] = calls
        return [message]
    if texts:
        out.append({"role": role, "content": "".join(texts)})
    return out


def _tools(body: Body) -> ToolUse | None:
    """``tools`` and ``tool_choice`` (``disable_parallel_tool_use`` included)."""
    raw, choice = body.raw("tools"), body.raw("tool_choice")
    if choice is not None and not isinstance(choice, dict):
        raise bad_request("tool_choice must be an object ({type: auto | any | tool | none})")
    choice = choice or {"type": "auto"}
    kind = choice.get("type")
    if kind not in ("auto", "any", "tool", "none"):
        raise bad_request(f"tool_choice.type {kind!r} is not supported (auto, any, tool, none)")
    extra = set(choice) - {"type", "name", "disable_parallel_tool_use"}
    if extra:
        raise bad_request(f"tool_choice has unsupported field(s): {', '.join(sorted(extra))}")
    parallel = not choice.get("disable_parallel_tool_use", False)
    if raw is None or raw == []:
        if kind in ("any", "tool"):
            raise bad_request("tool_choice needs tools")
        return None
    if not isinstance(raw, list):
        raise bad_request("tools must be an array")
    tools = []
    for i, spec in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(spec, dict):
            raise bad_request(f"{where} must be an object")
        extra = set(spec) - {"name", "description", "input_schema", "type", "cache_control"}
        if extra or spec.get("type", "custom") != "custom":
            raise bad_request(
                f"{where}: only custom tools (name, description, input_schema) are supported"
            )
        name = spec.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise bad_request(f"{where}.name must be 1-64 characters of a-z, A-Z, 0-9, _ and -")
        description = spec.get("description", "")
        if not isinstance(description, str):
            raise bad_request(f"{where}.description must be a string")
        if "input_schema" not in spec:
            raise bad_request(f"{where} is missing input_schema")
        schema = check_parameters(spec["input_schema"], f"{where}.input_schema", bad_request)
        tools.append(Tool(name, description, schema))
    name = choice.get("name") if kind == "tool" else None
    if kind == "tool" and not isinstance(name, str):
        raise bad_request("tool_choice.name must be a string")
    picked = {"auto": "auto", "none": "none", "any": "required"}.get(kind, name)
    assert isinstance(picked, str)
    return ToolUse.build(
        tools, picked, parallel, lambda m, field: bad_request(m), id_prefix="toolu_"
    )


def parse_messages(body: Body) -> Generation:
    """``POST /v1/messages``."""
    gen = Generation(model=body.string("model", required=True))
    max_tokens = body.required("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise bad_request("max_tokens must be an integer", param="max_tokens")
    if max_tokens < 1:
        raise bad_request(f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
    gen.max_tokens = max_tokens
    messages = body.required("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty array")
    rendered = []
    system = body.raw("system")
    if system is not None:
        marks: list[tuple[str, float]] = []
        rendered.append({"role": "system", "content": _text_of(system, "system", marks)})
        gen.cache_breakpoints.extend(CacheBreakpoint(0, text, ttl) for text, ttl in marks)
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise bad_request(f"{where}.role must be 'user' or 'assistant', got {role!r}")
        extra = set(message) - {"role", "content"}
        if extra:
            raise bad_request(f"{where} has unsupported field(s): {', '.join(sorted(extra))}")
        if "content" not in message:
            raise bad_request(f"{where} is missing content")
        marks = []
        rendered.extend(_blocks(role, message["content"], where, marks))
        gen.cache_breakpoints.extend(
            CacheBreakpoint(len(rendered) - 1, text, ttl) for text, ttl in marks
        )
    gen.messages = rendered
    gen.temperature = body.number("temperature", 1.0, low=0.0, high=1.0) or 0.0
    gen.top_p = body.number("top_p", 1.0, low=1e-9, high=1.0) or 1.0
    gen.top_k = body.integer("top_k", 0, minimum=0) or 0
    gen.stop = parse_stop(body, "stop_sequences", 16)
    gen.stream = body.boolean("stream")
    gen.cache_salt = parse_cache_salt(body)
    gen.return_token_ids = body.boolean("return_token_ids")
    body.ignore("metadata", "session_id", "model")
    gen.tools = _tools(body)
    body.refuse_unless("thinking", [], "extended thinking is not implemented")
    body.finish()
    return gen


def new_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def usage(c: CompletedGeneration, cache_end: int | None = None) -> dict[str, int]:
    """``cache_end``: where the last ``cache_control`` breakpoint ends (None: none)."""
    fresh, created, read = usage_split(c.prompt_tokens, c.cached_tokens, cache_end)
    return {
        "input_tokens": fresh,
        "output_tokens": c.token_count,
        "cache_creation_input_tokens": created,
        "cache_read_input_tokens": read,
    }


def cache_end(gen: Generation) -> int | None:
    """The end of the request's last breakpoint in tokens (None without breakpoints)."""
    return max((bp.end for bp in gen.cache_breakpoints), default=None)


def stop_reason(c: CompletedGeneration, num_calls: int = 0) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence): the stop sequence that matched, if one did; "tool_use"
    when the reply ended after ``num_calls`` calls."""
    if c.stop is not None:
        return "stop_sequence", c.stop
    if c.finish_reason == "length":
        return "max_tokens", None
    if num_calls:
        return "tool_use", None
    return "end_turn", None


def message_response(
    rid: str,
    model: str,
    c: CompletedGeneration,
    *,
    token_ids: bool,
    session_id: str | None,
    tools: ToolUse | None = None,
    cache_end: int | None = None,
) -> dict[str, Any]:
    """The whole answer; with ``tools``, the calls read from the reply are ``tool_use``
    blocks after the text (a text block only if there is text, or no call)."""
    content: list[dict[str, Any]] = [{"type": "text", "text": c.text}]
    calls: list[ToolCall] = []
    if tools is not None and tools.parses_calls:
        text, calls = tools.parse(c.text)
        if calls:
            content = [{"type": "text", "text": text}] if text else []
            content += [tool_use_json(call) for call in calls]
    reason, sequence = stop_reason(c, len(calls))
    out: dict[str, Any] = {
        "id": rid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage(c, cache_end),
        "session_id": session_id,
    }
    if token_ids:
        out["token_ids"] = list(c.token_ids)
    return out


def tool_use_json(call: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}


def message_start(rid: str, model: str, prompt_tokens: int) -> dict[str, Any]:
    return {
        "type": "message_start",
        "message": {
            "id": rid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": prompt_tokens,
                "output_tokens": 0,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        },
    }


def message_delta(
    c: CompletedGeneration, num_calls: int = 0, cache_end: int | None = None
) -> dict[str, Any]:
    reason, sequence = stop_reason(c, num_calls)
    return {
        "type": "message_delta",
        "delta": {"stop_reason": reason, "stop_sequence": sequence},
        "usage": usage(c, cache_end),
    }
