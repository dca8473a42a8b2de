"""OpenAI's Responses API: request parsing, the response object, its stream events, and the
prompt of a continuation.

``POST /v1/responses`` takes ``input`` (a string, or message items with text parts),
``instructions`` (a system message, not carried over to continuations, as OpenAI does),
``previous_response_id``, ``store`` (default true), ``stream``, ``max_output_tokens``,
``temperature``, ``top_p`` (and this server's ``top_k``, ``min_p``, ``cache_salt``,
``session_id`` as ``extra_body``). Fields that would change the output and are not
implemented (tools, reasoning, structured ``text.format``, ...) are refused with a 400.

A continuation's prompt is the previous response's token ids followed by the tokens of the
text the chat template puts after them: the end of the assistant turn (minus the stop token
the model already generated), the new input and the generation prompt
(:func:`continuation_text`). The engine then finds the whole previous conversation in the
session's blocks and prefills only that text.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvpool.blocks import CompletedGeneration
from kvpool.logprobs import TokenLogprob
from kvpool.server.errors import ApiError, bad_request
from kvpool.server.params import Body, Generation, parse_cache_salt
from kvpool.server.responders import sse

__all__ = [
    "ResponsesRequest",
    "ResponsesStream",
    "continuation_text",
    "parse_responses",
    "response_object",
]

_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
_TEXT_PARTS = {"input_text", "output_text", "text"}


@dataclass(slots=True)
class ResponsesRequest:
    """A parsed ``POST /v1/responses``: ``gen.messages`` holds the new input only."""

    gen: Generation
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def new_messages(self) -> list[dict[str, str]]:
        return list(self.gen.messages or [])


def _item_text(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or an array of parts", param="input")
    parts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if not isinstance(part, dict) or kind not in _TEXT_PARTS:
            raise bad_request(
                f"{where}.content[{i}] is of type {kind!r}; only text parts "
                "(input_text, output_text) are supported",
                param="input",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise bad_request(f"{where}.content[{i}].text must be a string", param="input")
        parts.append(text)
    return "".join(parts)


def _input_messages(value: object) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value:
            raise bad_request("input is empty", param="input")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise bad_request("input must be a non-empty string or array of items", param="input")
    out = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be an object", param="input")
        kind = item.get("type", "message")
        if kind != "message":
            raise bad_request(
                f"{where} is of type {kind!r}; only message items are supported", param="input"
            )
        role = item.get("role")
        if role not in _ROLES:
            raise bad_request(
                f"{where}.role {role!r} is not supported (user, system, developer, assistant)",
                param="input",
            )
        extra = set(item) - {"type", "role", "content", "id", "status"}
        if extra:
            raise bad_request(
                f"{where} has unsupported field(s): {', '.join(sorted(extra))}", param="input"
            )
        if "content" not in item:
            raise bad_request(f"{where} is missing content", param="input")
        out.append({"role": _ROLES[str(role)], "content": _item_text(item["content"], where)})
    return out


def parse_responses(body: Body) -> ResponsesRequest:
    """``POST /v1/responses``."""
    gen = Generation(model=body.string("model", required=True), prompt_param="input")
    gen.messages = _input_messages(body.required("input"))
    req = ResponsesRequest(gen)
    req.instructions = body.string("instructions")
    previous = body.raw("previous_response_id")
    if previous is not None and (not isinstance(previous, str) or not previous):
        raise bad_request(
            "previous_response_id must be a non-empty string", param="previous_response_id"
        )
    req.previous_response_id = previous
    req.store = body.boolean("store", True)
    metadata = body.raw("metadata", {})
    if not isinstance(metadata, dict):
        raise bad_request("metadata must be an object", param="metadata")
    req.metadata = metadata
    gen.max_tokens = body.integer("max_output_tokens", minimum=1)
    gen.max_tokens_param = "max_output_tokens"
    gen.temperature = body.number("temperature", 1.0, low=0.0, high=2.0) or 0.0
    gen.top_p = body.number("top_p", 1.0, low=1e-9, high=1.0) or 1.0
    gen.top_k = body.integer("top_k", 0, minimum=0) or 0
    gen.min_p = body.number("min_p", 0.0, low=0.0, high=0.999) or 0.0
    gen.stream = body.boolean("stream")
    gen.cache_salt = parse_cache_salt(body)
    body.ignore("user", "session_id", "prompt_cache_key", "service_tier", "stream_options")
    body.ignore("safety_identifier", "prompt_cache_retention")
    body.refuse_unless("tools", [[]], "tool calling is not implemented")
    body.refuse_unless("tool_choice", ["none", "auto"], "tool calling is not implemented")
    body.refuse_unless("parallel_tool_calls", [True, False], "tool calling is not implemented")
    body.refuse_unless(
        "text", [{"format": {"type": "text"}}, {}], "structured output is not implemented"
    )
    body.refuse_unless("reasoning", [], "reasoning is not implemented")
    body.refuse_unless("include", [[]], "include is not implemented")
    body.refuse_unless("truncation", ["disabled"], "truncation is not implemented")
    body.refuse_unless("background", [False], "background responses are not implemented")
    body.refuse_unless("top_logprobs", [0], "logprobs are not implemented")
    body.refuse_unless("conversation", [], "conversations are not implemented")
    body.refuse_unless("prompt", [], "prompt templates are not implemented")
    body.refuse_unless("max_tool_calls", [], "tool calling is not implemented")
    body.finish()
    return req


def render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    """The chat template's text of ``messages`` (400 if the template refuses them)."""
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as exc:
        raise bad_request(f"could not render the conversation: {exc}", param="input") from None
    return str(text)


def continuation_text(
    tokenizer: Any,
    previous: list[dict[str, str]],
    output: str,
    stop_text: str | None,
    new: list[dict[str, str]],
) -> str | None:
    """The text that follows a previous turn's tokens (its prompt + generated ids) in the
    conversation ``previous + [assistant output] + new``, or None when the template does not
    render the previous turn as a prefix of the new conversation (the caller then renders
    the whole conversation afresh).

    ``previous``: the messages the previous prompt was rendered from; ``output``: the text
    of its generation; ``stop_text``: the text of the stop token it ended with (the model
    generated it, so it is already in the previous tokens), None if it ran out of tokens.
    For ChatML, with output ``Hi`` and stop ``<|im_end|>``::

        previous prompt  ...<|im_start|>assistant\\n          (+ generated: Hi<|im_end|>)
        returned text    \\n<|im_start|>user\\nNext?<|im_end|>\\n<|im_start|>assistant\\n
    """
    asked = render(tokenizer, previous, True)
    answered = [*previous, {"role": "assistant", "content": output}]
    closed = render(tokenizer, answered, False)
    following = render(tokenizer, [*answered, *new], True)
    head = asked + output
    if not closed.startswith(head) or not following.startswith(closed):
        return None
    tail = closed[len(head) :]
    if stop_text is not None:
        if not tail.startswith(stop_text):
            return None
        tail = tail[len(stop_text) :]
    return tail + following[len(closed) :]


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def _usage(c: CompletedGeneration) -> dict[str, Any]:
    return {
        "input_tokens": c.prompt_tokens,
        "input_tokens_details": {"cached_tokens": c.cached_tokens},
        "output_tokens": c.token_count,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": c.prompt_tokens + c.token_count,
    }


def _message(message_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {
        "id": message_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content if text or status != "in_progress" else [],
    }


def response_object(
    rid: str,
    model: str,
    req: ResponsesRequest,
    created_at: float,
    *,
    message_id: str,
    completion: CompletedGeneration | None,
    session_id: str | None,
) -> dict[str, Any]:
    """The response object: in progress (``completion`` None, no output yet), completed, or
    incomplete (the turn ran out of ``max_output_tokens``)."""
    status, output, usage, incomplete = "in_progress", [], None, None
    if completion is not None:
        ran_out = completion.finish_reason == "length"
        status = "incomplete" if ran_out else "completed"
        incomplete = {"reason": "max_output_tokens"} if ran_out else None
        output = [_message(message_id, completion.text, status)]
        usage = _usage(completion)
    return {
        "id": rid,
        "object": "response",
        "created_at": round(created_at, 3),
        "status": status,
        "error": None,
        "incomplete_details": incomplete,
        "instructions": req.instructions,
        "max_output_tokens": req.gen.max_tokens,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": None, "summary": None},
        "store": req.store,
        "temperature": req.gen.temperature,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": req.gen.top_p,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": req.metadata,
        "session_id": session_id,
    }


class ResponsesStream:
    """The events of a streamed response, in order: ``response.created``,
    ``response.in_progress``, ``response.output_item.added``,
    ``response.content_part.added``, ``response.output_text.delta`` per piece of text,
    ``response.output_text.done``, ``response.content_part.done``,
    ``response.output_item.done``, then ``response.completed`` (or ``response.incomplete``
    when ``max_output_tokens`` ran out); ``error`` if it fails. Each carries its
    ``sequence_number``."""

    def __init__(self, rid: str, model: str, req: ResponsesRequest, session_id: str | None) -> None:
        self.rid, self.model, self.req, self.session_id = rid, model, req, session_id
        self.created_at = time.time()
        self.message_id = new_message_id()
        self._seq = 0
        # called with the completion at the end; returns the final response object
        self.on_finish: Callable[[CompletedGeneration], dict[str, Any]] | None = None
        self.finished = False  # close() ran: the turn completed

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return sse(data, kind)

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.message_id, "output_index": 0, "content_index": 0}

    def response(self, completion: CompletedGeneration | None) -> dict[str, Any]:
        return response_object(
            self.rid,
            self.model,
            self.req,
            self.created_at,
            message_id=self.message_id,
            completion=completion,
            session_id=self.session_id,
        )

    def open(self) -> list[bytes]:
        start = self.response(None)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [
            self._event("response.created", response=start),
            self._event("response.in_progress", response=start),
            self._event(
                "response.output_item.added",
                output_index=0,
                item=_message(self.message_id, "", "in_progress"),
            ),
            self._event("response.content_part.added", **self._where(), part=part),
        ]

    def text(self, text: str, token_ids: list[int] | None, logprobs: list[TokenLogprob]) -> bytes:
        return self._event("response.output_text.delta", **self._where(), delta=text, logprobs=[])

    def error(self, error: ApiError) -> bytes:
        return self._event("error", code=error.code, message=error.message, param=error.param)

    def close(self, c: CompletedGeneration) -> list[bytes]:
        self.finished = True
        final = self.on_finish(c) if self.on_finish is not None else self.response(c)
        (item,) = final["output"]
        (part,) = item["content"]
        end = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        return [
            self._event("response.output_text.done", **self._where(), text=c.text, logprobs=[]),
            self._event("response.content_part.done", **self._where(), part=part),
            self._event("response.output_item.done", output_index=0, item=item),
            self._event(end, response=final),
        ]
