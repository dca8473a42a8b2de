"""SamplingParams and their translation to mlx-lm samplers (imported lazily)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kvpool.errors import InvalidRequestError


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token.

    ``temperature == 0`` is greedy (the other knobs are then ignored).
    ``top_p == 1``, ``top_k == 0`` and ``min_p == 0`` disable those filters.
    ``stop_token_ids`` end a generation in addition to the tokenizer's EOS.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise InvalidRequestError(f"min_p must be in [0, 1), got {self.min_p}")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise InvalidRequestError(
                f"stop_token_ids must be ints >= 0, got {self.stop_token_ids}"
            )

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams()


def make_sampler(params: SamplingParams) -> Any:
    """An mlx-lm sampler callable for ``params`` (non-greedy ones only)."""
    from mlx_lm.sample_utils import make_sampler as mlx_make_sampler

    return mlx_make_sampler(
        temp=params.temperature,
        top_p=params.top_p if params.top_p < 1 else 0.0,
        min_p=params.min_p,
        top_k=params.top_k,
    )


def make_stop_sequences(stop_token_ids: Iterable[int]) -> Any:
    """mlx-lm's stop-sequence automaton, each id a one-token sequence."""
    from mlx_lm.generate import StopSequences

    return StopSequences([[t] for t in sorted(set(stop_token_ids))])
