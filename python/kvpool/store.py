"""AgentCacheStore: every agent's cache, hot (blocks in the pool) or cold (a file on disk,
or Redis: a :class:`~kvpool.tier.base.ColdTier`).

The store sits between the user and a :class:`~kvpool.engine.BlockPoolBatchEngine`. It
keeps each agent's latest cache and hands it to the engine when the agent comes back. When
the pool cannot fit a request, it writes the least recently used idle agents to disk
(:mod:`kvpool.persist`) and frees their blocks, then retries; a later request of an evicted
agent loads its file back into the pool. A new store over the same directory picks up every
cache a previous process left there.

    store = AgentCacheStore(engine, "caches/", fingerprint=model_fingerprint(model))
    store.submit("planner", context, max_tokens=64)   # cache from pool or disk, if any
    for done in store.drain():                        # or store.step() in your loop
        ...                                           # done.blocks is kept for next time
    store.close()                                     # idle caches to disk, blocks freed

Where an agent's cache lives (:class:`Tier`)::

    none --get (miss)--> checked out --put--> HOT --evict--> COLD --get (load)--> checked out
                              ^                |
                              +--get (hit)-----+

* HOT: its blocks are in the pool (a file may also hold this or an older turn of it).
* COLD: only its file holds it.
* checked out: from ``get`` (``submit`` calls it) to ``put`` (``step`` calls it with the
  completion): a request is using the cache, so it is never evicted.

Eviction takes the least recently used idle agent first (``get`` and ``put`` count as use).
Budgets: the pool bounds what is hot; ``max_pool_bytes``, if given, bounds what idle caches
may hold of it (the rest stays free for new requests). ``max_disk_bytes`` bounds the
directory: past it, the least recently used files are deleted and those agents start over
(counted in ``num_dropped``).

The cold tier is a directory by default (:class:`~kvpool.tier.local.LocalTier`, what the
rest of this docstring describes); pass a :class:`~kvpool.tier.base.ColdTier` instead of the
directory for another one (:func:`kvpool.tier.open_tier` builds one from a URL). With a
*shared* tier (Redis), an agent the store does not hold is looked up there on ``get``, a
prompt's published prefix blocks found there are imported into the pool before ``submit``,
and a tier that cannot be reached never fails a request: the turn is served from the pool or
by prefill, the error is counted (``num_tier_errors``) and the write is retried at the next
``flush``; a cache that must leave the pool while the tier is down is dropped (``num_dropped``).
A hot cache wins over the tier's copy (another server may have written a later turn of it:
its blocks then come in through the prefix import).

A file that fails its checks (or is not a regular file: a directory, a FIFO, a dangling
symlink under a cache file's name) is set aside, renamed to ``{name}.corrupt`` (counted in
``num_set_aside``; the store never reads or deletes those), and an incompatible one (another
model) is left alone; either way the agent starts with no cache (a miss) and a warning is
logged. A failed write (a full disk, something else at the file's path) fails that agent's
save alone: counted (``num_save_errors``), logged and listed in :attr:`save_errors`, the old
file intact. :meth:`flush` goes on with the other agents (the failed one stays hot),
:meth:`evict` raises :class:`~kvpool.errors.CacheWriteError` naming the file (its blocks stay),
and an eviction the pool needs (a request waits for room, or :meth:`close`) drops the cache
(``num_dropped``; an older file of it stays), so requests never fail for a disk.

Not thread-safe: call every method from one thread, the first that calls it (it must also be
the thread that drives the engine), and submit every request of the engine through the store
(the store takes and frees pool blocks outside the engine's lock). A call from another
thread raises InvalidRequestError before it touches anything.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvpool.blocks import CompletedGeneration
from kvpool.cache.tables import CacheHandle
from kvpool.engine import (
    BlockPoolBatchEngine,
    LogitsProcessor,
    RequestTooLargeError,
    TokenCallback,
)
from kvpool.errors import (
    CacheCorruptionError,
    CacheWriteError,
    IncompatibleCacheError,
    InvalidRequestError,
    KvpoolError,
    PoolExhaustedError,
)
from kvpool.sampling import SamplingParams
from kvpool.tier.base import ColdTier, TierStats, TierUnavailableError
from kvpool.tier.local import CORRUPT_SUFFIX, LocalTier
from kvpool.validation import validate_agent_id

__all__ = ["CORRUPT_SUFFIX", "AgentCacheStore", "SaveReport", "StoreStats", "Tier"]

logger = logging.getLogger(__name__)


class Tier(enum.Enum):
    """Where an agent's cache is."""

    HOT = "hot"  # blocks in the pool
    COLD = "cold"  # in the cold tier only (a file on disk, Redis)


@dataclass(frozen=True, slots=True)
class StoreStats:
    """A snapshot of the store's counters (since it was created)."""

    num_hot_hits: int  # get/submit found the cache in the pool
    num_cold_hits: int  # ... loaded it from disk
    num_misses: int  # ... found none (or an unusable file)
    num_evictions: int  # hot caches moved to disk, blocks freed
    num_saves: int  # files written (evictions, flush)
    num_dropped: int  # caches lost: deleted for max_disk_bytes, or unwritable when evicted
    num_save_errors: int  # saves that failed (a full disk, a bad path): each agent on its own
    num_load_errors: int  # corrupt or incompatible files met by get (counted as misses)
    num_set_aside: int  # bad or non-regular files renamed to *.corrupt (the agent starts over)
    tokens_saved: int  # prompt tokens taken from a cache instead of prefilled
    num_hot: int  # agents with blocks in the pool
    num_cold: int  # agents on disk only
    hot_bytes: int  # pool bytes their blocks hold
    bytes_on_disk: int  # size of every cache file in the directory
    bytes_written: int
    bytes_read: int
    save_s: float  # time spent saving and loading
    load_s: float
    num_tier_errors: int  # calls that met an unreachable tier (tier num_errors + num_skipped)
    num_prefix_imports: int  # submits that imported prefix blocks from a shared tier
    prefix_tokens_imported: int
    tier: TierStats  # the cold tier's own counters


@dataclass(slots=True)
class _Counters:
    """The cumulative part of :class:`StoreStats`."""

    num_hot_hits: int = 0
    num_cold_hits: int = 0
    num_misses: int = 0
    num_evictions: int = 0
    num_saves: int = 0
    num_dropped: int = 0
    num_save_errors: int = 0
    num_load_errors: int = 0
    num_set_aside: int = 0
    tokens_saved: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    save_s: float = 0.0
    load_s: float = 0.0
    num_tier_errors: int = 0
    num_prefix_imports: int = 0
    prefix_tokens_imported: int = 0


@dataclass(frozen=True, slots=True)
class SaveReport:
    """What :meth:`AgentCacheStore.close` left in the cold tier.

    ``num_written``: caches written by this call; ``num_current``: already there as they
    are; ``failed``: agent id -> why its cache could not be written (it is lost, or an
    older turn of it stays). Every agent is tried: one failure never stops another's save.
    """

    num_written: int
    num_current: int
    failed: dict[str, str]

    def summary(self) -> str:
        """One line: ``"3 written (1 already there), 1 FAILED: s2 (No space left on device)"``."""
        line = f"{self.num_written} written ({self.num_current} already there)"
        if self.failed:
            shown = "; ".join(f"{a} ({why})" for a, why in sorted(self.failed.items())[:10])
            more = f"; and {len(self.failed) - 10} more" if len(self.failed) > 10 else ""
            line += f", {len(self.failed)} FAILED: {shown}{more}"
        return line


@dataclass(slots=True)
class _Agent:
    """One agent the store knows.

    Invariants: ``blocks`` is None or live in the pool; ``file_bytes > 0`` exactly when
    the cold tier holds a copy (a file); ``file_current`` only with ``blocks``, and then the
    copy written in tier epoch ``tier_epoch`` holds exactly ``blocks`` (evicting needs no
    write); a ``checked_out`` agent is never evicted.
    ``loaded_unused`` keeps a load that a failed submit wasted counted as a cold hit when
    the cache is finally used.
    """

    agent_id: str
    blocks: CacheHandle | None = None
    file_bytes: int = 0
    file_current: bool = False
    tier_epoch: int = 0
    checked_out: bool = False
    loaded_unused: bool = False  # loaded from disk, no request has used it yet

    @property
    def tier(self) -> Tier | None:
        if self.blocks is not None:
            return Tier.HOT
        return Tier.COLD if self.file_bytes else None


class AgentCacheStore:
    """Agents' caches over ``engine``'s pool and the directory ``directory`` (or a cold tier).

    ``fingerprint`` identifies the model (:func:`kvpool.persist.model_fingerprint`): files
    written under another one are not loaded. ``max_pool_bytes``: the most pool bytes idle
    caches may hold (default: no limit beyond the pool; eviction then happens only when a
    request does not fit). ``max_disk_bytes``: the most bytes of cache files in the
    directory (default: no limit).
    """

    def __init__(
        self,
        engine: BlockPoolBatchEngine,
        directory: str | os.PathLike[str] | ColdTier,
        *,
        fingerprint: str,
        max_pool_bytes: int | None = None,
        max_disk_bytes: int | None = None,
    ) -> None:
        if not isinstance(fingerprint, str) or not fingerprint:
            raise InvalidRequestError(
                f"fingerprint must be a non-empty string, got {fingerprint!r}"
            )
        for name, value in (("max_pool_bytes", max_pool_bytes), ("max_disk_bytes", max_disk_bytes)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise InvalidRequestError(f"{name} must be an int >= 0 or None, got {value!r}")
        if not isinstance(engine, BlockPoolBatchEngine):
            raise InvalidRequestError(
                f"engine must be a BlockPoolBatchEngine, got {type(engine).__name__}"
            )
        self.engine = engine
        self.pool = engine.pool
        if isinstance(directory, (str, os.PathLike)):
            self.cold: ColdTier = LocalTier(directory, fingerprint=fingerprint)
        else:
            self.cold = directory
        # The cache directory (None for a tier that is not one).
        self.directory: Path | None = getattr(self.cold, "directory", None)
        self.fingerprint = fingerprint
        self.max_pool_bytes = max_pool_bytes
        self.max_disk_bytes = max_disk_bytes
        self._owner: threading.Thread | None = None  # the first thread that uses the store
        # Least recently used first.
        self._id_to_agent: OrderedDict[str, _Agent] = OrderedDict()
        self._uid_to_agent: dict[int, str] = {}  # requests submitted through the store
        self._counters = _Counters()
        self._pending_deletes: set[str] = set()  # forgotten while the tier was unreachable
        # agent id -> why its last save failed (cleared by a successful save or forget)
        self._agent_to_save_error: dict[str, str] = {}
        self._scan()
        self._enforce_disk_budget(keep=None)

    # -- the request path -----------------------------------------------------

    def submit(
        self,
        agent_id: str,
        prompt: str | Sequence[int],
        max_tokens: int = 256,
        *,
        sampling: SamplingParams | None = None,
        on_token: TokenCallback | None = None,
        cache_salt: str = "",
        logits_processors: Sequence[LogitsProcessor] = (),
    ) -> int:
        """Submit one turn of ``agent_id`` with its cache (from the pool or disk); returns the uid.

        ``prompt`` is the agent's whole context; ``max_tokens``, ``sampling``,
        ``on_token``, ``cache_salt`` and ``logits_processors`` are the engine's ``submit``
        arguments (an agent's
        cache computed under another salt is not used: the turn starts from the prefixes
        its own tenant shares). If the pool cannot fit the
        request, least recently used idle agents are written to disk and freed, one at a
        time, until it fits. Raises as the engine does: PoolExhaustedError when nothing
        idle is left to evict (try again after ``step``), RequestTooLargeError when it can
        never fit. Hits and misses count submitted requests only.
        """
        self._check_thread()
        cache, source = self._checkout(agent_id, cache_salt)
        if cache is not None and cache.salt != cache_salt:
            cache, source = None, None
        try:
            if self.cold.shared and not isinstance(prompt, str):
                self._import_prefix(prompt, cache, cache_salt)
            while True:
                try:
                    uid = self.engine.submit(
                        agent_id,
                        prompt,
                        cache,
                        max_tokens,
                        sampling=sampling,
                        on_token=on_token,
                        cache_salt=cache_salt,
                        logits_processors=logits_processors,
                    )
                    break
                except RequestTooLargeError:
                    raise
                except PoolExhaustedError:
                    if not self._evict_lru():
                        raise
        except BaseException:
            self.put_back(agent_id)
            raise
        self._uid_to_agent[uid] = agent_id
        self._count_lookup(source)
        return uid

    def step(self) -> list[CompletedGeneration]:
        """``engine.step()``; each completion of a request submitted here is ``put``."""
        self._check_thread()
        done = list(self.engine.step())
        for completion in done:
            if self._uid_to_agent.pop(completion.uid, None) is not None:
                self.put(completion)
        return done

    def drain(self) -> list[CompletedGeneration]:
        """Step until the engine has no work; returns every completion."""
        self._check_thread()
        done: list[CompletedGeneration] = []
        while self.engine.has_work:
            done.extend(self.step())
        return done

    def run_turns(
        self,
        prompts: Mapping[str, str | Sequence[int]],
        max_tokens: int = 256,
        *,
        sampling: SamplingParams | None = None,
    ) -> dict[str, CompletedGeneration]:
        """One turn for each agent in ``prompts``; returns every ending by agent id.

        Submits as many turns as the pool holds (evicting idle agents as ``submit``
        does) and queues the others until running ones finish and free blocks. If a turn
        cannot be submitted (bad input, RequestTooLargeError, or PoolExhaustedError with
        nothing running), the turns this call still has running are cancelled, their
        agents' caches stay as they were, and the error is raised. Failures inside the
        engine come back as completions with ``error`` set. Requests submitted before the
        call also advance; their completions are kept by the store but not returned here.
        """
        self._check_thread()
        pending = list(prompts)
        running: set[int] = set()
        done: dict[str, CompletedGeneration] = {}
        try:
            while pending or running:
                while pending:
                    agent_id = pending[0]
                    try:
                        uid = self.submit(
                            agent_id, prompts[agent_id], max_tokens, sampling=sampling
                        )
                    except RequestTooLargeError:
                        raise
                    except PoolExhaustedError:
                        if not running:
                            raise  # nothing of ours will free blocks: it cannot fit now
                        break
                    running.add(uid)
                    pending.pop(0)
                for completion in self.step():
                    if completion.uid in running:
                        running.discard(completion.uid)
                        done[completion.agent_id] = completion
        except BaseException:
            for uid in running:
                self.cancel(uid)
            raise
        return done

    def cancel(self, uid: int) -> bool:
        """Cancel a request submitted here; its agent's cache stays as it was."""
        self._check_thread()
        agent_id = self._uid_to_agent.pop(uid, None)
        cancelled = self.engine.cancel(uid)
        if agent_id is not None:
            self.put_back(agent_id)
        return cancelled

    # -- check out / check in -------------------------------------------------

    def get(self, agent_id: str) -> CacheHandle | None:
        """Check out ``agent_id``'s cache: its handle in the pool, or None (a miss).

        A cold cache is loaded into the pool first (evicting idle agents if needed). Until
        ``put`` (or ``put_back``), the agent is checked out and its cache is never evicted;
        a second ``get`` raises InvalidRequestError. Pass the result as ``cache`` to the
        engine's ``submit`` and the completion to :meth:`put`.
        """
        self._check_thread()
        blocks, source = self._checkout(agent_id)
        self._count_lookup(source)
        return blocks

    def _checkout(self, agent_id: str, salt: str = "") -> tuple[CacheHandle | None, Tier | None]:
        """Check out the agent; returns its cache and where it came from (None: a miss).

        A cold cache is loaded under ``salt`` (the request's): its blocks become prefix
        blocks of that salt only, never of another tenant's."""
        validate_agent_id(agent_id)
        entry = self._id_to_agent.get(agent_id)
        if entry is None:
            entry = self._id_to_agent[agent_id] = _Agent(agent_id)
        if entry.checked_out:
            raise InvalidRequestError(
                f"agent {agent_id!r} is checked out (a request in flight?): put() its completion "
                "or put_back() first"
            )
        self._check_hot(entry)
        cold = entry.file_bytes or (self.cold.shared and agent_id not in self._pending_deletes)
        if entry.blocks is None and cold and self._load(entry, salt):
            entry.loaded_unused = True
        source = entry.tier if entry.blocks is not None else None
        if entry.loaded_unused:
            source = Tier.COLD
        entry.checked_out = True
        self._id_to_agent.move_to_end(agent_id)
        return entry.blocks, source

    def _count_lookup(self, source: Tier | None) -> None:
        if source is Tier.HOT:
            self._counters.num_hot_hits += 1
        elif source is Tier.COLD:
            self._counters.num_cold_hits += 1
        else:
            self._counters.num_misses += 1

    def put(self, completion: CompletedGeneration) -> None:
        """Check in a completion: its ``blocks`` become the agent's cache.

        A failed completion carries the cache the request was given (still valid), or None;
        either way the agent's cache stays what it was. The agent is no longer checked out.
        """
        self._check_thread()
        if not isinstance(completion, CompletedGeneration):
            raise InvalidRequestError(
                f"put() takes a CompletedGeneration, got {type(completion).__name__}"
            )
        entry = self._id_to_agent.get(completion.agent_id)
        if entry is None:
            entry = self._id_to_agent[completion.agent_id] = _Agent(completion.agent_id)
        new = completion.blocks
        if new is not None and new != entry.blocks and self.pool.is_live(new):
            old = entry.blocks
            if old is not None and self.pool.is_live(old):  # superseded, not by the engine
                self.pool.release(old)
            entry.blocks, entry.file_current = new, False
        self._check_hot(entry)
        if completion.error is None:
            self._counters.tokens_saved += completion.cached_tokens
        entry.checked_out = entry.loaded_unused = False
        self._id_to_agent.move_to_end(entry.agent_id)
        self._enforce_pool_budget()  # a cache it cannot write stays hot (logged)

    def put_back(self, agent_id: str) -> None:
        """End a checkout without a completion (the request was never submitted)."""
        self._check_thread()
        entry = self._id_to_agent.get(agent_id)
        if entry is not None:
            entry.checked_out = False
            self._check_hot(entry)

    # -- forks ------------------------------------------------------------------

    def fork(self, parent_id: str, child_id: str, *, salt: str = "") -> CacheHandle | None:
        """Make ``child_id`` a new agent whose cache shares every block of ``parent_id``'s by
        reference (no K/V copied, :meth:`~kvpool.pool.BlockPool.fork`); returns the child's
        handle, or None (nothing changed) if the parent has no cache.

        A cold parent is loaded into the pool first (under ``salt``, evicting idle agents as
        ``get`` does). Both agents then continue independently: a turn of either writes its
        own blocks past the shared ones, and releasing either leaves the other's intact.
        Raises InvalidRequestError, nothing changed, if either agent is checked out, the ids
        are equal, or the child already has a cache.
        """
        self._check_thread()
        validate_agent_id(parent_id)
        validate_agent_id(child_id)
        if parent_id == child_id:
            raise InvalidRequestError(f"cannot fork agent {parent_id!r} into itself")
        child = self._id_to_agent.get(child_id)
        if child is not None and (child.checked_out or child.tier is not None):
            raise InvalidRequestError(f"agent {child_id!r} already exists; fork into a new id")
        parent = self._id_to_agent.get(parent_id)
        if parent is None:
            return None
        if parent.checked_out:
            raise InvalidRequestError(f"agent {parent_id!r} is checked out and cannot be forked")
        self._check_hot(parent)
        if parent.blocks is None:
            cold = parent.file_bytes or (
                self.cold.shared and parent_id not in self._pending_deletes
            )
            if not cold or not self._load(parent, salt):
                return None
            parent.loaded_unused = True
        assert parent.blocks is not None, "a loaded agent has blocks: this indicates a bug"
        handle = self.pool.fork(parent.blocks, child_id)
        self._id_to_agent.pop(child_id, None)
        self._id_to_agent[child_id] = _Agent(child_id, blocks=handle)
        self._id_to_agent.move_to_end(parent_id)
        self._id_to_agent.move_to_end(child_id)
        self._enforce_pool_budget()  # may write the least recently used idle cache to disk
        return handle

    # -- moving caches --------------------------------------------------------

    def evict(self, agent_id: str) -> bool:
        """Write an idle hot agent to disk and free its blocks; False if it is not hot.

        Raises InvalidRequestError if the agent is checked out.
        """
        self._check_thread()
        entry = self._id_to_agent.get(validate_agent_id(agent_id))
        if entry is None:
            return False
        if entry.checked_out:
            raise InvalidRequestError(f"agent {agent_id!r} is checked out and cannot be evicted")
        self._check_hot(entry)
        if entry.blocks is None:
            return False
        self._evict(entry, drop=False)
        return True

    def flush(self) -> int:
        """Write every idle hot cache whose file is not current; returns how many.

        Each agent is saved on its own: one that cannot be written (a full disk, a bad path:
        counted in ``num_save_errors``, logged, listed in :attr:`save_errors`) stays hot and
        unsaved, and the others are still written. With a tier that cannot be reached, stops
        at the first failure (counted in ``num_tier_errors``; a later flush writes the rest).
        """
        self._check_thread()
        written = 0
        try:
            self._retry_deletes()
            for entry in list(self._id_to_agent.values()):
                self._check_hot(entry)
                if entry.file_current and entry.tier_epoch != self.cold.epoch:
                    entry.file_current = False  # the tier may have lost it: write it again
                if entry.blocks is not None and not entry.checked_out and not entry.file_current:
                    written += self._try_save(entry) is None
        except TierUnavailableError as exc:
            self._tier_failed("flush", exc)
        return written

    def check_saved(self) -> int:
        """Ask the cold tier whether the idle hot caches it holds as they are are still
        there (Redis may have evicted or flushed them, a file may have been deleted); those
        it lost are marked unsaved, for the next :meth:`flush` (or :meth:`close`) to write.
        Returns how many. A tier that cannot be reached is counted and nothing changes."""
        self._check_thread()
        saved = [
            e
            for e in self._id_to_agent.values()
            if e.blocks is not None
            and not e.checked_out
            and e.file_current
            and e.tier_epoch == self.cold.epoch
        ]
        if not saved:
            return 0
        try:
            gone = self.cold.missing(self.pool, [e.blocks for e in saved if e.blocks is not None])
        except TierUnavailableError as exc:
            self._tier_failed("checking saved sessions", exc)
            return 0
        for entry in saved:
            if entry.agent_id in gone:
                entry.file_current = False
                logger.warning("the cold tier lost agent %r: it is written again", entry.agent_id)
        return len(gone)

    @property
    def save_errors(self) -> dict[str, str]:
        """Agent id -> why its last save failed, for agents whose cache is not written."""
        return dict(self._agent_to_save_error)

    @property
    def num_unsaved(self) -> int:
        """Idle hot caches the cold tier does not hold as they are (a flush would write)."""
        unsaved = [
            e
            for e in self._id_to_agent.values()
            if e.blocks is not None
            and not e.checked_out
            and (not e.file_current or e.tier_epoch != self.cold.epoch)
        ]
        return len(unsaved) + len(self._pending_deletes)

    def close(self) -> SaveReport:
        """Write every idle hot agent to disk and free its blocks (checked out ones stay).

        Every agent is tried, whatever failed before it; returns what was written and what
        could not be (those caches are dropped, an older file of theirs stays)."""
        self._check_thread()
        self.check_saved()  # what the tier lost since it was written is written again
        written = current = 0
        failed: dict[str, str] = {}
        for entry in list(self._id_to_agent.values()):
            self._check_hot(entry)
            if entry.blocks is not None and not entry.checked_out:
                if entry.file_current and entry.tier_epoch == self.cold.epoch:
                    current += 1
                    self._evict(entry)
                    continue
                saves = self._counters.num_saves
                self._evict(entry)
                if self._counters.num_saves > saves:
                    written += 1
                else:
                    failed[entry.agent_id] = self._agent_to_save_error.get(
                        entry.agent_id, "not written"
                    )
        try:
            self._retry_deletes()
        except TierUnavailableError as exc:
            self._tier_failed("delete", exc)
        self.cold.close()
        return SaveReport(written, current, failed)

    def forget(self, agent_id: str) -> bool:
        """Delete an agent's cache everywhere (pool and disk); False if there was none."""
        self._check_thread()
        entry = self._id_to_agent.get(validate_agent_id(agent_id))
        if entry is None:
            return False
        if entry.checked_out:
            raise InvalidRequestError(f"agent {agent_id!r} is checked out and cannot be forgotten")
        self._check_hot(entry)
        existed = entry.tier is not None
        self._delete_file(entry)  # first: if the file cannot be deleted, nothing changed
        if entry.blocks is not None:
            self.pool.release(entry.blocks)
        del self._id_to_agent[agent_id]
        self._agent_to_save_error.pop(agent_id, None)
        return existed

    # -- inspection -----------------------------------------------------------

    def tier(self, agent_id: str) -> Tier | None:
        """Where ``agent_id``'s cache is now, or None if the store holds none."""
        self._check_thread()
        entry = self._id_to_agent.get(validate_agent_id(agent_id))
        if entry is None:
            return None
        self._check_hot(entry)
        return entry.tier

    @property
    def stats(self) -> StoreStats:
        """A snapshot of the counters and of where the caches are."""
        self._check_thread()
        hot = [e.blocks for e in self._id_to_agent.values() if e.blocks is not None]
        return StoreStats(
            **dataclasses.asdict(self._counters),
            num_hot=len(hot),
            num_cold=sum(1 for e in self._id_to_agent.values() if e.tier is Tier.COLD),
            hot_bytes=sum(self.pool.handle_bytes(h) for h in hot),
            bytes_on_disk=self._bytes_on_disk(),
            tier=self.cold.stats(),
        )

    # -- internals ------------------------------------------------------------

    def _scan(self) -> None:
        """Register every cache the tier holds as a cold agent, oldest first."""
        for found in self.cold.scan():
            if found.bad:
                self._set_aside(_Agent(found.agent_id))
            else:
                self._id_to_agent[found.agent_id] = _Agent(found.agent_id, file_bytes=found.nbytes)

    def _import_prefix(
        self, prompt: Sequence[int], cache: CacheHandle | None, cache_salt: str
    ) -> None:
        """Bring the prompt's prefix blocks that a shared tier has and the pool lacks in."""
        try:
            tokens = tuple(prompt)
            have = self.pool.lookup(tokens, salt=cache_salt, own=cache).num_tokens
        except (KvpoolError, TypeError, ValueError):
            return  # bad input: the engine's submit raises for it
        try:
            imported = self.cold.import_prefix(self.pool, tokens, cache_salt, have)
        except TierUnavailableError as exc:
            self._tier_failed("prefix import", exc)
            return
        if imported:
            self._counters.num_prefix_imports += 1
            self._counters.prefix_tokens_imported += imported

    def _tier_failed(self, what: str, exc: TierUnavailableError) -> None:
        self._counters.num_tier_errors += 1
        logger.warning("cold tier %s: %s failed: %s", self.cold.describe(), what, exc)

    def _retry_deletes(self) -> None:
        for agent_id in sorted(self._pending_deletes):
            self.cold.delete(agent_id)
            self._pending_deletes.discard(agent_id)

    def _check_hot(self, entry: _Agent) -> None:
        """The store's handles are live: only the manager releases blocks, and it releases a
        store handle only when the store (or the engine's commit of the agent's next turn)
        asks. A dead handle here indicates a bug; nothing is repaired."""
        assert entry.blocks is None or self.pool.is_live(entry.blocks), (
            f"agent {entry.agent_id!r}: the store's handle was released by someone else"
        )

    def _load(self, entry: _Agent, salt: str) -> bool:
        """Load a cold agent into the pool under ``salt``, evicting idle ones for room; False
        on a bad file."""
        while True:
            t0 = time.perf_counter()
            try:
                blocks = self.cold.load(self.pool, entry.agent_id, salt)
            except PoolExhaustedError as exc:
                if exc.needed > exc.capacity:  # can never fit: start over instead
                    logger.warning(
                        "cache of agent %r does not fit the pool: %s", entry.agent_id, exc
                    )
                    return False
                if not self._evict_lru():
                    raise
                continue
            except TierUnavailableError as exc:
                self._tier_failed(f"loading agent {entry.agent_id!r}", exc)
                return False
            except CacheCorruptionError as exc:
                logger.warning("setting aside a corrupt cache file: %s", exc)
                self._counters.num_load_errors += 1
                self._set_aside(entry)
                return False
            except IncompatibleCacheError as exc:
                # Another model's (or layout's) cache: not ours to delete; the next save
                # of this agent replaces it.
                logger.warning("ignoring an incompatible cache file: %s", exc)
                self._counters.num_load_errors += 1
                return False
            if blocks is None:  # the file disappeared, or the shared tier has none
                entry.file_bytes, entry.file_current = 0, False
                return False
            entry.blocks = blocks
            if not entry.file_bytes:  # found in a shared tier: about its size there
                entry.file_bytes = max(1, self.pool.handle_bytes(blocks))
            self._counters.load_s += time.perf_counter() - t0
            self._counters.bytes_read += entry.file_bytes
            entry.file_current, entry.tier_epoch = True, self.cold.epoch
            return True

    def _save(self, entry: _Agent) -> None:
        assert entry.blocks is not None, "saving an agent with no blocks: this indicates a bug"
        t0 = time.perf_counter()
        entry.file_bytes = self.cold.save(self.pool, entry.blocks)
        self._counters.save_s += time.perf_counter() - t0
        entry.file_current, entry.tier_epoch = True, self.cold.epoch
        self._pending_deletes.discard(entry.agent_id)
        self._agent_to_save_error.pop(entry.agent_id, None)
        self._counters.num_saves += 1
        self._counters.bytes_written += entry.file_bytes
        self._enforce_disk_budget(keep=entry)

    def _try_save(self, entry: _Agent) -> CacheWriteError | None:
        """``_save``; a write that fails for this agent alone (CacheWriteError: a full disk,
        something else at its path) is counted, logged, recorded in :attr:`save_errors` and
        returned. A tier that cannot be reached raises TierUnavailableError (every save
        would fail)."""
        try:
            self._save(entry)
        except CacheWriteError as exc:
            self._counters.num_save_errors += 1
            self._agent_to_save_error[entry.agent_id] = exc.strerror or str(exc)
            logger.warning("could not save the cache of agent %r: %s", entry.agent_id, exc)
            return exc
        return None

    def _evict(self, entry: _Agent, *, drop: bool = True) -> None:
        """Free an idle hot agent's blocks, writing its cache first if the tier lacks it.

        A cache that cannot be written (a full disk) is dropped when ``drop`` (the pool
        needs the room; an older file of it stays), else the CacheWriteError is raised and
        it stays hot. With the tier unreachable it is dropped either way.
        """
        assert entry.blocks is not None and not entry.checked_out, "this indicates a bug"
        if not entry.file_current or entry.tier_epoch != self.cold.epoch:
            try:
                failed = self._try_save(entry)
            except TierUnavailableError as exc:  # the pool needs the room: drop the cache
                self._tier_failed(f"saving agent {entry.agent_id!r} (its cache is dropped)", exc)
                self._agent_to_save_error[entry.agent_id] = f"cold tier unreachable: {exc}"
                entry.file_bytes, entry.file_current = 0, False
            else:
                if failed is not None and not drop:
                    raise failed
        self.pool.release(entry.blocks)
        entry.blocks, entry.file_current, entry.loaded_unused = None, False, False
        self._counters.num_evictions += 1
        if not entry.file_bytes:  # the disk budget could not keep its file
            self._counters.num_dropped += 1
            del self._id_to_agent[entry.agent_id]

    def _evict_lru(self) -> bool:
        """Evict the least recently used idle hot agent; False if there is none."""
        for entry in list(self._id_to_agent.values()):
            self._check_hot(entry)
            if entry.blocks is not None and not entry.checked_out:
                self._evict(entry)
                return True
        return False

    def _enforce_pool_budget(self) -> None:
        if self.max_pool_bytes is None:
            return
        idle = [e for e in self._id_to_agent.values() if e.blocks is not None and not e.checked_out]
        held = sum(self.pool.handle_bytes(e.blocks) for e in idle if e.blocks is not None)
        for entry in idle:  # least recently used first
            if held <= self.max_pool_bytes:
                break
            assert entry.blocks is not None
            held -= self.pool.handle_bytes(entry.blocks)
            try:
                self._evict(entry, drop=False)
            except CacheWriteError:  # logged; it stays hot, the next put tries again
                continue

    def _bytes_on_disk(self) -> int:
        return sum(e.file_bytes for e in self._id_to_agent.values())

    def _enforce_disk_budget(self, keep: _Agent | None) -> None:
        """Delete least recently used files (``keep``'s last) until the directory fits."""
        if self.max_disk_bytes is None:
            return
        total = self._bytes_on_disk()
        victims = [e for e in self._id_to_agent.values() if e.file_bytes and e is not keep]
        if keep is not None and keep.file_bytes:
            victims.append(keep)
        for entry in victims:
            if total <= self.max_disk_bytes:
                break
            total -= entry.file_bytes
            try:
                self._delete_file(entry)
            except CacheWriteError as exc:  # it stays; the next save tries again
                logger.warning("could not delete a cache to keep max_disk_bytes: %s", exc)
                continue
            if entry.blocks is None and not entry.checked_out and entry is not keep:
                self._counters.num_dropped += 1
                del self._id_to_agent[entry.agent_id]

    def _set_aside(self, entry: _Agent) -> None:
        """Move a bad cache out of the store's way (a file: renamed ``{name}.corrupt``)."""
        entry.file_bytes, entry.file_current = 0, False
        try:
            moved = self.cold.set_aside(entry.agent_id)
        except TierUnavailableError as exc:
            self._tier_failed(f"setting aside agent {entry.agent_id!r}", exc)
            return
        if moved:
            self._counters.num_set_aside += 1

    def _check_thread(self) -> None:
        """Bind the store to the first thread that calls it (creating it does not count:
        a server builds it, then hands it to its engine-loop thread); refuse any other."""
        current = threading.current_thread()
        if self._owner is None:
            self._owner = current
        if current is not self._owner:
            raise InvalidRequestError(
                f"AgentCacheStore is not thread-safe: used by thread {self._owner.name!r} "
                f"({self._owner.ident}), called from {current.name!r} ({current.ident})"
            )

    def _delete_file(self, entry: _Agent) -> None:
        """Delete the agent's copy in the cold tier; CacheWriteError (a local file that
        cannot be removed) leaves the entry as it was."""
        try:
            self.cold.delete(entry.agent_id)
        except TierUnavailableError as exc:
            self._tier_failed(f"deleting agent {entry.agent_id!r} (retried later)", exc)
            self._pending_deletes.add(entry.agent_id)
        else:
            self._pending_deletes.discard(entry.agent_id)
        entry.file_bytes, entry.file_current = 0, False
