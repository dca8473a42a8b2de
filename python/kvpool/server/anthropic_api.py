"""Anthropic's Messages API: request parsing, the response and the stream's events.

Usage: ``input_tokens`` counts the prompt tokens that were prefilled,
``cache_read_input_tokens`` those taken from the session's cache (their sum is the prompt),
``cache_creation_input_tokens`` is 0; with ``cache_control`` breakpoints, Anthropic's split
(:mod:`kvpool.server.cache_control`). In a stream, ``message_start`` carries the prompt size
(the split is known only when the turn ends) and ``message_delta`` the final usage.
"""

from __future__ import annotations

import uuid
from typing import Any

from kvpool.blocks import CompletedGeneration
from kvpool.server.cache_control import CacheBreakpoint, parse_cache_control, usage_split
from kvpool.server.errors import bad_request
from kvpool.server.params import Body, Generation, parse_cache_salt, parse_stop

__all__ = ["message_response", "parse_messages", "stop_reason", "usage"]


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


def parse_messages(body: Body) -> Generation:
    """``POST /v1/messages``."""
    gen = Generation(model=body.string("model", required=True), stop_param="stop_sequences")
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
        rendered.append({"role": role, "content": _text_of(message["content"], where, marks)})
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
    body.refuse_unless("tools", [[]], "tool use is not implemented")
    body.refuse_unless("tool_choice", [], "tool use is not implemented")
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


def stop_reason(c: CompletedGeneration, stops: dict[int, str]) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence): ``stops`` maps stop tokens to the strings asked for."""
    if c.finish_reason == "length":
        return "max_tokens", None
    if c.token_ids and c.token_ids[-1] in stops:
        return "stop_sequence", stops[c.token_ids[-1]]
    return "end_turn", None


def message_response(
    rid: str,
    model: str,
    c: CompletedGeneration,
    stops: dict[int, str],
    *,
    token_ids: bool,
    session_id: str | None,
    cache_end: int | None = None,
) -> dict[str, Any]:
    reason, sequence = stop_reason(c, stops)
    out: dict[str, Any] = {
        "id": rid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": c.text}],
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage(c, cache_end),
        "session_id": session_id,
    }
    if token_ids:
        out["token_ids"] = list(c.token_ids)
    return out


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
    c: CompletedGeneration, stops: dict[int, str], cache_end: int | None = None
) -> dict[str, Any]:
    reason, sequence = stop_reason(c, stops)
    return {
        "type": "message_delta",
        "delta": {"stop_reason": reason, "stop_sequence": sequence},
        "usage": usage(c, cache_end),
    }
