"""The logits processor of constrained decoding: mask what a :class:`TokenMatcher` forbids.

mlx-lm's ``BatchGenerator`` calls a sequence's processors once per decode step with the
tokens so far (prompt included) and that step's logits ``[1, vocab]``. The first call
comes before any token is generated; each later call's last token is the one just
generated, which the matcher consumes before it computes the next mask.
"""

from __future__ import annotations

from typing import cast

import mlx.core as mx

from kvpool.grammar import TokenMatcher

__all__ = ["GrammarLogitsProcessor"]


class GrammarLogitsProcessor:
    """Sets the logits of the tokens ``matcher`` forbids next to ``-inf``.

    Reads the last generated token on the CPU (the matcher needs it), so a constrained
    sequence waits for its previous token before its next step is queued.
    """

    def __init__(self, matcher: TokenMatcher) -> None:
        self.matcher = matcher
        self._started = False

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        token = cast(int, tokens[-1].item()) if self._started else None
        self._started = True
        allowed = mx.array(self.matcher.advance(token))
        width = int(logits.shape[-1])
        if width != allowed.shape[0]:  # logits wider than the matcher's vocabulary
            allowed = mx.pad(allowed[:width], (0, max(0, width - allowed.shape[0])))
        return mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))
