"""SamplingParams and their translation to mlx-lm samplers (imported lazily)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kvpool.errors import InvalidRequestError
from kvpool.logprobs import MAX_TOP_LOGPROBS
from kvpool.textstream import MAX_STOP_CHARS
from kvpool.validation import is_integer

MAX_STOPS = 16  # stop strings per request (each checked against the text per token)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token.

    ``temperature == 0`` is greedy (the other knobs are then ignored).
    ``top_p == 1``, ``top_k == 0`` and ``min_p == 0`` disable those filters.
    ``stop_token_ids`` end a generation in addition to the tokenizer's EOS.
    ``stop`` strings end it when the decoded text contains one (across any token
    boundaries; the text ends before it): at most ``MAX_STOPS``, each 1..``MAX_STOP_CHARS``
    characters. ``logprobs``: None, or how many of the most likely tokens to report with
    each generated token's log-probability (0..``MAX_TOP_LOGPROBS``).
    Types are checked (``top_k`` and the stop ids integers, the others finite
    real numbers) and normalised to ``int``/``float``/a tuple of ints; the
    engine checks ``top_k`` and the stop ids against the model's vocabulary.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    logprobs: int | None = None

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
        self._check_stop_strings()
        if self.logprobs is not None:
            if not is_integer(self.logprobs) or not 0 <= int(self.logprobs) <= MAX_TOP_LOGPROBS:
                raise InvalidRequestError(
                    f"logprobs must be None or an int in [0, {MAX_TOP_LOGPROBS}], "
                    f"got {self.logprobs!r}"
                )
            object.__setattr__(self, "logprobs", int(self.logprobs))
        if not self.temperature >= 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise InvalidRequestError(f"min_p must be in [0, 1), got {self.min_p}")

    def _check_stop_strings(self) -> None:
        stop = self.stop
        if isinstance(stop, str) or not isinstance(stop, Iterable):
            raise InvalidRequestError(f"stop must be a sequence of strings, got {stop!r}")
        stop = tuple(stop)
        if len(stop) > MAX_STOPS:
            raise InvalidRequestError(f"at most {MAX_STOPS} stop strings, got {len(stop)}")
        for s in stop:
            if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_CHARS:
                raise InvalidRequestError(
                    f"each stop string must be a str of 1..{MAX_STOP_CHARS} characters, "
                    f"got {s!r:.60}"
                )
        object.__setattr__(self, "stop", stop)

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
