"""Log-probabilities of generated tokens: the chosen token's and the most likely ones.

The batch generator computes the log-softmax of every row's logits anyway (before any
temperature or filter: these are the model's own probabilities); a request that asks for
logprobs reads its row once per token, the others pay nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["MAX_TOP_LOGPROBS", "TokenLogprob", "token_logprob"]

MAX_TOP_LOGPROBS = 20  # OpenAI's bound for top_logprobs


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """``token``'s log-probability and the ``k`` most likely tokens (most likely first;
    ties by token id), all from the same distribution."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(vector: Any, token: int, k: int) -> TokenLogprob:
    """The log-probability of ``token`` in ``vector`` (a log-softmax row, numpy or MLX)
    and the ``k`` most likely tokens (``0 <= k <= MAX_TOP_LOGPROBS``)."""
    if not 0 <= k <= MAX_TOP_LOGPROBS:
        raise ValueError(f"k must be in [0, {MAX_TOP_LOGPROBS}], got {k}")
    if isinstance(vector, np.ndarray):
        row = vector.astype(np.float32, copy=False).reshape(-1)
        chosen = float(row[token])
        k = min(k, row.size)
        top = [(int(i), float(row[i])) for i in np.argpartition(-row, k - 1)[:k]] if k else []
    else:  # an mx.array: MLX is loaded already
        from kvpool.mlx.logprobs import row_logprobs

        chosen, top = row_logprobs(vector, token, k)
    top.sort(key=lambda entry: (-entry[1], entry[0]))
    return TokenLogprob(int(token), chosen, tuple(top))
