"""Checks on what users pass in: agent ids, token lists, counts."""

from __future__ import annotations

import numbers
import re
from collections.abc import Sequence
from typing import TypeGuard

from kvpool.errors import InvalidRequestError

MAX_AGENT_ID_LEN = 128
_AGENT_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def validate_agent_id(agent_id: object) -> str:
    """Return ``agent_id`` if it is safe as a key and as a file name.

    Allowed: 1..128 characters of ``A-Z a-z 0-9 _ . -``, not starting with
    ``.`` or ``-`` (so ``..``, ``/``, NUL and hidden names are refused).
    """
    if not isinstance(agent_id, str) or not agent_id:
        raise InvalidRequestError(f"agent_id must be a non-empty string, got {agent_id!r}")
    if len(agent_id) > MAX_AGENT_ID_LEN:
        raise InvalidRequestError(
            f"agent_id is {len(agent_id)} characters long, the limit is {MAX_AGENT_ID_LEN}"
        )
    if not _AGENT_ID.fullmatch(agent_id):
        raise InvalidRequestError(
            f"agent_id {agent_id!r} may only hold letters, digits, '_', '.', '-' "
            "and must not start with '.' or '-'"
        )
    return agent_id


def is_integer(value: object) -> TypeGuard[numbers.Integral]:
    """True for ints and numpy integers; False for bools, floats and everything else."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def validate_token_ids(tokens: Sequence[object], vocab_size: int | None = None) -> list[int]:
    """Return ``tokens`` as a non-empty list of ints in ``[0, vocab_size)``.

    Elements may be ints or numpy integers (they come back as ints).
    """
    if len(tokens) == 0:
        raise InvalidRequestError("the prompt is empty")
    if {type(t) for t in tokens} == {int}:  # the common case, checked in C loops
        ints: list[int] = list(tokens)  # type: ignore[arg-type]  # every element is an int
        if min(ints) >= 0 and (vocab_size is None or max(ints) < vocab_size):
            return ints
    out: list[int] = []
    for i, t in enumerate(tokens):
        if not is_integer(t):
            raise InvalidRequestError(f"token {i} is {t!r}, not an int")
        token = int(t)
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            raise InvalidRequestError(f"token {i} is {token}, outside [0, {vocab_size})")
        out.append(token)
    return out


def validate_count(name: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` as an int if it is an integer >= ``minimum`` (not a bool or float)."""
    if not is_integer(value) or int(value) < minimum:
        raise InvalidRequestError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)
