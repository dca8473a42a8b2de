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
from kvpool.server.tools import CallStart, StreamEvent, TextPiece

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
    """OpenAI chunks: ``chat.completion.chunk`` (chat) or ``text_completion`` chunks.

    With tools, the text goes through a :class:`~kvpool.server.tools.ToolCallStream`:
    calls are sent as ``delta.tool_calls`` (index, id and name, then argument pieces)."""

    def __init__(self, chat: bool, model: str, gen: Generation, tokenizer: Any) -> None:
        self.chat, self.model, self.gen, self.tokenizer = chat, model, gen, tokenizer
        self.rid = openai_api.new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.offset = 0  # characters of the tokens' texts so far (completions' text_offset)
        tools = gen.tools
        self.calls = tools.stream() if chat and tools is not None and tools.parses_calls else None

    def _chunk(self, **kw: Any) -> bytes:
        make = openai_api.chat_chunk if self.chat else openai_api.completion_chunk
        return sse(make(self.rid, self.model, self.created, **kw))

    def open(self) -> list[bytes]:
        if not self.chat:
            return []
        return [self._chunk(delta={"role": "assistant", "content": ""})]

    def text(self, text: str, token_ids: list[int] | None, logprobs: list[TokenLogprob]) -> bytes:
        if self.calls is not None:  # (a stream with tools carries no logprobs)
            chunks = [self._chunk(delta=d) for d in self._deltas(self.calls.feed(text))]
            if token_ids is not None:
                chunks.append(self._chunk(delta={}, token_ids=token_ids))
            return b"".join(chunks)
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

    @staticmethod
    def _deltas(events: list[StreamEvent]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for e in events:
            if isinstance(e, TextPiece):
                out.append({"content": e.text})
            elif isinstance(e, CallStart):
                function = {"name": e.name, "arguments": ""}
                call = {"index": e.index, "id": e.id, "type": "function", "function": function}
                out.append({"tool_calls": [call]})
            else:
                out.append({"tool_calls": [{"index": e.index, "function": {"arguments": e.text}}]})
        return out

    def error(self, error: ApiError) -> bytes:
        return sse(openai_body(error))

    def close(self, c: CompletedGeneration) -> list[bytes]:
        out = []
        num_calls = 0
        if self.calls is not None:
            out = [self._chunk(delta=d) for d in self._deltas(self.calls.finish())]
            num_calls = self.calls.num_calls
        out.append(self._chunk(finish=openai_api.finish_reason(c, num_calls)))
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
            tools=gen.tools,
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
    """Anthropic's message events: start, content blocks, delta, stop.

    Without tools: one text block, opened at once. With tools, blocks open as the reply
    needs them: a text block for text, a ``tool_use`` block per call (its input streamed
    as ``input_json_delta``), each closed before the next opens."""

    def __init__(
        self, model: str, gen: Generation, prompt_tokens: int, cache_end: int | None = None
    ) -> None:
        self.model, self.prompt_tokens, self.cache_end = model, prompt_tokens, cache_end
        self.rid = anthropic_api.new_id()
        tools = gen.tools
        self.calls = tools.stream() if tools is not None and tools.parses_calls else None
        self.index = -1  # the open block (-1: none yet)
        self.kind = ""  # its type

    def open(self) -> list[bytes]:
        start = anthropic_api.message_start(self.rid, self.model, self.prompt_tokens)
        out = [sse(start, "message_start")]
        if self.calls is None:
            out.append(self._open_block({"type": "text", "text": ""}))
        return [*out, sse({"type": "ping"}, "ping")]

    def _open_block(self, block: dict[str, Any]) -> bytes:
        head = b""
        if self.index >= 0:
            head = sse({"type": "content_block_stop", "index": self.index}, "content_block_stop")
        self.index, self.kind = self.index + 1, block["type"]
        event = {"type": "content_block_start", "index": self.index, "content_block": block}
        return head + sse(event, "content_block_start")

    def _delta(self, delta: dict[str, Any]) -> bytes:
        event = {"type": "content_block_delta", "index": self.index, "delta": delta}
        return sse(event, "content_block_delta")

    def _events(self, events: list[StreamEvent]) -> bytes:
        out = []
        for e in events:
            if isinstance(e, TextPiece):
                if self.kind != "text":
                    out.append(self._open_block({"type": "text", "text": ""}))
                out.append(self._delta({"type": "text_delta", "text": e.text}))
            elif isinstance(e, CallStart):
                block = {"type": "tool_use", "id": e.id, "name": e.name, "input": {}}
                out.append(self._open_block(block))
            else:
                out.append(self._delta({"type": "input_json_delta", "partial_json": e.text}))
        return b"".join(out)

    def text(self, text: str, token_ids: list[int] | None, logprobs: list[TokenLogprob]) -> bytes:
        if self.calls is not None:
            return self._events(self.calls.feed(text))
        return self._delta({"type": "text_delta", "text": text})

    def error(self, error: ApiError) -> bytes:
        return sse(anthropic_body(error), "error")

    def close(self, c: CompletedGeneration) -> list[bytes]:
        out, num_calls = [], 0
        if self.calls is not None:
            if rest := self._events(self.calls.finish()):
                out.append(rest)
            num_calls = self.calls.num_calls
            if self.index < 0:  # an empty reply: one empty text block, as without tools
                out.append(self._open_block({"type": "text", "text": ""}))
        return [
            *out,
            sse({"type": "content_block_stop", "index": self.index}, "content_block_stop"),
            sse(anthropic_api.message_delta(c, num_calls, self.cache_end), "message_delta"),
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
            session_id=session_id, tools=gen.tools, cache_end=anthropic_api.cache_end(gen),
        )  # fmt: skip

    def stream(
        self, model: str, gen: Generation, prompt_tokens: int, tokenizer: Any
    ) -> StreamShaper:
        return _AnthropicStream(model, gen, prompt_tokens, anthropic_api.cache_end(gen))
