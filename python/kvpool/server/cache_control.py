"""Anthropic ``cache_control`` breakpoints: where they fall in the prompt, and the usage split.

A content block (of ``system`` or of a message) carrying ``"cache_control": {"type":
"ephemeral", "ttl": "5m" | "1h"}`` (TTL "5m" by default) marks the end of a prompt prefix to
cache. Its position in tokens is found after tokenization: the chat template renders the
conversation cut after that block, and the breakpoint is where that rendering stops agreeing
with the prompt's tokens. The server pins each breakpoint's prefix for its TTL
(:mod:`kvpool.server.pins`).

Usage, as Anthropic defines it, for a prompt of ``P`` tokens of which ``C`` came from the
cache and whose last breakpoint ends at token ``L``::

    cache_read_input_tokens     = min(C, L)          the cached part of the prefix
    cache_creation_input_tokens = L - min(C, L)      the part of the prefix written now
    input_tokens                = P - L              everything after the last breakpoint

(their sum is ``P``). Without breakpoints the server reports what it did: ``C`` read from its
cache, ``P - C`` input, 0 created.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvpool.server.errors import bad_request

__all__ = ["CacheBreakpoint", "parse_cache_control", "resolve_breakpoints", "usage_split"]

TTL_S = {"5m": 300.0, "1h": 3600.0}


@dataclass(slots=True)
class CacheBreakpoint:
    """One breakpoint: message ``message`` (of the rendered messages, system first) cut
    after the marked block (``content``: its text up to there). ``end``: the prefix length
    in tokens, set by :func:`resolve_breakpoints`."""

    message: int
    content: str
    ttl_s: float
    end: int = 0


def parse_cache_control(value: object, where: str) -> float:
    """The TTL in seconds of a ``cache_control`` object (400 if it is not one)."""
    if not isinstance(value, dict) or value.get("type") != "ephemeral":
        raise bad_request(f'{where}.cache_control must be {{"type": "ephemeral"}}')
    extra = set(value) - {"type", "ttl"}
    if extra:
        raise bad_request(f"{where}.cache_control has unsupported field(s): {sorted(extra)}")
    ttl = value.get("ttl", "5m")
    if ttl not in TTL_S:
        raise bad_request(f"{where}.cache_control.ttl must be '5m' or '1h', got {ttl!r}")
    return TTL_S[ttl]


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def resolve_breakpoints(
    tokenizer: Any,
    messages: list[dict[str, str]],
    breakpoints: list[CacheBreakpoint],
    prompt: Sequence[int],
) -> None:
    """Set each breakpoint's ``end``: the tokens the prompt shares with the conversation
    cut after its block (runs with the tokenization, in a worker thread)."""
    for bp in breakpoints:
        cut = [*messages[: bp.message], {**messages[bp.message], "content": bp.content}]
        ids = tokenizer.apply_chat_template(cut, add_generation_prompt=False)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        bp.end = _common([int(t) for t in ids], prompt)


def usage_split(
    prompt_tokens: int, cached_tokens: int, cache_end: int | None
) -> tuple[int, int, int]:
    """(input_tokens, cache_creation_input_tokens, cache_read_input_tokens); ``cache_end``:
    the last breakpoint's end, None without breakpoints (see the module docstring)."""
    if cache_end is None:
        return prompt_tokens - cached_tokens, 0, cached_tokens
    end = min(cache_end, prompt_tokens)
    read = min(cached_tokens, end)
    return prompt_tokens - end, end - read, read
