"""BlockPoolBatchEngine: batched generation for many agents over one block pool.

An agent's turn: ``submit`` the agent's whole context (with the ``blocks`` of
its previous :class:`CompletedGeneration` as ``cache``); the engine reuses the
longest common token prefix, gathers those blocks into per-layer caches,
inserts only the remaining tokens into mlx-lm's ``BatchGenerator``, and, when
the generation finishes, scatters the final cache back into blocks.

Threading: one thread drives the engine (``step``, ``cancel``, ``drain``,
``close``): MLX is not thread-safe. The first of those calls binds the engine
to its thread; a call from another thread raises InvalidRequestError.
``submit`` may be called from any thread at any time; it only does bookkeeping
and queues the request, which the next ``step`` starts (continuous batching:
it joins the running batch).

Prompts: text (``str``, tokenized here) or token ids: a sequence of ints
(``list``, ``tuple``, ``range``; numpy integers included) or a 1-D numpy
integer array, every id in ``[0, vocab_size)``. ``bytes``, ``bytearray`` and
``memoryview`` are refused: they could be text or ids (decode them, or pass
``list(data)``).

Stop strings (``SamplingParams.stop``) are matched on the decoded text, across token
boundaries (:mod:`kvpool.textstream`): the request then ends as if it had reached a stop
token, its cache holding every token fed so far, and its text ends before the stop string.
Streamed text holds back what could begin a stop string, so no event ever shows one.

Callbacks: ``on_token`` runs on the driving thread inside ``step``. If it
raises, only its own request ends (``finish_reason == "error"``, its blocks
freed, its old cache still valid); the other requests of that step get their
tokens and completions. It may ``cancel`` its own request (then no completion
is reported for it), even on its last token. A KeyboardInterrupt (or other
BaseException) inside ``step`` ends the request it hit and is re-raised once
the step's other work is done; the completions of that step come back from
the next ``step``. A failure inside the batch step itself (the model, or a
sampler) cannot be pinned on one request: every running request then fails.
That is why sampling parameters are checked against the model at ``submit``.

Blocks (the pool's :class:`~kvpool.cache.manager.KVCacheManager` owns them): each
request holds one :class:`~kvpool.cache.sequence.SequenceCache`, opened at ``submit``
(the longest prefix *any* agent's blocks hold, or ``cache``, plus fresh blocks for
``len(prompt) + max_tokens`` positions, all or nothing, so the final write can never
run out), read when the request starts, closed when it finishes: it becomes the
agent's new :class:`~kvpool.cache.tables.CacheHandle` (its full blocks published for
every other agent) and the old handle is released. On failure or cancel it is aborted
and the old handle stays valid. The engine makes no other call on the pool.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvpool.blocks import CompletedGeneration, TokenEvent
from kvpool.cache.groups import GroupPolicy
from kvpool.cache.manager import PoolFull, common_prefix_len
from kvpool.cache.sequence import SequenceCache
from kvpool.cache.spec import ModelCacheSpec
from kvpool.cache.tables import CacheHandle
from kvpool.errors import GenerationError, InvalidRequestError, KvpoolError, PoolExhaustedError
from kvpool.logprobs import TokenLogprob, token_logprob
from kvpool.pool import BlockPool
from kvpool.sampling import GREEDY, SamplingParams, make_sampler, make_stop_sequences
from kvpool.textstream import TextStream
from kvpool.validation import validate_agent_id, validate_count, validate_token_ids
from kvpool.waves import Candidate, next_wave

BatchGenFactory = Callable[..., Any]
TokenCallback = Callable[[TokenEvent], None]
# mlx-lm's per-sequence logits processor: (tokens so far, logits [1, vocab]) -> logits
LogitsProcessor = Callable[[Any, Any], Any]


class RequestTooLargeError(PoolExhaustedError, InvalidRequestError):
    """The request needs more blocks than the whole pool has: it can never fit."""


def _default_batch_gen_factory(model: Any, **kwargs: Any) -> Any:
    from kvpool.mlx.mlx_lm import pool_batch_generator

    return pool_batch_generator(model, **kwargs)


def model_vocab_size(model: Any) -> int | None:
    """The model's vocabulary (``model.args.vocab_size``, as every mlx-lm text model
    has), or None when the model does not say."""
    vocab = getattr(getattr(model, "args", None), "vocab_size", None)
    return vocab if isinstance(vocab, int) and vocab > 0 else None


class RequestState(enum.Enum):
    QUEUED = "queued"  # validated, blocks reserved, waiting for step() (or for its wave)
    RUNNING = "running"  # inserted into the batch generator


@dataclass(slots=True)
class _Request:
    """One submitted request; owned by the engine until it finishes."""

    uid: int
    agent_id: str
    prompt: tuple[int, ...]
    cache: CacheHandle | None  # the handle the caller passed (returned again on failure)
    cache_salt: str
    seq: SequenceCache  # its cache in the pool: prompt[:seq.reused_tokens] comes from there
    max_tokens: int
    sampling: SamplingParams
    on_token: TokenCallback | None
    t_submit: float
    logits_processors: tuple[LogitsProcessor, ...] = ()  # this request's own (stateful)
    state: RequestState = RequestState.QUEUED
    gen_uid: int | None = None
    generated: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # when sampling.logprobs is set
    text: TextStream | None = None  # its text as it streams, once on_token or stops need it
    t_first_token: float | None = None
    cached_tokens: int = 0  # prompt tokens taken from the pool, fixed when it starts
    held_steps: int = 0  # steps spent waiting for its prefill wave (see kvpool.waves)
    # A leader (prefix_end > 0) publishes prompt[:prefix_end] when its prefill gets
    # there; its followers, queued with the same uncached prefix, wait for it.
    prefix_end: int = 0
    followers: list[_Request] = field(default_factory=list)
    # Block boundaries of the prompt where its prefill stops (one segment each) and
    # publishes the prefix: prefix_end and, for a recurrent model, state snapshots.
    segment_ends: list[int] = field(default_factory=list)

    @property
    def reused(self) -> int:
        """Prompt tokens the pool supplies (so far)."""
        return self.seq.reused_tokens

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens the batch generator will prefill (at least the last one)."""
        return max(1, len(self.prompt) - self.reused)


def cache_length(caches: Sequence[Any], num_tokens: int) -> int:
    """Positions a sequence's per-layer caches hold: the offset of the first cache that
    counts positions (attention caches do; a recurrent ``ArraysCache`` has no offset),
    or ``num_tokens`` (the tokens the generator fed) when no layer counts them."""
    for cache in caches:
        offset = getattr(cache, "offset", None)
        if offset is not None:
            return int(offset)
    return num_tokens


@dataclass(slots=True)
class EngineTimes:
    """Wall seconds the driving thread spent in each part of the engine's steps since the
    engine was made; every part ends synchronized (the K/V reads and writes evaluate their
    arrays, a batch step returns tokens), so the parts hold the device's time too.

    ``read_s``: gathering reused prefixes into caches (``SequenceCache.read``);
    ``generate_s``: ``BatchGenerator.next`` (prefill and decode); ``write_s``: writing
    caches into the pool (a finished turn, a published prefix or state snapshot);
    ``steps``: batch steps run.
    """

    read_s: float = 0.0
    generate_s: float = 0.0
    write_s: float = 0.0
    steps: int = 0

    def minus(self, earlier: EngineTimes) -> EngineTimes:
        """What was spent since ``earlier`` (a snapshot of the same engine)."""
        return EngineTimes(
            self.read_s - earlier.read_s,
            self.generate_s - earlier.generate_s,
            self.write_s - earlier.write_s,
            self.steps - earlier.steps,
        )


class BlockPoolBatchEngine:
    """Batched generation for many agents with their KV caches in ``pool``.

    ``batch_gen_factory(model, **kwargs)`` builds the batch generator (mlx-lm's
    ``BatchGenerator`` by default; ``kvpool.testing.FakeBatchGenerator`` in
    tests). It is the only seam for tests. ``vocab_size`` bounds prompt token
    ids (default: :func:`model_vocab_size`). ``prefix_sharing=False`` reuses
    only the ``cache`` a request passes, never other agents' blocks.

    ``prefill_waves=True`` inserts queued requests into the batch generator in
    waves of similar prefill length, shortest first (see :mod:`kvpool.waves`):
    mlx-lm pads a prefill batch to its longest row, so a long new prompt
    batched with short resumes would slow them all. ``False`` inserts every
    request in the step it was submitted, as plain mlx-lm batches them.

    A recurrent model's state (``ArraysCache``) cannot be trimmed to a prefix: the pool
    keeps it at each sequence's end (the agent's next turn) and at block boundaries where
    a prefill stopped. A sliding-window group keeps only its last window when a sequence
    ends, so a prefix needs the window there too. ``state_snapshot_blocks=k`` makes every
    prefill of such a model stop every ``k`` blocks (a segment of mlx-lm's
    ``insert_segments``) and publish its prefix there, state or window included, so later
    prompts sharing it resume from it; None (the default) stops only at shared-prefix ends
    of requests queued together and, with prefix sharing on, at a prompt's end: a
    recurrent model keeps the state after all but its last token (cached-free: a chat's
    next turn re-templates the reply but starts with the previous prompt), a sliding-window
    model the window at its last block boundary (an agent arriving later on the same
    system prompt resumes there when that boundary is inside the system prompt).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        pool: BlockPool,
        spec: ModelCacheSpec,
        batch_gen_factory: BatchGenFactory | None = None,
        *,
        max_batch_size: int = 32,
        prefill_batch_size: int = 8,
        prefill_step_size: int = 2048,
        vocab_size: int | None = None,
        prefix_sharing: bool = True,
        prefill_waves: bool = True,
        state_snapshot_blocks: int | None = None,
    ) -> None:
        if model is None:
            raise InvalidRequestError("model is required")
        if tokenizer is None:
            raise InvalidRequestError("tokenizer is required")
        if pool.spec != spec:
            raise InvalidRequestError(
                f"the pool was built for another spec: {pool.spec.describe()} vs {spec.describe()}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.pool = pool
        self.spec = spec
        self._factory = batch_gen_factory or _default_batch_gen_factory
        self._gen_kwargs = {
            "completion_batch_size": validate_count("max_batch_size", max_batch_size),
            "prefill_batch_size": validate_count("prefill_batch_size", prefill_batch_size),
            "prefill_step_size": validate_count("prefill_step_size", prefill_step_size),
        }
        self.prefix_sharing = bool(prefix_sharing)
        self.prefill_waves = bool(prefill_waves)
        # A recurrent model's prefill stops every this many blocks to snapshot its state
        # there (published like a shared prefix); None: at shared-prefix ends only.
        self.state_snapshot_blocks = (
            None
            if state_snapshot_blocks is None
            else validate_count("state_snapshot_blocks", state_snapshot_blocks)
        )
        self._gen: Any = None
        self._lock = threading.Lock()
        self._uids = itertools.count()
        self._queue: list[_Request] = []
        self._held: list[_Request] = []  # driving thread only: waiting for their prefill wave
        self._wave_tokens: int | None = None  # anchor length of the wave in flight
        self._running: dict[int, _Request] = {}  # generator uid -> request
        self._waiting: dict[int, _Request] = {}  # uid -> a follower waiting for its leader
        self._agent_to_uid: dict[str, int] = {}  # agents with a request in flight
        self._eos = frozenset(int(t) for t in tokenizer.eos_token_ids)
        # Prompt ids must index the model's embedding (which may be larger than the
        # tokenizer: the model can generate ids the tokenizer has no text for).
        self._vocab_size = model_vocab_size(model) if vocab_size is None else vocab_size
        self._driver: int | None = None  # the thread that drives step/cancel/drain/close
        self._in_step = False  # inside step(): a callback must not step again
        self._carried: list[CompletedGeneration] = []  # endings a raising step could not return
        self._times = EngineTimes()  # written by the driving thread only

    # -- public API -----------------------------------------------------------

    def submit(
        self,
        agent_id: str,
        prompt: str | Sequence[int],
        cache: CacheHandle | None = None,
        max_tokens: int = 256,
        *,
        sampling: SamplingParams | None = None,
        on_token: TokenCallback | None = None,
        cache_salt: str = "",
        logits_processors: Sequence[LogitsProcessor] = (),
    ) -> int:
        """Queue one turn of ``agent_id``; returns the request's uid.

        ``prompt`` is the agent's whole context, as text or token ids. The
        longest prefix of it that the pool holds is reused, from any agent of
        the same ``cache_salt`` (tenant) or from ``cache``: the ``blocks`` of
        the agent's previous completion (or of another agent, to fork it),
        which is released when this turn succeeds. A full hit re-feeds the last
        token. ``on_token`` receives each generated token as it arrives, on the
        thread that calls ``step``. ``logits_processors`` are this request's own
        mlx-lm logits processors (constrained decoding: :mod:`kvpool.mlx.constrain`),
        called once per decode step in order; they may keep state, so pass fresh ones
        to every request. One that raises fails the whole batch step.

        Raises InvalidRequestError for bad input (a ``cache`` that is not live
        in this pool included; ``sampling`` must be a SamplingParams whose
        ``top_k`` and stop ids fit the model's vocabulary), RequestTooLargeError
        if the turn can never fit the pool, PoolExhaustedError if too few blocks
        are free now. Nothing is allocated when it raises.
        """
        validate_agent_id(agent_id)
        max_tokens = validate_count("max_tokens", max_tokens)
        if not isinstance(cache_salt, str):
            raise InvalidRequestError(f"cache_salt must be a string, got {type(cache_salt)}")
        tokens = tuple(self._tokenize(prompt))
        sampling = self._check_sampling(sampling)
        if on_token is not None and not callable(on_token):
            raise InvalidRequestError(f"on_token must be callable or None, got {on_token!r}")
        processors = tuple(logits_processors)
        if not all(callable(p) for p in processors):
            raise InvalidRequestError(f"logits_processors must be callables, got {processors!r}")
        with self._lock:
            if agent_id in self._agent_to_uid:
                raise InvalidRequestError(
                    f"agent {agent_id!r} already has a request in flight "
                    f"(uid {self._agent_to_uid[agent_id]})"
                )
            seq = self.pool.open_sequence(
                agent_id, tokens, max_tokens, own=cache, salt=cache_salt,
                shared=self.prefix_sharing,
            )  # fmt: skip
            if isinstance(seq, PoolFull):
                raise self._pool_full_error(agent_id, tokens, max_tokens, seq)
            request = _Request(
                uid=next(self._uids),
                agent_id=agent_id,
                prompt=tokens,
                cache=cache,
                cache_salt=cache_salt,
                seq=seq,
                max_tokens=max_tokens,
                sampling=sampling,
                on_token=on_token,
                t_submit=time.perf_counter(),
                logits_processors=processors,
            )
            self._queue.append(request)
            self._agent_to_uid[agent_id] = request.uid
        return request.uid

    def step(self) -> Iterator[CompletedGeneration]:
        """Start queued requests, run one decode step, finish what is done.

        Returns the requests that ended in this step (successes and failures:
        ``finish_reason == "error"`` with ``error`` set). Runs eagerly: the
        work is done before this returns. If a BaseException (KeyboardInterrupt)
        escapes, no request is left half-done: the one it hit has ended, and
        this step's endings are returned by the next ``step``.
        """
        self._check_driver("step")
        if self._in_step:
            raise InvalidRequestError("step() or drain() called from inside a step (an on_token?)")
        with self._lock:
            queued, self._queue = self._queue, []
        self._held.extend(self._plan_shared_prefills(queued))
        start_now = self._take_wave()
        done, self._carried = self._carried, []
        self._in_step = True
        try:
            for i, request in enumerate(start_now):
                try:
                    completion = self._start(request)
                except BaseException as exc:  # _start catches Exception: an interrupt
                    self._held[:0] = start_now[i + 1 :]
                    done.append(self._fail(request, exc, "interrupted while starting"))
                    raise
                if completion is not None:
                    done.append(completion)
            if self._running:
                self._decode(done)
        except BaseException:
            self._carried = done
            raise
        finally:
            self._in_step = False
        return iter(done)

    def drain(self) -> list[CompletedGeneration]:
        """Step until no request is queued or running; returns every ending."""
        self._check_driver("drain")
        done: list[CompletedGeneration] = []
        while self.has_work:
            with self._lock:
                stuck = (
                    not self._queue
                    and not self._held
                    and not self._running
                    and bool(self._agent_to_uid)
                )
            assert not stuck, (
                f"requests of {sorted(self._agent_to_uid)} are in flight but neither queued nor "
                "running: this indicates a bug"
            )
            done.extend(self.step())
        return done

    def cancel(self, uid: int) -> bool:
        """Drop a queued or running request; its agent's old cache stays valid.

        Returns False if no such request is in flight. May be called from the
        request's own ``on_token`` (also on its last token): no completion is
        then reported for it.
        """
        self._check_driver("cancel")
        with self._lock:
            request = next((r for r in self._queue if r.uid == uid), None)
            if request is not None:
                self._queue.remove(request)
        if request is None:
            request = next((r for r in self._held if r.uid == uid), None)
            if request is not None:
                self._held.remove(request)
        if request is None:
            request = self._waiting.pop(uid, None)
            if request is not None:
                for leader in self._running.values():
                    if request in leader.followers:
                        leader.followers.remove(request)
        if request is None:
            request = next((r for r in self._running.values() if r.uid == uid), None)
            if request is None:
                return False
            assert request.gen_uid is not None
            # A no-op for a sequence that finished in this step (the generator
            # dropped it already).
            self._gen.remove([request.gen_uid])
        self._drop(request)
        return True

    def close(self) -> None:
        """Cancel everything in flight and close the batch generator."""
        self._check_driver("close")
        with self._lock:
            uids = [r.uid for r in self._queue]
        uids += [r.uid for r in self._held]
        uids += list(self._waiting)
        uids += [r.uid for r in self._running.values()]
        for uid in uids:
            self.cancel(uid)
        self._discard_generator()

    def is_in_flight(self, agent_id: str) -> bool:
        """True while ``agent_id`` has a request queued or running."""
        with self._lock:
            return agent_id in self._agent_to_uid

    @property
    def has_work(self) -> bool:
        """True while any request is queued or running, or a step that raised (an
        interrupt) left endings for the next ``step`` to return."""
        with self._lock:
            return bool(self._agent_to_uid) or bool(self._carried)

    @property
    def num_in_flight(self) -> int:
        """Requests queued or running (one per agent at most)."""
        with self._lock:
            return len(self._agent_to_uid)

    @property
    def times(self) -> EngineTimes:
        """Where the steps' time went so far (see :class:`EngineTimes`); subtract an earlier
        snapshot (:meth:`EngineTimes.minus`) for one stretch of work."""
        return dataclasses.replace(self._times)

    # -- submit helpers (called under the lock) -------------------------------

    def _tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty")
            return validate_token_ids(self.tokenizer.encode(prompt), self._vocab_size)
        if isinstance(prompt, (bytes, bytearray, memoryview)):
            raise InvalidRequestError(
                f"prompt is {type(prompt).__name__}: text or token ids? Decode it to str, or "
                "pass the ids as a list"
            )
        if isinstance(prompt, np.ndarray):
            if prompt.ndim != 1 or prompt.dtype.kind not in "iu":
                raise InvalidRequestError(
                    f"a numpy prompt must be a 1-D integer array, got shape {prompt.shape} "
                    f"dtype {prompt.dtype}"
                )
            return validate_token_ids(prompt.tolist(), self._vocab_size)
        if not isinstance(prompt, Sequence):
            raise InvalidRequestError(f"prompt must be text or token ids, got {type(prompt)}")
        return validate_token_ids(prompt, self._vocab_size)

    def _check_sampling(self, sampling: object) -> SamplingParams:
        """``sampling`` (None: greedy) if it is a SamplingParams the model can sample with."""
        if sampling is None:
            return GREEDY
        if not isinstance(sampling, SamplingParams):
            raise InvalidRequestError(
                f"sampling must be a SamplingParams or None, got {type(sampling).__name__} "
                f"{sampling!r}"
            )
        vocab = self._vocab_size
        if vocab is not None and not sampling.is_greedy and sampling.top_k >= vocab:
            raise InvalidRequestError(
                f"top_k {sampling.top_k} must be below the model's vocabulary of {vocab} "
                "tokens (0 disables it)"
            )
        if vocab is not None and any(t >= vocab for t in sampling.stop_token_ids):
            raise InvalidRequestError(
                f"stop_token_ids {sampling.stop_token_ids} must be below the model's "
                f"vocabulary of {vocab} tokens"
            )
        return sampling

    def _check_driver(self, what: str) -> None:
        """Bind the engine to the first thread that drives it; refuse any other."""
        current = threading.get_ident()
        with self._lock:
            if self._driver is None:
                self._driver = current
        if current != self._driver:
            raise InvalidRequestError(
                f"{what}() called from thread {current}, but thread {self._driver} drives "
                "this engine (MLX is not thread-safe: only submit() may come from other threads)"
            )

    def _pool_full_error(
        self, agent_id: str, tokens: Sequence[int], max_tokens: int, full: PoolFull
    ) -> PoolExhaustedError:
        where = f" of layer group {full.group}" if len(self.spec.groups) > 1 else ""
        if full.never_fits:
            return RequestTooLargeError(
                f"{len(tokens)} prompt tokens + {max_tokens} max_tokens need {full.needed} "
                f"blocks{where} of {self.spec.block_tokens} tokens (with what the agent's "
                f"current cache holds until the turn ends); the pool has {full.capacity}",
                needed=full.needed,
                free=full.free,
                capacity=full.capacity,
            )
        return PoolExhaustedError(
            f"agent {agent_id!r} needs {full.needed} blocks{where}, {full.free} free "
            f"(pool of {full.capacity})",
            needed=full.needed,
            free=full.free,
            capacity=full.capacity,
        )

    # -- step helpers (driving thread) ----------------------------------------

    def _generator(self) -> Any:
        if self._gen is None:
            self._gen = self._factory(
                self.model, stop_tokens=[[t] for t in sorted(self._eos)], **self._gen_kwargs
            )
        return self._gen

    def _discard_generator(self) -> None:
        gen, self._gen = self._gen, None
        close = getattr(gen, "close", None)
        if close is not None:
            close()

    def _plan_shared_prefills(self, queued: list[_Request]) -> list[_Request]:
        """Requests to start now; the others wait for a leader to publish their prefix.

        When several queued requests share an uncached prefix of at least one full
        block, the first is a leader: it is prefilled to the end of the shared blocks
        (``prefix_end``, the shortest its followers share), publishes them, and the
        followers start from them (see :meth:`_publish_prefixes`).
        """
        if not self.prefix_sharing or len(queued) < 2:
            return queued
        size = self.spec.block_tokens
        start_now: list[_Request] = []
        taken: set[int] = set()
        for i, leader in enumerate(queued):
            if leader.uid in taken:
                continue
            start_now.append(leader)
            least = (leader.reused // size + 1) * size
            group = []
            for other in queued[i + 1 :]:
                if other.uid in taken or other.cache_salt != leader.cache_salt:
                    continue
                shared = common_prefix_len(leader.prompt, other.prompt)
                end = min(shared, len(leader.prompt) - 1, len(other.prompt) - 1) // size * size
                if end >= least and end > other.reused:
                    group.append((other, end))
            if group:
                leader.prefix_end = min(end for _, end in group)
                leader.followers = [other for other, _ in group]
                for other, _ in group:
                    taken.add(other.uid)
                    self._waiting[other.uid] = other
        return start_now

    def _take_wave(self) -> list[_Request]:
        """The held requests to insert now (all of them unless ``prefill_waves``).

        A wave is in flight while a request it inserted (or a follower it released)
        is running without its first token.
        """
        if not self.prefill_waves:
            held, self._held = self._held, []
            return held
        if not any(r.t_first_token is None for r in self._running.values()):
            self._wave_tokens = None
        wave = next_wave(
            [Candidate(r.prefill_tokens, r.held_steps) for r in self._held], self._wave_tokens
        )
        members = set(wave.members) if wave is not None else set()
        start_now = [r for i, r in enumerate(self._held) if i in members]
        self._held = [r for i, r in enumerate(self._held) if i not in members]
        for request in self._held:
            request.held_steps += 1
        if wave is not None:
            self._wave_tokens = wave.anchor_tokens
        return start_now

    def _start(self, request: _Request) -> CompletedGeneration | None:
        """Gather the reused prefix and insert the rest; None on success."""
        try:
            t0 = time.perf_counter()
            caches = request.seq.read()
            self._times.read_s += time.perf_counter() - t0
            reused = request.cached_tokens = request.reused
            kwargs: dict[str, Any] = {}
            if not request.sampling.is_greedy:
                kwargs["samplers"] = [make_sampler(request.sampling)]
            if request.sampling.stop_token_ids:
                stops = self._eos | set(request.sampling.stop_token_ids)
                kwargs["stop_sequences"] = [make_stop_sequences(stops)]
            if request.logits_processors:
                kwargs["logits_processors"] = [list(request.logits_processors)]
            request.segment_ends = self._segment_ends(request)
            bounds = [reused, *request.segment_ends, len(request.prompt)]
            segments = [list(request.prompt[a:b]) for a, b in itertools.pairwise(bounds)]
            (gen_uid,) = self._generator().insert_segments(
                [segments],
                max_tokens=[request.max_tokens],
                caches=[caches],
                all_tokens=[list(request.prompt[:reused])],
                **kwargs,
            )
        except Exception as exc:  # the request fails; the engine goes on
            return self._fail(request, exc, "could not start")
        request.gen_uid, request.state = int(gen_uid), RequestState.RUNNING
        self._running[request.gen_uid] = request
        return None

    def _segment_ends(self, request: _Request) -> list[int]:
        """Where the request's prefill stops to publish its prefix: its ``prefix_end`` (a
        leader) and, with prefix sharing on, the :meth:`_snapshot_ends` whose windows the
        pool can take (short of its last token)."""
        ends = {request.prefix_end} if request.prefix_end else set()
        if self.prefix_sharing:
            snapshots = self._snapshot_ends(request)
            ends.update(e for e in snapshots if self._windows_whole_at(request, e))
        return sorted(e for e in ends if request.reused < e < len(request.prompt))

    def _snapshot_ends(self, request: _Request) -> set[int]:
        """For a sliding-window model, the prompt's last block boundary; for a recurrent
        model, the prompt's end; for both, every ``state_snapshot_blocks``-th block boundary
        past what the request reuses."""
        size, n, every = self.spec.block_tokens, len(request.prompt), self.state_snapshot_blocks
        ends: set[int] = set()
        if self.spec.has_window:
            # a sliding group keeps only its last window when the request ends: the window
            # at the prompt's last block boundary is what a later prompt sharing these
            # blocks (an agent on the same system prompt) needs from it
            ends.add((n - 1) // size * size)
        if self.spec.has_recurrent:
            # the state after all but the prompt's last token (mlx-lm feeds that one on its
            # own anyway): the next turn of a chat re-templates the reply, but its prompt
            # starts with this one
            ends.add(n - 1)
        if every and (self.spec.has_window or self.spec.has_recurrent):
            step = every * size
            ends.update(range((request.reused // step + 1) * step, n, step))
        return ends

    def _windows_whole_at(self, request: _Request, end: int) -> bool:
        """Whether every sliding group's cache holds, when the prefill reaches ``end``, the
        first row of each block its window at ``end`` needs (so the pool can publish them).
        A resumed sliding cache comes from the pool with its last ``window - 1`` rows and a
        prefill keeps every row it adds; a prefix whose blocks are not whole would be
        written, then refused (:meth:`KVCacheManager.commit_prefix`)."""
        size, reused = self.spec.block_tokens, request.reused
        if end % size:  # a recurrent prompt-end snapshot: no window published
            return True
        for group in self.spec.groups:
            if group.window is None:
                continue
            policy = GroupPolicy(group.kind, group.window, size)
            if reused - min(reused, group.window - 1) > policy.needed_from(end) // size * size:
                return False
        return True

    def _publish_prefixes(self, prompt_responses: Sequence[Any]) -> list[CompletedGeneration]:
        """Requests whose prefill reached a segment end publish the prefix there (blocks and,
        for a recurrent model, a snapshot of its state); a leader's followers then start
        from it. Returns the followers that failed to start."""
        done: list[CompletedGeneration] = []
        for response in prompt_responses:
            request = self._running.get(int(response.uid))
            if request is None or not (request.segment_ends and response.end_of_segment):
                continue
            end = request.segment_ends.pop(0)
            try:
                caches, tokens = self._gen.extract_cache([request.gen_uid])[request.gen_uid]
                if cache_length(caches, len(tokens)) == end:
                    t0 = time.perf_counter()
                    if end % self.spec.block_tokens == 0:
                        request.seq.publish_prefix(caches, end)
                    else:  # a recurrent model's prompt end: its states only
                        request.seq.snapshot_state(caches, end)
                    self._times.write_s += time.perf_counter() - t0
            except Exception as exc:  # the leader's blocks are in an unknown state: it fails
                assert request.gen_uid is not None
                self._gen.remove([request.gen_uid])
                done.append(self._fail(request, exc, "could not publish the shared prefix"))
                continue  # _fail queued the followers: they start on their own
            if end == request.prefix_end:
                request.prefix_end = 0
                done.extend(self._release_followers(request))
        return done

    def _release_followers(self, leader: _Request) -> list[CompletedGeneration]:
        """Start a leader's followers from whatever the pool now holds."""
        done = []
        followers, leader.followers = leader.followers, []
        for request in followers:
            self._waiting.pop(request.uid, None)
            request.seq.extend(request.cache)
            if (c := self._start(request)) is not None:
                done.append(c)
        return done

    def _decode(self, done: list[CompletedGeneration]) -> None:
        """One batch step; appends what ended to ``done`` (also when it raises).

        A callback's failure ends only its own request. A BaseException
        (KeyboardInterrupt) ends the request it hit; the rest of the step's
        responses are still delivered, then it is re-raised. Leaders whose
        prefill reached their shared prefix publish it first.
        """
        t0 = time.perf_counter()
        try:
            prompt_responses, responses = self._gen.next()
        except BaseException as exc:
            # The batch's state is unknown: every running request fails and a
            # fresh generator serves the next ones.
            failed = list(self._running.values())
            self._running.clear()
            self._discard_generator()
            done.extend(self._fail(r, exc, "the batch step failed") for r in failed)
            if not isinstance(exc, Exception):
                raise
            return
        self._times.generate_s += time.perf_counter() - t0
        self._times.steps += 1
        done.extend(self._publish_prefixes(prompt_responses))
        interrupt: BaseException | None = None
        for response in responses:
            gen_uid = int(response.uid)
            request = self._running.get(gen_uid)
            if request is None:
                continue  # cancelled (perhaps by a callback earlier in this step)
            finished = response.finish_reason is not None
            try:
                self._on_token(request, response)
            except BaseException as exc:
                if self._running.get(gen_uid) is request:  # not cancelled by the callback
                    if not finished:
                        self._gen.remove([gen_uid])
                    done.append(self._fail(request, exc, "on_token raised"))
                if not isinstance(exc, Exception):
                    interrupt = interrupt or exc
                continue
            if self._running.get(gen_uid) is not request:
                continue  # the callback cancelled its own request
            stopped = not finished and request.text is not None and request.text.stop is not None
            if finished or stopped:
                del self._running[gen_uid]
                try:
                    if stopped:  # a stop string: end it here, its cache as a finish has it
                        removed = self._gen.remove([gen_uid], return_prompt_caches=True)
                        caches, all_tokens = removed[gen_uid]
                        done.append(self._finish(request, "stop", caches, all_tokens))
                    else:
                        done.append(
                            self._finish(
                                request,
                                str(response.finish_reason),
                                response.prompt_cache,
                                response.all_tokens,
                            )
                        )
                except BaseException as exc:  # an interrupt, or a failure past _finish's try
                    done.append(self._fail(request, exc, "could not finish"))
                    if not isinstance(exc, Exception):
                        interrupt = interrupt or exc
        if interrupt is not None:
            raise interrupt

    def _on_token(self, request: _Request, response: Any) -> None:
        """Record one generated token: its logprob, its text (stop strings matched),
        then the request's callback."""
        if request.t_first_token is None:
            request.t_first_token = time.perf_counter()
        token, finish_reason = int(response.token), response.finish_reason
        request.generated.append(token)
        logprob = None
        if request.sampling.logprobs is not None:
            logprob = token_logprob(response.logprobs, token, request.sampling.logprobs)
            request.logprobs.append(logprob)
        if request.on_token is None and not request.sampling.stop:
            return
        if request.text is None:
            request.text = TextStream(self.tokenizer, request.sampling.stop)
        # a stop token is not part of the text
        piece = request.text.add(
            token, final=finish_reason is not None, is_text=finish_reason != "stop"
        )
        if request.on_token is not None:
            index = len(request.generated) - 1
            event = TokenEvent(request.uid, request.agent_id, token, piece, index, logprob)
            request.on_token(event)

    def _finish(
        self, request: _Request, finish_reason: str, caches: Any, fed: Sequence[int]
    ) -> CompletedGeneration:
        """Write the final cache (``caches``, holding the ``fed`` tokens) into the request's
        blocks; it becomes the agent's handle.

        Everything that can fail (the text too) happens before the commit: a
        failure rolls the request back and the agent's old cache stays valid.
        """
        generated = tuple(request.generated)
        stream = request.text
        stop = stream.stop if stream is not None else None
        if stop is not None:  # matched on the token that also hit EOS or max_tokens
            finish_reason = "stop"
        try:
            if stream is not None and stop is not None:
                text, num_text = stream.text, stream.tokens_in_text()
            else:  # the tokenizer's own decode: the text a non-streamed request always had
                num_text = len(generated) - 1 if finish_reason == "stop" else len(generated)
                text = self.tokenizer.decode(list(generated[:num_text]))
            all_tokens = tuple(int(t) for t in fed)
            length = cache_length(caches, len(all_tokens))
            if length != len(all_tokens):
                raise GenerationError(
                    f"final cache holds {length} positions but {len(all_tokens)} tokens"
                )
            t0 = time.perf_counter()
            blocks = request.seq.close(caches, all_tokens)
            self._times.write_s += time.perf_counter() - t0
            with self._lock:
                del self._agent_to_uid[request.agent_id]
        except Exception as exc:
            return self._fail(request, exc, "could not store the final cache")
        return CompletedGeneration(
            uid=request.uid,
            agent_id=request.agent_id,
            text=text,
            token_ids=generated,
            blocks=blocks,
            finish_reason=finish_reason,
            prompt_tokens=len(request.prompt),
            cached_tokens=request.cached_tokens,
            ttft_s=None
            if request.t_first_token is None
            else request.t_first_token - request.t_submit,
            elapsed_s=time.perf_counter() - request.t_submit,
            stop=stop,
            logprobs=tuple(request.logprobs[:num_text])
            if request.sampling.logprobs is not None
            else None,
        )

    def _drop(self, request: _Request) -> None:
        """Release what the request holds; its agent may submit again."""
        request.seq.abort()
        with self._lock:
            if self._agent_to_uid.get(request.agent_id) == request.uid:
                del self._agent_to_uid[request.agent_id]
            followers, request.followers = request.followers, []
            for follower in followers:  # they start on their own in the next step
                self._waiting.pop(follower.uid, None)
            self._queue[:0] = followers
        if request.gen_uid is not None:
            self._running.pop(request.gen_uid, None)

    def _fail(self, request: _Request, exc: BaseException, what: str) -> CompletedGeneration:
        self._drop(request)
        error = exc if isinstance(exc, KvpoolError) else GenerationError(f"{what}: {exc!r}")
        if error is not exc:
            error.__cause__ = exc
        return CompletedGeneration(
            uid=request.uid,
            agent_id=request.agent_id,
            text="",
            token_ids=tuple(request.generated),
            blocks=request.cache,
            finish_reason="error",
            prompt_tokens=len(request.prompt),
            cached_tokens=request.cached_tokens,
            elapsed_s=time.perf_counter() - request.t_submit,
            error=error,
        )
