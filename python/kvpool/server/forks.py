"""Session fork: a new session that shares every block of its parent by reference.

``POST /v1/sessions/{id}/fork`` runs :func:`fork_session` on the engine-loop thread. The
child's cache is :meth:`~kvpool.store.AgentCacheStore.fork` of the parent's: one more
reference on each block, no K/V copied, so the fork costs the same for 10 tokens or 8K.
Both sessions then continue independently (a turn writes past the shared blocks; the shared
partial last block is read and re-written by whichever branch extends it).

Errors, in the OpenAI shape: 409 ``session_busy`` if the parent (or the child id) has a
request in flight, 409 ``session_exists`` if the child id is taken, 404
``session_not_found`` if the parent has no cache.
"""

from __future__ import annotations

from typing import Any

from kvpool.server.errors import ApiError
from kvpool.server.loop import EngineLoop
from kvpool.server.tenants import Tenant

__all__ = ["fork_session"]


def fork_session(
    loop: EngineLoop, tenant: Tenant, parent: str, child: str, *, salt: str = ""
) -> dict[str, Any]:
    """On the loop thread: fork ``tenant``'s session ``parent`` into ``child``; returns the
    child's session record (``forked_from``: the parent). ``salt``: the tenant's cache salt,
    under which a cold parent is loaded."""
    parent_agent, child_agent = tenant.agent_id(parent), tenant.agent_id(child)
    for busy in (parent, child):
        if loop.in_flight(tenant.agent_id(busy)):
            raise ApiError(
                409,
                "conflict",
                f"session {busy!r} has a request in flight; fork it after the request ends",
                code="session_busy",
            )
    if child == parent or loop.store.tier(child_agent) is not None:
        raise ApiError(
            409,
            "conflict",
            f"session {child!r} already exists; fork into a new session id",
            param="session_id",
            code="session_exists",
        )
    handle = loop.store.fork(parent_agent, child_agent, salt=salt or tenant.salt())
    if handle is None:
        raise ApiError(404, "not_found", f"no session {parent!r}", code="session_not_found")
    parent_info = loop.sessions.touch(parent_agent)
    info = loop.sessions.touch(child_agent)
    info.context_tokens = handle.total_tokens
    info.last_used = parent_info.last_used
    tier = loop.store.tier(child_agent)
    record = info.to_json(child, tier.value if tier else None, False)
    return {**record, "forked_from": parent}
