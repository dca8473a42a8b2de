"""The text of one generation as it streams: detokenized, stop strings matched, held back.

A :class:`TextStream` is fed each generated token and returns the text that may be shown
now. Invariants:

- the pieces returned concatenate to :attr:`TextStream.text`;
- that text never contains a stop string: when one appears (anywhere, across any number of
  token boundaries) the text ends where the earliest match starts, and :attr:`stop` names it;
- a piece is released only once no stop string can start inside it: a suffix that is a
  prefix of some stop string is held until later tokens decide (``final`` releases it).

mlx-lm's streaming detokenizers drop the leading space of a reply's first token, which
``tokenizer.decode`` keeps; the first text is taken from ``decode`` when the two differ only
by leading whitespace, so the stream's text is the non-streamed text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["MAX_STOP_CHARS", "TextStream", "first_stop", "held_suffix"]

MAX_STOP_CHARS = 256  # the longest stop string accepted (each suffix check is O(len))


def first_stop(text: str, stops: Sequence[str], start: int = 0) -> tuple[int, str] | None:
    """The earliest match of any of ``stops`` in ``text[start:]``: (position, stop string).

    At equal positions the longest stop wins (it names the most the text matched).
    """
    best: tuple[int, str] | None = None
    for stop in stops:
        pos = text.find(stop, start)
        if pos < 0:
            continue
        if best is None or pos < best[0] or (pos == best[0] and len(stop) > len(best[1])):
            best = (pos, stop)
    return best


def held_suffix(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Length of the longest suffix of ``text[start:]`` that is a proper prefix of a stop."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text) - start), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class TextStream:
    """One request's text: feed every generated token to :meth:`add`, in order.

    ``stops`` are matched on the decoded text. After a match, :attr:`stop` is set, the text
    is final and further tokens add nothing (the caller ends the generation).
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()) -> None:
        if any(not s for s in stops):
            raise ValueError("a stop string must not be empty")
        self._tokenizer = tokenizer
        self._detokenizer = tokenizer.detokenizer  # a fresh streaming one (mlx-lm's API)
        self._stops = tuple(stops)
        self._tokens: list[int] = []  # the tokens whose text is decoded
        self._text = ""  # everything decoded so far (cut at a stop once one matched)
        self._released = 0  # self._text[:released] has been returned
        self._starts: list[int] = []  # per token fed: where its text starts in self._text
        self.stop: str | None = None

    @property
    def text(self) -> str:
        """The text released so far (all of it once the stream is final or stopped)."""
        return self._text[: self._released]

    def add(self, token: int, *, final: bool = False, is_text: bool = True) -> str:
        """Feed one generated token; returns the text released by it (may be empty).

        ``is_text=False`` for a token that ends the generation without text (EOS, a stop
        token); ``final`` for the last token: everything held is released.
        """
        self._starts.append(len(self._text))
        if self.stop is not None:
            return ""
        if is_text:
            self._tokens.append(token)
            self._detokenizer.add_token(token)
        if final:
            self._detokenizer.finalize()
        segment = str(self._detokenizer.last_segment)
        if segment and not self._text:
            segment = self._as_decoded(segment)
        self._text += segment
        return self._release(final)

    def tokens_in_text(self) -> int:
        """How many of the tokens fed so far produced text that :attr:`text` shows (a
        token whose text starts before the end of the shown text counts)."""
        end = len(self.text)
        return sum(1 for start in self._starts if start < end)

    def _release(self, final: bool) -> str:
        found = first_stop(self._text, self._stops, self._released) if self._stops else None
        if found is not None:
            end, self.stop = found
            self._text = self._text[:end]
        elif final:
            end = len(self._text)
        else:
            end = len(self._text) - held_suffix(self._text, self._stops, self._released)
        piece = self._text[self._released : end]
        self._released = end
        return piece

    def _as_decoded(self, segment: str) -> str:
        """The first text as ``decode`` has it, when they differ only by leading whitespace."""
        try:
            whole = str(self._tokenizer.decode(self._tokens))
        except Exception:  # a tokenizer that cannot decode a prefix: keep the segment
            return segment
        if whole != segment and whole.endswith(segment) and not whole[: -len(segment)].strip():
            return whole
        return segment
