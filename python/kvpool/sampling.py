"""SamplingParams and their translation to mlx-lm samplers (imported lazily)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kvpool.errors import InvalidRequestError
from kvpool.validation import is_integer


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token.

    ``temperature == 0`` is greedy (the other knobs are then ignored).
    ``top_p == 1``, ``top_k == 0`` and ``min_p == 0`` disable those filters.
    ``stop_token_ids`` end a generation in addition to the tokenizer's EOS.
    Types are checked (``top_k`` and the stop ids integers, the others finite
    real numbers) and normalised to ``int``/``float``/a tuple of ints; the
    engine checks ``top_k`` and the stop ids against the model's vocabulary.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise InvalidRequestError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise InvalidRequestError(f"{name} must be finite, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not is_integer(self.top_k):
            raise InvalidRequestError(f"top_k must be an int, got {self.top_k!r}")
        object.__setattr__(self, "top_k", int(self.top_k))
        stops = self.stop_token_ids
        if isinstance(stops, (str, bytes)) or not isinstance(stops, Iterable):
            raise InvalidRequestError(f"stop_token_ids must be a sequence of ints, got {stops!r}")
        stops = tuple(stops)
        if not all(is_integer(t) and int(t) >= 0 for t in stops):
            raise InvalidRequestError(f"stop_token_ids must be ints >= 0, got {stops}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in stops))
        if not self.temperature >= 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise InvalidRequestError(f"min_p must be in [0, 1), got {self.min_p}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams()


def make_sampler(params: SamplingParams) -> Any:
    """An mlx-lm sampler callable for ``params`` (non-greedy ones only)."""
    from kvpool.mlx.mlx_lm import sampler

    return sampler(params.temperature, params.top_p, params.min_p, params.top_k)


def make_stop_sequences(stop_token_ids: Iterable[int]) -> Any:
    """mlx-lm's stop-sequence automaton, each id a one-token sequence."""
    from kvpool.mlx.mlx_lm import stop_sequences

    return stop_sequences(stop_token_ids)
