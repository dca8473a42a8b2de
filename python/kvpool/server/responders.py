"""One responder per generation endpoint: how a request is parsed and its answer shaped.

The route code (:mod:`kvpool.server.app`) is the same for every endpoint; everything that
differs between OpenAI chat, OpenAI completions and Anthropic messages is here, one class
each, chosen once when the route is made::

    parse(body)            -> Generation           the request, validated
    response(...)          -> dict                 the whole answer (not streamed)
    stream(...)            -> StreamShaper         a streamed answer's events:
      open()                   -> [SSE bytes]      before the first token
      text(text, ids, lps)     -> SSE bytes        one piece of text (its logprobs)
      error(error)             -> SSE bytes        an error after the first byte
      close(c)                 -> [SSE bytes]      the end (finish reason, usage)
"""

from __future__ import annotations

import json
import time
from typing import Any, Protocol

from kvpool.blocks import CompletedGeneration
from kvpool.logprobs import TokenLogprob
from kvpool.server import anthropic_api, openai_api
from kvpool.server.errors import ApiError, anthropic_body, openai_body
from kvpool.server.params import Body, Generation

OPENAI, ANTHROPIC = "openai", "anthropic"


def sse(data: Any, event: str | None = None) -> bytes:
    """One Server-Sent Event (``data:`` JSON, or a literal string such as ``[DONE]``)."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


class Responder(Protocol):
    """An endpoint's request and answer shapes (see the module docstring)."""

    api: str  # the error shape: OPENAI or ANTHROPIC

    def parse(self, body: Body) -> Generation: ...

    def response(
        self,
        model: str,
        gen: Generation,
        c: CompletedGeneration,
        tokenizer: Any,
        session_id: str | None,
    ) -> dict[str, Any]: ...

    def stream(
        self, model: str, gen: Generation, prompt_tokens: int, tokenizer: Any
    ) -> StreamShaper: ...


class StreamShaper(Protocol):
    """The events of one streamed answer."""

    def open(self) -> list[bytes]: ...

    def text(
        self, text: str, token_ids: list[int] | None, logprobs: list[TokenLogprob]
    ) -> bytes: ...

    def error(self, error: ApiError) -> bytes: ...

    def close(self, c: CompletedGeneration) -> list[bytes]: ...


class _OpenAIStream:
    """OpenAI chunks: ``chat.completion.chunk`` (chat) or ``text_completion`` chunks."""

    def __init__(self, chat: bool, model: str, gen: Generation, tokenizer: Any) -> None:
        self.chat, self.model, self.gen, self.tokenizer = chat, model, gen, tokenizer
        self.rid = openai_api.new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.offset = 0  # characters of the tokens' texts so far (completions' text_offset)

    def _chunk(self, **kw: Any) -> bytes:
        make = openai_api.chat_chunk if self.chat else openai_api.completion_chunk
        return sse(make(self.rid, self.model, self.created, **kw))

    def open(self) -> list[bytes]:
        if not self.chat:
            return []
        return [self._chunk(delta={"role": "assistant", "content": ""})]

    def text(self, text: str, token_ids: list[int] | None, logprobs: list[TokenLogprob]) -> bytes:
        wanted = self.gen.logprobs is not None
        if self.chat:
            lps = openai_api.chat_logprobs(self.tokenizer, logprobs) if wanted else None
            return self._chunk(delta={"content": text}, token_ids=token_ids, logprobs=lps)
        lps = None
        if wanted:
            k = self.gen.logprobs or 0
            lps = openai_api.completion_logprobs(self.tokenizer, logprobs, k, self.offset)
            self.offset += sum(len(t) for t in lps["tokens"]) if lps else 0
        return self._chunk(text=text, token_ids=token_ids, logprobs=lps)

    def error(self, error: ApiError) -> bytes:
        return sse(openai_body(error))

    def close(self, c: CompletedGeneration) -> list[bytes]:
        out = [self._chunk(finish=openai_api.finish_reason(c))]
        if self.gen.include_usage:
            out.append(self._chunk(usage_of=c))
        out.append(b"data: [DONE]\n\n")
        return out


class ChatResponder:
    """``POST /v1/chat/completions`` (OpenAI)."""

    api = OPENAI

    def parse(self, body: Body) -> Generation:
        return openai_api.parse_chat(body)

    def response(
        self,
        model: str,
        gen: Generation,
        c: CompletedGeneration,
        tokenizer: Any,
        session_id: str | None,
    ) -> dict[str, Any]:
        return openai_api.chat_response(
            openai_api.new_id("chatcmpl"),
            model,
            c,
            tokenizer,
            token_ids=gen.return_token_ids,
            session_id=session_id,
        )

    def stream(
        self, model: str, gen: Generation, prompt_tokens: int, tokenizer: Any
    ) -> StreamShaper:
        return _OpenAIStream(True, model, gen, tokenizer)


class CompletionResponder:
    """``POST /v1/completions`` (OpenAI)."""

    api = OPENAI

    def parse(self, body: Body) -> Generation:
        return openai_api.parse_completion(body)

    def response(
        self,
        model: str,
        gen: Generation,
        c: CompletedGeneration,
        tokenizer: Any,
        session_id: str | None,
    ) -> dict[str, Any]:
        return openai_api.completion_response(
            openai_api.new_id("cmpl"), model, c, tokenizer, gen.logprobs or 0,
            token_ids=gen.return_token_ids, session_id=session_id,
        )  # fmt: skip

    def stream(
        self, model: str, gen: Generation, prompt_tokens: int, tokenizer: Any
    ) -> StreamShaper:
        return _OpenAIStream(False, model, gen, tokenizer)


class _AnthropicStream:
    """Anthropic's message events: start, one text block, delta, stop."""

    def __init__(self, model: str, prompt_tokens: int) -> None:
        self.model, self.prompt_tokens = model, prompt_tokens
        self.rid = anthropic_api.new_id()

    def open(self) -> list[bytes]:
        block = {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "text", "text": ""},
        }
        return [
            sse(
                anthropic_api.message_start(self.rid, self.model, self.prompt_tokens),
                "message_start",
            ),
            sse(block, "content_block_start"),
            sse({"type": "ping"}, "ping"),
        ]

    def text(self, text: str, token_ids: list[int] | None, logprobs: list[TokenLogprob]) -> bytes:
        delta = {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": text},
        }
        return sse(delta, "content_block_delta")

    def error(self, error: ApiError) -> bytes:
        return sse(anthropic_body(error), "error")

    def close(self, c: CompletedGeneration) -> list[bytes]:
        return [
            sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            sse(anthropic_api.message_delta(c), "message_delta"),
            sse({"type": "message_stop"}, "message_stop"),
        ]


class MessagesResponder:
    """``POST /v1/messages`` (Anthropic)."""

    api = ANTHROPIC

    def parse(self, body: Body) -> Generation:
        return anthropic_api.parse_messages(body)

    def response(
        self,
        model: str,
        gen: Generation,
        c: CompletedGeneration,
        tokenizer: Any,
        session_id: str | None,
    ) -> dict[str, Any]:
        return anthropic_api.message_response(
            anthropic_api.new_id(), model, c, token_ids=gen.return_token_ids,
            session_id=session_id,
        )  # fmt: skip

    def stream(
        self, model: str, gen: Generation, prompt_tokens: int, tokenizer: Any
    ) -> StreamShaper:
        return _AnthropicStream(model, prompt_tokens)
