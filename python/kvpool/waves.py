"""Prefill waves: which queued requests the engine inserts into the batch generator together.

mlx-lm's ``BatchGenerator`` prefills the prompts it holds as one batch: every ``next()``
processes one chunk (up to ``prefill_step_size`` tokens) of each row, right-padded to the
longest row, and a sequence's first token is reported only by the ``next()`` after its
prompt is done, at the end of a call that also runs that step's prefill. So a 2K-token new
prompt inserted with 64-token resumes makes every row cost 2K tokens, and the resumes' first
tokens wait for the long prefill. The engine therefore inserts requests in *waves* of
similar prefill length (tokens to prefill: the prompt minus what the pool holds), shortest
first, and starts the next wave only once every request of the current one has its first
token. A request compatible with the wave in flight joins it at once (uniform traffic is
not delayed)::

    held (prefill tokens):   [2048, 64, 60, 64, 1]
    wave 1 (anchor 1):       [     64, 60, 64, 1]   each <= RATIO * 1 + SLACK = 66
    wave 2 (anchor 2048):    [2048]                 once wave 1 has its first tokens

A request held for ``STARVE_STEPS`` steps anchors the next wave whatever its length, and
while one is starving nothing joins the wave in flight: a stream of short requests cannot
hold a long one back for ever.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

RATIO = 2  # rows of one wave differ by at most this factor ...
SLACK = 64  # ... plus this many tokens (a few padded tokens cost nothing)
STARVE_STEPS = 8  # steps held before a request anchors the next wave


def compatible(a: int, b: int) -> bool:
    """True if prompts needing ``a`` and ``b`` prefill tokens may share a prefill batch."""
    lo, hi = min(a, b), max(a, b)
    return hi <= RATIO * lo + SLACK


@dataclass(frozen=True, slots=True)
class Candidate:
    """A held request as the policy sees it (the engine keeps them in arrival order)."""

    prefill_tokens: int  # >= 1: prompt tokens the pool does not hold
    held_steps: int  # steps it has waited so far


@dataclass(frozen=True, slots=True)
class Wave:
    """The requests to insert now (indices into the candidates) and the wave's anchor
    length, which later arrivals are compared with to join it."""

    members: tuple[int, ...]
    anchor_tokens: int


def next_wave(candidates: Sequence[Candidate], in_flight: int | None) -> Wave | None:
    """What to insert now, given the held ``candidates`` (oldest first) and the anchor length
    of the wave still waiting for first tokens (None: no wave in flight).

    With a wave in flight, the compatible candidates join it (none if one is starving);
    otherwise a new wave forms around the starving candidate held longest, else the
    shortest (the oldest among equals). None when nothing is to be inserted.

    >>> next_wave([Candidate(2048, 0), Candidate(64, 0), Candidate(1, 0)], None)
    Wave(members=(1, 2), anchor_tokens=1)
    >>> next_wave([Candidate(2048, 3)], 1) is None
    True
    """
    if not candidates:
        return None
    starving = [i for i, c in enumerate(candidates) if c.held_steps >= STARVE_STEPS]
    if in_flight is not None:
        if starving:
            return None
        members = tuple(
            i for i, c in enumerate(candidates) if compatible(in_flight, c.prefill_tokens)
        )
        return Wave(members, in_flight) if members else None
    if starving:
        anchor = max(starving, key=lambda i: (candidates[i].held_steps, -i))
    else:
        anchor = min(range(len(candidates)), key=lambda i: (candidates[i].prefill_tokens, i))
    tokens = candidates[anchor].prefill_tokens
    members = tuple(i for i, c in enumerate(candidates) if compatible(tokens, c.prefill_tokens))
    return Wave(members, tokens)
