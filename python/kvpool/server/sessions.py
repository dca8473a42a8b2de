"""Session ids and the server's record of each session.

A session is an agent of the :class:`~kvpool.store.AgentCacheStore`: its agent id is the
session id in its tenant's namespace (the session id itself for the default tenant,
``_t-{tenant}_{session id}`` for another: :mod:`kvpool.server.tenants`), so its cache file
survives restarts under that name. Session ids are
1..128 characters of ``A-Z a-z 0-9 _ . -`` starting with a letter or digit. Requests without
a session run as an *ephemeral* agent whose id starts with ``_`` (never a valid session id,
so the two never collide) and which is forgotten when the request ends.

:class:`SessionRegistry` is touched only by the engine-loop thread.
"""

from __future__ import annotations

import itertools
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from kvpool.errors import KvpoolError
from kvpool.persist import agent_id_of, read_cache_info
from kvpool.server.errors import bad_request

__all__ = [
    "MAX_SESSION_ID_LEN",
    "SessionInfo",
    "SessionRegistry",
    "new_session_id",
    "validate_session_id",
]

MAX_SESSION_ID_LEN = 128
_SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
EPHEMERAL_PREFIX = "_req-"


def validate_session_id(session_id: object, source: str) -> str:
    """``session_id`` if valid; else a 400 ApiError naming ``source`` (header or field)."""
    if not isinstance(session_id, str):
        raise bad_request(
            f"{source} must be a string, got {type(session_id).__name__}",
            param=source,
            code="invalid_session_id",
        )
    if not 1 <= len(session_id) <= MAX_SESSION_ID_LEN:
        raise bad_request(
            f"{source} is {len(session_id)} characters long; it must be 1..{MAX_SESSION_ID_LEN}",
            param=source,
            code="invalid_session_id",
        )
    if not _SESSION_ID.fullmatch(session_id):
        raise bad_request(
            f"{source} {session_id[:40]!r} may only hold letters, digits, '_', '.' and '-' "
            "and must start with a letter or digit",
            param=source,
            code="invalid_session_id",
        )
    return session_id


_ephemeral_ids = itertools.count()


def new_session_id() -> str:
    """A fresh session id for a session the server names (a fork without a given id)."""
    return f"s-{uuid.uuid4().hex[:24]}"


def ephemeral_agent_id() -> str:
    """A fresh agent id for a request without a session (unique within this process)."""
    return f"{EPHEMERAL_PREFIX}{os.getpid()}-{next(_ephemeral_ids)}"


@dataclass(slots=True)
class SessionInfo:
    """What the server knows of one session (beyond where the store keeps its cache).

    ``agent_id`` is the store's id: the session id inside its tenant's namespace
    (:meth:`~kvpool.server.tenants.Tenant.agent_id`).
    """

    agent_id: str
    turns: int = 0  # turns completed by this process (a restart starts at 0)
    context_tokens: int = 0  # prompt + generated tokens of its last turn (on disk at start)
    last_prompt_tokens: int = 0
    last_cached_tokens: int = 0
    last_used: float = 0.0  # unix time of its last completed turn (file mtime on restart)

    def to_json(self, session_id: str, tier: str | None, in_flight: bool) -> dict[str, object]:
        """The record as its tenant sees it (``session_id``: the id without the namespace)."""
        return {
            "id": session_id,
            "object": "session",
            "tier": tier,
            "in_flight": in_flight,
            "turns": self.turns,
            "context_tokens": self.context_tokens,
            "last_prompt_tokens": self.last_prompt_tokens,
            "last_cached_tokens": self.last_cached_tokens,
            "last_used": round(self.last_used, 3),
        }


def _saved_tokens(path: Path) -> int:
    """Tokens a session file holds (its header only); 0 if it cannot be read."""
    try:
        return read_cache_info(path).num_tokens
    except (KvpoolError, OSError):
        return 0  # the store sets it aside or ignores it when it meets it


class SessionRegistry:
    """The sessions of one server, by agent id: those found in the cache directory plus new
    ones."""

    def __init__(self, cache_dir: Path | None) -> None:
        """``cache_dir``: the local cache directory, None for a shared tier (Redis), whose
        sessions are not listed until this server serves them."""
        self._sessions: dict[str, SessionInfo] = {}
        found = sorted(cache_dir.iterdir()) if cache_dir is not None and cache_dir.is_dir() else []
        for path in found:
            agent_id = agent_id_of(path)
            if agent_id is None:
                continue
            if agent_id.startswith(EPHEMERAL_PREFIX):
                path.unlink(missing_ok=True)  # an ephemeral agent a killed process left
                continue
            self._sessions[agent_id] = SessionInfo(
                agent_id, context_tokens=_saved_tokens(path), last_used=path.stat().st_mtime
            )

    def get(self, agent_id: str) -> SessionInfo | None:
        return self._sessions.get(agent_id)

    def touch(self, agent_id: str) -> SessionInfo:
        info = self._sessions.get(agent_id)
        if info is None:
            info = self._sessions[agent_id] = SessionInfo(agent_id)
        return info

    def record_turn(
        self, agent_id: str, prompt_tokens: int, cached_tokens: int, generated: int
    ) -> None:
        info = self.touch(agent_id)
        info.turns += 1
        info.last_prompt_tokens, info.last_cached_tokens = prompt_tokens, cached_tokens
        info.context_tokens = prompt_tokens + generated
        info.last_used = time.time()

    def remove(self, agent_id: str) -> bool:
        return self._sessions.pop(agent_id, None) is not None

    def all(self) -> list[SessionInfo]:
        return sorted(self._sessions.values(), key=lambda s: s.agent_id)
