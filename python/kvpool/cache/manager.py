"""KVCacheManager: the only owner of blocks (bookkeeping only, no MLX).

One C++ :class:`kvpool._blocks.BlockAllocator` per layer group holds that
group's blocks, reference counts, the LRU queue of free and cached-free blocks
and the prefix-key index. Everything else (engine, store, persistence) asks the
manager and holds only :class:`~kvpool.cache.tables.CacheHandle` and
:class:`Reservation` records it hands out.

A request's life, all-or-nothing at every step::

    match = lookup(tokens, salt, own)        # longest prefix any agent's blocks supply
    res = reserve(agent, tokens, n, match)   # Reservation, or PoolFull (nothing changed)
    ...gather match.read, release_pin(res)   # partial blocks stay pinned until read
    tables = place(res, length)              # where the final cache is written
    ...write the final cache into tables
    handle = commit(res, tokens, tables, written_from)   # or rollback(res)

Reuse: a block wholly inside the matched prefix is *shared* (its reference
count goes up, zero copy); the block holding the first unmatched token is only
*read* up to that token (token-granular reuse) and the request writes its own
copy. A finished sequence's fully written blocks are *published* under chained
keys (:mod:`kvpool.cache.prefix`); when the last holder lets go they stay
*cached* (free but findable) until an allocation evicts them, least recently
freed first. Tokens are compared before any block is handed out, so a key
collision can never give one sequence another's K/V, and a different salt
(tenant) never matches at all.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvpool import _blocks
from kvpool.cache.groups import GroupPolicy
from kvpool.cache.prefix import block_keys, chain_key, root_key
from kvpool.cache.spec import ModelCacheSpec
from kvpool.cache.tables import NULL_BLOCK, CacheHandle, GroupTable, repoint_blocks
from kvpool.errors import InvalidRequestError, PoolExhaustedError

__all__ = [
    "CacheUsage",
    "GroupMatch",
    "GroupUsage",
    "HeldSnapshots",
    "KVCacheManager",
    "PoolFull",
    "PrefixMatch",
    "Reservation",
    "StateLease",
]


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass(frozen=True, slots=True)
class GroupMatch:
    """What one group supplies for a matched prefix of ``p`` tokens.

    ``shared``: (index, block id) of whole blocks taken by reference, indices
    ``[lo // B, p // B)``. ``pinned``: the block read only up to ``p`` (at
    index ``p // B``), if ``p`` is not a block boundary. ``read``: the table
    the gather reads, ``ceil(p / B)`` entries, NULL where the group needs
    nothing. ``valid_from``: first position the shared blocks hold.
    """

    shared: tuple[tuple[int, int], ...]
    pinned: tuple[int, ...]
    read: tuple[int, ...]
    valid_from: int


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """The longest prompt prefix every group can supply: ``prompt[:num_tokens]``."""

    num_tokens: int
    groups: tuple[GroupMatch, ...]

    @property
    def read_tables(self) -> tuple[tuple[int, ...], ...]:
        return tuple(g.read for g in self.groups)


@dataclass(frozen=True, slots=True)
class PoolFull:
    """Why a reservation could not be made (nothing was taken).

    ``never_fits``: the request needs more than the whole group holds.
    """

    group: int
    needed: int
    free: int
    capacity: int
    never_fits: bool

    def error(self, what: str) -> PoolExhaustedError:
        """The exception for callers: ``"<what> needs N blocks, F free (pool of C)"``."""
        return PoolExhaustedError(
            f"{what} needs {self.needed} blocks, {self.free} free (pool of {self.capacity})",
            needed=self.needed,
            free=self.free,
            capacity=self.capacity,
        )


def _moved_match(match: PrefixMatch, group: int, moves: dict[int, int]) -> PrefixMatch:
    """``match`` with group ``group``'s block ids moved (old id -> new id)."""
    gm = match.groups[group]
    moved = GroupMatch(
        tuple((j, moves.get(b, b)) for j, b in gm.shared),
        tuple(moves.get(b, b) for b in gm.pinned),
        tuple(moves.get(b, b) for b in gm.read),  # NULL entries are no ids: kept
        gm.valid_from,
    )
    groups = list(match.groups)
    groups[group] = moved
    return PrefixMatch(match.num_tokens, tuple(groups))


@dataclass(slots=True)
class Reservation:
    """Blocks held for one request between ``reserve`` and ``commit``/``rollback``.

    ``lease`` owns the shared and fresh blocks in every group, ``pin`` the
    partially read ones until :meth:`KVCacheManager.release_pin`. ``fresh[g]``
    are group ``g``'s blocks not yet placed at a position. Until ``writing`` (set by
    :meth:`KVCacheManager.place`, the final write's tables), nothing is written into the
    fresh blocks, so a resize may move them (it re-points ``fresh``); once ``read`` (the
    gather is done: :meth:`KVCacheManager.release_pin`), the match's shared blocks too (it
    re-points ``match``): nothing reads or writes them outside the pool's lock until then.
    """

    agent_id: str
    tokens: tuple[int, ...]
    max_tokens: int
    salt: str
    match: PrefixMatch
    lease: int
    pin: int
    fresh: list[list[int]]
    replacing: CacheHandle | None
    open: bool = True
    writing: bool = False
    read: bool = False


@dataclass(slots=True)
class StateLease:
    """Blocks taken for one state snapshot of a live handle's prefix, between
    :meth:`KVCacheManager.place_snapshot` and ``commit_snapshot``/``abort_snapshot``.

    ``tables`` has ``ceil(len(tokens) / B)`` entries per group: the state's block at the
    last entry of each recurrent group, NULL elsewhere (as :meth:`~KVCacheManager.place_state`
    hands out). ``tokens`` are exactly the prefix the state follows.
    """

    tokens: tuple[int, ...]
    salt: str
    lease: int
    tables: tuple[tuple[int, ...], ...]
    open: bool = True


@dataclass(frozen=True, slots=True)
class HeldSnapshots:
    """The state snapshots of a handle's prefix held under ``lease`` (so no allocation
    evicts them) from :meth:`KVCacheManager.hold_snapshots` until ``release_snapshots``.
    ``lengths``: the prefix lengths they follow, shortest first."""

    lease: int
    lengths: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class GroupUsage:
    num_blocks: int
    num_used: int  # held by a handle or a request
    num_free: int  # allocatable: never used, invalidated, or cached
    num_cached: int  # free but still findable by prefix
    num_evictions: int  # cached blocks whose content was dropped to allocate them
    bytes_per_block: int


@dataclass(frozen=True, slots=True)
class CacheUsage:
    """A snapshot of the pool's blocks and the prefix cache's counters."""

    groups: tuple[GroupUsage, ...]
    num_handles: int
    num_queries: int  # lookups that led to a reservation
    query_tokens: int  # prompt tokens those lookups covered
    hit_tokens: int  # ... of which came from the pool

    @property
    def hit_rate(self) -> float:
        """Prefix-cache hit rate as vLLM defines it: hit tokens / queried tokens."""
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    @property
    def num_blocks(self) -> int:
        return sum(g.num_blocks for g in self.groups)

    @property
    def num_used(self) -> int:
        return sum(g.num_used for g in self.groups)

    @property
    def num_free(self) -> int:
        return sum(g.num_free for g in self.groups)

    @property
    def num_cached(self) -> int:
        return sum(g.num_cached for g in self.groups)

    @property
    def num_evictions(self) -> int:
        return sum(g.num_evictions for g in self.groups)

    @property
    def bytes_total(self) -> int:
        return sum(g.num_blocks * g.bytes_per_block for g in self.groups)

    @property
    def bytes_used(self) -> int:
        return sum(g.num_used * g.bytes_per_block for g in self.groups)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready numbers (the totals, and each group's)."""
        return {
            "num_blocks": self.num_blocks,
            "num_used": self.num_used,
            "num_free": self.num_free,
            "num_cached": self.num_cached,
            "num_evictions": self.num_evictions,
            "bytes_total": self.bytes_total,
            "bytes_used": self.bytes_used,
            "num_handles": self.num_handles,
            "prefix_query_tokens": self.query_tokens,
            "prefix_hit_tokens": self.hit_tokens,
            "prefix_hit_rate": self.hit_rate,
            "groups": [dataclasses.asdict(g) for g in self.groups],
        }


@dataclass(slots=True)
class _Counters:
    num_queries: int = 0
    query_tokens: int = 0
    hit_tokens: int = 0


@dataclass(slots=True)
class _Lookup:
    """One lookup's inputs, shared by the per-group planners."""

    tokens: Sequence[int]
    keys: list[int]
    root: int
    own: CacheHandle | None
    own_common: int  # common prefix of own.token_ids and tokens
    shared: bool  # search every agent's published blocks, not only own's


class KVCacheManager:
    """Blocks of every layer group of ``spec``: ``blocks_per_group[g]`` for group ``g``.

    ``key_salt`` (e.g. the model fingerprint) goes into every prefix key, so
    keys from two models never meet. Not thread-safe: the caller serialises
    (the engine holds its lock around every call).
    """

    def __init__(
        self, spec: ModelCacheSpec, blocks_per_group: Sequence[int], *, key_salt: str = ""
    ) -> None:
        groups = spec.groups
        if len(blocks_per_group) != len(groups):
            raise InvalidRequestError(
                f"{len(groups)} layer groups need {len(groups)} block counts, "
                f"got {len(blocks_per_group)}"
            )
        for g, n in enumerate(blocks_per_group):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise InvalidRequestError(f"group {g} needs >= 1 block, got {n!r}")
        self.spec = spec
        self.block_tokens = spec.block_tokens
        self.policies = tuple(GroupPolicy(g.kind, g.window, spec.block_tokens) for g in groups)
        self._allocators = [_blocks.BlockAllocator(n, spec.block_tokens) for n in blocks_per_group]
        self._recurrent = [g for g, p in enumerate(self.policies) if p.is_recurrent]
        self._has_recurrent = bool(self._recurrent)
        # parent key -> lengths (< B) of prompt-end snapshots published after it (checked
        # against the allocators on use: an evicted one is simply not found), and the same
        # (parent, length) entries least recently published first, to bound the index
        self._snapshot_lengths: dict[int, set[int]] = {}
        self._snapshot_order: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._keys_memo: tuple[CacheHandle, list[int]] | None = None  # see _handle_keys
        self._bytes_per_block = tuple(spec.group_bytes_per_block(g) for g in range(len(groups)))
        self._key_salt = key_salt
        self._owner_ids = itertools.count(1)
        self._handles: dict[int, CacheHandle] = {}  # handle id (its lease) -> the live handle
        self._reservations: dict[int, Reservation] = {}  # lease -> an open reservation
        self._counters = _Counters()

    # -- handles --------------------------------------------------------------

    def is_live(self, handle: CacheHandle) -> bool:
        """True while ``handle`` is a live handle of *this* manager."""
        return self._handles.get(handle.handle_id) is handle

    def check_live(self, handle: object) -> CacheHandle:
        """Return ``handle`` if it is live here, else raise InvalidRequestError."""
        if not isinstance(handle, CacheHandle):
            raise InvalidRequestError(f"cache must be a CacheHandle or None, got {type(handle)}")
        if not self.is_live(handle):
            raise InvalidRequestError(
                f"the cache of agent {handle.agent_id!r} ({handle.total_tokens} tokens) is not "
                "live in this pool: it was released, superseded by a later generation, or "
                "belongs to another pool"
            )
        return handle

    def release(self, handle: CacheHandle) -> int:
        """Drop a live handle's blocks; returns how many reached reference count 0."""
        self.check_live(handle)
        del self._handles[handle.handle_id]
        return sum(
            self._free_last_first(alloc, handle.handle_id, table.block_ids)
            for alloc, table in zip(self._allocators, handle.tables, strict=True)
        )

    def fork(self, handle: CacheHandle, agent_id: str, length: int | None = None) -> CacheHandle:
        """A new live handle of ``agent_id`` holding every block of ``handle`` by reference
        (``length``: only its first ``length`` tokens, the blocks that hold them).

        Zero copy: each block's ``ref_cnt`` goes up by one, no block is allocated and no K/V
        is written. The shared partial last block (if ``total_tokens % B``) stays read-only
        like every shared block: a branch that extends it reads its filled positions and
        writes its own copy at its next commit (the copy any continuation makes), so
        neither branch sees the other's tokens. Releasing either handle leaves the other
        intact::

            parent  tokens t0..t9  full group [ 12, 3, 40 ]   (40: 2 of 4 positions)
            child   tokens t0..t9  full group [ 12, 3, 40 ]   ref_cnt of 12, 3, 40: 2
        """
        self.check_live(handle)
        n = handle.total_tokens if length is None else length
        if not 1 <= n <= handle.total_tokens:
            raise InvalidRequestError(
                f"a fork of {n} tokens of a {handle.total_tokens}-token cache: it must hold "
                f"1..{handle.total_tokens}"
            )
        num_entries = -(-n // self.block_tokens)
        tables = tuple(
            GroupTable(t.block_ids[:num_entries], min(t.valid_from, n)) for t in handle.tables
        )
        lease = next(self._owner_ids)
        try:
            for alloc, table in zip(self._allocators, tables, strict=True):
                alloc.share(lease, list(table.held))
        except BaseException:
            for alloc in self._allocators:
                alloc.release(lease)
            raise
        child = dataclasses.replace(
            handle,
            agent_id=agent_id,
            token_ids=handle.token_ids[:n],
            tables=tables,
            handle_id=lease,
        )
        self._handles[lease] = child
        return child

    @staticmethod
    def _free_last_first(alloc: _blocks.BlockAllocator, owner: int, table: Sequence[int]) -> int:
        """Drop ``owner``'s blocks, the last position first: the cached-free queue then
        evicts a chain's tail before its head (which more prompts share). Returns how
        many reached reference count 0."""
        held = [b for b in reversed(table) if b != NULL_BLOCK]
        alloc.free(owner, held)
        alloc.release(owner)
        return sum(1 for b in held if alloc.ref_cnt(b) == 0)

    @property
    def handles(self) -> list[CacheHandle]:
        return list(self._handles.values())

    # -- lookup ---------------------------------------------------------------

    def root(self, salt: str) -> int:
        """The prefix-key root of tenant ``salt``."""
        return root_key(self._key_salt, salt)

    def lookup(
        self,
        tokens: Sequence[int],
        *,
        salt: str = "",
        own: CacheHandle | None = None,
        limit: int | None = None,
        shared: bool = True,
    ) -> PrefixMatch:
        """The longest prefix of ``tokens`` (at most ``limit``, default ``len - 1``:
        one token must remain to be fed) that every group can supply, from any
        live or cached block of tenant ``salt`` (unless ``shared`` is False) or
        from ``own`` (a live handle of the same tenant). Changes nothing."""
        n = len(tokens)
        limit = n - 1 if limit is None else min(limit, n)
        if own is not None:
            self.check_live(own)
            if own.salt != salt:
                raise InvalidRequestError(
                    f"the cache of agent {own.agent_id!r} was computed under another cache_salt"
                )
        root = self.root(salt)
        ctx = _Lookup(
            tokens,
            block_keys(tokens, self.block_tokens, root),
            root,
            own,
            common_prefix_len(own.token_ids, tokens) if own is not None else 0,
            shared,
        )
        p = min(self._reach(ctx), max(limit, 0))
        size = self.block_tokens
        candidates = [p, *(j * size for j in range(p // size, -1, -1) if j * size < p)]
        if self._has_recurrent:
            # a recurrent group supplies a prefix only where a state was taken: add the
            # lengths of the states the pool holds for prefixes of the prompt
            extra = set(self._state_lengths(ctx, p))
            if own is not None and ctx.own_common == own.total_tokens < p:
                extra.add(own.total_tokens)  # the end of the agent's own sequence
            candidates = sorted({*candidates, *extra}, reverse=True)
        for candidate in candidates:
            plans = [self._plan(g, candidate, ctx) for g in range(len(self.policies))]
            if all(plan is not None for plan in plans):
                return PrefixMatch(candidate, tuple(plan for plan in plans if plan is not None))
        raise AssertionError("a match of 0 tokens always exists: this indicates a bug")

    def _reach(self, ctx: _Lookup) -> int:
        """Tokens the full-attention groups can supply (the whole prompt if none)."""
        reach = len(ctx.tokens)
        for g, policy in enumerate(self.policies):
            if policy.is_full:
                reach = min(reach, self._group_reach(g, ctx))
        return reach

    def _group_reach(self, g: int, ctx: _Lookup) -> int:
        size, n = self.block_tokens, len(ctx.tokens)
        j = 0
        while (j + 1) * size <= n and self._whole(g, j, j * size, ctx) != NULL_BLOCK:
            j += 1
        return j * size + self._partial_len(g, j, ctx)

    def _whole(self, g: int, j: int, needed_from: int, ctx: _Lookup) -> int:
        """A block holding all of prompt block ``j`` (positions >= needed_from valid), or NULL."""
        size = self.block_tokens
        end = (j + 1) * size
        own_block = self._own_block(g, j, needed_from, end, ctx)
        if own_block != NULL_BLOCK:
            return own_block
        if j >= len(ctx.keys) or not ctx.shared:
            return NULL_BLOCK
        return int(self._allocators[g].lookup(ctx.keys[j], list(ctx.tokens[j * size : end])))

    def _own_block(self, g: int, j: int, needed_from: int, end: int, ctx: _Lookup) -> int:
        own = ctx.own
        if own is None or ctx.own_common < end:
            return NULL_BLOCK
        table = own.tables[g]
        if j >= len(table.block_ids) or table.valid_from > needed_from:
            return NULL_BLOCK
        return table.block_ids[j]

    def _partial_len(self, g: int, j: int, ctx: _Lookup) -> int:
        """Tokens of prompt block ``j`` that some block holds (0 if none)."""
        return self._partial(g, j, j * self.block_tokens, ctx)[1]

    def _partial(self, g: int, j: int, needed_from: int, ctx: _Lookup) -> tuple[int, int]:
        """(block, tokens) of the block that shares the most leading tokens with
        prompt block ``j``, with positions >= needed_from valid."""
        size, n = self.block_tokens, len(ctx.tokens)
        start, stop = j * size, min((j + 1) * size, n)
        if start >= n:
            return NULL_BLOCK, 0
        best, best_len = NULL_BLOCK, 0
        own = ctx.own
        if own is not None and ctx.own_common > start:
            table = own.tables[g]
            if (
                j < len(table.block_ids)
                and table.block_ids[j] != NULL_BLOCK
                and table.valid_from <= needed_from
            ):
                best, best_len = table.block_ids[j], min(ctx.own_common, stop) - start
        if not ctx.shared:
            return best, best_len
        parent = ctx.keys[j - 1] if j > 0 else ctx.root
        child, common = self._allocators[g].best_child(parent, list(ctx.tokens[start:stop]))
        if common > best_len:
            best, best_len = int(child), int(common)
        return best, best_len

    def _plan(self, g: int, p: int, ctx: _Lookup) -> GroupMatch | None:
        """Group ``g``'s part of a match of ``p`` tokens, or None if it cannot supply it."""
        if self.policies[g].is_recurrent:
            return self._plan_state(g, p, ctx)
        size = self.block_tokens
        lo = self.policies[g].needed_from(p)
        read = [NULL_BLOCK] * (-(-p // size))
        shared: list[tuple[int, int]] = []
        for j in range(lo // size, p // size):
            block = self._whole(g, j, max(lo, j * size), ctx)
            if block == NULL_BLOCK:
                return None
            shared.append((j, block))
            read[j] = block
        pinned: tuple[int, ...] = ()
        if p % size:
            j = p // size
            block, length = self._partial(g, j, max(lo, j * size), ctx)
            if length < p - j * size:
                return None
            read[j], pinned = block, (block,)
        valid_from = (p // size) * size
        if shared:
            j0, first = shared[0]
            valid_from = j0 * size
            own = ctx.own
            if own is not None and own.tables[g].block_ids[j0 : j0 + 1] == (first,):
                valid_from = max(valid_from, own.tables[g].valid_from)
        return GroupMatch(tuple(shared), pinned, tuple(read), valid_from)

    def _state_lengths(self, ctx: _Lookup, p: int) -> list[int]:
        """Prompt prefix lengths ``<= p``, not block boundaries, at which a recurrent group
        holds a published snapshot (taken at a prompt's end)."""
        if not ctx.shared or p == 0:
            return []
        size, out = self.block_tokens, []
        for j in range((p - 1) // size + 1):
            parent = ctx.keys[j - 1] if j > 0 else ctx.root
            lengths = self._snapshot_lengths.get(parent)
            if not lengths:
                continue
            start = j * size
            for n in sorted(lengths):
                if start + n > p:
                    break
                chunk = ctx.tokens[start : start + n]
                if any(self._exact_state(g, parent, chunk) != NULL_BLOCK for g in self._recurrent):
                    out.append(start + n)
        return out

    def _exact_state(self, g: int, parent: int, chunk: Sequence[int]) -> int:
        """A snapshot of group ``g`` after exactly ``chunk`` following ``parent``'s tokens
        (published under their own chain key, so only an exact prefix finds it), or NULL."""
        exact = chain_key(parent, chunk)
        alloc = self._allocators[g]
        child, common = alloc.best_child(exact, list(chunk))
        if child < 0 or common != len(chunk) or len(alloc.content_tokens(child)) != len(chunk):
            return NULL_BLOCK
        return int(child)

    def _plan_state(self, g: int, p: int, ctx: _Lookup) -> GroupMatch | None:
        """A recurrent group's part of a match of ``p`` tokens: the state after exactly
        ``p`` tokens, from ``own``'s table (its end, or a snapshot at a boundary) or a
        snapshot published under the block key of ``p`` (``p`` a block boundary). The
        state's block is shared when ``p`` is a boundary, else pinned until it is read
        (the request writes its own final state either way)."""
        if p == 0:
            return GroupMatch((), (), (), 0)
        size = self.block_tokens
        j = (p - 1) // size
        block = NULL_BLOCK
        own = ctx.own
        if (
            own is not None
            and ctx.own_common >= p
            and (own.total_tokens == p or (p % size == 0 and own.total_tokens > p))
        ):
            block = own.tables[g].block_ids[j]
        if block == NULL_BLOCK and p % size == 0 and ctx.shared and j < len(ctx.keys):
            block = int(self._allocators[g].lookup(ctx.keys[j], list(ctx.tokens[j * size : p])))
        if block == NULL_BLOCK and p % size and ctx.shared:
            parent = ctx.keys[j - 1] if j > 0 else ctx.root
            block = self._exact_state(g, parent, ctx.tokens[j * size : p])
        if block == NULL_BLOCK:
            return None
        read = (NULL_BLOCK,) * j + (block,)
        if p % size:
            return GroupMatch((), (block,), read, j * size)
        return GroupMatch(((j, block),), (), read, j * size)

    # -- reservations ---------------------------------------------------------

    def reserve(
        self,
        agent_id: str,
        tokens: Sequence[int],
        max_tokens: int,
        match: PrefixMatch,
        *,
        salt: str = "",
        replacing: CacheHandle | None = None,
    ) -> Reservation | PoolFull:
        """Hold what the request needs: the match's blocks and fresh blocks for
        ``len(tokens) + max_tokens`` positions, so its final write cannot run out.

        ``replacing`` (the agent's live handle, released at commit) stays held
        until then, which counts against what fits. Returns PoolFull and
        changes nothing when a group has too few free blocks.
        """
        total = len(tokens) + max_tokens
        fresh_counts: list[int] = []
        for g, (alloc, gm) in enumerate(zip(self._allocators, match.groups, strict=True)):
            fresh = self._fresh_needed(g, total, match.num_tokens)
            taken = {b for _, b in gm.shared} | set(gm.pinned)
            revived = sum(1 for b in taken if alloc.ref_cnt(b) == 0)
            kept = 0
            if replacing is not None:
                kept = len(set(replacing.tables[g].held) - taken)
            capacity = int(alloc.num_blocks)
            if fresh + len(taken) + kept > capacity:
                return PoolFull(g, fresh + len(taken) + kept, int(alloc.num_free), capacity, True)
            if fresh > int(alloc.num_free) - revived:
                return PoolFull(g, fresh, int(alloc.num_free) - revived, capacity, False)
            fresh_counts.append(fresh)
        lease, pin = next(self._owner_ids), next(self._owner_ids)
        fresh_ids: list[list[int]] = []
        try:
            for alloc, gm, n in zip(self._allocators, match.groups, fresh_counts, strict=True):
                alloc.share(lease, [b for _, b in gm.shared])
                alloc.share(pin, list(gm.pinned))
                fresh_ids.append([int(b) for b in alloc.allocate(lease, n)])
        except BaseException:
            for alloc in self._allocators:
                alloc.release(lease)
                alloc.release(pin)
            raise
        self._counters.num_queries += 1
        self._counters.query_tokens += len(tokens)
        self._counters.hit_tokens += match.num_tokens
        res = Reservation(
            agent_id, tuple(tokens), max_tokens, salt, match, lease, pin, fresh_ids, replacing
        )
        self._reservations[lease] = res
        return res

    def _full(self, g: int, needed: int) -> PoolFull:
        """Group ``g`` has fewer than ``needed`` free blocks (a snapshot or a published
        prefix: the group could hold it if it had the room)."""
        alloc = self._allocators[g]
        capacity = int(alloc.num_blocks)
        return PoolFull(g, needed, int(alloc.num_free), capacity, needed > capacity)

    def _fresh_needed(self, g: int, total: int, matched: int) -> int:
        """Fresh blocks group ``g`` needs for a final cache of up to ``total`` positions
        written from the end of the matched prefix's whole blocks."""
        size = self.block_tokens
        return min(-(-total // size) - matched // size, self.policies[g].max_fresh_blocks(total))

    def rebase(self, res: Reservation, match: PrefixMatch) -> bool:
        """Swap ``res``'s match for ``match`` (found after ``res`` was made, before its
        gather: blocks were published meanwhile), keeping every other block it holds
        consistent. All or nothing: False, and nothing changed, if it does not fit."""
        total = len(res.tokens) + res.max_tokens
        plans = []
        for g, (alloc, old, new) in enumerate(
            zip(self._allocators, res.match.groups, match.groups, strict=True)
        ):
            old_shared = {b for _, b in old.shared}
            new_shared = {b for _, b in new.shared}
            to_share = sorted(new_shared - old_shared)
            surplus = len(res.fresh[g]) - self._fresh_needed(g, total, match.num_tokens)
            revived = sum(1 for b in {*to_share, *new.pinned} if alloc.ref_cnt(b) == 0)
            if revived + max(0, -surplus) > int(alloc.num_free) + max(0, surplus):
                return False
            plans.append((to_share, sorted(old_shared - new_shared), surplus))
        for alloc in self._allocators:
            alloc.release(res.pin)
        for g, (alloc, (to_share, to_drop, surplus)) in enumerate(
            zip(self._allocators, plans, strict=True)
        ):
            alloc.share(res.lease, to_share)
            alloc.share(res.pin, list(match.groups[g].pinned))
            if surplus > 0:
                alloc.free(res.lease, res.fresh[g][-surplus:])
                del res.fresh[g][-surplus:]
            alloc.free(res.lease, to_drop)
            if surplus < 0:
                res.fresh[g].extend(int(b) for b in alloc.allocate(res.lease, -surplus))
        res.match = match
        return True

    def place_prefix(self, res: Reservation, length: int) -> tuple[tuple[int, ...], ...] | PoolFull:
        """Tables to write a running request's first ``length`` positions through
        (``length`` a block boundary past its match), so that :meth:`commit_prefix`
        can publish them before the request ends. Full groups use the request's own
        fresh blocks; a sliding group takes extra blocks for the positions its window
        holds at ``length`` (the final write still needs its own). PoolFull, and nothing
        changed, if a sliding group has too few free blocks."""
        size = self.block_tokens
        first = res.match.num_tokens // size
        end = length // size
        if length % size or end <= first:
            raise InvalidRequestError(
                f"a prefix of {length} positions is no block boundary past the match "
                f"({res.match.num_tokens} tokens, blocks of {size})"
            )
        starts = [max(first, p.needed_from(length) // size) for p in self.policies]
        for g, (alloc, policy) in enumerate(zip(self._allocators, self.policies, strict=True)):
            if not policy.is_full and end - starts[g] > int(alloc.num_free):
                return self._full(g, end - starts[g])
        tables = []
        for g, (alloc, policy) in enumerate(zip(self._allocators, self.policies, strict=True)):
            table = [NULL_BLOCK] * end
            for j, block in res.match.groups[g].shared:
                table[j] = block
            if policy.is_full:
                blocks, res.fresh[g] = res.fresh[g][: end - first], res.fresh[g][end - first :]
            else:
                blocks = [int(b) for b in alloc.allocate(res.lease, end - starts[g])]
            for j, block in zip(range(starts[g], end), blocks, strict=True):
                table[j] = block
            tables.append(tuple(table))
        return tuple(tables)

    def commit_prefix(
        self,
        res: Reservation,
        tables: Sequence[Sequence[int]],
        written_from: Sequence[int],
    ) -> bool:
        """Publish the prefix written through ``tables`` (from :meth:`place_prefix`) and
        make it the request's match: the blocks stay the request's, others can share
        them now, and its final write starts after them.

        A block written only in part (a sliding cache that no longer held its first rows)
        is not shareable: it is freed if the request's own cache will not keep it (it lies
        before ``keep_from`` of the prompt's length), else the prefix is refused: False,
        with its blocks given back (a full group's to the request's fresh blocks, the
        others' freed) and the match unchanged, since the final write would not cover it."""
        size = self.block_tokens
        old_end = self.shared_end(res.match)
        valids = [
            old.valid_from if written_from[g] <= old_end else written_from[g]
            for g, old in enumerate(res.match.groups)
        ]
        partial = [  # per group, the entries written only in part
            {
                j
                for j in range(old_end // size, len(table))
                if table[j] != NULL_BLOCK and j * size < valid
            }
            for table, valid in zip(tables, valids, strict=True)
        ]
        kept = [policy.keep_from(len(res.tokens)) for policy in self.policies]
        if any((j + 1) * size > kept[g] for g, js in enumerate(partial) for j in js):
            self._give_back_prefix(res, tables)
            return False
        length = len(tables[0]) * size
        tokens = res.tokens[:length]
        keys = block_keys(tokens, size, self.root(res.salt))
        groups = []
        for g, (alloc, old) in enumerate(zip(self._allocators, res.match.groups, strict=True)):
            table = list(tables[g])
            shared = list(old.shared)
            for j in range(old_end // size, len(table)):
                block = table[j]
                if block == NULL_BLOCK:
                    continue
                if j in partial[g]:  # not shareable, not needed later
                    alloc.free(res.lease, [block])
                    continue
                parent = keys[j - 1] if j > 0 else self.root(res.salt)
                chunk = list(tokens[j * size : (j + 1) * size])
                canonical = int(alloc.publish(block, parent, chunk, keys[j]))
                if canonical != block:  # published meanwhile (or before a shorter match)
                    alloc.share(res.lease, [canonical])
                    alloc.invalidate(block)
                    alloc.free(res.lease, [block])
                shared.append((j, canonical))
            groups.append(GroupMatch(tuple(shared), (), (), valids[g]))
        res.match = PrefixMatch(length, tuple(groups))
        return True

    def _give_back_prefix(self, res: Reservation, tables: Sequence[Sequence[int]]) -> None:
        """Undo :meth:`place_prefix`: a full group's blocks go back to the front of the
        request's fresh blocks (where they came from), the others' are freed."""
        first = self.shared_end(res.match) // self.block_tokens
        for g, (alloc, policy) in enumerate(zip(self._allocators, self.policies, strict=True)):
            blocks = [b for b in tables[g][first:] if b != NULL_BLOCK]
            if policy.is_full:
                res.fresh[g] = [*blocks, *res.fresh[g]]
            elif blocks:
                alloc.free(res.lease, blocks)

    def place_state(self, res: Reservation, length: int) -> tuple[tuple[int, ...], ...] | PoolFull:
        """Tables to write a running request's recurrent states after its first ``length``
        tokens through (a snapshot anywhere, e.g. at its prompt's end): one fresh block in
        each recurrent group, at entry ``(length - 1) // B``; other groups' tables all NULL.
        PoolFull, and nothing changed, if a recurrent group has no free block."""
        if not 0 < length <= len(res.tokens):
            raise InvalidRequestError(f"a state after {length} of {len(res.tokens)} tokens")
        return self._take_state_blocks(res.lease, length)

    def _take_state_blocks(self, owner: int, length: int) -> tuple[tuple[int, ...], ...] | PoolFull:
        """One block of each recurrent group for ``owner`` at entry ``(length - 1) // B``
        (other entries and groups NULL); PoolFull, and nothing taken, if one has none free."""
        for g in self._recurrent:
            if int(self._allocators[g].num_free) < 1:
                return self._full(g, 1)
        entries = -(-length // self.block_tokens)
        tables = []
        for g in range(len(self.policies)):
            table = [NULL_BLOCK] * entries
            if g in self._recurrent:
                table[-1] = int(self._allocators[g].allocate(owner, 1)[0])
            tables.append(tuple(table))
        return tuple(tables)

    def commit_state(self, res: Reservation, tables: Sequence[Sequence[int]], length: int) -> None:
        """Publish the states written through ``tables`` (from :meth:`place_state`) under
        the prompt's first ``length`` tokens and let them go: they are cached-free, found
        by :meth:`lookup` for that exact prefix until an allocation evicts them."""
        self._publish_state(res.lease, res.tokens[:length], res.salt, tables)

    def _publish_state(
        self, owner: int, tokens: Sequence[int], salt: str, tables: Sequence[Sequence[int]]
    ) -> None:
        """Publish ``owner``'s state blocks (entry ``(len(tokens) - 1) // B`` of each
        recurrent group's table) as the states after exactly ``tokens`` and drop them to
        cached-free. At a block boundary a state goes under the block key of ``tokens``;
        mid-block under the chain key of its own tokens (only that exact prefix finds it),
        indexed by :meth:`_index_snapshot`. A state already published there wins: ours is
        invalidated."""
        size, length = self.block_tokens, len(tokens)
        j = (length - 1) // size
        keys = block_keys(tokens, size, self.root(salt))
        parent = keys[j - 1] if j > 0 else self.root(salt)
        chunk = list(tokens[j * size : length])
        partial = length % size != 0
        if partial:  # findable for exactly this prefix: under the chain key of its tokens
            self._index_snapshot(parent, len(chunk))
        for g in self._recurrent:
            alloc, block = self._allocators[g], tables[g][-1]
            if partial:
                canonical = int(alloc.publish(block, chain_key(parent, chunk), chunk, None))
            else:
                canonical = int(alloc.publish(block, parent, chunk, keys[j]))
            if canonical != block:
                alloc.invalidate(block)
            alloc.free(owner, [block])

    def _index_snapshot(self, parent: int, length: int) -> None:
        """Record a prompt-end snapshot's (parent, length). The index keeps at most as many
        entries as the recurrent groups have blocks (no more snapshots can be live at
        once); past that the least recently published entry goes: a stale one costs a
        lookup, a dropped live one a miss."""
        self._snapshot_lengths.setdefault(parent, set()).add(length)
        self._snapshot_order[(parent, length)] = None
        self._snapshot_order.move_to_end((parent, length))
        most = sum(int(self._allocators[g].num_blocks) for g in self._recurrent)
        while len(self._snapshot_order) > most:
            (old_parent, old_length), _ = self._snapshot_order.popitem(last=False)
            lengths = self._snapshot_lengths[old_parent]
            lengths.discard(old_length)
            if not lengths:
                del self._snapshot_lengths[old_parent]

    @property
    def num_snapshot_entries(self) -> int:
        """Entries of the prompt-end snapshot index (bounded: see :meth:`_index_snapshot`)."""
        return len(self._snapshot_order)

    def release_state(self, res: Reservation, tables: Sequence[Sequence[int]]) -> None:
        """Give back the blocks of :meth:`place_state` unpublished (their write failed)."""
        for g, policy in enumerate(self.policies):
            if policy.is_recurrent:
                self._allocators[g].free(res.lease, [tables[g][-1]])

    # -- state snapshots of a live handle's prefix -----------------------------

    def snapshot_tables(
        self, handle: CacheHandle, only: int | None = None
    ) -> dict[int, tuple[tuple[int, ...], ...]]:
        """Length -> tables of each state snapshot the pool holds (live or cached-free) of
        every recurrent group after exactly ``handle.token_ids[:length]``, ``0 < length <
        handle.total_tokens``: block boundaries (published under the block key of the
        prefix) and prompt-end snapshots mid-block (under the chain key of their tokens);
        what :meth:`lookup` reuses for that prefix. Tables as :meth:`place_state` hands
        them out. ``only``: that length alone (absent if none). Shortest first; empty for
        a model without recurrent layers or when ``handle`` is not live. Changes nothing."""
        if not self._recurrent or not self.is_live(handle):
            return {}
        size, tokens = self.block_tokens, handle.token_ids
        last = handle.total_tokens - 1  # lengths 1 .. last
        if only is not None and not 0 < only <= last:
            return {}
        root = self.root(handle.salt)
        keys = block_keys(tokens[: last // size * size], size, root)
        found: dict[int, tuple[tuple[int, ...], ...]] = {}
        entries = range(-(-last // size)) if only is None else [(only - 1) // size]
        for j in entries:
            parent = keys[j - 1] if j > 0 else root
            lengths = sorted(self._snapshot_lengths.get(parent, ()))
            if (j + 1) * size <= last:
                lengths.append(size)
            for n in lengths:
                length = j * size + n
                if length > last or (only is not None and length != only):
                    continue
                chunk = tokens[j * size : length]
                blocks = {
                    g: self._exact_state(g, parent, chunk)
                    if n < size
                    else int(self._allocators[g].lookup(keys[j], list(chunk)))
                    for g in self._recurrent
                }
                if NULL_BLOCK not in blocks.values():
                    found[length] = self._state_tables(length, blocks)
        return found

    def window_lengths(self, handle: CacheHandle) -> list[int]:
        """Block boundaries ``0 < e <= handle.total_tokens``, shortest first, at which the
        pool holds (live or cached-free, published under the block keys of
        ``handle.token_ids``) every block each sliding-window group needs for a lookup of
        exactly ``token_ids[:e]``: those of positions ``needed_from(e)`` to ``e``, whole.
        What a leader's published prefix and a sequence's window leave behind. Empty for a
        model without sliding-window groups or when ``handle`` is not live. Changes nothing."""
        sliding = self._sliding()
        if not sliding or not self.is_live(handle):
            return []
        size, tokens = self.block_tokens, handle.token_ids
        num = len(tokens) // size
        keys = self._handle_keys(handle)
        held = {
            g: [
                int(self._allocators[g].lookup(keys[j], list(tokens[j * size : (j + 1) * size])))
                != NULL_BLOCK
                for j in range(num)
            ]
            for g in sliding
        }
        return [
            k * size
            for k in range(1, num + 1)
            if all(
                all(held[g][self.policies[g].needed_from(k * size) // size : k]) for g in sliding
            )
        ]

    def window_block(self, handle: CacheHandle, group: int, j: int) -> int:
        """The block the pool holds (live or cached-free) for whole block ``j`` of a live
        handle's tokens in group ``group``, published under its block key; NULL if none."""
        size, tokens = self.block_tokens, handle.token_ids
        if not 0 <= j < len(tokens) // size:
            return NULL_BLOCK
        key = self._handle_keys(handle)[j]
        chunk = list(tokens[j * size : (j + 1) * size])
        return int(self._allocators[group].lookup(key, chunk))

    def _handle_keys(self, handle: CacheHandle) -> list[int]:
        """The block keys of ``handle``'s tokens, kept for the last handle asked about (a
        tier reads a handle's window blocks one by one: each would hash its whole prefix)."""
        memo = self._keys_memo
        if memo is None or memo[0] is not handle:
            keys = block_keys(handle.token_ids, self.block_tokens, self.root(handle.salt))
            memo = self._keys_memo = (handle, keys)
        return memo[1]

    def _sliding(self) -> list[int]:
        """The sliding-window groups."""
        return [g for g, p in enumerate(self.policies) if p.window is not None]

    def _state_tables(self, length: int, blocks: dict[int, int]) -> tuple[tuple[int, ...], ...]:
        """Tables of ``ceil(length / B)`` entries with ``blocks[g]`` last in group ``g``."""
        entries = -(-length // self.block_tokens)
        return tuple(
            (NULL_BLOCK,) * (entries - 1) + (blocks.get(g, NULL_BLOCK),)
            for g in range(len(self.policies))
        )

    def hold_snapshots(self, handle: CacheHandle) -> HeldSnapshots:
        """Hold every snapshot of :meth:`snapshot_tables` (a reference each, cached-free
        ones revived) until :meth:`release_snapshots`: a reader of several is sure to find
        them all."""
        found = self.snapshot_tables(handle)
        lease = next(self._owner_ids)
        for tables in found.values():
            for g in self._recurrent:
                self._allocators[g].share(lease, [tables[g][-1]])
        return HeldSnapshots(lease, tuple(found))

    def release_snapshots(self, held: HeldSnapshots) -> None:
        """Let go of what :meth:`hold_snapshots` held (published: they stay cached)."""
        for alloc in self._allocators:
            alloc.release(held.lease)

    def place_snapshot(self, handle: CacheHandle, length: int) -> StateLease | PoolFull:
        """Blocks to write the states after the first ``length`` tokens of a live handle
        into (``0 < length < total_tokens``; its K/V is not touched), to be published by
        :meth:`commit_snapshot` exactly as :meth:`commit_state` publishes a prompt's; or
        :meth:`abort_snapshot`. PoolFull, and nothing changed, if a recurrent group has no
        free block."""
        self.check_live(handle)
        if not self._recurrent:
            raise InvalidRequestError("a state snapshot of a model without recurrent layers")
        if not 0 < length < handle.total_tokens:
            raise InvalidRequestError(
                f"a snapshot after {length} tokens of a {handle.total_tokens}-token cache: it "
                f"must hold 1..{handle.total_tokens - 1}"
            )
        lease = next(self._owner_ids)
        tables = self._take_state_blocks(lease, length)
        if isinstance(tables, PoolFull):
            return tables
        return StateLease(handle.token_ids[:length], handle.salt, lease, tables)

    def commit_snapshot(self, snap: StateLease) -> None:
        """Publish the states written through ``snap.tables``: cached-free, found by
        :meth:`lookup` for exactly ``snap.tokens`` until an allocation evicts them."""
        if not snap.open:
            raise InvalidRequestError("this snapshot was already committed or aborted")
        snap.open = False
        self._publish_state(snap.lease, snap.tokens, snap.salt, snap.tables)
        for alloc in self._allocators:
            alloc.release(snap.lease)

    def abort_snapshot(self, snap: StateLease) -> None:
        """Give back the blocks of :meth:`place_snapshot` unpublished (a no-op once
        committed or aborted)."""
        if not snap.open:
            return
        snap.open = False
        for alloc in self._allocators:
            alloc.release(snap.lease)

    def shared_end(self, match: PrefixMatch) -> int:
        """The end of ``match``'s whole blocks: they are shared (read-only), so a request's
        writes start there."""
        return match.num_tokens // self.block_tokens * self.block_tokens

    def release_pin(self, res: Reservation) -> None:
        """The gather has read the partial blocks: let them go (``res.read``)."""
        res.read = True
        for alloc in self._allocators:
            alloc.release(res.pin)

    def rollback(self, res: Reservation) -> None:
        """Give back everything ``res`` holds; the agent's old handle stays live."""
        if not res.open:
            return
        res.open = False
        self._reservations.pop(res.lease, None)
        for alloc in self._allocators:
            alloc.release(res.lease)
            alloc.release(res.pin)

    def place(self, res: Reservation, length: int) -> tuple[tuple[int, ...], ...]:
        """Per group, the table a final cache of ``length`` positions is written
        through: shared blocks where the match put them, fresh blocks at every
        later position the group keeps, NULL elsewhere. Writes go to positions
        ``>= match.num_tokens // B * B`` only (shared blocks are read-only). From here on
        the fresh blocks stay where they are (``res.writing``)."""
        size = self.block_tokens
        res.writing = True
        num_entries = -(-length // size)
        first_fresh = res.match.num_tokens // size
        tables = []
        for g, policy in enumerate(self.policies):
            keep = policy.keep_from(length) // size
            table = [NULL_BLOCK] * num_entries
            for j, block in res.match.groups[g].shared:
                if j >= keep:
                    table[j] = block
            positions = range(max(first_fresh, keep), num_entries)
            fresh = res.fresh[g]
            if len(positions) > len(fresh):
                raise InvalidRequestError(
                    f"a final cache of {length} positions needs {len(positions)} fresh blocks "
                    f"in group {g}, the request reserved {len(fresh)}"
                )
            for j, block in zip(positions, fresh, strict=False):
                table[j] = block
            tables.append(tuple(table))
        return tuple(tables)

    def commit(
        self,
        res: Reservation,
        token_ids: Sequence[int],
        tables: Sequence[Sequence[int]],
        written_from: Sequence[int],
        *,
        whole_blocks: bool = False,
        publish_state: bool = False,
    ) -> CacheHandle:
        """Turn ``res`` into the handle of ``token_ids``, whose K/V was written
        through ``tables`` (from :meth:`place`) at positions ``>= written_from[g]``.

        Frees the fresh blocks not placed and the shared ones that fell out of a
        window, publishes every fully written block under its prefix key (a block
        whose key another block already holds is swapped for that one), and
        releases ``res.replacing`` if it is still live.

        A sliding group keeps positions from ``keep_from(len(token_ids))`` on; with
        ``whole_blocks`` (a host write of whole blocks: a prefix import) from the start of
        the block holding that position, when written from there, so that this block is
        published too (lookups of exactly these tokens need it: their window starts in it).
        A recurrent end state mid-block stays unpublished unless ``publish_state`` (a
        prefix import ending at a prompt's end): then it is published as the snapshot of
        exactly ``token_ids``, as :meth:`commit_state` publishes a prompt's.
        """
        if not res.open:
            raise InvalidRequestError("this reservation was already committed or rolled back")
        size = self.block_tokens
        length = len(token_ids)
        keys = block_keys(token_ids, size, self.root(res.salt))
        shared_end = self.shared_end(res.match)
        final: list[GroupTable] = []
        for g, (alloc, policy) in enumerate(zip(self._allocators, self.policies, strict=True)):
            table = list(tables[g])
            gm = res.match.groups[g]
            valid = gm.valid_from if written_from[g] <= shared_end else written_from[g]
            keep = policy.keep_from(length)
            valid = max(valid, keep // size * size if whole_blocks else keep)
            for j in range(min(valid // size, len(table))):  # out of the window, or unwritten
                table[j] = NULL_BLOCK
            placed = {b for b in table if b != NULL_BLOCK}
            held = {b for _, b in gm.shared} | set(res.fresh[g])
            alloc.free(res.lease, sorted(held - placed))
            for j in range(shared_end // size, len(table)):
                block = table[j]
                start, stop = j * size, min((j + 1) * size, length)
                if block == NULL_BLOCK or start < valid:
                    continue
                key = keys[j] if stop - start == size else None
                parent = keys[j - 1] if j > 0 else self.root(res.salt)
                chunk = list(token_ids[start:stop])
                if policy.is_recurrent and stop - start < size:
                    # an end state mid-block stays unpublished: the agent's own next turn
                    # finds it through its handle, and published under ``parent`` it would
                    # hide the prompt-end snapshots of this block from lookups (best_child);
                    # as a snapshot it goes under the chain key of its own tokens
                    if not publish_state:
                        continue
                    parent = chain_key(parent, chunk)
                canonical = int(alloc.publish(block, parent, chunk, key))
                if canonical != block:  # computed twice: keep one copy
                    alloc.share(res.lease, [canonical])
                    alloc.invalidate(block)
                    alloc.free(res.lease, [block])
                    table[j] = canonical
            final.append(GroupTable(tuple(table), min(valid, length)))
        if publish_state and length % size and self._has_recurrent:
            j = length // size
            self._index_snapshot(keys[j - 1] if j else self.root(res.salt), length - j * size)
        for alloc in self._allocators:
            alloc.release(res.pin)
        res.open = False
        self._reservations.pop(res.lease, None)
        handle = CacheHandle(
            res.agent_id, tuple(token_ids), tuple(final), size, res.salt, res.lease
        )
        self._handles[res.lease] = handle
        old = res.replacing
        if old is not None and self.is_live(old):
            self.release(old)
        return handle

    # -- capacity -------------------------------------------------------------

    def allocator(self, group: int = 0) -> _blocks.BlockAllocator:
        """Group ``group``'s allocator, for inspection and tests: mutating it directly
        breaks the manager's records."""
        return self._allocators[group]

    def num_blocks(self, group: int = 0) -> int:
        return int(self._allocators[group].num_blocks)

    def num_free(self, group: int = 0) -> int:
        return int(self._allocators[group].num_free)

    def spare_blocks(self, group: int) -> int:
        """The most blocks :meth:`resize_group` can take away from group ``group``: no
        more than it has free (cached ones included), one block always stays, and none
        at or below the highest block that something holds in place (see
        :meth:`_movable_refs`: a request not yet gathered or writing its final cache, a block
        being published, a pin, a snapshot lease). O(blocks it looks at), plus O(blocks the
        handles and requests hold) once it meets a held one."""
        alloc = self._allocators[group]
        n = int(alloc.num_blocks)
        most = min(int(alloc.num_free), n - 1)
        refs: Counter[int] | None = None  # counted at the first held block met, if any
        for k in range(most):
            b = n - 1 - k
            held = int(alloc.ref_cnt(b))
            if held:
                refs = self._movable_refs(group) if refs is None else refs
                if held > refs.get(b, 0):
                    return k
        return most

    def _movable_refs(self, group: int) -> Counter[int]:
        """Block id -> the references to it in group ``group`` that a move can re-point:
        live handles', and open requests' not writing their final cache: their fresh
        blocks, and their match's shared blocks once read (see :class:`Reservation`)."""
        refs: Counter[int] = Counter()
        for handle in self._handles.values():
            refs.update(handle.tables[group].held)
        for res in self._reservations.values():
            if not res.writing:
                refs.update(res.fresh[group])
                if res.read:
                    refs.update(b for _, b in res.match.groups[group].shared)
        return refs

    def resize_group(self, group: int, num_blocks: int) -> dict[int, int]:
        """Give group ``group`` ``num_blocks`` blocks. Added ones are free. To take ids
        ``[num_blocks, n)`` away, the blocks there that only live handles and requests
        hold (where :meth:`_movable_refs` counts them) first move to free ids below (free
        ones first, then the least recently used cached ones, whose content goes) and those
        handles' tables and requests' fresh blocks and matches are re-pointed; the cached
        content of the ids taken away goes. Returns the moves (old id -> new id): the caller
        moves their bytes before the next read. InvalidRequestError, and nothing changed, if
        it would take more than :meth:`spare_blocks`."""
        alloc = self._allocators[group]
        n = int(alloc.num_blocks)
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise InvalidRequestError(f"layer group {group} needs >= 1 block, got {num_blocks!r}")
        if num_blocks >= n:
            alloc.resize(num_blocks)
            return {}
        spare = self.spare_blocks(group)
        if n - num_blocks > spare:
            raise InvalidRequestError(
                f"layer group {group}: cannot take {n - num_blocks} of its {n} blocks away, "
                f"at most {spare} (its free blocks, above what requests, pins and leases hold "
                "in place)"
            )
        movers = [b for b in range(num_blocks, n) if int(alloc.ref_cnt(b)) > 0]
        targets = [int(b) for b in alloc.free_queue() if b < num_blocks][: len(movers)]
        moves = dict(zip(movers, targets, strict=True))
        for old, new in moves.items():
            alloc.relocate(old, new)
        if moves:
            for handle in self._handles.values():
                if any(b in moves for b in handle.tables[group].block_ids):
                    repoint_blocks(handle, group, moves)
            for res in self._reservations.values():
                res.fresh[group] = [moves.get(b, b) for b in res.fresh[group]]
                if res.read:
                    res.match = _moved_match(res.match, group, moves)
        alloc.resize(num_blocks)
        return moves

    def ref_cnt(self, block_id: int, group: int = 0) -> int:
        return int(self._allocators[group].ref_cnt(block_id))

    def usage(self) -> CacheUsage:
        groups = tuple(
            GroupUsage(
                int(a.num_blocks),
                int(a.num_used),
                int(a.num_free),
                int(a.num_cached),
                int(a.num_evictions),
                bpb,
            )
            for a, bpb in zip(self._allocators, self._bytes_per_block, strict=True)
        )
        c = self._counters
        return CacheUsage(groups, len(self._handles), c.num_queries, c.query_tokens, c.hit_tokens)

    def num_shared_blocks(self) -> int:
        """Blocks held by more than one holder (O(num_blocks): for reports, not hot paths)."""
        return sum(
            1 for a in self._allocators for b in range(int(a.num_blocks)) if a.ref_cnt(b) > 1
        )

    def check_invariants(self) -> None:
        """Raise AssertionError if the manager's records and the allocators disagree."""
        for a in self._allocators:
            a.check_invariants()
        for lease, res in self._reservations.items():
            assert res.open and res.lease == lease, f"reservation {lease} is closed: a bug"
            for g, a in enumerate(self._allocators):
                leased = {int(b) for b in a.table(lease)}
                assert set(res.fresh[g]) <= leased, (
                    f"reservation {lease} group {g}: fresh {res.fresh[g]} not all held by its "
                    f"lease ({sorted(leased)}): this indicates a bug"
                )
        for handle_id, handle in self._handles.items():
            for g, (a, table) in enumerate(zip(self._allocators, handle.tables, strict=True)):
                held = sorted(int(b) for b in a.table(handle_id))
                assert held == sorted(table.held), (
                    f"handle {handle_id} group {g}: allocator holds {held}, table {table.held}: "
                    "this indicates a bug"
                )
                if self.policies[g].is_recurrent:
                    continue
                size, n = self.block_tokens, handle.total_tokens
                holes = [
                    j
                    for j in range(table.valid_from // size, -(-n // size))
                    if table.block_ids[j] == NULL_BLOCK
                ]
                assert not holes, (
                    f"handle {handle_id} group {g}: positions {table.valid_from}..{n} valid, "
                    f"but entries {holes} hold no block: this indicates a bug"
                )
