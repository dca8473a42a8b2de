"""SequenceCache: what one in-flight sequence holds in the pool, from its request to its handle.

The engine sees a sequence's cache through these verbs only::

    seq = pool.open_sequence(agent, tokens, max_tokens, own=cache)  # or PoolFull
    caches = seq.read()                    # the reused prefix as per-layer caches (or None)
    seq.publish_prefix(running, end)       # optional: share a prefix while prefilling
    handle = seq.close(final, all_tokens)  # write the final cache and commit it
    seq.abort()                            # on any failure: give everything back

and a cache that comes from the host (a file, Redis) through :class:`HostWrite`.

States (``abort`` after ``close`` or ``abort`` changes nothing)::

    OPEN --read--> READ --close--> CLOSED
      \\______________\\___abort___> ABORTED

Bookkeeping runs under the pool's lock; reads and writes of K/V do not: they touch only
blocks the sequence holds or pins, which nothing else writes.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from kvpool.cache.manager import KVCacheManager, PoolFull, PrefixMatch, Reservation
from kvpool.cache.storage import KVStorage, LayerCodes, LayerKV, LayerState
from kvpool.cache.tables import CacheHandle
from kvpool.errors import InvalidRequestError

__all__ = ["HostWrite", "MakeRoom", "SequenceCache", "SequenceState", "open_sequence"]

MakeRoom = Callable[[PoolFull], bool]
"""Moves budget so that the group a PoolFull names has what it lacked (the pool's; called
under its lock); False, and nothing changed, if it cannot."""

_Placed = TypeVar("_Placed")


class SequenceState(enum.Enum):
    OPEN = "open"  # reserved; the prefix may still grow (rebase) until it is read
    READ = "read"  # the reused prefix was gathered; partially read blocks let go
    CLOSED = "closed"  # committed: the reservation became a handle
    ABORTED = "aborted"  # rolled back: nothing held


def open_sequence(
    manager: KVCacheManager,
    storage: KVStorage,
    lock: threading.RLock,
    agent_id: str,
    tokens: Sequence[int],
    max_tokens: int,
    *,
    own: CacheHandle | None = None,
    salt: str = "",
    shared: bool = True,
    room: MakeRoom | None = None,
) -> SequenceCache | PoolFull:
    """Reserve what a request for ``tokens`` (+ ``max_tokens``) needs, reusing the longest
    prefix the pool holds (``own``: the agent's cache, also replaced at close when it is
    the same agent's). PoolFull, and nothing changed, if it does not fit even without the
    partly matching block (whose tokens it would then prefill). ``room`` is asked for the
    blocks a prefix or snapshot published while the sequence runs lacks."""
    with lock:
        if own is not None:
            manager.check_live(own)
        replacing = own if own is not None and own.agent_id == agent_id else None
        match = manager.lookup(tokens, salt=salt, own=own, shared=shared)
        res = manager.reserve(agent_id, tokens, max_tokens, match, salt=salt, replacing=replacing)
        size = manager.block_tokens
        if isinstance(res, PoolFull) and match.num_tokens % size:
            # The partly matching block is pinned beside the fresh ones until the
            # read: without it the request may fit.
            whole = match.num_tokens - match.num_tokens % size
            match = manager.lookup(tokens, salt=salt, own=own, shared=shared, limit=whole)
            res = manager.reserve(
                agent_id, tokens, max_tokens, match, salt=salt, replacing=replacing
            )
        if isinstance(res, PoolFull):
            return res
        return SequenceCache(manager, storage, lock, res, shared, room)


class SequenceCache:
    """One sequence's reservation and the verbs that end it (see the module docstring).

    ``reused_tokens`` is how much of the prompt comes from the pool: fixed once read.
    Usable as a context manager that aborts when the block raises.
    """

    def __init__(
        self,
        manager: KVCacheManager,
        storage: KVStorage,
        lock: threading.RLock,
        reservation: Reservation,
        shared: bool,
        room: MakeRoom | None = None,
    ) -> None:
        self._manager = manager
        self._storage = storage
        self._lock = lock
        self._res = reservation
        self._shared = shared
        self._room = room
        self.state = SequenceState.OPEN

    @property
    def agent_id(self) -> str:
        return self._res.agent_id

    @property
    def tokens(self) -> tuple[int, ...]:
        return self._res.tokens

    @property
    def reused_tokens(self) -> int:
        """Prompt tokens the pool supplies (so far: it can grow until :meth:`read`)."""
        return self._res.match.num_tokens

    @property
    def match(self) -> PrefixMatch:
        return self._res.match

    def _expect(self, *states: SequenceState) -> None:
        if self.state not in states:
            raise InvalidRequestError(
                f"sequence of {self.agent_id!r} is {self.state.value}; "
                f"expected {' or '.join(s.value for s in states)}"
            )

    def extend(self, own: CacheHandle | None) -> bool:
        """Before :meth:`read`: take a longer prefix published since the sequence opened
        (by a leader prefilling the same tokens). True if it grew; all or nothing."""
        self._expect(SequenceState.OPEN)
        with self._lock:
            if own is not None and not self._manager.is_live(own):
                own = None
            match = self._manager.lookup(
                self._res.tokens, salt=self._res.salt, own=own, shared=self._shared
            )
            if match.num_tokens <= self._res.match.num_tokens:
                return False
            return self._manager.rebase(self._res, match)

    def read(self) -> list[Any] | None:
        """The reused prefix as per-layer caches (None when nothing is reused); then the
        partially read blocks are let go."""
        self._expect(SequenceState.OPEN)
        p = self._res.match.num_tokens
        caches = self._storage.load(self._res.match.read_tables, p) if p else None
        with self._lock:
            self._manager.release_pin(self._res)
        self.state = SequenceState.READ
        return caches

    def publish_prefix(self, caches: Sequence[Any], length: int) -> bool:
        """Write and publish the first ``length`` positions (a block boundary) from the
        running sequence's caches, so that sequences waiting for the same prefix share
        them. False, and nothing changed, if the pool cannot hold the sliding groups'
        copies now, even after moving budget to them, or if a sliding cache no longer
        holds the first rows of a block the prefix needs (written, then given back)."""
        self._expect(SequenceState.READ)
        tables = self._placed(lambda: self._manager.place_prefix(self._res, length))
        if tables is None:
            return False
        written_from = self._storage.store(caches, tables, self._write_start())
        with self._lock:
            return self._manager.commit_prefix(self._res, tables, written_from)

    def snapshot_state(self, caches: Sequence[Any], length: int) -> bool:
        """Write and publish the recurrent states of the running sequence's caches (after
        its first ``length`` tokens: its prompt's end, say) so that a later prompt with that
        exact prefix resumes from them. False, and nothing changed, without a free block
        (after moving budget to the recurrent groups, if the pool can)."""
        self._expect(SequenceState.READ)
        tables = self._placed(lambda: self._manager.place_state(self._res, length))
        if tables is None:
            return False
        try:
            self._storage.store(caches, tables, 0)
        except BaseException:
            with self._lock:
                self._manager.release_state(self._res, tables)
            raise
        with self._lock:
            self._manager.commit_state(self._res, tables, length)
        return True

    def _placed(self, place: Callable[[], _Placed | PoolFull]) -> _Placed | None:
        """``place()`` under the lock, once more after ``room`` moved budget to the group it
        found short; None, and nothing changed, if it still does not fit."""
        with self._lock:
            got = place()
            if isinstance(got, PoolFull) and self._room is not None and self._room(got):
                got = place()
        return None if isinstance(got, PoolFull) else got

    def close(self, caches: Sequence[Any], token_ids: Sequence[int]) -> CacheHandle:
        """Write the finished sequence's caches (one position per token of ``token_ids``)
        and commit: the reservation becomes the agent's new handle (its old one, if this
        replaced it, is released). On failure the sequence is aborted and the error raised."""
        self._expect(SequenceState.READ)
        try:
            with self._lock:
                tables = self._manager.place(self._res, len(token_ids))
            written_from = self._storage.store(caches, tables, self._write_start())
            with self._lock:
                handle = self._manager.commit(self._res, token_ids, tables, written_from)
        except BaseException:
            self.abort()
            raise
        self.state = SequenceState.CLOSED
        return handle

    def abort(self) -> None:
        """Give back everything the sequence holds (the agent's old handle stays live)."""
        if self.state in (SequenceState.CLOSED, SequenceState.ABORTED):
            return
        with self._lock:
            self._manager.rollback(self._res)
        self.state = SequenceState.ABORTED

    def _write_start(self) -> int:
        """Writes go to positions past the reused prefix's whole blocks (shared blocks are
        read-only)."""
        return self._manager.shared_end(self._res.match)

    def __enter__(self) -> SequenceCache:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()


_Rows = TypeVar("_Rows", LayerKV, LayerCodes)


class HostWrite:
    """A cache of exactly ``tokens`` whose K/V comes from the host (a file, the Redis tier),
    committed as a handle: the one owner of reserve -> write -> commit | rollback for them::

        with pool.write_from_host(agent, tokens, salt=salt) as w:  # or PoolFull
            w.write(rows)                   # LayerKV; or LayerCodes for a quantized pool
            handle = w.commit(valid_from)   # leaving without commit rolls back

    Blocks the pool already holds for a whole-block prefix of ``tokens`` are shared, not
    written: :meth:`write` skips positions before ``shared_tokens``.
    """

    def __init__(
        self,
        manager: KVCacheManager,
        storage: KVStorage,
        lock: threading.RLock,
        reservation: Reservation,
        tables: tuple[tuple[int, ...], ...],
    ) -> None:
        self._manager = manager
        self._storage = storage
        self._lock = lock
        self._res = reservation
        self.tables = tables
        self.shared_tokens = manager.shared_end(reservation.match)
        self._group_of_layer = storage.spec.group_of_layer()
        self._states_missing: set[int] = (
            set()
        )  # recurrent layers whose end state commit still needs
        size = manager.block_tokens
        if (len(reservation.tokens) - 1) // size * size >= self.shared_tokens:
            self._states_missing = {
                i for i, layer in enumerate(storage.spec.layers) if layer.states
            }  # the end state's block is fresh: not shared from the pool
        self.state = SequenceState.OPEN

    @classmethod
    def open(
        cls,
        manager: KVCacheManager,
        storage: KVStorage,
        lock: threading.RLock,
        agent_id: str,
        tokens: Sequence[int],
        *,
        salt: str = "",
    ) -> HostWrite | PoolFull:
        """Reserve blocks for exactly ``tokens`` (whole shared blocks reused); PoolFull, and
        nothing changed, if they do not fit."""
        with lock:
            match = manager.lookup(tokens, salt=salt, limit=len(tokens))
            # Only whole shared blocks avoid a write; a partial read buys nothing here.
            match = manager.lookup(tokens, salt=salt, limit=manager.shared_end(match))
            res = manager.reserve(agent_id, tokens, 0, match, salt=salt)
            if isinstance(res, PoolFull):
                return res
            manager.release_pin(res)
            return cls(manager, storage, lock, res, manager.place(res, len(tokens)))

    @property
    def tokens(self) -> tuple[int, ...]:
        return self._res.tokens

    def write(self, rows: Sequence[LayerKV | LayerCodes | LayerState]) -> None:
        """Write host rows (cut to the positions this write owns) into the blocks: dense
        rows quantize on the way in for a quantized pool; codes go in bit for bit; a
        recurrent layer's end state goes into its own block (unless the pool already held
        the state at exactly these tokens: then it is shared, not written)."""
        self._expect_open()
        dense = [r for r in rows if isinstance(r, LayerKV)]
        codes = [r for r in rows if isinstance(r, LayerCodes)]
        states = [r for r in rows if isinstance(r, LayerState)]
        if dense:
            self._storage.write_layers(self.tables, self._writable(dense))
        if codes:
            self._storage.write_codes(self.tables, self._writable(codes))
        if states and self._states_missing:  # else the pool shares the state it holds
            for st in states:
                if st.num_tokens != len(self.tokens):
                    raise InvalidRequestError(
                        f"layer {st.layer}: a state after {st.num_tokens} tokens for a cache "
                        f"of {len(self.tokens)}"
                    )
            self._storage.write_states(self.tables, states)
            self._states_missing -= {st.layer for st in states}

    def _expect_open(self) -> None:
        if self.state is not SequenceState.OPEN:
            raise InvalidRequestError(
                f"the host write of {self._res.agent_id!r} is {self.state.value}"
            )

    def _writable(self, rows: list[_Rows]) -> list[_Rows]:
        """``rows`` cut to positions ``>= shared_tokens`` in blocks of the tables (not NULL)."""
        size = self._manager.block_tokens
        out = []
        for kv in rows:
            table = self.tables[self._group_of_layer[kv.layer]]
            lo = max(self.shared_tokens, kv.start)
            while lo < kv.start + kv.num_tokens and table[lo // size] < 0:
                lo = (lo // size + 1) * size
            skip = lo - kv.start
            if skip < kv.num_tokens:
                out.append(kv.drop(skip))
        return out

    def commit(
        self,
        valid_from: Sequence[int] | None = None,
        *,
        whole_blocks: bool = False,
        publish_state: bool = False,
    ) -> CacheHandle:
        """The written blocks become the handle of ``tokens``; group ``g`` holds positions
        ``>= valid_from[g]`` (None: all of them, as full-attention groups do), a sliding
        group at most its window (from ``keep_from``); with ``whole_blocks`` (the rows were
        written from ``valid_from[g]``, a block start) from the start of the window's first
        block, which is then published too (a prefix import: see
        :meth:`KVCacheManager.commit`); with ``publish_state`` a recurrent end state
        mid-block is published as the snapshot of exactly ``tokens`` (a prefix import
        ending at a prompt's end).
        InvalidRequestError, and the write still open, if a recurrent layer's end state was
        not written into its fresh block (it would be published holding nothing)."""
        self._expect_open()
        if self._states_missing:
            raise InvalidRequestError(
                f"the host write of {self._res.agent_id!r} ({len(self.tokens)} tokens) has no "
                f"end state for recurrent layers {sorted(self._states_missing)}"
            )
        valid = valid_from if valid_from is not None else [0] * len(self.tables)
        written = [max(v, self.shared_tokens) for v in valid]
        with self._lock:
            handle = self._manager.commit(
                self._res,
                self._res.tokens,
                self.tables,
                written,
                whole_blocks=whole_blocks,
                publish_state=publish_state,
            )
        self.state = SequenceState.CLOSED
        return handle

    def abort(self) -> None:
        """Give the reserved blocks back (nothing was committed)."""
        if self.state is not SequenceState.OPEN:
            return
        with self._lock:
            self._manager.rollback(self._res)
        self.state = SequenceState.ABORTED

    def __enter__(self) -> HostWrite:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.abort()  # a no-op after commit
