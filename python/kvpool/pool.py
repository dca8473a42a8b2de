"""BlockPool: the pool's bookkeeping (a KVCacheManager) and its bytes (a KVStorage).

The :class:`~kvpool.cache.manager.KVCacheManager` is the only owner of blocks;
the :class:`~kvpool.cache.storage.KVStorage` (MLX slabs by default) holds their K/V.
The pool puts the two together for its users: the engine, the store and
persistence call the pool and never touch allocators, leases or slabs.

Each layer group (:attr:`ModelCacheSpec.groups`) has its own blocks. Sized by a
byte budget, a model with one group gets ``max_bytes // bytes_per_block``
blocks; with sliding-window or recurrent groups, the budget is first split so that
every group runs out at the same number of agents of ``reference_tokens`` tokens
each (a sliding group needs only ``ceil(W / B) + 1`` blocks per agent, a recurrent
group 2 states: its end state and the next turn's, or a snapshot).

The split then follows the workload: when a request does not fit one group while
others hold free blocks, the top of their id range is taken away and its bytes go to
the short group (:meth:`BlockPool.open_sequence`, :meth:`BlockPool.write_from_host`).
Blocks that live handles or running requests hold there first move down to free ids
(their handles, and the requests' fresh blocks and gathered matches, are re-pointed:
:meth:`KVCacheManager.resize_group`); cached content there, or on the free ids they move
to, is dropped. A short group grows by what it lacks, and up to doubling
when the others can spare it (at most half of what they could give), so a shifting
workload resizes rarely: each resize copies the slabs of the groups involved.
Invariant: the groups' blocks never hold more than ``max_bytes``. A request is refused
(PoolExhaustedError) only when the other groups' free blocks cannot make up the
difference, or when the ones they could give sit below a block held in place: by a
request not yet gathered or writing its final cache, a prefix or state being published,
a pin or a snapshot lease (a gather or a write may be using it outside the lock); that
lasts only until that step is done. A pool sized by ``num_blocks`` keeps its counts.

The block format (dense, or 8/4-bit affine-quantized at rest) is the spec's
(:attr:`ModelCacheSpec.format`): byte budgets count bytes at rest, so a 4-bit pool of
the same budget holds about 3.5x the blocks; gathers hand out dense caches whatever
the format. The spec, not the pool, carries it because everything that must agree on
it already compares specs: the manager's byte counts, the engine (``pool.spec ==
spec``) and saved files (a file of another format is an IncompatibleCacheError).

Not thread-safe by itself: the engine serialises access under its lock.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from kvpool.cache.manager import (
    CacheUsage,
    HeldSnapshots,
    KVCacheManager,
    PoolFull,
    PrefixMatch,
)
from kvpool.cache.sequence import HostWrite, SequenceCache, open_sequence
from kvpool.cache.spec import AttentionKind, ModelCacheSpec
from kvpool.cache.storage import KVStorage, LayerCodes, LayerKV, LayerState
from kvpool.cache.tables import NULL_BLOCK, CacheHandle
from kvpool.errors import InvalidRequestError, PoolAllocationError

_Rows = TypeVar("_Rows", LayerKV, LayerCodes)
_Opened = TypeVar("_Opened", SequenceCache, HostWrite)

StorageFactory = Callable[[ModelCacheSpec, tuple[int, ...]], KVStorage]

DEFAULT_REFERENCE_TOKENS = 8192
"""Context length the budget split between layer groups is tuned for."""


MAX_NUM_BLOCKS = 2**31 - 1  # block ids are int32 in the C++ core
BOOKKEEPING_BYTES_PER_BLOCK = 12  # the C++ core's ref count and two links, int32 each


def physical_memory_bytes() -> int | None:
    """The memory this machine gives the process, or None if it cannot tell.

    Linux: ``MemTotal`` of ``/proc/meminfo``, bounded by the cgroup (v2) limit
    ``/sys/fs/cgroup/memory.max`` when one is set; elsewhere the physical pages
    (``os.sysconf``).
    """
    total: int | None = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        total = None
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        limit = "max"
    if limit.isdigit():
        total = min(total, int(limit))
    return total if total > 0 else None


def check_pool_fits(spec: ModelCacheSpec, blocks_per_group: Sequence[int]) -> None:
    """Raise InvalidRequestError unless the groups' blocks of ``spec`` fit this machine.

    The bound is the machine's memory (:func:`physical_memory_bytes`), checked
    before anything is allocated: a pool past it could only swap, be killed
    by the OOM killer or crash inside MLX.
    """
    for n in blocks_per_group:
        if n > MAX_NUM_BLOCKS:
            raise InvalidRequestError(
                f"num_blocks {n} is more than the {MAX_NUM_BLOCKS} a pool can hold"
            )
    memory = physical_memory_bytes()
    needed = sum(
        n * (spec.group_bytes_per_block(g) + BOOKKEEPING_BYTES_PER_BLOCK)
        for g, n in enumerate(blocks_per_group)
    )
    if memory is not None and needed > memory:
        raise InvalidRequestError(
            f"a pool of {sum(blocks_per_group)} blocks ({spec.bytes_per_block / 2**20:.2f} MiB "
            f"for one in every group) needs {needed / 2**20:,.0f} MiB, more than this "
            f"machine's memory ({memory / 2**20:,.0f} MiB)"
        )


def _default_storage(spec: ModelCacheSpec, blocks_per_group: tuple[int, ...]) -> KVStorage:
    from kvpool.mlx.slabs import make_slab_storage

    return make_slab_storage(spec, blocks_per_group)


RECURRENT_BLOCKS_PER_AGENT = 2
"""State blocks a reference agent counts for in a recurrent group's share of a budget."""


def split_budget(
    spec: ModelCacheSpec, max_bytes: int, reference_tokens: int = DEFAULT_REFERENCE_TOKENS
) -> tuple[int, ...]:
    """Blocks per group for a budget of ``max_bytes`` (see the module docstring).

    Every group gets at least one block; raises InvalidRequestError when the
    budget cannot hold one block of every group.
    """
    groups = spec.groups
    per_block = [spec.group_bytes_per_block(g) for g in range(len(groups))]
    if max_bytes < sum(per_block):
        raise InvalidRequestError(
            f"a budget of {max_bytes} bytes holds no block of every layer group "
            f"({sum(per_block)} bytes for one block each: {spec.describe()})"
        )
    if len(groups) == 1:
        return (max_bytes // per_block[0],)
    size = spec.block_tokens
    per_agent = []
    for group in groups:
        blocks = -(-reference_tokens // size)
        if group.kind is AttentionKind.RECURRENT:
            # one state at the end, and one for the turn in flight (or a snapshot)
            blocks = RECURRENT_BLOCKS_PER_AGENT
        elif group.window is not None:
            blocks = min(blocks, -(-group.window // size) + 1)
        per_agent.append(blocks)
    agent_bytes = sum(n * b for n, b in zip(per_agent, per_block, strict=True))
    agents = max_bytes / agent_bytes
    counts = [max(1, int(agents * n)) for n in per_agent]
    while sum(c * b for c, b in zip(counts, per_block, strict=True)) > max_bytes:
        g = max(range(len(counts)), key=lambda i: counts[i] * per_block[i])
        counts[g] -= 1
    return tuple(counts)


class BlockPool:
    """Blocks of ``spec.block_tokens`` positions for every layer group of ``spec``.

    Size it with exactly one of ``num_blocks`` (that many blocks in every group)
    or ``max_bytes`` (a budget of K and V bytes over all groups, see
    :func:`split_budget`). The storage is allocated up front. ``key_salt`` (e.g.
    the model fingerprint) goes into every prefix key.
    Sizes are checked against the machine's memory before anything is allocated
    (:func:`check_pool_fits`, InvalidRequestError); an allocation that fails
    anyway raises PoolAllocationError.
    """

    def __init__(
        self,
        spec: ModelCacheSpec,
        *,
        num_blocks: int | None = None,
        max_bytes: int | None = None,
        storage: StorageFactory = _default_storage,
        reference_tokens: int = DEFAULT_REFERENCE_TOKENS,
        key_salt: str = "",
    ) -> None:
        if (num_blocks is None) == (max_bytes is None):
            raise InvalidRequestError("give exactly one of num_blocks or max_bytes")
        for name, value in (("num_blocks", num_blocks), ("max_bytes", max_bytes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise InvalidRequestError(f"{name} must be an int, got {value!r}")
        if max_bytes is not None:
            blocks_per_group = split_budget(spec, max_bytes, reference_tokens)
        else:
            assert num_blocks is not None
            if num_blocks < 1:
                raise InvalidRequestError(f"num_blocks must be >= 1, got {num_blocks}")
            blocks_per_group = (num_blocks,) * len(spec.groups)
        check_pool_fits(spec, blocks_per_group)
        self.spec = spec
        self.max_bytes = max_bytes
        self.num_resizes = 0  # budget moves between groups (see the module docstring)
        self.num_blocks_moved = 0  # held blocks moved down to free ids by those moves
        self._group_of_layer = spec.group_of_layer()
        # guards the manager's bookkeeping; K/V reads and writes of blocks one holds don't need it
        self._lock = threading.RLock()
        try:
            self.manager = KVCacheManager(spec, blocks_per_group, key_salt=key_salt)
            self._storage = storage(spec, blocks_per_group)
        except (MemoryError, RuntimeError) as exc:  # MLX reports a failed malloc as RuntimeError
            raise PoolAllocationError(
                f"could not allocate a pool of {blocks_per_group} blocks per layer group "
                f"({spec.bytes_per_block} bytes for one in every group): {exc}"
            ) from exc

    @property
    def storage(self) -> KVStorage:
        """The K/V bytes (for inspection and tests; the pool is their only writer)."""
        return self._storage

    # -- capacity -------------------------------------------------------------

    @property
    def blocks_per_group(self) -> tuple[int, ...]:
        """Each group's blocks now (a budget-sized pool moves them between groups)."""
        return tuple(self.manager.num_blocks(g) for g in range(len(self.spec.groups)))

    @property
    def num_blocks(self) -> int:
        """Blocks over all groups."""
        return sum(self.blocks_per_group)

    def max_group_blocks(self, group: int) -> int:
        """The most blocks group ``group`` can ever have: its count in a pool sized by
        ``num_blocks``; in a budget-sized one, what the budget holds with one block left
        to every other group."""
        if self.max_bytes is None:
            return self.manager.num_blocks(group)
        others = sum(
            self.spec.group_bytes_per_block(h) for h in range(len(self.spec.groups)) if h != group
        )
        return (self.max_bytes - others) // self.spec.group_bytes_per_block(group)

    @property
    def num_free(self) -> int:
        """Allocatable blocks over all groups (cached-free ones included)."""
        return self.usage().num_free

    @property
    def num_used(self) -> int:
        return self.usage().num_used

    @property
    def num_cached(self) -> int:
        return self.usage().num_cached

    @property
    def num_handles(self) -> int:
        """Live handles (agents' caches) in the pool."""
        return self.usage().num_handles

    @property
    def bytes_total(self) -> int:
        return self.usage().bytes_total

    @property
    def bytes_used(self) -> int:
        return self.usage().bytes_used

    def usage(self) -> CacheUsage:
        """Blocks and bytes per group, and the prefix cache's counters."""
        with self._lock:
            return self.manager.usage()

    def num_shared_blocks(self) -> int:
        """Blocks held by more than one holder (O(num_blocks): for reports, not hot paths)."""
        return self.manager.num_shared_blocks()

    def handle_bytes(self, handle: CacheHandle) -> int:
        """Bytes of the blocks ``handle`` holds (shared ones counted in full)."""
        return sum(
            len(t.held) * self.spec.group_bytes_per_block(g) for g, t in enumerate(handle.tables)
        )

    def check_invariants(self) -> None:
        with self._lock:
            self.manager.check_invariants()

    def max_context_tokens(self) -> int:
        """The longest sequence the pool could hold: the fewest positions any group without
        a window can get (:meth:`max_group_blocks`); sliding and recurrent groups need a
        bounded number of blocks whatever the length. All blocks when every group has one."""
        unbounded = [
            g
            for g, group in enumerate(self.spec.groups)
            if group.window is None and group.kind is not AttentionKind.RECURRENT
        ]
        if not unbounded:
            return self.num_blocks * self.spec.block_tokens
        return min(self.max_group_blocks(g) for g in unbounded) * self.spec.block_tokens

    # -- handles --------------------------------------------------------------

    def is_live(self, handle: CacheHandle) -> bool:
        """True while ``handle`` is live in this pool."""
        return self.manager.is_live(handle)

    def check_live(self, handle: object) -> CacheHandle:
        """Return ``handle`` if it is live here, else raise InvalidRequestError."""
        return self.manager.check_live(handle)

    def release(self, handle: CacheHandle) -> int:
        """Return an agent's cache to the pool (its published blocks stay cached)."""
        with self._lock:
            return self.manager.release(handle)

    def fork(self, handle: CacheHandle, agent_id: str, length: int | None = None) -> CacheHandle:
        """A new live handle of ``agent_id`` sharing every block of ``handle`` (or of its
        first ``length`` tokens). No K/V copied: see
        :meth:`~kvpool.cache.manager.KVCacheManager.fork`."""
        with self._lock:
            return self.manager.fork(handle, agent_id, length)

    # -- requests -------------------------------------------------------------

    def lookup(
        self,
        tokens: Sequence[int],
        *,
        salt: str = "",
        own: CacheHandle | None = None,
        limit: int | None = None,
        shared: bool = True,
    ) -> PrefixMatch:
        """The longest prefix of ``tokens`` the pool holds (a query: nothing is held)."""
        with self._lock:
            return self.manager.lookup(tokens, salt=salt, own=own, limit=limit, shared=shared)

    def open_sequence(
        self,
        agent_id: str,
        tokens: Sequence[int],
        max_tokens: int,
        *,
        own: CacheHandle | None = None,
        salt: str = "",
        shared: bool = True,
    ) -> SequenceCache | PoolFull:
        """A :class:`~kvpool.cache.sequence.SequenceCache` holding what a request for
        ``tokens`` needs (the reused prefix and room for ``max_tokens`` more), or
        PoolFull with nothing changed."""

        def attempt() -> SequenceCache | PoolFull:
            return open_sequence(
                self.manager, self._storage, self._lock, agent_id, tokens, max_tokens,
                own=own, salt=salt, shared=shared, room=self._make_room_for,
            )  # fmt: skip

        return self._with_room(attempt)

    # -- persistence ----------------------------------------------------------

    def read_layers(
        self, handle: CacheHandle, layers: Sequence[int], start: int, stop: int
    ) -> list[LayerKV]:
        """Positions ``[start, stop)`` of ``layers`` of a live handle, on the host."""
        with self._lock:  # the pool may move a handle's blocks (resize_group)
            self.check_live(handle)
            tables = tuple(t.block_ids for t in handle.tables)
            return self._storage.read_layers(tables, layers, start, stop)

    def read_codes(
        self, handle: CacheHandle, layers: Sequence[int], start: int, stop: int
    ) -> list[LayerCodes]:
        """Positions ``[start, stop)`` of ``layers`` of a live handle as its quantized
        blocks hold them (codes, scales, biases), on the host. Quantized pools only."""
        with self._lock:  # the pool may move a handle's blocks (resize_group)
            self.check_live(handle)
            tables = tuple(t.block_ids for t in handle.tables)
            return self._storage.read_codes(tables, layers, start, stop)

    def read_states(self, handle: CacheHandle, layers: Sequence[int]) -> list[LayerState]:
        """The end states of recurrent ``layers`` of a live handle, on the host."""
        with self._lock:  # the pool may move a handle's blocks (resize_group)
            self.check_live(handle)
            tables = tuple(t.block_ids for t in handle.tables)
            return self._storage.read_states(tables, layers, handle.total_tokens)

    def write_from_host(
        self, agent_id: str, tokens: Sequence[int], *, salt: str = ""
    ) -> HostWrite | PoolFull:
        """A :class:`~kvpool.cache.sequence.HostWrite` for a cache of exactly ``tokens``
        written from the host (whole blocks the pool holds for a prefix are shared), or
        PoolFull with nothing changed."""
        return self._with_room(
            lambda: HostWrite.open(
                self.manager, self._storage, self._lock, agent_id, tokens, salt=salt
            )
        )

    # -- the budget follows the workload --------------------------------------

    def _with_room(self, attempt: Callable[[], _Opened | PoolFull]) -> _Opened | PoolFull:
        """``attempt()``, again after moving budget to each group it finds short.

        A group that received budget is never a donor within the same call, so this
        ends after at most one move per group. A final PoolFull says ``never_fits``
        only when the group could not hold the request with the whole budget.
        """
        protected: set[int] = set()
        while True:
            got = attempt()
            if not isinstance(got, PoolFull):
                return got
            if got.group in protected or not self._make_room(got, protected):
                return self._final(got)
            protected.add(got.group)

    def _make_room_for(self, full: PoolFull) -> bool:
        """:meth:`_make_room` for a running sequence's prefix or snapshot (one move)."""
        return self._make_room(full, set())

    def _final(self, full: PoolFull) -> PoolFull:
        if self.max_bytes is None:
            return full
        most = self.max_group_blocks(full.group)
        return dataclasses.replace(full, capacity=most, never_fits=full.needed > most)

    def _make_room(self, full: PoolFull, protected: set[int]) -> bool:
        """Move budget to ``full.group`` so it has ``full.needed - full.free`` more free
        blocks, taking blocks off the top of the other groups (not ``protected``) after
        moving the ones handles and requests hold there down, where they can move
        (:meth:`KVCacheManager.spare_blocks`).
        False, and nothing changed, if they cannot spare enough."""
        if self.max_bytes is None:
            return False
        g = full.group
        per_block = [self.spec.group_bytes_per_block(h) for h in range(len(self.spec.groups))]
        short = (full.needed - full.free) * per_block[g]
        with self._lock:
            counts = list(self.blocks_per_group)
            slack = self.max_bytes - sum(n * b for n, b in zip(counts, per_block, strict=True))
            spare = {
                h: self.manager.spare_blocks(h)
                for h in range(len(counts))
                if h != g and h not in protected
            }
            can_give = slack + sum(n * per_block[h] for h, n in spare.items())
            if short <= 0 or can_give < short:
                return False
            want = max(short, min(counts[g] * per_block[g], can_give // 2))
            got = slack
            for h in sorted(spare, key=lambda h: spare[h] * per_block[h], reverse=True):
                if got >= want:
                    break
                take = min(spare[h], -(-(want - got) // per_block[h]))
                counts[h] -= take
                got += take * per_block[h]
            counts[g] += got // per_block[g]
            moves: list[dict[int, int]] = [{} for _ in counts]
            for h, n in enumerate(counts):
                if n < self.manager.num_blocks(h):
                    moves[h] = self.manager.resize_group(h, n)
            self.manager.resize_group(g, counts[g])
            self._storage.resize(counts, moves)
            self.num_resizes += 1
            self.num_blocks_moved += sum(len(m) for m in moves)
        return True

    def write_cache(
        self,
        agent_id: str,
        tokens: Sequence[int],
        kvs: Sequence[LayerKV | LayerState],
        *,
        valid_from: int = 0,
        salt: str = "",
    ) -> CacheHandle:
        """A handle of ``tokens`` whose K/V comes from the host (``kvs``: every layer,
        sliding ones from ``valid_from``, recurrent ones as their end state); blocks the
        pool holds for a prefix are
        shared instead. Raises PoolExhaustedError (nothing taken) if it does not fit."""
        got = self.write_from_host(agent_id, tokens, salt=salt)
        if isinstance(got, PoolFull):
            raise got.error(f"a cache of {len(tokens)} tokens")
        with got as write:
            write.write(kvs)
            return write.commit([valid_from if g.window else 0 for g in self.spec.groups])

    # -- sliding-window blocks of a prefix (a shared tier) ----------------------

    def window_lengths(self, handle: CacheHandle) -> list[int]:
        """Block boundaries ``0 < e <= handle.total_tokens``, shortest first, at which the
        pool holds every whole block each sliding-window group needs for a lookup of
        exactly ``handle.token_ids[:e]`` (see
        :meth:`~kvpool.cache.manager.KVCacheManager.window_lengths`). Changes nothing;
        empty for a model without sliding-window layers."""
        self.check_live(handle)
        with self._lock:
            return self.manager.window_lengths(handle)

    def read_window(
        self, handle: CacheHandle, group: int, j: int, layers: Sequence[int]
    ) -> list[LayerKV] | list[LayerCodes] | None:
        """Whole block ``j`` of ``layers`` (of sliding-window group ``group``) from the block
        the pool holds for it under the block key of a live handle's tokens, on the host, as
        the blocks hold them (codes for a quantized pool); None if it holds none. Read under
        the pool's lock: a cached-free block cannot be evicted and overwritten meanwhile."""
        self.check_live(handle)
        size = self.spec.block_tokens
        with self._lock:
            block = self.manager.window_block(handle, group, j)
            if block == NULL_BLOCK:
                return None
            tables = tuple(
                (NULL_BLOCK,) * j + (block if g == group else NULL_BLOCK,)
                for g in range(len(self.spec.groups))
            )
            if self.spec.format.is_quantized:
                return self._storage.read_codes(tables, layers, j * size, (j + 1) * size)
            return self._storage.read_layers(tables, layers, j * size, (j + 1) * size)

    # -- recurrent-state snapshots (files, a shared tier) ---------------------

    def snapshot_lengths(self, handle: CacheHandle) -> list[int]:
        """Prefix lengths ``0 < b < handle.total_tokens``, shortest first, at which the pool
        holds a state snapshot of every recurrent group after exactly
        ``handle.token_ids[:b]``: block boundaries and prompt ends (see
        :meth:`~kvpool.cache.manager.KVCacheManager.snapshot_tables`). Changes nothing;
        empty for a model without recurrent layers."""
        self.check_live(handle)
        with self._lock:
            return list(self.manager.snapshot_tables(handle))

    def read_snapshot(
        self, handle: CacheHandle, length: int, layers: Sequence[int]
    ) -> list[LayerState] | None:
        """The states of recurrent ``layers`` after the first ``length`` tokens of a live
        handle (``0 < length < total_tokens``), from the snapshot the pool holds there, on
        the host; None if it holds none. Read under the pool's lock: a cached-free snapshot
        cannot be evicted and overwritten meanwhile."""
        self.check_live(handle)
        if not 0 < length < handle.total_tokens:
            raise InvalidRequestError(
                f"a snapshot after {length} tokens of a {handle.total_tokens}-token cache: it "
                f"must hold 1..{handle.total_tokens - 1}"
            )
        with self._lock:
            tables = self.manager.snapshot_tables(handle, only=length).get(length)
            if tables is None:
                return None
            return self._storage.read_states(tables, layers, length)

    def hold_snapshots(self, handle: CacheHandle) -> HeldSnapshots:
        """Hold the snapshots of :meth:`snapshot_lengths` until :meth:`release_snapshots`,
        so :meth:`read_snapshot` finds each of them (a file lists them before writing)."""
        self.check_live(handle)
        with self._lock:
            return self.manager.hold_snapshots(handle)

    def release_snapshots(self, held: HeldSnapshots) -> None:
        with self._lock:
            self.manager.release_snapshots(held)

    def write_snapshot(self, handle: CacheHandle, states: Sequence[LayerState]) -> bool:
        """Register ``states`` (every recurrent layer's, after the same ``length < total``
        tokens of a live handle) as the pool's snapshot of that prefix, published as a
        prompt's is; the handle's K/V is not touched. True if the pool holds it now (also
        when it held one already: then nothing is written); False, and nothing changed,
        without a free block in a recurrent group (after moving budget to it, if it can)."""
        lengths = {st.num_tokens for st in states}
        layers = sorted(st.layer for st in states)
        recurrent = [
            i for i, layer in enumerate(self.spec.layers) if layer.kind is AttentionKind.RECURRENT
        ]
        if len(lengths) != 1 or layers != recurrent:
            raise InvalidRequestError(
                f"a snapshot needs the states of layers {recurrent} after one length, got "
                f"layers {layers} after {sorted(lengths)}"
            )
        (length,) = lengths
        with self._lock:
            self.check_live(handle)
            if self.manager.snapshot_tables(handle, only=length):
                return True
            snap = self.manager.place_snapshot(handle, length)
            if isinstance(snap, PoolFull) and self._make_room_for(snap):
                snap = self.manager.place_snapshot(handle, length)
        if isinstance(snap, PoolFull):
            return False
        try:
            self._storage.write_states(snap.tables, states)
        except BaseException:
            with self._lock:
                self.manager.abort_snapshot(snap)
            raise
        with self._lock:
            self.manager.commit_snapshot(snap)
        return True
