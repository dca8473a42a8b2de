"""RedisTier: sessions and prefix blocks in Redis, shared by every server pointed at it.

Layout (:mod:`kvpool.tier.layout`): each block once, content-addressed by its prefix chain
key, the model, the block format and the tenant; a session is a small JSON manifest naming
its blocks. Records are :mod:`kvpool.tier.codec`'s (a blake2b checksum each): a quantized
pool's blocks travel as their at-rest codes, and keys carry the format, so servers with
different ``--kv-bits`` share a Redis without sharing blocks or sessions.

* **Writing a session** sends only the blocks Redis lacks: one pipelined ``EXPIRE`` (or
  ``EXISTS`` without a TTL) over its block keys both refreshes the ones there and finds the
  missing ones, which go with ``SET NX``; the manifest goes last, in one ``SET``, on the
  same connection, so Redis has every block before the manifest that names it and a reader
  sees the old manifest or the new one, never a mix.
* **Reading a session** checks the manifest (its keys must be the chain of its tokens),
  then fetches the blocks the pool does not already share, a few at a time, and checks each
  one's checksum and tokens before writing it into blocks reserved for it; nothing is
  visible in the pool until every block passed (commit), any failure gives the blocks back.
  A block that fails its checksum is deleted (the next writer stores it again) and counted;
  a manifest with a missing block (evicted) is a miss.
* **Prefix import**: the published full blocks of a prompt's prefix that the pool lacks are
  fetched the same way and committed as a throwaway handle that is released at once: they
  stay in the pool as cached prefix blocks (and, for a recurrent model, the state at their
  end as a cached snapshot; for a sliding-window model, the window at their end), which the
  engine's own lookup then shares.
* **Memory**: every key gets a TTL (``ttl``, default one day; ``?ttl=0`` for none),
  refreshed whenever a session or block is written or read; bound Redis itself with
  ``maxmemory`` and ``maxmemory-policy allkeys-lru`` (docs/DEPLOY.md). An evicted block
  only turns a later read into a miss (a prefill).
* **Faults**: any Redis error (unreachable, timeout, OOM) raises
  :class:`~kvpool.tier.base.TierUnavailableError` to the store after counting it, and the
  tier then refuses at once, without a network call, for a back-off that doubles from
  ``backoff_s`` up to ``max_backoff_s``; after the first success ``epoch`` bumps, so the
  store writes every hot session again (Redis may have restarted empty).

A sliding-window layer group's rows are records of their own (``:g<group>:<row>`` after the
block key: that block's positions from ``row`` on, of that group's layers); block records
then hold the layers of the groups without a window. A session writes them for the
positions its window holds (its ``valid_from`` per group, in the manifest) and, like
snapshots, the whole window blocks the pool holds for its prefix at block boundaries
(``SET NX``, checked on read like every block): a lookup of exactly ``e`` tokens needs each
sliding group's blocks from the one holding ``needed_from(e)`` to ``e``, whole (the pool
shares only whole published blocks), which a leader's published prefix leaves cached in the
pool (:meth:`BlockPool.window_lengths`). These are records at row 0, so the importer names
them without a scan (a session's records of blocks wholly inside its window are the same
keys). A prefix import then takes the longest run of blocks ending at a boundary where Redis
holds every sliding group's window too, and commits its first window block whole so that it
is published (``whole_blocks``). A session served alone leaves no window at its prefix's
boundaries (the pool then holds none either): a new agent sharing only its system prompt
imports nothing.

A model with recurrent layers keeps their state out of the block records: a state after
exactly ``n`` tokens is a record of its own (``:st:`` under the chain key of those tokens,
checked like a block). A session writes its end state (before the manifest, read with the
blocks) and the snapshots the pool holds for its prefix, block boundaries and prompt ends
(``SET NX``, like blocks; the manifest lists their lengths). Loading the session registers
the longest of them Redis still holds as the pool's snapshot, best effort (a chat's next
turn, which re-templates the reply, resumes at the previous prompt's end on any server).
A prompt end (mid-block) also gets the K/V rows of its partial block, under the key a
session of exactly its tokens ends with, and its length in a set per block
(:meth:`KeySpace.prompt_ends_key`; a model without sliding groups). A prefix import takes
the longest of: a run of blocks that ends at a boundary with a state, or such a run and a
listed prompt end's partial block; it registers that state as the pool's snapshot of
exactly that prefix (blocks without a state at their end would serve no lookup). So a new
agent whose prompt starts with another session's prompt resumes where that one's prompt
ended, on any server.
"""

from __future__ import annotations

import contextlib
import logging
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from kvpool.cache.groups import GroupPolicy
from kvpool.cache.manager import PoolFull
from kvpool.cache.sequence import HostWrite
from kvpool.cache.spec import ModelCacheSpec
from kvpool.cache.storage import LayerState
from kvpool.cache.tables import CacheHandle
from kvpool.errors import (
    CacheCorruptionError,
    InvalidRequestError,
)
from kvpool.pool import BlockPool
from kvpool.tier.base import StoredCache, TierStats, TierUnavailableError
from kvpool.tier.codec import (
    DecodedBlock,
    block_format_id,
    decode_block,
    decode_state,
    mac_key,
    read_block,
    read_snapshot,
    read_state,
    read_window,
    record_bytes,
    state_record_bytes,
)
from kvpool.tier.layout import KeySpace, SessionManifest, secret_id

__all__ = ["DEFAULT_TTL_S", "RedisTier"]

logger = logging.getLogger(__name__)

DEFAULT_TTL_S = 86400
_FETCH_BLOCKS = 8  # blocks per pipelined round trip when reading or writing


@dataclass(frozen=True, slots=True)
class _Record:
    """One record of a session: positions ``[start, stop)`` of block ``j``, of the layers
    of every group without a window (``group`` None) or of sliding-window group ``group``."""

    j: int
    key: str
    start: int
    stop: int
    group: int | None = None


_IMPORT_AGENT = "_kvpool-import"  # the throwaway handle prefix imports commit
_LISTING_PAGE = 512  # members of a prompt-end listing read per block (255 lengths at most)
_MAX_VERIFIED = 1 << 16  # block keys remembered as checked (with a secret), least recent out
_WRONG_TYPE = b""  # what a GET of a key of another type (a list) reads as: a bad record


def _redis_errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.RedisError, OSError)


def _is_wrong_type(result: object) -> bool:
    """A pipelined command's error that concerns its key alone (WRONGTYPE), not Redis."""
    return isinstance(result, Exception) and str(result).startswith("WRONGTYPE")


def _raise_outage(results: Sequence[object]) -> list[object]:
    """``results`` of ``execute(raise_on_error=False)``: raises the first error that is not
    a key's own; a WRONGTYPE becomes :data:`_WRONG_TYPE`."""
    for result in results:
        if isinstance(result, Exception) and not _is_wrong_type(result):
            raise result
    return [_WRONG_TYPE if _is_wrong_type(r) else r for r in results]


def _prompt_end_lengths(listed: object, size: int) -> list[int]:
    """The lengths ``1..size-1`` in a page of a :meth:`KeySpace.prompt_ends_key` set as
    ``SSCAN`` returns it, ``(cursor, members)`` (anything else, e.g. a key of another type,
    lists none; so does a member that is no such length)."""
    if not isinstance(listed, list | tuple) or len(listed) != 2:
        return []
    members = listed[1]
    if not isinstance(members, list | tuple | set):
        return []
    out = []
    for member in members:
        try:
            length = int(member)
        except (TypeError, ValueError):
            continue
        if 0 < length < size:
            out.append(length)
    return out


class RedisTier:
    """Sessions of model ``fingerprint`` in the Redis behind ``client`` (a ``redis.Redis``).

    Build it from a URL with :meth:`from_url`. ``spec`` must be the pool's. ``secret``
    (every server of a deployment the same) keys a MAC of every block and manifest: what
    fails it is never loaded (deleted, counted as corrupt), and a writer checks a block it
    finds already there before it counts it as written. Without one, every Redis writer is
    trusted (checksums catch corruption, not forgery).
    """

    kind = "redis"
    shared = True

    def __init__(
        self,
        client: Any,
        *,
        spec: ModelCacheSpec,
        fingerprint: str,
        ttl_s: int | None = DEFAULT_TTL_S,
        prefix: str = "kvpool",
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        where: str = "redis",
        secret: bytes | None = None,
    ) -> None:
        if ttl_s is not None and (isinstance(ttl_s, bool) or ttl_s < 1):
            raise InvalidRequestError(f"ttl_s must be >= 1 or None, got {ttl_s!r}")
        self.client = client
        self.spec = spec
        self._windowed = [g for g, group in enumerate(spec.groups) if group.window is not None]
        self._policies = [GroupPolicy(g.kind, g.window, spec.block_tokens) for g in spec.groups]
        self._mac = mac_key(secret) if secret else None
        block_format = block_format_id(spec)
        if self._mac is not None:  # keyed and unkeyed servers (or two secrets) keep apart
            block_format += f"+{secret_id(self._mac)}"
        self.keys = KeySpace(fingerprint, block_format, spec.block_tokens, prefix)
        # block keys whose record this tier wrote or checked (with a secret): trusted as there
        self._verified: OrderedDict[str, None] = OrderedDict()
        self.ttl_s = ttl_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.where = where
        self.epoch = 0
        self._errors = _redis_errors()
        self._delay = 0.0  # the current back-off (0: healthy)
        self._failing = False  # from a failed operation until one succeeds
        self._down_until = 0.0
        self._last_error = ""
        self._counts: dict[str, int] = dict.fromkeys(
            (
                "num_errors",
                "num_skipped",
                "num_blocks_written",
                "num_blocks_deduplicated",
                "num_blocks_corrupt",
                "num_incomplete",
                "num_snapshots_written",
                "num_snapshots_read",
                "num_prefix_imports",
                "prefix_tokens_imported",
                "bytes_sent",
                "bytes_received",
            ),
            0,
        )

    @classmethod
    def from_url(
        cls, url: str, *, spec: ModelCacheSpec, fingerprint: str, secret: bytes | None = None
    ) -> RedisTier:
        """``redis://[:password@]host:port/db[?ttl=SECONDS&prefix=NAME]`` (``rediss://``
        for TLS; ``ttl=0``: no TTL). Connects lazily: a Redis that is down at start-up is
        an error counted on first use, not a failed start."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(parts.query)
        ttl_text = query.pop("ttl", [str(DEFAULT_TTL_S)])[-1]
        prefix = query.pop("prefix", ["kvpool"])[-1]
        try:
            ttl = int(ttl_text)
        except ValueError:
            raise InvalidRequestError(
                f"--cache-url: ttl must be an int, got {ttl_text!r}"
            ) from None
        rest = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query, True)))
        client = redis.Redis.from_url(
            rest,
            socket_timeout=2.0,
            socket_connect_timeout=1.0,
            retry=Retry(NoBackoff(), 0),  # the tier backs off itself; never stall the loop
        )
        host = parts.hostname or "localhost"
        where = f"{parts.scheme}://{host}:{parts.port or 6379}{parts.path}"  # no password
        return cls(
            client,
            spec=spec,
            fingerprint=fingerprint,
            ttl_s=ttl or None,
            prefix=prefix,
            where=where,
            secret=secret,
        )

    # -- faults ---------------------------------------------------------------

    @contextlib.contextmanager
    def _redis(self, what: str) -> Iterator[Any]:
        """Run Redis calls: counted and turned into TierUnavailableError on failure."""
        now = time.monotonic()
        if now < self._down_until:
            self._counts["num_skipped"] += 1
            raise TierUnavailableError(
                f"{self.where}: {what} skipped, backing off {self._down_until - now:.1f} s more "
                f"after: {self._last_error}"
            )
        try:
            yield self.client
        except self._errors as exc:
            self._counts["num_errors"] += 1
            self._delay = min(self.max_backoff_s, max(self.backoff_s, 2 * self._delay))
            self._down_until = time.monotonic() + self._delay
            self._last_error = f"{type(exc).__name__}: {exc}"
            self._failing = True
            raise TierUnavailableError(
                f"{self.where}: {what} failed ({self._last_error}); retrying in {self._delay:.1f} s"
            ) from exc
        self._failing = False
        if self._delay:
            self._delay = 0.0
            self.epoch += 1  # it may have restarted empty, or lost a write: rewrite
            logger.warning("%s is reachable again", self.where)

    # -- ColdTier -------------------------------------------------------------

    def describe(self) -> str:
        return self.where

    @property
    def authenticated(self) -> bool:
        """True with a secret: records are MACed, writers without it are not trusted."""
        return self._mac is not None

    def _context(self, key: str) -> bytes:
        return key.encode()

    def _trust(self, key: str) -> None:
        self._verified[key] = None
        self._verified.move_to_end(key)
        if len(self._verified) > _MAX_VERIFIED:
            self._verified.popitem(last=False)

    def scan(self) -> list[StoredCache]:
        return []  # shared: asked per agent

    def _check_pool(self, pool: BlockPool) -> None:
        if pool.spec != self.spec:
            raise InvalidRequestError(
                f"this Redis tier was built for {self.spec.describe()}, "
                f"the pool is {pool.spec.describe()}"
            )

    def _refresh(self, pipe: Any, key: str) -> None:
        if self.ttl_s is None:
            pipe.exists(key)
        else:
            pipe.expire(key, self.ttl_s)

    def save(self, pool: BlockPool, handle: CacheHandle) -> int:
        self._check_pool(pool)
        pool.check_live(handle)
        tokens, salt, size = handle.token_ids, handle.salt, self.spec.block_tokens
        if not tokens:
            raise InvalidRequestError(f"the cache of agent {handle.agent_id!r} holds no tokens")
        chain = self.keys.chain(tokens, salt)
        valid_from = tuple(
            t.valid_from if g in self._windowed else 0 for g, t in enumerate(handle.tables)
        )
        recs = self._records(salt, tokens, chain, valid_from)
        with self._redis(f"saving agent {handle.agent_id!r}") as r:
            pipe = r.pipeline(transaction=False)
            for rec in recs:
                self._refresh(pipe, rec.key)
            present = pipe.execute()
        missing = [i for i, there in enumerate(present) if not there]
        replace = self._unverified(recs, present, tokens) if self._mac else set()
        self._counts["num_blocks_deduplicated"] += len(recs) - len(missing) - len(replace)
        todo = sorted({*missing, *replace})
        for i in range(0, len(todo), _FETCH_BLOCKS):
            chunk = [recs[t] for t in todo[i : i + _FETCH_BLOCKS]]
            records = [
                read_block(
                    pool,
                    handle,
                    tokens,
                    rec.start,
                    rec.stop,
                    self._mac,
                    self._context(rec.key),
                    rec.group,
                )
                for rec in chunk
            ]
            with self._redis(f"saving agent {handle.agent_id!r}") as r:
                pipe = r.pipeline(transaction=False)
                for t, record in zip(todo[i : i + _FETCH_BLOCKS], records, strict=True):
                    # a bad record found there is replaced; a missing one is set only if
                    # still missing (a concurrent writer's is as good, and checked on read)
                    pipe.set(recs[t].key, record, nx=t not in replace, ex=self.ttl_s)
                pipe.execute()
            for rec in chunk:
                self._trust(rec.key)
            self._counts["num_blocks_written"] += len(chunk)
            self._counts["bytes_sent"] += sum(len(rec) for rec in records)
        sent_state = 0
        snapshots: tuple[int, ...] = ()
        if self._windowed:
            sent_state += self._save_windows(pool, handle, chain, {rec.key for rec in recs})
        if self.spec.has_recurrent:
            held, snapshots = self._save_snapshots(pool, handle, chain)
            sent_state += held
            if not self._windowed:
                sent_state += self._save_prompt_ends(pool, handle, chain, snapshots)
            # the end state, under the chain key of all the tokens
            state_key = self.keys.state_key(salt, chain[-1])
            record = read_state(pool, handle, self._mac, self._context(state_key))
            with self._redis(f"saving agent {handle.agent_id!r}") as r:
                r.set(state_key, record, ex=self.ttl_s)
            self._trust(state_key)
            sent_state += len(record)
            self._counts["bytes_sent"] += len(record)
        manifest_key = self.keys.session_key(handle.agent_id)
        manifest = SessionManifest(
            handle.agent_id,
            tokens,
            tuple(chain),
            salt,
            self.keys.fingerprint,
            self.keys.block_format,
            size,
            valid_from if self._windowed else (),
            snapshots,
        ).encode(self._mac, self._context(manifest_key))
        with self._redis(f"saving agent {handle.agent_id!r}") as r:
            r.set(manifest_key, manifest, ex=self.ttl_s)
        self._counts["bytes_sent"] += len(manifest)
        return (
            len(manifest)
            + sent_state
            + sum(record_bytes(self.spec, rec.stop - rec.start, rec.group) for rec in recs)
        )

    def _records(
        self,
        salt: str,
        tokens: Sequence[int],
        chain: Sequence[int],
        valid_from: Sequence[int] = (),
        first: int = 0,
    ) -> list[_Record]:
        """The records of ``tokens``' blocks ``first..``: one per block with the layers of
        the groups without a window, and one per block and sliding-window group for the
        positions from ``valid_from[g]`` on (its first block's record starts there)."""
        size, n = self.spec.block_tokens, len(tokens)
        recs = [
            _Record(j, self.keys.block_key(salt, chain[j]), j * size, min((j + 1) * size, n))
            for j in range(first, len(chain))
        ]
        for g in self._windowed:
            v = valid_from[g] if valid_from else 0
            for j in range(max(first, v // size), len(chain)):
                start = max(j * size, v)
                key = self.keys.window_key(salt, chain[j], g, start - j * size)
                recs.append(_Record(j, key, start, min((j + 1) * size, n), g))
        return recs

    def _unverified(
        self, recs: Sequence[_Record], present: Sequence[object], tokens: Sequence[int]
    ) -> set[int]:
        """With a secret: the indices of records found present that fail their check
        (planted, corrupt, another type): they are replaced, never trusted. Records this
        tier wrote or checked before are not fetched again."""
        known = self._verified
        check = [i for i, there in enumerate(present) if there and recs[i].key not in known]
        bad: set[int] = set()
        for c in range(0, len(check), _FETCH_BLOCKS):
            idx = check[c : c + _FETCH_BLOCKS]
            keys = [recs[i].key for i in idx]
            for i, record in zip(idx, self._fetch("checking blocks", keys), strict=True):
                try:
                    if self._checked(record, recs[i], tokens, delete=False) is not None:
                        continue
                except CacheCorruptionError as exc:
                    logger.warning("%s: replacing a block failing its check: %s", self.where, exc)
                bad.add(i)  # failed, or vanished since: write it
        return bad

    def _fetch(self, what: str, keys: Sequence[str]) -> list[bytes | None]:
        """The records under ``keys`` (None: missing; :data:`_WRONG_TYPE`: not a string)."""
        with self._redis(what) as r:
            pipe = r.pipeline(transaction=False)
            for key in keys:
                pipe.get(key)
                if self.ttl_s is not None:
                    pipe.expire(key, self.ttl_s)
            out = _raise_outage(pipe.execute(raise_on_error=False))
        records: list[bytes | None] = out[:: 2 if self.ttl_s is not None else 1]  # type: ignore[assignment]
        self._counts["bytes_received"] += sum(len(rec) for rec in records if rec)
        return records

    def _checked(
        self, record: bytes | None, rec: _Record, tokens: Sequence[int], *, delete: bool = True
    ) -> DecodedBlock | None:
        """The block of ``rec`` if ``record`` is there and passes; None if it is missing.

        A record that fails is counted, deleted (best effort; unless not ``delete``: the
        caller replaces it), forgotten as checked, and raises CacheCorruptionError."""
        if record is None:
            return None
        key, start, stop = rec.key, rec.start, rec.stop
        with self._checking(key, delete):
            if record is _WRONG_TYPE:
                raise CacheCorruptionError(f"{key}: a key of another type than a block's")
            block = decode_block(
                record, self.spec, start, key, self._mac, self._context(key), rec.group
            )
            if block.token_ids != tuple(tokens[start:stop]):
                raise CacheCorruptionError(
                    f"{key}: holds other tokens than positions {start}..{stop} of the sequence"
                )
        return block

    @contextlib.contextmanager
    def _checking(self, key: str, delete: bool) -> Iterator[None]:
        """Around the check of the record under ``key``: one that fails (raises
        CacheCorruptionError, re-raised) is counted (``num_blocks_corrupt``), forgotten as
        checked and deleted (best effort; unless not ``delete``: the caller replaces it);
        one that passes is trusted (with a secret: not checked again)."""
        try:
            yield
        except CacheCorruptionError:
            self._counts["num_blocks_corrupt"] += 1
            self._verified.pop(key, None)
            if delete and not self._failing:  # best effort: not an operation the store sees
                with contextlib.suppress(*self._errors):
                    self.client.delete(key)
            raise
        if self._mac is not None:
            self._trust(key)

    def _fill(
        self,
        target: HostWrite,
        what: str,
        tokens: Sequence[int],
        salt: str,
        chain: Sequence[int],
        valid_from: Sequence[int] = (),
    ) -> bool:
        """Fetch, check and write the records of the blocks ``target`` does not share yet
        (sliding-window groups from ``valid_from``); False if one is missing."""
        first = target.shared_tokens // self.spec.block_tokens
        recs = self._records(salt, tokens, chain, valid_from, first)
        for i in range(0, len(recs), _FETCH_BLOCKS):
            chunk = recs[i : i + _FETCH_BLOCKS]
            records = self._fetch(what, [rec.key for rec in chunk])
            for rec, record in zip(chunk, records, strict=True):
                block = self._checked(record, rec, tokens)
                if block is None:
                    return False
                target.write(block.layers)
        return True

    def load(self, pool: BlockPool, agent_id: str, salt: str = "") -> CacheHandle | None:
        self._check_pool(pool)
        key = self.keys.session_key(agent_id)
        what = f"loading agent {agent_id!r}"
        with self._redis(what) as r:
            pipe = r.pipeline(transaction=False)
            pipe.get(key)
            if self.ttl_s is not None:
                pipe.expire(key, self.ttl_s)
            data = _raise_outage(pipe.execute(raise_on_error=False))[0]
        if data is None:
            return None
        if data is _WRONG_TYPE:  # the store sets it aside (deletes it): a miss, not an outage
            raise CacheCorruptionError(f"{self.where} {key}: a key of another type than a manifest")
        assert isinstance(data, bytes)
        self._counts["bytes_received"] += len(data)
        manifest = SessionManifest.decode(
            data, self.keys, agent_id, f"{self.where} {key}", self._mac, self._context(key)
        )
        if manifest.salt != salt:  # written under another tenant salt: not this request's
            return None
        tokens, valid_from = manifest.token_ids, manifest.valid_from
        if len(valid_from) != (len(self.spec.groups) if self._windowed else 0):
            raise CacheCorruptionError(
                f"{self.where} {key}: valid_from {list(valid_from)} for "
                f"{len(self.spec.groups)} layer groups"
            )
        got = pool.write_from_host(agent_id, tokens, salt=manifest.salt)
        if isinstance(got, PoolFull):
            raise got.error(f"{self.where}: loading {len(tokens)} tokens of agent {agent_id!r}")
        with got as write:
            if not self._fill(write, what, tokens, manifest.salt, manifest.chain, valid_from) or (
                self.spec.has_recurrent and not self._fill_state(write, what, manifest)
            ):
                self._counts["num_incomplete"] += 1
                logger.warning("%s: a block of agent %r is gone (evicted?)", self.where, agent_id)
                return None
            handle = write.commit(valid_from or None)
        if manifest.snapshots:
            try:
                self._load_snapshots(pool, handle, manifest)
            except BaseException:
                pool.release(handle)
                raise
        return handle

    def _load_snapshots(
        self, pool: BlockPool, handle: CacheHandle, manifest: SessionManifest
    ) -> None:
        """Register the longest state snapshot the session was written with that Redis still
        holds and that passes its check (:meth:`BlockPool.write_snapshot`): one record and
        one state block, where a chat's next turn resumes (its previous prompt's end), not
        every snapshot the session ever had (each is a whole state: 73.7 MiB for
        Qwen3-Next-80B). Nothing if the pool holds one as long already. Best effort: the
        session is loaded already, so a missing record falls back to the next shorter one, a
        record failing its check is deleted, counted and skipped likewise, and an outage or a
        pool without a free state block ends it (logged)."""
        salt, tokens, chain = manifest.salt, manifest.token_ids, manifest.chain
        longest_held = max(pool.snapshot_lengths(handle), default=0)
        what = f"loading a state snapshot of agent {manifest.agent_id!r}"
        for n in sorted((n for n in manifest.snapshots if n > longest_held), reverse=True):
            key = self.keys.state_key(salt, self.keys.prefix_chain_key(salt, tokens, chain, n))
            try:
                (record,) = self._fetch(what, [key])
                states = self._checked_state(record, key, n)
            except TierUnavailableError as exc:
                logger.warning("%s: no snapshot loaded: %s", self.where, exc)
                return
            except CacheCorruptionError as exc:
                logger.warning("%s: skipping a snapshot: %s", self.where, exc)
                continue
            if states is None:
                continue  # evicted from Redis: a shorter one may be there
            if pool.write_snapshot(handle, states):
                self._counts["num_snapshots_read"] += 1
            else:
                logger.warning(
                    "%s: no free state block for the snapshot of agent %r after %d tokens",
                    self.where, manifest.agent_id, n,
                )  # fmt: skip
            return

    def _fill_state(self, target: HostWrite, what: str, manifest: SessionManifest) -> bool:
        """Fetch, check and write a recurrent model's end state; False if it is missing. A
        state that fails its check is deleted (best effort) and raises CacheCorruptionError."""
        key = self.keys.state_key(manifest.salt, manifest.chain[-1])
        (record,) = self._fetch(what, [key])
        states = self._checked_state(record, key, len(manifest.token_ids))
        if states is None:
            return False
        target.write(states)
        return True

    def _checked_state(
        self, record: bytes | None, key: str, num_tokens: int, *, delete: bool = True
    ) -> tuple[LayerState, ...] | None:
        """The state after ``num_tokens`` tokens if ``record`` is there and passes; None if
        it is missing. A record that fails is counted (``num_blocks_corrupt``), deleted (best
        effort; unless not ``delete``: the caller replaces it), forgotten as checked, and
        raises CacheCorruptionError."""
        if record is None:
            return None
        with self._checking(key, delete):
            if record is _WRONG_TYPE:
                raise CacheCorruptionError(f"{key}: a key of another type than a state's")
            states = decode_state(record, self.spec, num_tokens, key, self._mac, self._context(key))
        return states

    def _save_snapshots(
        self, pool: BlockPool, handle: CacheHandle, chain: Sequence[int]
    ) -> tuple[int, tuple[int, ...]]:
        """Write the state snapshots the pool holds for ``handle``'s prefix
        (:meth:`BlockPool.snapshot_lengths`: block boundaries and prompt ends) that Redis
        lacks, each under the chain key of exactly its tokens
        (:meth:`KeySpace.prefix_chain_key`), with ``SET NX`` (with a secret, one found there
        unchecked is checked first and replaced if it fails); the others get their TTL
        refreshed. Returns the bytes of these records in Redis and their lengths (what the
        manifest lists)."""
        lengths = pool.snapshot_lengths(handle)
        if not lengths:
            return 0, ()
        keys = self._snapshot_keys(handle, chain, lengths)
        what = f"saving the state snapshots of agent {handle.agent_id!r}"
        with self._redis(what) as r:
            pipe = r.pipeline(transaction=False)
            for key in keys:
                self._refresh(pipe, key)
            present = pipe.execute()
        replace = set()
        if self._mac is not None:
            for i, key in enumerate(keys):
                if not present[i] or key in self._verified:
                    continue
                (record,) = self._fetch(what, [key])
                try:
                    if self._checked_state(record, key, lengths[i], delete=False) is not None:
                        continue
                except CacheCorruptionError as exc:
                    logger.warning("%s: replacing a state failing its check: %s", self.where, exc)
                replace.add(i)  # failed, or vanished since: write it
        held, stored = 0, []
        for i, (length, key) in enumerate(zip(lengths, keys, strict=True)):
            if present[i] and i not in replace:
                held += state_record_bytes(self.spec)
                stored.append(length)
                continue
            record = read_snapshot(pool, handle, length, self._mac, self._context(key))
            if record is None:  # evicted from the pool since: nothing to send
                continue
            with self._redis(what) as r:
                # a concurrent writer's record is as good (and checked on read)
                r.set(key, record, nx=i not in replace, ex=self.ttl_s)
            self._trust(key)
            self._counts["num_snapshots_written"] += 1
            self._counts["bytes_sent"] += len(record)
            held += len(record)
            stored.append(length)
        return held, tuple(stored)

    def _prompt_end_records(
        self, handle: CacheHandle, chain: Sequence[int], lengths: Sequence[int]
    ) -> list[_Record]:
        """The records of the partial last blocks of ``handle``'s prefixes of the mid-block
        ``lengths``: each the last block record of a session of exactly those tokens."""
        salt, tokens, size = handle.salt, handle.token_ids, self.spec.block_tokens
        return [
            _Record(
                n // size,
                self.keys.block_key(salt, self.keys.prefix_chain_key(salt, tokens, chain, n)),
                n // size * size,
                n,
            )
            for n in lengths
            if n % size
        ]

    def _prompt_ends_key(self, handle: CacheHandle, chain: Sequence[int], n: int) -> str:
        """The :meth:`KeySpace.prompt_ends_key` that lists a snapshot after ``n`` tokens."""
        j = n // self.spec.block_tokens
        return self.keys.prompt_ends_key(
            handle.salt, chain[j - 1] if j else self.keys.root(handle.salt)
        )

    def _save_prompt_ends(
        self, pool: BlockPool, handle: CacheHandle, chain: Sequence[int], lengths: Sequence[int]
    ) -> int:
        """Make the prompt-end snapshots among ``lengths`` (mid-block; their states are in
        Redis) importable as a prefix by another server: the K/V of each one's partial last
        block, under the key a session of exactly its tokens ends with (``SET NX``, like
        every block; with a secret, one found there unchecked is checked first), and its
        length in the set :meth:`KeySpace.prompt_ends_key` (``SADD``). Returns the bytes of
        these records in Redis."""
        recs = self._prompt_end_records(handle, chain, lengths)
        if not recs:
            return 0
        tokens = handle.token_ids
        what = f"saving the prompt ends of agent {handle.agent_id!r}"
        listings = [self._prompt_ends_key(handle, chain, rec.stop) for rec in recs]
        with self._redis(what) as r:
            pipe = r.pipeline(transaction=False)
            for rec in recs:
                self._refresh(pipe, rec.key)
            for rec, listing in zip(recs, listings, strict=True):
                pipe.sadd(listing, rec.stop - rec.start)
                self._refresh(pipe, listing)
            found = _raise_outage(pipe.execute(raise_on_error=False))
            present, added = found[: len(recs)], found[len(recs) :: 2]
            wrong = [i for i, result in enumerate(added) if result is _WRONG_TYPE]
            if wrong:  # a key of another type (planted, or a bug): replaced by the set
                pipe = r.pipeline(transaction=False)
                for i in wrong:
                    pipe.delete(listings[i])
                    pipe.sadd(listings[i], recs[i].stop - recs[i].start)
                    self._refresh(pipe, listings[i])
                pipe.execute()
        replace = self._unverified(recs, present, tokens) if self._mac else set()
        held = 0
        for i, rec in enumerate(recs):
            if present[i] and i not in replace:
                held += record_bytes(self.spec, rec.stop - rec.start, None)
                continue
            record = read_block(
                pool, handle, tokens, rec.start, rec.stop, self._mac, self._context(rec.key)
            )
            with self._redis(what) as r:
                # a concurrent writer's record is as good (and checked on read)
                r.set(rec.key, record, nx=i not in replace, ex=self.ttl_s)
            self._trust(rec.key)
            self._counts["num_blocks_written"] += 1
            self._counts["bytes_sent"] += len(record)
            held += len(record)
        return held

    def _snapshot_keys(
        self, handle: CacheHandle, chain: Sequence[int], lengths: Sequence[int]
    ) -> list[str]:
        """The state keys of ``handle``'s snapshots after ``lengths`` tokens: each under the
        chain key of exactly its tokens (``chain``: the chain of all of them)."""
        salt, tokens = handle.salt, handle.token_ids
        return [
            self.keys.state_key(salt, self.keys.prefix_chain_key(salt, tokens, chain, n))
            for n in lengths
        ]

    def _prefix_window_records(
        self, pool: BlockPool, handle: CacheHandle, chain: Sequence[int]
    ) -> dict[str, _Record]:
        """The window records (:meth:`_window_records`) of every block boundary where the
        pool holds ``handle``'s whole windows (:meth:`BlockPool.window_lengths`), by key."""
        recs: dict[str, _Record] = {}
        for end in pool.window_lengths(handle):
            for rec in self._window_records(handle.salt, chain, end):
                recs.setdefault(rec.key, rec)
        return recs

    def _window_records(self, salt: str, chain: Sequence[int], end: int) -> list[_Record]:
        """The records a prefix import at block boundary ``end`` needs from every
        sliding-window group: its whole blocks (row 0) from the one holding the first
        position a lookup of exactly ``end`` tokens needs (:meth:`GroupPolicy.needed_from`)
        to ``end``. The pool shares only whole published blocks, so none starts mid-block;
        a session's records of the blocks wholly inside its window are the same keys."""
        size = self.spec.block_tokens
        return [
            _Record(j, self.keys.window_key(salt, chain[j], g, 0), j * size, (j + 1) * size, g)
            for g in self._windowed
            for j in range(self._policies[g].needed_from(end) // size, end // size)
        ]

    def _save_windows(
        self, pool: BlockPool, handle: CacheHandle, chain: Sequence[int], written: set[str]
    ) -> int:
        """Write the sliding-window blocks the pool holds for ``handle``'s prefix at the
        block boundaries where it holds a whole window (:meth:`BlockPool.window_lengths`:
        what a leader's published prefix left behind), as :meth:`_window_records` (row 0),
        that Redis lacks, with ``SET NX`` (with a secret, one found there unchecked is
        checked first and replaced if it fails); the others get their TTL refreshed.
        ``written``: the session's own record keys, already handled. Returns the bytes of
        these records in Redis."""
        tokens, size = handle.token_ids, self.spec.block_tokens
        recs = self._prefix_window_records(pool, handle, chain)
        todo_recs = [rec for key, rec in recs.items() if key not in written]
        if not todo_recs:
            return 0
        what = f"saving the window blocks of agent {handle.agent_id!r}"
        with self._redis(what) as r:
            pipe = r.pipeline(transaction=False)
            for rec in todo_recs:
                self._refresh(pipe, rec.key)
            present = pipe.execute()
        replace = self._unverified(todo_recs, present, tokens) if self._mac else set()
        there = [i for i, found in enumerate(present) if found and i not in replace]
        self._counts["num_blocks_deduplicated"] += len(there)
        held = sum(record_bytes(self.spec, size, todo_recs[i].group) for i in there)
        todo = [i for i in range(len(todo_recs)) if i not in set(there)]
        for c in range(0, len(todo), _FETCH_BLOCKS):
            chunk: list[tuple[int, bytes]] = []
            for i in todo[c : c + _FETCH_BLOCKS]:
                rec = todo_recs[i]
                assert rec.group is not None
                key, context = self._mac, self._context(rec.key)
                record = read_window(pool, handle, rec.group, rec.j, key, context)
                if record is not None:  # else evicted from the pool since: nothing to send
                    chunk.append((i, record))
            if not chunk:
                continue
            with self._redis(what) as r:
                pipe = r.pipeline(transaction=False)
                for i, record in chunk:
                    # a concurrent writer's record is as good (and checked on read)
                    pipe.set(todo_recs[i].key, record, nx=i not in replace, ex=self.ttl_s)
                pipe.execute()
            for i, record in chunk:
                self._trust(todo_recs[i].key)
                held += len(record)
                self._counts["bytes_sent"] += len(record)
            self._counts["num_blocks_written"] += len(chunk)
        return held

    def missing(self, pool: BlockPool, handles: Sequence[CacheHandle]) -> set[str]:
        """One pipelined EXISTS over every key a save of ``handles`` writes: the manifest,
        the blocks, the end state, and the prefix's state snapshots (with the prompt ends'
        rows and listings) and window blocks the pool holds (gone from Redis, they would be
        sent again only at the session's next save; meanwhile a load falls back to a
        shorter snapshot, an import to a shorter prefix)."""
        self._check_pool(pool)
        keys_of = {}
        for h in handles:
            chain = self.keys.chain(h.token_ids, h.salt)
            valid_from = [t.valid_from for t in h.tables] if self._windowed else []
            keys = [
                self.keys.session_key(h.agent_id),
                *(rec.key for rec in self._records(h.salt, h.token_ids, chain, valid_from)),
            ]
            if self.spec.has_recurrent and chain:
                keys.append(self.keys.state_key(h.salt, chain[-1]))
                lengths = pool.snapshot_lengths(h)
                keys += self._snapshot_keys(h, chain, lengths)
                if not self._windowed:  # the prompt ends' rows and listings
                    for rec in self._prompt_end_records(h, chain, lengths):
                        keys += (rec.key, self._prompt_ends_key(h, chain, rec.stop))
            if self._windowed:
                keys += self._prefix_window_records(pool, h, chain)
            keys_of[h.agent_id] = list(dict.fromkeys(keys))
        with self._redis(f"checking {len(handles)} sessions are still stored") as r:
            pipe = r.pipeline(transaction=False)
            for keys in keys_of.values():
                for key in keys:
                    pipe.exists(key)
            found = iter(pipe.execute())
        gone = set()
        for agent_id, keys in keys_of.items():
            there = [next(found) for _ in keys]
            if not all(there):
                gone.add(agent_id)
                for key, ok in zip(keys, there, strict=True):
                    if not ok:
                        self._verified.pop(key, None)
        return gone

    def delete(self, agent_id: str) -> None:
        with self._redis(f"deleting agent {agent_id!r}") as r:
            r.delete(self.keys.session_key(agent_id))

    def set_aside(self, agent_id: str) -> bool:
        """Drop the manifest of a session that failed its checks (its bad block is already
        deleted; the other blocks stay, shared and checked on their own)."""
        self.delete(agent_id)
        return True

    def import_prefix(self, pool: BlockPool, tokens: Sequence[int], salt: str, have: int) -> int:
        """Import the longest prefix of ``tokens`` past ``have`` that Redis holds with what
        the pool needs at its end. Either a run of whole blocks ending at a block boundary
        where Redis holds, for a recurrent model, the state (below the prompt's end),
        imported as a snapshot of exactly that prefix, and for a sliding-window model every
        sliding group's whole blocks of the window (:meth:`_window_records`), published
        with the prefix; or, for a recurrent model without sliding groups, such a run and
        then the partial block of a longer prompt-end snapshot another session left
        (:meth:`_save_prompt_ends`): its state comes in as the snapshot of exactly that
        prefix. A prompt end that fails its check or is gone falls back to the boundary.
        Nothing on any miss, bad record or full pool. Returns the tokens imported."""
        self._check_pool(pool)
        size, recurrent = self.spec.block_tokens, self.spec.has_recurrent
        # the engine feeds a prompt's last token itself: a state after all of them serves no
        # lookup, and a recurrent group supplies a prefix only where it has a state
        last = len(tokens) - 1 if recurrent else len(tokens)
        num_full, first = last // size, have // size
        if have >= last:
            return 0
        # prompt ends can lie in blocks first.. (mid-block, past ``have``, up to ``last``)
        ends_in = range(first, last // size + 1) if recurrent and not self._windowed else range(0)
        if first >= num_full and not ends_in:
            return 0
        full = tokens[: num_full * size]
        chain = self.keys.chain(full, salt)
        n = max(0, num_full - first)
        # the window records any boundary past ``first`` needs (blocks before it: shared)
        windows = list(
            dict.fromkeys(
                rec.key
                for k in range(first + 1, num_full + 1)
                for rec in self._window_records(salt, chain, k * size)
                if rec.j >= first
            )
        )
        root = self.keys.root(salt)
        what = f"looking up {n} prefix blocks"
        with self._redis(what) as r:
            pipe = r.pipeline(transaction=False)
            for c in chain[first:]:
                pipe.exists(self.keys.block_key(salt, c))
            if recurrent:
                for c in chain[first:]:
                    pipe.exists(self.keys.state_key(salt, c))
            for key in windows:
                pipe.exists(key)
            for j in ends_in:  # one page: a set bloated by junk costs no more than this
                key = self.keys.prompt_ends_key(salt, chain[j - 1] if j else root)
                pipe.sscan(key, 0, count=_LISTING_PAGE)
            found = _raise_outage(pipe.execute(raise_on_error=False))
        present = found[:n]
        with_state = found[n : 2 * n] if recurrent else []
        base = 2 * n if recurrent else n
        window_there = dict(zip(windows, found[base : base + len(windows)], strict=True))
        listed = found[base + len(windows) :]

        def has_windows(k: int) -> bool:
            """Redis holds the window records a boundary of ``k`` blocks needs."""
            return all(
                window_there[rec.key]
                for rec in self._window_records(salt, chain, k * size)
                if rec.j >= first
            )

        whole = 0  # blocks past ``first`` that Redis holds, in a run
        while whole < n and present[whole]:
            whole += 1
        run = whole
        while run and ((recurrent and not with_state[run - 1]) or not has_windows(first + run)):
            run -= 1
        boundary = (first + run) * size if run else 0
        chains = {
            end: [*chain[: end // size], self.keys.prefix_chain_key(salt, tokens, chain, end)]
            for j, lengths in zip(ends_in, listed, strict=True)
            if j - first <= whole  # the whole blocks before it are in Redis
            for end in (j * size + length for length in _prompt_end_lengths(lengths, size))
            if max(have, boundary) < end <= last
        }
        for end in self._prompt_ends_held(salt, chains):
            imported = self._import_at(pool, tokens[:end], salt, chains[end])
            if imported is not None:  # else gone or bad: the next shorter
                return imported
        if not run:
            return 0
        return self._import_at(pool, full[:boundary], salt, chain[: first + run]) or 0

    def _prompt_ends_held(self, salt: str, chains: dict[int, list[int]]) -> list[int]:
        """The prompt-end lengths among ``chains`` (length -> chain keys of exactly that
        prefix), longest first, whose state and partial block records Redis holds (one
        pipelined EXISTS: the sets that list them are hints, not records)."""
        ends = sorted(chains, reverse=True)
        if not ends:
            return []
        with self._redis(f"looking up {len(ends)} prompt ends") as r:
            pipe = r.pipeline(transaction=False)
            for end in ends:
                pipe.exists(self.keys.state_key(salt, chains[end][-1]))
                pipe.exists(self.keys.block_key(salt, chains[end][-1]))
            found = pipe.execute()
        return [end for i, end in enumerate(ends) if found[2 * i] and found[2 * i + 1]]

    def _import_at(
        self, pool: BlockPool, tokens: Sequence[int], salt: str, chain: Sequence[int]
    ) -> int | None:
        """Import exactly ``tokens`` (``chain``: their chain keys) as cached prefix blocks,
        with, for a recurrent model, the state after them as the pool's snapshot of exactly
        that prefix (fetched and checked before anything is reserved), and for a sliding
        model each group's whole window blocks. Returns the tokens the pool did not hold;
        0 if the pool has no room or held them all; None if a record is gone or fails its
        check (deleted, counted), with nothing left in the pool."""
        size, end = self.spec.block_tokens, len(tokens)
        states: tuple[LayerState, ...] | None = None
        if self.spec.has_recurrent:  # checked before anything is reserved
            key = self.keys.state_key(salt, chain[-1])
            (record,) = self._fetch("importing a prefix state", [key])
            try:
                states = self._checked_state(record, key, end)
            except CacheCorruptionError as exc:
                logger.warning("not importing a prefix: %s", exc)
            if states is None:
                return None
        # a sliding group holds its window's whole blocks: from the start of the block
        # holding the first position a lookup of exactly ``end`` tokens needs
        valid_from = [
            policy.needed_from(end) // size * size if g in self._windowed else 0
            for g, policy in enumerate(self._policies)
        ]
        got = pool.write_from_host(_IMPORT_AGENT, tokens, salt=salt)
        if isinstance(got, PoolFull):
            return 0  # no room now: the request prefills
        with got as write:
            shared = write.shared_tokens
            if shared >= end:
                return 0
            try:
                ok = self._fill(
                    write,
                    "importing prefix blocks",
                    tokens,
                    salt,
                    chain,
                    valid_from if self._windowed else (),
                )
            except CacheCorruptionError as exc:
                logger.warning("not importing a prefix: %s", exc)
                ok = False
            if not ok:
                return None
            if states is not None:
                write.write(states)  # published as the snapshot of exactly these tokens
            # whole blocks: the sliding groups' first blocks are published too; a state
            # mid-block (a prompt end) is published as a snapshot
            handle = write.commit(valid_from, whole_blocks=True, publish_state=end % size != 0)
        pool.release(handle)  # its published blocks stay cached for the engine's lookup
        self._counts["num_prefix_imports"] += 1
        self._counts["prefix_tokens_imported"] += end - shared
        return end - shared

    def stats(self) -> TierStats:
        # down from a failure until an operation succeeds, not merely until the back-off ends
        return TierStats(self.kind, **self._counts, available=not self._failing)

    def close(self) -> None:
        with contextlib.suppress(*self._errors):
            self.client.close()
