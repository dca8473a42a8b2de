"""OpenAI's Chat Completions and Completions: request parsing, responses, stream chunks.

Accepted beyond the standard fields (as ``extra_body`` of the official client): ``session_id``
(also the ``X-Session-ID`` header or ``prompt_cache_key``), ``top_k``, ``min_p``,
``cache_salt`` (vLLM's: prefix caching only among requests of the same salt) and
``return_token_ids`` (each choice then carries the generated ``token_ids``). Fields with
no effect here (``user``, ``metadata``, ``store``) are accepted; anything that would change
the output and is not implemented (``n > 1``, penalties, a chat message's ``name``, ...) is
refused with a 400 naming it. ``tools`` (:mod:`~kvpool.server.tools`) and
``response_format`` (constrained decoding, :mod:`kvpool.grammar`) are served.

``stop``: up to 4 strings of any length, matched on the text across token boundaries.
Logprobs are the model's own (the log-softmax of its logits, before temperature or
filters): chat ``logprobs: true`` + ``top_logprobs`` 0..20, completions ``logprobs`` 0..20.
A token's ``token`` is its text alone (``tokenizer.decode([id])``; a piece of a multi-byte
character shows as U+FFFD) and ``bytes`` that text's UTF-8.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

from kvpool.blocks import CompletedGeneration
from kvpool.grammar import GrammarError, json_object_grammar, json_schema_grammar
from kvpool.logprobs import MAX_TOP_LOGPROBS, TokenLogprob
from kvpool.server.errors import bad_request
from kvpool.server.params import Body, Generation, parse_cache_salt, parse_stop
from kvpool.server.tools import NAME, Tool, ToolCall, ToolUse, check_parameters

__all__ = [
    "chat_chunk",
    "chat_response",
    "completion_chunk",
    "completion_response",
    "parse_chat",
    "parse_completion",
    "usage",
]

_UNSUPPORTED = "this server generates one greedy-or-sampled text choice per request"


def _common(body: Body, gen: Generation) -> None:
    gen.temperature = body.number("temperature", 1.0, low=0.0, high=2.0) or 0.0
    gen.top_p = body.number("top_p", 1.0, low=1e-9, high=1.0) or 1.0
    gen.top_k = body.integer("top_k", 0, minimum=0) or 0
    gen.min_p = body.number("min_p", 0.0, low=0.0, high=0.999) or 0.0
    gen.seed = body.integer("seed")
    gen.stop = parse_stop(body, "stop", 4)
    gen.stream = body.boolean("stream")
    gen.cache_salt = parse_cache_salt(body)
    options = body.raw("stream_options")
    if options is not None:
        if not gen.stream:
            raise bad_request(
                "stream_options is only allowed with stream: true", param="stream_options"
            )
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad_request(
                "stream_options must be an object with only include_usage", param="stream_options"
            )
        include = options.get("include_usage", False)
        if not isinstance(include, bool):
            raise bad_request("stream_options.include_usage must be a boolean")
        gen.include_usage = include
    gen.return_token_ids = body.boolean("return_token_ids")
    body.refuse_unless("n", [1], _UNSUPPORTED)
    body.refuse_unless("presence_penalty", [0, 0.0], "penalties are not implemented")
    body.refuse_unless("frequency_penalty", [0, 0.0], "penalties are not implemented")
    body.refuse_unless("logit_bias", [{}], "logit bias is not implemented")
    body.ignore("user", "metadata", "store", "session_id", "prompt_cache_key", "model")


def _max_tokens(body: Body, gen: Generation, *names: str) -> None:
    for name in names:
        value = body.integer(name, minimum=1)
        if value is not None and gen.max_tokens is None:
            gen.max_tokens, gen.max_tokens_param = value, name


def _text_of(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad_request(
                    f"{where}.content[{i}] is of type {kind!r}; only text parts are supported",
                    param=where,
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request(f"{where}.content[{i}].text must be a string", param=where)
            parts.append(text)
        return "".join(parts)
    raise bad_request(f"{where}.content must be a string or an array of text parts", param=where)


def _tool_calls(value: object, where: str) -> list[ToolCall]:
    """An assistant message's ``tool_calls`` (history)."""
    if not isinstance(value, list):
        raise bad_request(f"{where}.tool_calls must be an array", param="messages")
    calls = []
    for k, call in enumerate(value):
        at = f"{where}.tool_calls[{k}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(call, dict) or call.get("type", "function") != "function":
            raise bad_request(f"{at} must be a function call", param="messages")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad_request(f"{at}.function.name must be a string", param="messages")
        arguments = function.get("arguments", "{}")
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else None
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise bad_request(
                f"{at}.function.arguments must be a JSON object in a string", param="messages"
            )
        call_id = call.get("id")
        if not isinstance(call_id, str):
            raise bad_request(f"{at}.id must be a string", param="messages")
        arguments_text = json.dumps(parsed, ensure_ascii=False)
        calls.append(ToolCall(call_id, function["name"], arguments_text))
    return calls


_FIELDS = {
    "system": {"role", "content"},
    "user": {"role", "content"},
    "assistant": {"role", "content", "tool_calls"},
    "tool": {"role", "content", "tool_call_id"},
}


def _message(message: object, where: str) -> dict[str, Any]:
    """One chat message, as the chat template (and :mod:`~kvpool.server.tools`) takes it."""
    if not isinstance(message, dict):
        raise bad_request(f"{where} must be an object", param="messages")
    role = message.get("role")
    role = "system" if role == "developer" else role
    if role not in _FIELDS:
        raise bad_request(
            f"{where}.role {message.get('role')!r} is not supported (system, developer, user, "
            "assistant, tool)",
            param="messages",
        )
    extra = set(message) - _FIELDS[role]
    if extra:  # "name" too: chat templates drop it, so it would be ignored silently
        raise bad_request(
            f"{where} has unsupported field(s): {', '.join(sorted(extra))}", param="messages"
        )
    calls = message.get("tool_calls")
    if role == "assistant" and calls is not None:
        content = message.get("content")
        text = "" if content is None else _text_of(content, where)
        return {"role": role, "content": text, "tool_calls": _tool_calls(calls, where)}
    if "content" not in message:
        raise bad_request(f"{where} is missing content", param="messages")
    text = _text_of(message["content"], where)
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str):
            raise bad_request(f"{where}.tool_call_id must be a string", param="messages")
        return {"role": role, "content": text, "tool_call_id": call_id}
    return {"role": role, "content": text}


def _tools(body: Body) -> ToolUse | None:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls``."""
    raw = body.raw("tools")
    choice = body.raw("tool_choice")
    parallel = body.boolean("parallel_tool_calls", True)
    if raw is None or raw == []:
        if choice not in (None, "none", "auto"):
            raise bad_request("tool_choice needs tools", param="tool_choice")
        return None
    if not isinstance(raw, list):
        raise bad_request("tools must be an array", param="tools")
    tools = []
    for i, spec in enumerate(raw):
        where = f"tools[{i}]"
        function = spec.get("function") if isinstance(spec, dict) else None
        if not isinstance(spec, dict) or spec.get("type") != "function":
            raise bad_request(f"{where}.type must be 'function'", param="tools")
        if set(spec) - {"type", "function"} or not isinstance(function, dict):
            raise bad_request(
                f"{where} must be {{type: function, function: {{...}}}}", param="tools"
            )
        extra = set(function) - {"name", "description", "parameters", "strict"}
        if extra:
            raise bad_request(
                f"{where}.function has unsupported field(s): {', '.join(sorted(extra))}",
                param="tools",
            )
        name = function.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise bad_request(
                f"{where}.function.name must be 1-64 characters of a-z, A-Z, 0-9, _ and -",
                param="tools",
            )
        description = function.get("description", "")
        if not isinstance(description, str):
            raise bad_request(f"{where}.function.description must be a string", param="tools")
        parameters = check_parameters(
            function.get("parameters"),
            f"{where}.function.parameters",
            lambda m: bad_request(m, param="tools", code="invalid_schema"),
        )
        tools.append(Tool(name, description, parameters))
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        function = choice.get("function")
        if choice.get("type") != "function" or not isinstance(function, dict):
            raise bad_request(
                "tool_choice must be none, auto, required or {type: function, function: {name}}",
                param="tool_choice",
            )
        choice = function.get("name")
        if not isinstance(choice, str):
            raise bad_request("tool_choice.function.name must be a string", param="tool_choice")
    elif choice not in ("none", "auto", "required"):
        raise bad_request(
            f"tool_choice {choice!r} is not supported (none, auto, required, or a function)",
            param="tool_choice",
        )
    return ToolUse.build(tools, choice, parallel, lambda m, field: bad_request(m, param=field))


def parse_chat(body: Body) -> Generation:
    """``POST /v1/chat/completions``."""
    gen = Generation(model=body.string("model", required=True))
    messages = body.required("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty array", param="messages")
    gen.messages = [_message(m, f"messages[{i}]") for i, m in enumerate(messages)]
    _max_tokens(body, gen, "max_completion_tokens", "max_tokens")
    _common(body, gen)
    wanted = body.boolean("logprobs")
    top = body.integer("top_logprobs", minimum=0)
    if top is not None and top > MAX_TOP_LOGPROBS:
        raise bad_request(
            f"top_logprobs must be <= {MAX_TOP_LOGPROBS}, got {top}", param="top_logprobs"
        )
    if top is not None and not wanted:
        raise bad_request("top_logprobs requires logprobs: true", param="top_logprobs")
    gen.logprobs = (top or 0) if wanted else None
    gen.tools = _tools(body)
    _response_format(body, gen)
    body.finish()
    return gen


_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _response_format(body: Body, gen: Generation) -> None:
    """``response_format``: ``text``, ``json_object`` or ``json_schema`` (always enforced by
    constrained decoding, ``strict`` or not)."""
    fmt = body.raw("response_format")
    if fmt is None:
        return
    param = "response_format"
    if not isinstance(fmt, dict):
        raise bad_request("response_format must be an object", param=param)
    kind = fmt.get("type")
    allowed = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
    if kind not in allowed:
        raise bad_request(
            f"response_format.type {kind!r} is not supported (text, json_object, json_schema)",
            param=param,
        )
    extra = set(fmt) - allowed[kind]
    if extra:
        raise bad_request(
            f"response_format has unsupported field(s): {', '.join(sorted(extra))}", param=param
        )
    if kind == "text":
        return
    if kind == "json_object":
        gen.grammar = json_object_grammar()
        return
    spec = fmt.get("json_schema")
    where = "response_format.json_schema"
    if not isinstance(spec, dict):
        raise bad_request(f"{where} must be an object", param=param)
    extra = set(spec) - {"name", "schema", "strict", "description"}
    if extra:
        raise bad_request(
            f"{where} has unsupported field(s): {', '.join(sorted(extra))}", param=param
        )
    name = spec.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
        raise bad_request(
            f"{where}.name must be 1-64 characters of a-z, A-Z, 0-9, _ and -", param=param
        )
    if not isinstance(spec.get("strict", False), bool | None):
        raise bad_request(f"{where}.strict must be a boolean", param=param)
    if not isinstance(spec.get("description", ""), str):
        raise bad_request(f"{where}.description must be a string", param=param)
    schema = spec.get("schema", {"type": "object"})
    try:
        gen.grammar = json_schema_grammar(schema)
    except GrammarError as exc:
        raise bad_request(f"{where}.schema: {exc}", param=param, code="invalid_schema") from None


def parse_completion(body: Body) -> Generation:
    """``POST /v1/completions``: the prompt is text or token ids (one prompt only)."""
    gen = Generation(model=body.string("model", required=True), prompt_param="prompt")
    prompt = body.required("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("prompt is empty", param="prompt")
        gen.text = prompt
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        gen.token_ids = list(prompt)
    else:
        raise bad_request(
            "prompt must be a non-empty string or array of token ids (one prompt per request)",
            param="prompt",
        )
    gen.max_tokens = body.integer("max_tokens", 16, minimum=1)
    _common(body, gen)
    gen.logprobs = body.integer("logprobs", minimum=0)
    if gen.logprobs is not None and gen.logprobs > MAX_TOP_LOGPROBS:
        raise bad_request(
            f"logprobs must be <= {MAX_TOP_LOGPROBS}, got {gen.logprobs}", param="logprobs"
        )
    body.refuse_unless("echo", [False], "echo is not implemented")
    body.refuse_unless("best_of", [1], _UNSUPPORTED)
    body.refuse_unless("suffix", [""], "suffix is not implemented")
    body.finish()
    return gen


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(c: CompletedGeneration) -> dict[str, Any]:
    """Usage; ``cached_tokens``: prompt tokens taken from the cache (not prefilled)."""
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.token_count,
        "total_tokens": c.prompt_tokens + c.token_count,
        "prompt_tokens_details": {"cached_tokens": c.cached_tokens},
    }


def finish_reason(c: CompletedGeneration, num_calls: int = 0) -> str:
    """ "length" (max_tokens), "tool_calls" (the reply ended after calling tools), "stop"."""
    if c.finish_reason == "length":
        return "length"
    return "tool_calls" if num_calls else "stop"


def tool_call_json(call: ToolCall) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def _token_text(tokenizer: Any, token: int) -> str:
    return str(tokenizer.decode([token]))


def _chat_entry(tokenizer: Any, token: int, logprob: float) -> dict[str, Any]:
    text = _token_text(tokenizer, token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(
    tokenizer: Any, entries: tuple[TokenLogprob, ...] | list[TokenLogprob] | None
) -> dict[str, Any] | None:
    """A chat choice's ``logprobs``: ``{"content": [...], "refusal": None}``."""
    if entries is None:
        return None
    content = []
    for e in entries:
        entry = _chat_entry(tokenizer, e.token, e.logprob)
        entry["top_logprobs"] = [_chat_entry(tokenizer, t, lp) for t, lp in e.top]
        content.append(entry)
    return {"content": content, "refusal": None}


def completion_logprobs(
    tokenizer: Any,
    entries: tuple[TokenLogprob, ...] | list[TokenLogprob] | None,
    k: int,
    offset: int = 0,
) -> dict[str, Any] | None:
    """A completion choice's legacy ``logprobs``; ``text_offset`` counts characters of the
    tokens' own texts from ``offset`` (the characters streamed before)."""
    if entries is None:
        return None
    tokens = [_token_text(tokenizer, e.token) for e in entries]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{_token_text(tokenizer, t): lp for t, lp in e.top} for e in entries]
        if k
        else None,
        "text_offset": offsets,
    }


def chat_response(
    rid: str,
    model: str,
    c: CompletedGeneration,
    tokenizer: Any,
    *,
    token_ids: bool,
    session_id: str | None,
    tools: ToolUse | None = None,
) -> dict[str, Any]:
    """The whole answer; with ``tools``, the calls read from the reply are ``tool_calls``
    (the text outside them ``content``, None when empty)."""
    message: dict[str, Any] = {"role": "assistant", "content": c.text}
    calls: list[ToolCall] = []
    if tools is not None and tools.parses_calls:
        text, calls = tools.parse(c.text)
        if calls:
            message = {
                "role": "assistant",
                "content": text or None,
                "tool_calls": [tool_call_json(call) for call in calls],
            }
    choice: dict[str, Any] = {
        "index": 0,
        "message": message,
        "logprobs": chat_logprobs(tokenizer, c.logprobs),
        "finish_reason": finish_reason(c, len(calls)),
    }
    if token_ids:
        choice["token_ids"] = list(c.token_ids)
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(c),
        "session_id": session_id,
    }


def completion_response(
    rid: str,
    model: str,
    c: CompletedGeneration,
    tokenizer: Any,
    k: int,
    *,
    token_ids: bool,
    session_id: str | None,
) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": 0,
        "text": c.text,
        "logprobs": completion_logprobs(tokenizer, c.logprobs, k),
        "finish_reason": finish_reason(c),
    }
    if token_ids:
        choice["token_ids"] = list(c.token_ids)
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(c),
        "session_id": session_id,
    }


def chat_chunk(
    rid: str,
    model: str,
    created: int,
    *,
    delta: dict[str, Any] | None = None,
    finish: str | None = None,
    usage_of: CompletedGeneration | None = None,
    token_ids: list[int] | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One ``chat.completion.chunk``; with ``usage_of``, the final usage chunk (no choices)."""
    chunk: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
    }
    if usage_of is not None:
        chunk["choices"], chunk["usage"] = [], usage(usage_of)
        return chunk
    choice: dict[str, Any] = {
        "index": 0,
        "delta": delta or {},
        "logprobs": logprobs,
        "finish_reason": finish,
    }
    if token_ids is not None:
        choice["token_ids"] = token_ids
    chunk["choices"] = [choice]
    return chunk


def completion_chunk(
    rid: str,
    model: str,
    created: int,
    *,
    text: str = "",
    finish: str | None = None,
    usage_of: CompletedGeneration | None = None,
    token_ids: list[int] | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
    }
    if usage_of is not None:
        chunk["choices"], chunk["usage"] = [], usage(usage_of)
        return chunk
    choice: dict[str, Any] = {
        "index": 0,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": finish,
    }
    if token_ids is not None:
        choice["token_ids"] = token_ids
    chunk["choices"] = [choice]
    return chunk
