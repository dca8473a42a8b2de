"""The HTTP side of ``kvpool serve``: routes, body limits, auth, streaming (Starlette).

Every generation endpoint runs the same path: authenticate (the key names the caller's
tenant, :mod:`~kvpool.server.tenants`: its cache salt and session namespace), read a bounded
UTF-8 JSON body,
parse it (:mod:`~kvpool.server.openai_api`, :mod:`~kvpool.server.anthropic_api`), tokenize
(chat messages through the tokenizer's chat template) in a worker thread, check the limits,
then hand a :class:`~kvpool.server.loop.WorkItem` to the engine loop and relay its events:
a JSON response, or Server-Sent Events in the endpoint's own format. Errors before the first
byte are HTTP errors in the endpoint's error shape; an error mid-stream is an error event.

A client that disconnects (while waiting for admission, for a non-streamed response, or in
the middle of a stream) cancels its request on the loop; the engine frees its blocks before
its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kvpool.errors import InvalidRequestError
from kvpool.logprobs import TokenLogprob
from kvpool.server.cache_control import resolve_breakpoints
from kvpool.server.errors import (
    ApiError,
    anthropic_body,
    bad_request,
    openai_body,
    shutting_down,
)
from kvpool.server.forks import fork_session
from kvpool.server.loop import Admitted, Channel, EngineLoop, Event, Finished, Refused, WorkItem
from kvpool.server.metrics import CONTENT_TYPE, ServerMetrics
from kvpool.server.params import Body, Generation, Limits, sampling_of
from kvpool.server.responders import (
    ANTHROPIC,
    OPENAI,
    ChatResponder,
    CompletionResponder,
    MessagesResponder,
    Responder,
    StreamShaper,
)
from kvpool.server.response_store import ResponseStore
from kvpool.server.sessions import ephemeral_agent_id, new_session_id, validate_session_id
from kvpool.server.tenants import ApiKeys, Tenant
from kvpool.server.tools import HERMES, ToolFormat

__all__ = ["ServerState", "create_app"]

logger = logging.getLogger(__name__)

_POLL_S = 0.25  # how often a waiting non-streamed request checks for a disconnect


@dataclass(slots=True)
class ServerState:
    """What the routes need: the engine loop and the model's tokenizer, limits, names.

    ``model_name`` is the name responses carry; requests may name it or any of
    ``model_aliases`` (the string given to ``--model``, its directory name).
    """

    loop: EngineLoop
    tokenizer: Any
    model_name: str
    limits: Limits
    metrics: ServerMetrics
    keys: ApiKeys
    max_body_bytes: int
    vocab_size: int | None
    created: int
    cache_dir: Path | None = None
    cache_where: str = ""  # where sessions' caches are (a directory, a Redis URL), for logs
    accepting: bool = True
    model_aliases: tuple[str, ...] = ()
    # a fresh logits processor enforcing an llguidance grammar (kvpool.grammar); raises
    # GrammarError. None: this model's tokenizer cannot be used for constrained decoding.
    constrain: Callable[[str], Any] | None = None
    tool_format: ToolFormat = HERMES  # how the chat template takes tools (kvpool.server.tools)
    responses: ResponseStore | None = None  # stored /v1/responses (create_app makes it)

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.model_name, *(a for a in self.model_aliases if a != self.model_name))


class _Disconnected(Exception):
    """The client went away."""


# -- plumbing ----------------------------------------------------------------------------


def _error_response(error: ApiError, api: str) -> JSONResponse:
    body = anthropic_body(error) if api == ANTHROPIC else openai_body(error)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def _check_auth(state: ServerState, request: Request) -> Tenant:
    """The caller's tenant (the default one when the server has no keys); else a 401."""
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    tenant = state.keys.tenant_of(given)
    if tenant is None:
        raise ApiError(
            401,
            "authentication",
            "invalid or missing API key (Authorization: Bearer KEY or x-api-key: KEY)",
            code="invalid_api_key",
        )
    return tenant


async def _read_json(state: ServerState, request: Request) -> Any:
    limit = state.max_body_bytes
    too_large = ApiError(
        413, "too_large", f"the request body is larger than {limit} bytes", code="body_too_large"
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise _Disconnected() from None
    raw = b"".join(chunks)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(
            f"the request body is not valid UTF-8 (byte {exc.start})", code="invalid_utf8"
        ) from None
    if not text.strip():
        raise bad_request("the request body is empty; expected a JSON object")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad_request(
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column "
            f"{exc.colno}",
            code="invalid_json",
        ) from None
    except RecursionError:
        raise bad_request(
            "the request body is not valid JSON here: it is nested too deeply",
            code="invalid_json",
        ) from None
    except ValueError as exc:  # e.g. an integer past Python's digit limit
        raise bad_request(
            f"the request body is not valid JSON here: {str(exc)[:200]}", code="invalid_json"
        ) from None


def _check_model(state: ServerState, model: str) -> None:
    """A 404 unless ``model`` names the served model (or one of its aliases)."""
    if model not in state.model_names:
        raise ApiError(
            404,
            "not_found",
            f"model {model[:200]!r} is not served here; this server serves "
            f"{state.model_name!r} (GET /v1/models)",
            param="model",
            code="model_not_found",
        )


def _session_of(request: Request, data: dict[str, Any], api: str) -> str | None:
    """The session id: ``X-Session-ID``, body ``session_id`` or ``prompt_cache_key``."""
    found = [("X-Session-ID header", request.headers.get("x-session-id"))]
    found.append(("session_id", data.get("session_id")))
    if api == OPENAI:
        found.append(("prompt_cache_key", data.get("prompt_cache_key")))
    given = [(where, validate_session_id(v, where)) for where, v in found if v is not None]
    if len({v for _, v in given}) > 1:
        raise bad_request(
            "conflicting session ids: " + ", ".join(f"{w}={v!r}" for w, v in given),
            param="session_id",
            code="invalid_session_id",
        )
    return given[0][1] if given else None


def _tokenize(state: ServerState, gen: Generation) -> list[int]:
    """The prompt's token ids (runs in a worker thread for long prompts)."""
    tok = state.tokenizer
    try:
        if gen.messages is not None:
            messages, extra = state.tool_format.render(gen.messages, gen.tools)
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, **extra)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        elif gen.text is not None:
            ids = tok.encode(gen.text)
        else:
            ids = gen.token_ids
    except ApiError:
        raise
    except Exception as exc:  # a template or tokenizer refusing the input
        raise bad_request(f"could not tokenize the prompt: {exc}") from None
    ids = [int(t) for t in ids or ()]
    if not ids:
        raise bad_request("the prompt is empty after tokenization", param="prompt")
    if gen.cache_breakpoints and gen.messages is not None:
        resolve_breakpoints(tok, gen.messages, gen.cache_breakpoints, ids)
    vocab = state.vocab_size
    bad = next((t for t in ids if t < 0 or (vocab is not None and t >= vocab)), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside [0, {vocab})", param="prompt")
    return ids


async def _constraint(state: ServerState, gen: Generation) -> tuple[Any, ...]:
    """The request's logits processors: one enforcing ``gen.grammar`` (a response format,
    or the tool calls ``tool_choice`` requires), if it has one."""
    if gen.tools is not None:
        gen.tools.format = state.tool_format
        try:
            grammar = state.tool_format.grammar(gen.tools)
        except InvalidRequestError as exc:
            raise bad_request(str(exc), param="tool_choice") from None
        if grammar is not None:
            if gen.grammar is not None:
                raise bad_request(
                    "response_format cannot be combined with a tool_choice that requires a "
                    "call (the reply is the call)",
                    param="response_format",
                )
            gen.grammar, gen.grammar_param = grammar, "tool_choice"
    if gen.grammar is None:
        return ()
    if state.constrain is None:
        raise bad_request(
            f"{gen.grammar_param} needs constrained decoding, which this model's tokenizer "
            "does not support (it is not a Hugging Face fast tokenizer)",
            param=gen.grammar_param,
        )
    try:  # compiling a schema can take milliseconds: not on the event loop
        return (await run_in_threadpool(state.constrain, gen.grammar),)
    except InvalidRequestError as exc:
        raise bad_request(str(exc), param=gen.grammar_param) from None


_SHORT_PROMPT_CHARS = 2048


def _is_short(gen: Generation) -> bool:
    """A prompt small enough to tokenize on the event loop (well under a millisecond)."""
    if gen.token_ids is not None:
        return True
    if gen.text is not None:
        return len(gen.text) <= _SHORT_PROMPT_CHARS
    return sum(len(m["content"]) for m in gen.messages or ()) <= _SHORT_PROMPT_CHARS


class _Events:
    """Reads a channel; a pending get survives timeouts (no event is ever lost)."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._pending: asyncio.Task[Event] | None = None

    async def next(self, request: Request | None) -> Event:
        """The next event; with ``request``, raises _Disconnected if the client left."""
        while True:
            if self._pending is None:
                self._pending = asyncio.ensure_future(self.channel.get())
            if request is None:
                event = await self._pending
                self._pending = None
                return event
            done, _ = await asyncio.wait({self._pending}, timeout=_POLL_S)
            if done:
                event = self._pending.result()
                self._pending = None
                return event
            if await request.is_disconnected():
                raise _Disconnected()

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()


# -- generation ----------------------------------------------------------------------------


async def _generate(request: Request, responder: Responder) -> Response:
    state: ServerState = request.app.state.kvpool
    t_received = time.perf_counter()
    api = responder.api
    try:
        if not state.accepting:
            raise shutting_down()
        tenant = _check_auth(state, request)
        body = Body(await _read_json(state, request))
        try:
            gen = responder.parse(body)
        except RecursionError:  # a field nested deeper than Python compares or prints
            raise bad_request("a field of the request body is nested too deeply") from None
        _check_model(state, gen.model)
        session_id = _session_of(request, body.data, api)
        agent_id = tenant.agent_id(session_id) if session_id is not None else None
        processors = await _constraint(state, gen)
        if _is_short(gen):  # cheaper here than the hop to a worker thread
            prompt = _tokenize(state, gen)
        else:
            prompt = await run_in_threadpool(_tokenize, state, gen)
        max_tokens = gen.max_tokens or min(
            state.limits.default_max_tokens, state.limits.max_context_tokens - len(prompt)
        )
        state.limits.check(len(prompt), max(max_tokens, 1), gen.max_tokens_param, gen.prompt_param)
        sampling = sampling_of(gen)
    except ApiError as exc:
        state.metrics.refused.labels(str(exc.status)).inc()
        return _error_response(exc, api)
    except _Disconnected:
        return Response(status_code=499)
    item = WorkItem(
        agent_id=agent_id or ephemeral_agent_id(),
        session_id=session_id,
        prompt=tuple(prompt),
        max_tokens=max_tokens,
        sampling=sampling,
        channel=Channel(asyncio.get_running_loop()),
        t_received=t_received,
        cache_salt=tenant.salt(gen.cache_salt),
        logits_processors=processors,
    )
    if gen.cache_breakpoints:  # pinned when the turn ends (kvpool.server.pins)
        item.extra["pins"] = [(bp.end, bp.ttl_s) for bp in gen.cache_breakpoints]
    events = _Events(item.channel)
    state.loop.submit(item)
    try:
        first = await events.next(request)
    except _Disconnected:
        state.loop.cancel(item)
        events.close()
        return Response(status_code=499)
    except asyncio.CancelledError:
        state.loop.cancel(item)
        events.close()
        raise
    if isinstance(first, Refused):
        return _error_response(first.error, api)
    assert isinstance(first, Admitted), f"unexpected first event {first!r}"
    if not gen.stream:
        try:
            while True:
                event = await events.next(request)
                if isinstance(event, Finished):
                    c = event.completion
                    # the engine's own time for this request: clients (kvpool bench serve)
                    # can tell the server's overhead from it
                    timing = {"X-Kvpool-Engine-Ms": f"{c.elapsed_s * 1e3:.3f}"}
                    answer = responder.response(
                        state.model_name, gen, c, state.tokenizer, session_id
                    )
                    return JSONResponse(answer, headers=timing)
                if isinstance(event, Refused):
                    return _error_response(event.error, api)
        except _Disconnected:
            state.loop.cancel(item)
            events.close()
            return Response(status_code=499)
        except asyncio.CancelledError:
            state.loop.cancel(item)
            events.close()
            raise
    shaper = responder.stream(state.model_name, gen, len(prompt), state.tokenizer)
    stream = _stream(shaper, state, gen, item, events)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    if session_id is not None:
        headers["X-Session-ID"] = session_id
    return StreamingResponse(stream, media_type="text/event-stream", headers=headers)


async def _stream(
    shaper: StreamShaper,
    state: ServerState,
    gen: Generation,
    item: WorkItem,
    events: _Events,
) -> AsyncIterator[bytes]:
    """SSE of one admitted request; cancels it if the client goes away first.

    A chunk carries the logprobs of the tokens since the previous chunk (tokens without
    text, such as the final EOS, carry theirs into the next chunk or none)."""
    ended = False
    logprobs: list[TokenLogprob] = []  # of the tokens not yet in a chunk
    try:
        for chunk in shaper.open():
            yield chunk
        while True:
            event = await events.next(None)
            if isinstance(event, Refused):
                ended = True
                yield shaper.error(event.error)
                return
            if isinstance(event, Finished):
                ended = True
                for chunk in shaper.close(event.completion):
                    yield chunk
                return
            if isinstance(event, Admitted):
                continue
            if event.logprob is not None:
                logprobs.append(event.logprob)
            token_ids = [event.token] if gen.return_token_ids else None
            if not event.text and token_ids is None:
                continue
            chunk = shaper.text(event.text, token_ids, logprobs)
            if chunk:  # text held back (a tool call's marker may be starting) sends nothing
                yield chunk
                logprobs = []
    finally:
        if not ended:
            state.loop.cancel(item)
        events.close()


# -- other routes ------------------------------------------------------------------------------


_Handler = Callable[[Request, ServerState, Tenant], Awaitable[Response]]


def _openai_route(handler: _Handler) -> Callable[[Request], Awaitable[Response]]:
    """Auth and errors (OpenAI's shape) around a non-generation route."""

    async def route(request: Request) -> Response:
        state: ServerState = request.app.state.kvpool
        try:
            tenant = _check_auth(state, request)
            return await handler(request, state, tenant)
        except ApiError as exc:
            return _error_response(exc, OPENAI)

    return route


async def _on_loop(state: ServerState, fn: Callable[[], Any], what: str = "the request") -> Any:
    """``fn()`` on the loop thread. A caller's mistake is a 400; any other failure a 500
    whose body names no file and no other session (the log has the details)."""
    try:
        return await asyncio.wrap_future(state.loop.call(fn))
    except ApiError:
        raise
    except InvalidRequestError as exc:
        raise bad_request(str(exc)) from None
    except Exception as exc:
        logger.error("%s failed: %r", what, exc)
        raise ApiError(
            500, "server", f"{what} failed ({type(exc).__name__}; see the server log)"
        ) from None


async def _models(request: Request, state: ServerState, tenant: Tenant) -> Response:
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(state.created))
    models = [
        {
            "id": name,
            "object": "model",
            "type": "model",
            "display_name": name,
            "created": state.created,
            "created_at": created,
            "owned_by": "kvpool",
        }
        for name in state.model_names
    ]
    return JSONResponse(
        {
            "object": "list",
            "data": models,
            "has_more": False,
            "first_id": models[0]["id"],
            "last_id": models[-1]["id"],
        }
    )


def _session_json(state: ServerState, tenant: Tenant, session_id: str) -> dict[str, Any] | None:
    """On the loop thread: one of ``tenant``'s sessions' record, or None if unknown."""
    loop = state.loop
    agent_id = tenant.agent_id(session_id)
    info = loop.sessions.get(agent_id)
    tier = loop.store.tier(agent_id)
    if info is None and tier is None:
        return None
    if info is None:
        info = loop.sessions.touch(agent_id)
    return info.to_json(session_id, tier.value if tier else None, loop.in_flight(agent_id))


async def _list_sessions(request: Request, state: ServerState, tenant: Tenant) -> Response:
    def collect() -> list[dict[str, Any]]:
        out = []
        for info in state.loop.sessions.all():
            session_id = tenant.session_of(info.agent_id)
            if session_id is None:  # another tenant's
                continue
            tier = state.loop.store.tier(info.agent_id)
            out.append(
                info.to_json(
                    session_id, tier.value if tier else None, state.loop.in_flight(info.agent_id)
                )
            )
        return out

    return JSONResponse({"object": "list", "data": await _on_loop(state, collect)})


def _path_session(request: Request, tenant: Tenant) -> tuple[str, str]:
    """The path's session id and its agent id in ``tenant``'s namespace."""
    session_id = validate_session_id(request.path_params["session_id"], "session id")
    return session_id, tenant.agent_id(session_id)


def _not_found(session_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no session {session_id!r}", code="session_not_found")


async def _get_session(request: Request, state: ServerState, tenant: Tenant) -> Response:
    session_id, _ = _path_session(request, tenant)
    found = await _on_loop(state, lambda: _session_json(state, tenant, session_id))
    if found is None:
        raise _not_found(session_id)
    return JSONResponse(found)


def _busy(session_id: str) -> ApiError:
    return ApiError(
        409, "conflict", f"session {session_id!r} has a request in flight", code="session_busy"
    )


async def _delete_session(request: Request, state: ServerState, tenant: Tenant) -> Response:
    session_id, agent_id = _path_session(request, tenant)

    def forget() -> bool | None:
        loop = state.loop
        if loop.in_flight(agent_id):
            return None
        existed = loop.store.forget(agent_id)  # first: if it raises, nothing was forgotten
        return loop.sessions.remove(agent_id) or existed

    existed = await _on_loop(state, forget, f"deleting session {session_id!r}")
    if existed is None:
        raise _busy(session_id)
    if not existed:
        raise _not_found(session_id)
    return JSONResponse({"id": session_id, "object": "session.deleted", "deleted": True})


async def _offload_session(request: Request, state: ServerState, tenant: Tenant) -> Response:
    session_id, agent_id = _path_session(request, tenant)

    def offload() -> tuple[bool, dict[str, Any] | None] | None:
        if state.loop.in_flight(agent_id):
            return None
        moved = state.loop.store.evict(agent_id)
        return moved, _session_json(state, tenant, session_id)

    result = await _on_loop(state, offload, f"offloading session {session_id!r}")
    if result is None:
        raise _busy(session_id)
    moved, found = result
    if found is None:
        raise _not_found(session_id)
    return JSONResponse({**found, "offloaded": moved})


async def _fork_session(request: Request, state: ServerState, tenant: Tenant) -> Response:
    """``POST /v1/sessions/{id}/fork`` (body ``{"session_id": NEW_ID}`` or none): a new
    session sharing every block of the parent by reference (:mod:`~kvpool.server.forks`)."""
    session_id, _ = _path_session(request, tenant)
    raw = await request.body()
    data = await _read_json(state, request) if raw.strip() else {}
    if not isinstance(data, dict) or set(data) - {"session_id"}:
        raise bad_request('the body must be empty or {"session_id": NEW_ID}', param="session_id")
    given = data.get("session_id")
    child = validate_session_id(given, "session_id") if given is not None else new_session_id()
    found = await _on_loop(
        state,
        lambda: fork_session(state.loop, tenant, session_id, child),
        f"forking session {session_id!r}",
    )
    return JSONResponse(found)


async def _cache_stats(request: Request, state: ServerState, tenant: Tenant) -> Response:
    snap = await _on_loop(state, state.loop.snapshot)
    return JSONResponse(snap)


async def _metrics(request: Request, state: ServerState, tenant: Tenant) -> Response:
    snap = await _on_loop(state, state.loop.snapshot)
    state.metrics.set_snapshot(snap)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


async def _health(request: Request) -> Response:
    state: ServerState = request.app.state.kvpool
    ok = state.accepting and not state.loop.stopped.is_set()
    return JSONResponse(
        {"status": "ok" if ok else "shutting_down", "model": state.model_name},
        status_code=200 if ok else 503,
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "not_found" if exc.status_code == 404 else "invalid_request"
    error = ApiError(exc.status_code, kind, f"{request.method} {request.url.path}: {exc.detail}")
    api = ANTHROPIC if request.url.path.startswith("/v1/messages") else OPENAI
    return _error_response(error, api)


async def _server_error(request: Request, exc: Exception) -> Response:
    """A bug below a route: a 500 in the API's shape, the traceback in the log only."""
    logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    error = ApiError(500, "server", f"internal error ({type(exc).__name__}; see the server log)")
    api = ANTHROPIC if request.url.path.startswith("/v1/messages") else OPENAI
    return _error_response(error, api)


def create_app(state: ServerState) -> Starlette:
    """The Starlette app over ``state``; the caller starts and stops ``state.loop``."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        state.accepting = False
        await run_in_threadpool(state.loop.stop)

    from kvpool.server import responses_route as rr  # it builds on this module's plumbing

    if state.responses is None:
        where = state.cache_dir / rr.RESPONSES_DIR if state.cache_dir is not None else None
        state.responses = ResponseStore(where)

    def generation(responder: Responder) -> Callable[[Request], Awaitable[Response]]:
        async def route(request: Request) -> Response:
            return await _generate(request, responder)

        return route

    routes = [
        Route("/v1/chat/completions", generation(ChatResponder()), methods=["POST"]),
        Route("/v1/completions", generation(CompletionResponder()), methods=["POST"]),
        Route("/v1/messages", generation(MessagesResponder()), methods=["POST"]),
        Route("/v1/responses", rr.create_response, methods=["POST"]),
        Route("/v1/responses/{response_id}", _openai_route(rr.get_response), methods=["GET"]),
        Route("/v1/responses/{response_id}", _openai_route(rr.delete_response), methods=["DELETE"]),
        Route("/v1/models", _openai_route(_models), methods=["GET"]),
        Route("/v1/sessions", _openai_route(_list_sessions), methods=["GET"]),
        Route("/v1/sessions/{session_id}", _openai_route(_get_session), methods=["GET"]),
        Route("/v1/sessions/{session_id}", _openai_route(_delete_session), methods=["DELETE"]),
        Route(
            "/v1/sessions/{session_id}/offload", _openai_route(_offload_session), methods=["POST"]
        ),
        Route("/v1/sessions/{session_id}/fork", _openai_route(_fork_session), methods=["POST"]),
        Route("/v1/cache/stats", _openai_route(_cache_stats), methods=["GET"]),
        Route("/metrics", _openai_route(_metrics), methods=["GET"]),
        Route("/health", _health, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    app.state.kvpool = state
    return app
