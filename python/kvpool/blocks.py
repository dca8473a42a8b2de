"""Domain records: KVBlock, AgentBlocks, CompletedGeneration, TokenEvent.

Plain data, no MLX. Invariants are checked on construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvpool.errors import InvalidRequestError, KvpoolError


@dataclass(frozen=True, slots=True)
class KVBlock:
    """One block of an agent's cache: its id in the pool and how full it is.

    ``0 < token_count <= block_tokens``; only an agent's last block may be
    partial.
    """

    block_id: int
    token_count: int


@dataclass(frozen=True, slots=True)
class AgentBlocks:
    """An agent's cache in the pool: a block table plus the tokens it holds.

    Position ``p`` of the cache lives in block ``block_ids[p // block_tokens]``
    at slot ``p % block_tokens``. With ``block_tokens = 4`` and 10 tokens::

        token_ids:  t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9
        block_ids:  [    12     ,     3       ,   40  ]   (last block: 2 of 4)

    Invariants: ``len(block_ids) == ceil(total_tokens / block_tokens)``, so the
    sum of the blocks' token counts equals ``total_tokens``. Global-attention
    layers hold every position; sliding-window layers hold only positions
    ``>= sliding_valid_from`` (0 when the model has no sliding layers).

    ``lease`` is the pool's owner id for these blocks; once the pool releases
    it (the agent's next generation finished, or the user released it) the
    record is stale and the pool refuses it.
    """

    agent_id: str
    block_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    block_tokens: int
    lease: int
    sliding_valid_from: int = 0

    def __post_init__(self) -> None:
        needed = -(-len(self.token_ids) // self.block_tokens)
        if len(self.block_ids) != needed:
            raise InvalidRequestError(
                f"{len(self.token_ids)} tokens need {needed} blocks of {self.block_tokens}, "
                f"got {len(self.block_ids)}"
            )
        if len(set(self.block_ids)) != len(self.block_ids):
            raise InvalidRequestError(f"duplicate block ids in {self.block_ids}")
        if not 0 <= self.sliding_valid_from <= len(self.token_ids):
            raise InvalidRequestError(
                f"sliding_valid_from {self.sliding_valid_from} outside [0, {len(self.token_ids)}]"
            )

    @property
    def total_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def blocks(self) -> tuple[KVBlock, ...]:
        """The table as KVBlocks; token counts sum to ``total_tokens``."""
        n, size = self.total_tokens, self.block_tokens
        return tuple(
            KVBlock(block_id, min(size, n - i * size)) for i, block_id in enumerate(self.block_ids)
        )


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token, delivered to a request's ``on_token`` callback.

    ``text`` is the newly completed text (may be empty while a multi-byte
    character is incomplete); ``index`` counts generated tokens from 0.
    """

    uid: int
    agent_id: str
    token: int
    text: str
    index: int


@dataclass(frozen=True, slots=True)
class CompletedGeneration:
    """The end of one request.

    ``blocks`` holds the agent's cache after this turn (prompt + generated
    tokens): pass it as ``cache`` to the agent's next ``submit``. On failure
    ``finish_reason == "error"``, ``error`` says why, and ``blocks`` is the
    cache the request was given (still valid) or None.

    ``cached_tokens`` prompt tokens came from the cache, ``prompt_tokens -
    cached_tokens`` were prefilled.
    """

    uid: int
    agent_id: str
    text: str
    token_ids: tuple[int, ...]
    blocks: AgentBlocks | None
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float | None = None
    elapsed_s: float = 0.0
    error: KvpoolError | None = field(default=None, compare=False)

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
