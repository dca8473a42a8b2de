"""Stored responses of ``/v1/responses``: each one a node of a session.

A :class:`StoredResponse` records where its conversation lives and what it holds: the agent
(session) whose cache holds it, the token ids of the whole conversation up to and including
its output (``tokens``: prompt + generated), the messages that produced them (without the
instructions, which OpenAI does not carry over) and the response object returned to the
client. A continuation (``previous_response_id``) prompts with ``tokens`` + the new input,
so the engine reuses the session's blocks for all of ``tokens`` it holds.

Within one session the stored responses form a chain; the session's *head* is the latest
one whose turn finished there (its cache holds the head's tokens). Continuing from the head
runs in the session; continuing from any other node forks the session first
(:meth:`~kvpool.store.AgentCacheStore.fork`), so both branches keep their blocks::

    session s1:  r1 -> r2 -> r3 (head)       continue r3: runs in s1, head becomes r4
                        \\
    session s2:          r2' (fork of s1)    continue r2: fork s1 -> s2, runs in s2

Persistence: one JSON file per response in ``directory`` (``{id}.json``, written to a
temporary file and renamed, so a crash leaves the old file or the new one), read back when
the server starts. Responses are private to their tenant: every lookup names the tenant.
Touched only by the server's asyncio thread.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["ResponseStore", "StoredResponse", "new_response_id"]

logger = logging.getLogger(__name__)

_ID = re.compile(r"resp_[0-9a-f]{32}")


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


@dataclass(slots=True)
class StoredResponse:
    """One stored response (see the module docstring).

    ``tokens`` is the prompt the turn ran on followed by every generated token;
    ``messages`` the conversation as chat messages (the output last, as an assistant
    message); ``finished_at`` orders the nodes of a session (its head is the latest).
    """

    id: str
    tenant: str
    agent_id: str
    session_id: str
    tokens: list[int]
    messages: list[dict[str, str]]
    instructions: str | None
    finish_reason: str
    body: dict[str, Any]  # the response object as returned
    finished_at: float
    previous_response_id: str | None = None


class ResponseStore:
    """Stored responses by id, with each session's head; files in ``directory`` (None:
    kept in memory only)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._by_id: dict[str, StoredResponse] = {}
        self._agent_to_head: dict[str, str] = {}
        if directory is not None and directory.is_dir():
            for path in sorted(directory.glob("resp_*.json")):
                self._load(path)

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
            stored = StoredResponse(**data)
            if not _ID.fullmatch(stored.id) or path.stem != stored.id:
                raise ValueError(f"id {stored.id!r} does not match the file name")
        except (OSError, ValueError, TypeError) as exc:
            logger.warning("ignoring an unreadable stored response %s: %s", path, exc)
            return
        self._by_id[stored.id] = stored
        head = self._by_id.get(self._agent_to_head.get(stored.agent_id, ""))
        if head is None or stored.finished_at > head.finished_at:
            self._agent_to_head[stored.agent_id] = stored.id

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        """The response if it exists and is ``tenant``'s (another tenant's reads as absent)."""
        stored = self._by_id.get(response_id)
        return stored if stored is not None and stored.tenant == tenant else None

    def is_head(self, stored: StoredResponse) -> bool:
        """True if ``stored`` is the latest finished turn of its session."""
        return self._agent_to_head.get(stored.agent_id) == stored.id

    def add(self, stored: StoredResponse) -> None:
        """Record a finished turn (it becomes its session's head) and write its file.

        A file that cannot be written is logged; the response stays in memory (it is lost
        at a restart)."""
        self._by_id[stored.id] = stored
        self._agent_to_head[stored.agent_id] = stored.id
        if self.directory is None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"{stored.id}.json"
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(asdict(stored), separators=(",", ":")))
            os.replace(tmp, path)
        except OSError as exc:
            logger.error("could not write stored response %s: %s", stored.id, exc)

    def delete(self, tenant: str, response_id: str) -> bool:
        """Forget a response and delete its file; False if ``tenant`` has none of that id.
        The session (and its cache) stays: it is deleted through ``/v1/sessions``."""
        stored = self.get(tenant, response_id)
        if stored is None:
            return False
        del self._by_id[response_id]
        if self._agent_to_head.get(stored.agent_id) == response_id:
            del self._agent_to_head[stored.agent_id]
        if self.directory is not None:
            try:
                (self.directory / f"{response_id}.json").unlink(missing_ok=True)
            except OSError as exc:
                logger.error("could not delete stored response %s: %s", response_id, exc)
        return True
