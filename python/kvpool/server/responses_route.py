"""The routes of OpenAI's Responses API: ``POST /v1/responses``, ``GET`` and ``DELETE
/v1/responses/{id}``, on the plumbing of :mod:`kvpool.server.app`.

Where a turn runs (:func:`_place`)::

    no previous_response_id        the session given (X-Session-ID / session_id), else a new
                                   one (store: false and no session: an ephemeral agent)
    previous is its session's head the previous response's session (store: true)
    anything else                  a fork of that session: a new session (store: true) or an
                                   ephemeral agent forgotten at the end (store: false)
    its session is busy            a new session (or ephemeral agent) without a fork: the
                                   prefix cache still holds the previous conversation

so a continuation always finds the previous conversation's blocks (by reference after a
fork) and ``store: false`` changes no stored session. A turn that fails leaves no fork behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from kvpool.blocks import CompletedGeneration
from kvpool.server.app import (
    ServerState,
    _check_auth,
    _check_model,
    _Disconnected,
    _error_response,
    _Events,
    _on_loop,
    _read_json,
    _session_of,
    _stream,
    _tokenize,
)
from kvpool.server.errors import ApiError, bad_request, shutting_down
from kvpool.server.loop import Admitted, Channel, Finished, Refused, WorkItem
from kvpool.server.params import Body, Generation, sampling_of
from kvpool.server.responders import OPENAI
from kvpool.server.response_store import ResponseStore, StoredResponse, new_response_id
from kvpool.server.responses_api import (
    ResponsesRequest,
    ResponsesStream,
    continuation_text,
    parse_responses,
)
from kvpool.server.sessions import ephemeral_agent_id, new_session_id
from kvpool.server.tenants import Tenant

__all__ = ["RESPONSES_DIR", "create_response", "delete_response", "get_response"]

RESPONSES_DIR = "responses"  # under the cache directory: one JSON file per stored response


def _store(state: ServerState) -> ResponseStore:
    assert state.responses is not None, "create_app sets it: this indicates a bug"
    return state.responses


def _prompt(state: ServerState, req: ResponsesRequest, prev: StoredResponse | None) -> list[int]:
    """The turn's prompt ids (runs in a worker thread): the previous tokens + the text that
    follows them when the template allows, else the whole conversation rendered afresh."""
    tok = state.tokenizer
    system = [{"role": "system", "content": req.instructions}] if req.instructions else []
    history = prev.messages if prev is not None else []
    if prev is not None and prev.instructions == req.instructions:
        stopped = prev.finish_reason == "stop"
        stop_text = str(tok.decode([prev.tokens[-1]])) if stopped and prev.tokens else None
        text = continuation_text(
            tok, system + history[:-1], history[-1]["content"], stop_text, req.new_messages
        )
        if text is not None:
            try:
                ids = tok.encode(text, add_special_tokens=False)
            except Exception as exc:
                raise bad_request(f"could not tokenize the input: {exc}") from None
            return [*prev.tokens, *(int(t) for t in ids)]
    whole = Generation(model=req.gen.model, messages=system + history + req.new_messages)
    return _tokenize(state, whole)


async def _place(
    state: ServerState,
    tenant: Tenant,
    req: ResponsesRequest,
    prev: StoredResponse | None,
    given: str | None,
) -> tuple[str | None, str, bool]:
    """(session id or None, agent id, forked) of the turn (see the module docstring)."""
    if prev is None:
        if given is None and not req.store:
            return None, ephemeral_agent_id(), False
        named = given or new_session_id()
        return named, tenant.agent_id(named), False
    loop = state.loop
    head = req.store and _store(state).is_head(prev)
    session = new_session_id() if req.store else None
    child = tenant.agent_id(session) if session is not None else ephemeral_agent_id()
    salt = tenant.salt(req.gen.cache_salt)

    def place() -> str:
        if loop.in_flight(prev.agent_id):
            # Another turn runs in that session (its cache is checked out): start a new one,
            # which finds the previous conversation's blocks through the prefix cache.
            return "new"
        if head:
            return "in place"
        loop.store.fork(prev.agent_id, child, salt=salt)  # None: no cache left, a miss
        return "forked"

    where = await _on_loop(state, place, f"continuing {prev.id!r}")
    if where == "in place":
        return prev.session_id, prev.agent_id, False
    return session, child, where == "forked"


async def _drop_fork(state: ServerState, agent_id: str) -> None:
    """A forked turn failed: the fork goes (nothing of it stays)."""

    def drop() -> None:
        if not state.loop.in_flight(agent_id):
            state.loop.store.forget(agent_id)
            state.loop.sessions.remove(agent_id)

    with contextlib.suppress(ApiError):  # shutting down: written with the other sessions
        await _on_loop(state, drop, "dropping a fork")


async def _dropping_failed_fork(
    stream: AsyncIterator[bytes], state: ServerState, shaper: ResponsesStream, agent_id: str
) -> AsyncIterator[bytes]:
    """``stream``; a forked turn that ends in an error event drops its fork."""
    async for chunk in stream:
        yield chunk
    if not shaper.finished:
        await _drop_fork(state, agent_id)


async def create_response(request: Request) -> Response:
    """``POST /v1/responses``."""
    state: ServerState = request.app.state.kvpool
    t_received = time.perf_counter()
    responses = _store(state)
    try:
        if not state.accepting:
            raise shutting_down()
        tenant = _check_auth(state, request)
        body = Body(await _read_json(state, request))
        try:
            req = parse_responses(body)
        except RecursionError:
            raise bad_request("a field of the request body is nested too deeply") from None
        gen = req.gen
        _check_model(state, gen.model)
        given = _session_of(request, body.data, OPENAI)
        prev = None
        if req.previous_response_id is not None:
            prev = responses.get(tenant.name, req.previous_response_id)
            if prev is None:
                raise bad_request(
                    f"Previous response with id {req.previous_response_id[:100]!r} not found.",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            if given is not None and given != prev.session_id:
                raise bad_request(
                    f"session {given!r} is not the session of {prev.id!r} ({prev.session_id!r})"
                    "; leave the session out to continue a response",
                    param="session_id",
                    code="invalid_session_id",
                )
        prompt = await run_in_threadpool(_prompt, state, req, prev)
        max_tokens = gen.max_tokens or min(
            state.limits.default_max_tokens, state.limits.max_context_tokens - len(prompt)
        )
        state.limits.check(len(prompt), max(max_tokens, 1), "max_output_tokens", "input")
        sampling = sampling_of(gen)
        session_id, agent_id, forked = await _place(state, tenant, req, prev, given)
    except ApiError as exc:
        state.metrics.refused.labels(str(exc.status)).inc()
        return _error_response(exc, OPENAI)
    except _Disconnected:
        return Response(status_code=499)
    item = WorkItem(
        agent_id=agent_id,
        session_id=session_id,
        prompt=tuple(prompt),
        max_tokens=max_tokens,
        sampling=sampling,
        channel=Channel(asyncio.get_running_loop()),
        t_received=t_received,
        cache_salt=tenant.salt(gen.cache_salt),
    )
    shaper = ResponsesStream(new_response_id(), state.model_name, req, session_id)

    def finished(c: CompletedGeneration) -> dict[str, Any]:
        body = shaper.response(c)
        if req.store and session_id is not None:
            history = prev.messages if prev is not None else []
            responses.add(
                StoredResponse(
                    id=shaper.rid,
                    tenant=tenant.name,
                    agent_id=agent_id,
                    session_id=session_id,
                    tokens=[*prompt, *c.token_ids],
                    messages=[
                        *history,
                        *req.new_messages,
                        {"role": "assistant", "content": c.text},
                    ],
                    instructions=req.instructions,
                    finish_reason=c.finish_reason,
                    body=body,
                    finished_at=time.time(),
                    previous_response_id=req.previous_response_id,
                )
            )
        return body

    events = _Events(item.channel)
    state.loop.submit(item)
    try:
        first = await events.next(request)
        if isinstance(first, Refused):
            if forked:
                await _drop_fork(state, agent_id)
            return _error_response(first.error, OPENAI)
        assert isinstance(first, Admitted), f"unexpected first event {first!r}"
        if not gen.stream:
            while True:
                event = await events.next(request)
                if isinstance(event, Finished):
                    return JSONResponse(finished(event.completion))
                if isinstance(event, Refused):
                    if forked:
                        await _drop_fork(state, agent_id)
                    return _error_response(event.error, OPENAI)
    except _Disconnected:
        state.loop.cancel(item)
        events.close()
        return Response(status_code=499)
    except asyncio.CancelledError:
        state.loop.cancel(item)
        events.close()
        raise
    shaper.on_finish = finished
    stream = _stream(shaper, state, gen, item, events)
    if forked:
        stream = _dropping_failed_fork(stream, state, shaper, agent_id)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    if session_id is not None:
        headers["X-Session-ID"] = session_id
    return StreamingResponse(stream, media_type="text/event-stream", headers=headers)


def _not_found(response_id: str) -> ApiError:
    return ApiError(
        404,
        "not_found",
        f"Response with id {response_id[:100]!r} not found.",
        param="response_id",
        code="response_not_found",
    )


async def get_response(request: Request, state: ServerState, tenant: Tenant) -> Response:
    """``GET /v1/responses/{id}``: a stored response of the caller's tenant."""
    response_id = request.path_params["response_id"]
    stored = _store(state).get(tenant.name, response_id)
    if stored is None:
        raise _not_found(response_id)
    return JSONResponse(stored.body)


async def delete_response(request: Request, state: ServerState, tenant: Tenant) -> Response:
    """``DELETE /v1/responses/{id}``: forget a stored response (its session stays)."""
    response_id = request.path_params["response_id"]
    if not _store(state).delete(tenant.name, response_id):
        raise _not_found(response_id)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})
