"""EngineLoop: the one thread that owns the engine and the store.

HTTP handlers never touch the engine, the store or the pool. They put commands on the loop's
thread-safe queue (:meth:`EngineLoop.submit`, :meth:`cancel`, :meth:`call`) and receive a
request's events through its :class:`Channel`, whose ``push`` is safe from the loop thread
(``call_soon_threadsafe`` onto the handler's asyncio loop). A slow reader only grows its own
channel; the loop never waits for a client.

The loop steps the engine while it has work and otherwise blocks on the command queue (with
a short timeout, so it never spins). Commands are handled between steps: a new request joins
the running batch at the next step, a cancel (client disconnect) takes effect before it.

Requests for which the pool has no room now wait in ``waiting`` (at most ``max_queue``; past
that they are refused with 503) and are retried after every step. One request per agent is
in flight at a time: a second one for a busy session is refused with 409.

Sessions' caches are written to disk (``store.flush``) once the loop has been idle for
``flush_idle_s`` (not at once: a client's next turn usually follows its last within
milliseconds, and a flush would delay it) and every ``flush_interval_s`` while it is busy, so a
killed server loses at most the turns of that interval; ``stop`` cancels what is in flight and
writes every idle cache to disk.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kvpool.blocks import CompletedGeneration, TokenEvent
from kvpool.engine import BlockPoolBatchEngine, RequestTooLargeError
from kvpool.errors import InvalidRequestError, KvpoolError, PoolExhaustedError
from kvpool.logprobs import TokenLogprob
from kvpool.pool import BlockPool
from kvpool.sampling import SamplingParams
from kvpool.server.errors import ApiError, shutting_down
from kvpool.server.metrics import ServerMetrics
from kvpool.server.pins import PrefixPins
from kvpool.server.sessions import SessionRegistry
from kvpool.store import AgentCacheStore, SaveReport

__all__ = ["Admitted", "Channel", "EngineLoop", "Finished", "Refused", "Token", "WorkItem"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


# -- events a request's channel receives, in order: Admitted, Token*, Finished | Refused


@dataclass(frozen=True, slots=True)
class Admitted:
    """The request is in the engine (its blocks are reserved)."""


@dataclass(frozen=True, slots=True)
class Token:
    """One generated token, the text it released (may be empty) and, when asked for, its
    logprobs."""

    token: int
    text: str
    index: int
    logprob: TokenLogprob | None = None


@dataclass(frozen=True, slots=True)
class Finished:
    completion: CompletedGeneration


@dataclass(frozen=True, slots=True)
class Refused:
    """The request failed: before admission (nothing was generated) or mid-generation."""

    error: ApiError


Event = Admitted | Token | Finished | Refused


class Channel:
    """One request's events, pushed by the loop thread, read by an asyncio handler."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def push(self, event: Event) -> None:
        # RuntimeError: the handler's loop is closed, nobody is listening.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def get(self) -> Event:
        return await self._queue.get()


@dataclass(eq=False, slots=True)
class WorkItem:
    """One generation request as the loop sees it.

    ``agent_id`` is the session's id in its tenant's namespace, or an ephemeral id
    (``session_id is None``) that is forgotten when the request ends. ``cache_salt`` is the
    engine's salt (tenant and request, :meth:`~kvpool.server.tenants.Tenant.salt`).
    ``t_received`` (perf_counter) is when the HTTP request arrived: the TTFT histogram
    measures from it.
    """

    agent_id: str
    session_id: str | None
    prompt: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams
    channel: Channel
    t_received: float
    cache_salt: str = ""
    logits_processors: tuple[Any, ...] = ()  # constrained decoding (fresh per request)
    uid: int | None = None
    t_first_token: float | None = None
    num_tokens: int = 0
    ended: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Call:
    fn: Callable[[], Any]
    future: concurrent.futures.Future[Any]


@dataclass(frozen=True, slots=True)
class _Cancel:
    item: WorkItem


@dataclass(frozen=True, slots=True)
class _Submit:
    item: WorkItem


@dataclass(frozen=True, slots=True)
class _Stop:
    pass


Command = _Submit | _Cancel | _Call | _Stop


def _api_error_of(exc: KvpoolError) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestTooLargeError):
        return ApiError(
            400,
            "invalid_request",
            f"the request cannot fit the pool: {exc}",
            code="context_length_exceeded",
        )
    if isinstance(exc, InvalidRequestError):
        return ApiError(400, "invalid_request", str(exc))
    # Anything else may name files or other sessions: the log has it, the client does not.
    logger.error("a request failed: %s", exc)
    return ApiError(500, "server", f"generation failed ({type(exc).__name__}; see the server log)")


class EngineLoop:
    """The engine-loop thread over ``store`` (which wraps ``engine`` and ``pool``)."""

    def __init__(
        self,
        engine: BlockPoolBatchEngine,
        store: AgentCacheStore,
        pool: BlockPool,
        sessions: SessionRegistry,
        metrics: ServerMetrics,
        *,
        max_queue: int = 64,
        flush_interval_s: float = 2.0,
        flush_idle_s: float = 0.25,
        idle_wait_s: float = 0.05,
        check_saved_s: float = 30.0,
    ) -> None:
        self.engine = engine
        self.store = store
        self.pool = pool
        self.sessions = sessions
        self.metrics = metrics
        self.max_queue = max_queue
        self.flush_interval_s = flush_interval_s
        self.idle_wait_s = idle_wait_s
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="kvpool-engine-loop", daemon=True)
        self._waiting: deque[WorkItem] = deque()  # no pool room yet, oldest first
        self._by_uid: dict[int, WorkItem] = {}  # in the engine
        self._by_agent: dict[str, WorkItem] = {}  # waiting or in the engine
        self._dirty = False  # a turn finished since the last flush
        self._retry_flush = False  # the last flush left sessions unwritten (tier down)
        self._last_flush = self._last_busy = time.monotonic()
        self.flush_idle_s = flush_idle_s
        self.check_saved_s = check_saved_s  # how often to ask the tier what it lost
        self._last_check = time.monotonic()
        self._stopping = False
        self.stopped = threading.Event()
        self.num_steps = 0
        self.num_finished = 0
        self.prompt_tokens_total = 0  # of finished requests
        self.cached_tokens_total = 0  # ... of which came from a cache
        self.close_report: SaveReport | None = None  # what the shutdown wrote (None: failed)
        self.pins = PrefixPins(pool)  # Anthropic cache_control breakpoints (item.extra["pins"])

    # -- any thread -----------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, item: WorkItem) -> None:
        """Queue ``item``; its channel gets Admitted (or Refused), then its tokens."""
        if self.stopped.is_set():
            item.channel.push(Refused(shutting_down()))
            return
        self._commands.put(_Submit(item))

    def cancel(self, item: WorkItem) -> None:
        """Cancel ``item`` if it is still waiting or running (a no-op once it ended)."""
        self._commands.put(_Cancel(item))

    def call(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run ``fn`` on the loop thread between steps; its result (or error) in the future."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        if self.stopped.is_set():
            future.set_exception(shutting_down())
        else:
            self._commands.put(_Call(fn, future))
        return future

    def stop(self, timeout_s: float = 30.0) -> None:
        """Cancel everything in flight, write idle caches to disk, end the thread."""
        if self._thread.is_alive():
            self._commands.put(_Stop())
            self._thread.join(timeout_s)

    # -- loop thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                busy = self.engine.has_work
                self._handle_commands(block=not busy)
                if self._stopping:
                    break
                self._admit_waiting()
                now = time.monotonic()
                if self.pins:
                    self.pins.expire(now)
                if self.engine.has_work:
                    self._step()
                    self._last_busy = now
                    if now - self._last_flush >= self.flush_interval_s:
                        self._flush()
                elif (self._dirty and now - self._last_busy >= self.flush_idle_s) or (
                    self._retry_flush and now - self._last_flush >= self.flush_interval_s
                ):
                    self._flush()
                elif now - self._last_check >= self.check_saved_s:
                    self._check_saved()
        except BaseException:
            logger.exception("the engine loop failed")
            raise
        finally:
            self._shutdown()

    def _handle_commands(self, *, block: bool) -> None:
        """Handle every queued command; when ``block``, wait a little for the first."""
        try:
            command = self._commands.get(timeout=self.idle_wait_s) if block else None
        except queue.Empty:
            return
        while True:
            if command is None:
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    return
            self._handle(command)
            command = None

    def _handle(self, command: Command) -> None:
        self._last_busy = time.monotonic()
        if isinstance(command, _Submit):
            self._on_submit(command.item)
        elif isinstance(command, _Cancel):
            self._on_cancel(command.item)
        elif isinstance(command, _Call):
            if command.future.set_running_or_notify_cancel():
                try:
                    command.future.set_result(command.fn())
                except BaseException as exc:
                    command.future.set_exception(exc)
        else:
            self._stopping = True

    def _on_submit(self, item: WorkItem) -> None:
        if item.agent_id in self._by_agent:
            self._refuse(
                item,
                ApiError(
                    409,
                    "conflict",
                    f"session {item.session_id!r} already has a request in flight; "
                    "send the next turn after it ends",
                    code="session_busy",
                ),
            )
            return
        self._by_agent[item.agent_id] = item
        if self._waiting or not self._try_submit(item):  # first come, first served
            self._wait_or_refuse(item)

    def _wait_or_refuse(self, item: WorkItem) -> None:
        if len(self._waiting) >= self.max_queue:
            self._end(item)
            self._refuse(
                item,
                ApiError(
                    503,
                    "overloaded",
                    f"the pool is full and {len(self._waiting)} requests already wait "
                    f"(--max-queue {self.max_queue}); retry later",
                    code="queue_full",
                    headers={"Retry-After": "1"},
                ),
            )
            return
        self._waiting.append(item)

    def _try_submit(self, item: WorkItem) -> bool:
        """Submit to the store; False if the pool has no room now (the item must wait)."""
        try:
            uid = self.store.submit(
                item.agent_id,
                item.prompt,
                item.max_tokens,
                sampling=item.sampling,
                on_token=lambda event: self._on_token(item, event),
                cache_salt=item.cache_salt,
                logits_processors=item.logits_processors,
            )
        except RequestTooLargeError as exc:
            self._end(item)
            self._refuse(item, _api_error_of(exc))
            return True
        except PoolExhaustedError:
            if self.pins.drop_soonest():  # pinned prefixes never make a request wait
                return self._try_submit(item)
            return False
        except KvpoolError as exc:
            self._end(item)
            self._refuse(item, _api_error_of(exc))
            return True
        item.uid = uid
        self._by_uid[uid] = item
        item.channel.push(Admitted())
        return True

    def _admit_waiting(self) -> None:
        while self._waiting:
            item = self._waiting[0]
            if not self._try_submit(item):
                if not self.engine.has_work:  # nothing running will free blocks
                    self._waiting.popleft()
                    self._end(item)
                    self._refuse(
                        item,
                        ApiError(
                            503,
                            "overloaded",
                            "the pool has no room for this request even with every idle "
                            "session on disk; retry later",
                            code="pool_full",
                            headers={"Retry-After": "1"},
                        ),
                    )
                    continue
                return
            self._waiting.popleft()

    def _on_token(self, item: WorkItem, event: TokenEvent) -> None:
        if item.t_first_token is None:
            item.t_first_token = time.perf_counter()
            self.metrics.ttft.observe(item.t_first_token - item.t_received)
        item.num_tokens += 1
        item.channel.push(Token(event.token, event.text, event.index, event.logprob))

    def _step(self) -> None:
        try:
            done = self.store.step()
        except Exception as exc:  # a bug below us: fail what runs, keep serving
            logger.exception("engine step failed")
            for running in list(self._by_uid.values()):
                self._cancel_running(running)
                self._refuse(
                    running,
                    ApiError(500, "server", f"engine step failed ({type(exc).__name__})"),
                )
            return
        self.num_steps += 1
        for completion in done:
            item = self._by_uid.pop(completion.uid, None)
            if item is None:
                continue
            if completion.error is None and completion.blocks is not None:
                for length, ttl_s in item.extra.get("pins", ()):
                    self.pins.pin(completion.blocks, length, ttl_s, time.monotonic())
            self._end(item)
            if completion.error is not None:
                self._refuse(item, _api_error_of(completion.error))
                continue
            now = time.perf_counter()
            m = self.metrics
            m.e2e.observe(now - item.t_received)
            self.prompt_tokens_total += completion.prompt_tokens
            self.cached_tokens_total += completion.cached_tokens
            self.num_finished += 1
            m.prefix_queries.inc(completion.prompt_tokens)
            m.prefix_hits.inc(completion.cached_tokens)
            m.prompt_tokens.inc(completion.prompt_tokens)
            m.generation_tokens.inc(completion.token_count)
            m.requests.labels(completion.finish_reason).inc()
            if item.session_id is not None:
                self.sessions.record_turn(
                    item.agent_id,
                    completion.prompt_tokens,
                    completion.cached_tokens,
                    completion.token_count,
                )
                self._dirty = True
            item.channel.push(Finished(completion))

    def _on_cancel(self, item: WorkItem) -> None:
        if item.ended:
            return
        if item in self._waiting:
            self._waiting.remove(item)
        self._cancel_running(item)
        self._end(item)
        self.metrics.cancelled.inc()

    def _cancel_running(self, item: WorkItem) -> None:
        if item.uid is not None and self._by_uid.pop(item.uid, None) is not None:
            self.store.cancel(item.uid)
            self._end(item)

    def _end(self, item: WorkItem) -> None:
        """``item`` is no longer in flight; an ephemeral agent is forgotten."""
        item.ended = True
        if self._by_agent.get(item.agent_id) is item:
            del self._by_agent[item.agent_id]
            if item.session_id is None:
                try:
                    self.store.forget(item.agent_id)
                except KvpoolError:  # still checked out: forgotten when its turn ends
                    logger.exception("could not forget ephemeral agent %s", item.agent_id)

    def _refuse(self, item: WorkItem, error: ApiError) -> None:
        self.metrics.refused.labels(str(error.status)).inc()
        item.channel.push(Refused(error))

    def _flush(self) -> None:
        t0 = time.monotonic()
        try:
            self.store.flush()
        except Exception:
            logger.exception("writing sessions' caches to disk failed")
        self._dirty = False
        # A shared tier that was unreachable: retry every flush interval until it takes them.
        self._retry_flush = self.store.cold.shared and self.store.num_unsaved > 0
        self._last_flush = time.monotonic()
        if self._last_flush - t0 > 0.5:
            logger.info("flushed sessions to disk in %.2f s", self._last_flush - t0)

    def _check_saved(self) -> None:
        """Idle: write again the sessions the cold tier lost (Redis evicted or flushed)."""
        self._last_check = time.monotonic()
        try:
            lost = self.store.check_saved()
        except Exception:
            logger.exception("checking the cold tier for lost sessions failed")
            return
        if lost:
            self._flush()

    def _shutdown(self) -> None:
        """Refuse what waits, cancel what runs, write idle caches to disk."""
        shutting = shutting_down()
        for item in list(self._waiting):
            self._end(item)
            self._refuse(item, shutting)
        self._waiting.clear()
        for item in list(self._by_uid.values()):
            self._cancel_running(item)
            self._refuse(item, shutting)
        self.stopped.set()
        self.pins.clear()
        while True:  # answer calls that raced the stop
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, _Call):
                command.future.set_exception(shutting)
            elif isinstance(command, _Submit):
                self._refuse(command.item, shutting)
        try:
            self.close_report = self.store.close()
        except Exception:
            logger.exception("writing sessions' caches to disk at shutdown failed")
            return
        for agent_id, why in sorted(self.close_report.failed.items()):
            logger.error("the cache of session %r was not written at shutdown: %s", agent_id, why)

    # -- snapshots (run on the loop thread through call) --------------------------

    def in_flight(self, agent_id: str) -> bool:
        return agent_id in self._by_agent

    def snapshot(self) -> dict[str, Any]:
        """Pool, store and request counts, as JSON-ready numbers."""
        stats = dataclasses.asdict(self.store.stats)
        return {
            "pool": {**self.pool.usage().as_dict(), "num_shared": self.pool.num_shared_blocks()},
            "store": stats,
            "requests": {
                "running": len(self._by_uid),
                "waiting": len(self._waiting),
                "max_queue": self.max_queue,
            },
            "prefix_cache": {
                "queried_tokens": self.prompt_tokens_total,
                "hit_tokens": self.cached_tokens_total,
                "hit_rate": (
                    self.cached_tokens_total / self.prompt_tokens_total
                    if self.prompt_tokens_total
                    else None
                ),
            },
            "pins": {
                "num_live": len(self.pins),
                "num_pinned": self.pins.num_pinned,
                "num_dropped": self.pins.num_dropped,
            },
            "evictions": stats["num_evictions"],
            "requests_finished": self.num_finished,
            "engine_steps": self.num_steps,
        }
