"""Domain records of a request: TokenEvent, CompletedGeneration.

Plain data, no MLX. Invariants are checked on construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvpool.cache.tables import CacheHandle
from kvpool.errors import KvpoolError
from kvpool.logprobs import TokenLogprob

AgentBlocks = CacheHandle
"""The earlier name of :class:`~kvpool.cache.tables.CacheHandle`."""


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token, delivered to a request's ``on_token`` callback.

    ``text`` is the newly released text (may be empty while a multi-byte
    character is incomplete, or while it may begin a stop string); the texts of a
    request's events concatenate to its completion's ``text``. ``index`` counts
    generated tokens from 0. ``logprob`` is set when the request asked for logprobs.
    """

    uid: int
    agent_id: str
    token: int
    text: str
    index: int
    logprob: TokenLogprob | None = None


@dataclass(frozen=True, slots=True)
class CompletedGeneration:
    """The end of one request.

    ``blocks`` holds the agent's cache after this turn (prompt + generated
    tokens): pass it as ``cache`` to the agent's next ``submit``. On failure
    ``finish_reason == "error"``, ``error`` says why, and ``blocks`` is the
    cache the request was given (still valid) or None.

    ``cached_tokens`` prompt tokens came from the cache, ``prompt_tokens -
    cached_tokens`` were prefilled.

    ``stop`` is the stop string that ended the generation (``finish_reason ==
    "stop"``; ``text`` ends before it). ``logprobs`` (when asked for) has one entry per
    generated token that ``text`` shows: a final EOS or stop token, and tokens wholly
    inside a matched stop string, have none.
    """

    uid: int
    agent_id: str
    text: str
    token_ids: tuple[int, ...]
    blocks: CacheHandle | None
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float | None = None
    elapsed_s: float = 0.0
    error: KvpoolError | None = field(default=None, compare=False)
    stop: str | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None

    @property
    def token_count(self) -> int:
        """Generated tokens."""
        return len(self.token_ids)

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Generated tokens after the first, per second after the first token."""
        if self.ttft_s is None or self.token_count < 2:
            return None
        decode_s = self.elapsed_s - self.ttft_s
        return (self.token_count - 1) / decode_s if decode_s > 0 else None
