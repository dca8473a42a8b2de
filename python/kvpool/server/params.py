"""What both APIs' request bodies share: typed field access, sampling, limits.

:class:`Body` reads fields of a decoded JSON object with the checks every endpoint needs
(type, range, unknown fields refused) and raises 400 ApiErrors naming the field.
:class:`Generation` is a parsed generation request, API-neutral; :class:`Limits` holds the
bounds the server enforces before anything reaches the engine.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kvpool.errors import InvalidRequestError
from kvpool.sampling import SamplingParams
from kvpool.server.cache_control import CacheBreakpoint
from kvpool.server.errors import ApiError, bad_request
from kvpool.server.tools import ToolUse
from kvpool.textstream import MAX_STOP_CHARS

__all__ = [
    "Body",
    "Generation",
    "Limits",
    "parse_cache_salt",
    "sampling_of",
]

_MISSING = object()


class Body:
    """A request body (a JSON object) whose fields are read at most once each.

    ``finish()`` refuses every field that was neither read nor ignored, with the names of
    the unsupported fields: nothing a client sends is dropped silently.
    """

    def __init__(self, data: object) -> None:
        if not isinstance(data, dict):
            raise bad_request(f"the request body must be a JSON object, got {_kind(data)}")
        self.data: dict[str, Any] = data
        self._seen: set[str] = set()

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def raw(self, name: str, default: Any = None) -> Any:
        self._seen.add(name)
        value = self.data.get(name, _MISSING)
        return default if value is _MISSING or value is None else value

    def required(self, name: str) -> Any:
        self._seen.add(name)
        if self.data.get(name) is None:
            raise bad_request(f"missing required field {name!r}", param=name)
        return self.data[name]

    def string(self, name: str, default: str | None = None, *, required: bool = False) -> Any:
        value = self.required(name) if required else self.raw(name, default)
        if value is not None and not isinstance(value, str):
            raise _wrong_type(name, "a string", value)
        return value

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            raise _wrong_type(name, "a boolean", value)
        return value

    def integer(
        self, name: str, default: int | None = None, *, minimum: int | None = None
    ) -> int | None:
        value = self.raw(name, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong_type(name, "an integer", value)
        if minimum is not None and value < minimum:
            raise bad_request(f"{name} must be >= {minimum}, got {value}", param=name)
        return value

    def number(self, name: str, default: float | None, *, low: float, high: float) -> float | None:
        value = self.raw(name, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _wrong_type(name, "a number", value)
        if not (math.isfinite(value) and low <= value <= high):
            raise bad_request(f"{name} must be in [{low}, {high}], got {value}", param=name)
        return float(value)

    def ignore(self, *names: str) -> None:
        """Fields accepted and without effect (metadata such as ``user``)."""
        self._seen.update(names)

    def refuse_unless(self, name: str, allowed: Iterable[object], why: str) -> None:
        """Refuse ``name`` unless it is absent or one of ``allowed`` (its no-op values)."""
        self._seen.add(name)
        value = self.data.get(name)
        if value is not None and value not in list(allowed):
            raise bad_request(f"{name}={_short(value)} is not supported: {why}", param=name)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self._seen)
        if unknown:
            raise bad_request(
                f"unsupported field(s): {', '.join(unknown)}",
                param=unknown[0],
                code="unsupported_parameter",
            )


def _kind(value: object) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _wrong_type(name: str, expected: str, value: object) -> ApiError:
    return bad_request(f"{name} must be {expected}, got {_kind(value)}", param=name)


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds checked before a request reaches the engine.

    ``max_context_tokens``: prompt + max_tokens, at most (the model's context and the
    pool's capacity, whichever is smaller). ``max_tokens_cap``: the most tokens one request
    may ask for.
    """

    max_context_tokens: int
    max_tokens_cap: int
    default_max_tokens: int = 256

    def check(self, prompt_tokens: int, max_tokens: int, param: str, prompt_param: str) -> None:
        """Refuse a prompt that leaves no room, then a ``max_tokens`` that does not fit."""
        if prompt_tokens >= self.max_context_tokens:
            raise bad_request(
                f"the prompt is {prompt_tokens} tokens; the limit is "
                f"{self.max_context_tokens - 1} (context of {self.max_context_tokens} tokens "
                "including max_tokens)",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if max_tokens > self.max_tokens_cap or prompt_tokens + max_tokens > self.max_context_tokens:
            raise bad_request(
                f"{param}={max_tokens} is too large: with a {prompt_tokens}-token prompt at most "
                f"{min(self.max_tokens_cap, self.max_context_tokens - prompt_tokens)} tokens fit "
                f"(context of {self.max_context_tokens} tokens, pool included)",
                param=param,
                code="max_tokens_too_large",
            )


@dataclass(slots=True)
class Generation:
    """A parsed generation request, the same for every endpoint.

    Exactly one of ``messages`` (chat, rendered with the chat template), ``text`` or
    ``token_ids`` is the prompt. ``max_tokens`` None means the server default.
    """

    model: str
    messages: list[dict[str, Any]] | None = None
    text: str | None = None
    token_ids: list[int] | None = None
    max_tokens: int | None = None
    max_tokens_param: str = "max_tokens"  # the field names errors point at
    prompt_param: str = "messages"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: none; k: each token's logprob and the top k
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    session_id: str | None = None
    return_token_ids: bool = False
    cache_salt: str = ""  # vLLM's field: partitions the prefix cache inside the tenant
    grammar: str | None = None  # constrained decoding (kvpool.grammar); None: free text
    grammar_param: str = "response_format"  # the field a refused grammar is blamed on
    tools: ToolUse | None = None  # the request's tools (kvpool.server.tools)
    cache_breakpoints: list[CacheBreakpoint] = field(default_factory=list)  # Anthropic's


MAX_CACHE_SALT_LEN = 256


def parse_cache_salt(body: Body) -> str:
    """vLLM's ``cache_salt``: 1..256 characters, or absent (``""``)."""
    value = body.string("cache_salt")
    if value is None:
        return ""
    if not 1 <= len(value) <= MAX_CACHE_SALT_LEN:
        raise bad_request(
            f"cache_salt is {len(value)} characters long; it must be 1..{MAX_CACHE_SALT_LEN}",
            param="cache_salt",
        )
    return str(value)


def sampling_of(gen: Generation) -> SamplingParams:
    """SamplingParams of ``gen``; a seed is refused unless sampling is greedy."""
    if gen.seed is not None and gen.temperature > 0:
        raise bad_request(
            "seed is not supported with temperature > 0: sampling runs batched, with no "
            "per-request random state (greedy, temperature 0, is deterministic)",
            param="seed",
        )
    try:
        return SamplingParams(
            temperature=gen.temperature,
            top_p=gen.top_p,
            top_k=gen.top_k,
            min_p=gen.min_p,
            stop=tuple(gen.stop),
            logprobs=gen.logprobs,
        )
    except InvalidRequestError as exc:
        raise bad_request(str(exc)) from exc


def parse_stop(body: Body, name: str, max_items: int) -> list[str]:
    value = body.raw(name)
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise _wrong_type(name, "a non-empty string or an array of them", value)
    if len(items) > max_items:
        raise bad_request(f"{name} holds {len(items)} sequences; at most {max_items}", param=name)
    too_long = next((s for s in items if len(s) > MAX_STOP_CHARS), None)
    if too_long is not None:
        raise bad_request(
            f"a stop sequence is {len(too_long)} characters long; at most {MAX_STOP_CHARS}",
            param=name,
        )
    return list(items)
