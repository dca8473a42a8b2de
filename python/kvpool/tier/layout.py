"""Where a shared tier keeps blocks and sessions: key names and the session manifest.

Blocks are content-addressed and stored once for every session and server::

    kvpool:blk:<model>:<block format>:<tenant>:<chain key>    one block record (tier.codec)
    kvpool:ses:<model>:<block format>:<agent id>               one session manifest (JSON)
    kvpool:st:<model>:<block format>:<tenant>:<chain key>     a recurrent model's state after
                                                               exactly the tokens the key names
    kvpool:pe:<model>:<block format>:<tenant>:<chain key>     lengths of the prompt-end snapshots
                                                               in the block after that key (a set)

``<model>`` is the first 16 hex digits of the model fingerprint, ``<tenant>`` a 64-bit
blake2b of the ``cache_salt`` (tenants never share a key), ``<block format>`` is
:func:`~kvpool.tier.codec.block_format_id`, and ``<chain key>`` the block's prefix key: the
chain of :mod:`kvpool.cache.prefix` from a root of the fingerprint and salt over every token
up to the block's end (a session's last block may be partial: its key hashes the tokens it
holds). So a block's key names its tokens and every token before them; the record also holds
its tokens, compared token for token before it is used. Both keys carry the block format:
servers whose pools hold blocks in different formats (dense, ``--kv-bits 4``, ``8``) keep
separate blocks and sessions in one Redis and never read each other's (a miss, a prefill).

A manifest names a session's blocks in order (``block_keys``), its tokens and, for a
recurrent model, the prefix lengths whose state was written with it (``snapshots``: block
boundaries and prompt ends, the state under the chain key of exactly those tokens, a partial
last block's key where the length is mid-block); it is written
after its blocks, in one SET, so a reader sees the old manifest or the new one, never a mix.
With a deployment secret (``--cache-secret``) its last field ``mac`` is a keyed blake2b of
the rest and of its key, and ``<block format>`` carries the secret's id (``...+m<8 hex>``):
servers with and without a secret (or with two secrets) keep apart, and none deletes what
the other wrote.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvpool.cache.prefix import chain_key, root_key
from kvpool.errors import CacheCorruptionError, IncompatibleCacheError

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "KeySpace",
    "SessionManifest",
    "secret_id",
    "session_chain",
]

MANIFEST_FORMAT = "kvpool-session-manifest"
MANIFEST_VERSION = 1


def session_chain(tokens: Sequence[int], block_tokens: int, root: int) -> list[int]:
    """Chain keys of every block of ``tokens``, the last one partial if it is not full.

    The full blocks' keys are :func:`kvpool.cache.prefix.block_keys`'s.
    """
    keys: list[int] = []
    parent = root
    for start in range(0, len(tokens), block_tokens):
        parent = chain_key(parent, tokens[start : start + block_tokens])
        keys.append(parent)
    return keys


def _short_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def _dump(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def _manifest_mac(data: bytes, key: bytes, context: bytes) -> str:
    h = hashlib.blake2b(digest_size=32, key=key, person=b"kvpool.manifest")
    h.update(len(context).to_bytes(4, "little") + context)
    h.update(data)
    return h.hexdigest()


def secret_id(key: bytes) -> str:
    """A short public id of a MAC key, for key names (``m`` and 8 hex digits)."""
    return "m" + hashlib.blake2b(key, digest_size=4, person=b"kvpool.secretid").hexdigest()


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Key names of one model's blocks and sessions under ``prefix`` (default ``kvpool``)."""

    fingerprint: str
    block_format: str
    block_tokens: int
    prefix: str = "kvpool"

    @property
    def model(self) -> str:
        return self.fingerprint.split(":")[-1][:16]

    def root(self, salt: str) -> int:
        return root_key(self.fingerprint, salt)

    def chain(self, tokens: Sequence[int], salt: str) -> list[int]:
        return session_chain(tokens, self.block_tokens, self.root(salt))

    def block_key(self, salt: str, chain: int) -> str:
        return (
            f"{self.prefix}:blk:{self.model}:{self.block_format}:{_short_hash(salt)}:{chain:016x}"
        )

    def window_key(self, salt: str, chain: int, group: int, offset: int = 0) -> str:
        """Where sliding-window group ``group``'s rows of a block live from row ``offset``
        on (block keys hold the other layers): a session holds them only for the positions
        its window covers."""
        return f"{self.block_key(salt, chain)}:g{group}:{offset}"

    def prefix_chain_key(
        self, salt: str, tokens: Sequence[int], chain: Sequence[int], length: int
    ) -> int:
        """The last chain key of ``tokens[:length]`` (``0 < length <= len(tokens)``), from
        ``chain`` (``tokens``' own) at a block boundary, else hashing only the last partial
        block: the key a session of exactly those tokens ends with."""
        size = self.block_tokens
        whole = length // size
        if length % size == 0:
            return chain[whole - 1]
        parent = chain[whole - 1] if whole else self.root(salt)
        return chain_key(parent, tokens[whole * size : length])

    def state_key(self, salt: str, chain: int) -> str:
        """Where the end state of a session whose last chain key is ``chain`` lives (a
        recurrent model's: the state after exactly the tokens the chain names)."""
        return f"{self.prefix}:st:{self.model}:{self.block_format}:{_short_hash(salt)}:{chain:016x}"

    def session_key(self, agent_id: str) -> str:
        return f"{self.prefix}:ses:{self.model}:{self.block_format}:{agent_id}"

    def prompt_ends_key(self, salt: str, parent: int) -> str:
        """Where the lengths (``1..B-1``, a set) of the prompt-end snapshots inside the block
        after the chain key ``parent`` (the root for block 0) are listed: how a prefix
        import names their records without a scan. Hints only: each record is checked."""
        tenant = _short_hash(salt)
        return f"{self.prefix}:pe:{self.model}:{self.block_format}:{tenant}:{parent:016x}"


@dataclass(frozen=True, slots=True)
class SessionManifest:
    """One session's cache in a shared tier: its tokens and the chain keys of its blocks.

    Invariant (checked by :meth:`decode`): ``chain == KeySpace.chain(token_ids, salt)``.
    """

    agent_id: str
    token_ids: tuple[int, ...]
    chain: tuple[int, ...]
    salt: str
    fingerprint: str
    block_format: str
    block_tokens: int
    valid_from: tuple[int, ...] = ()  # per layer group: its first stored position; empty:
    # every group holds every position (a model without sliding-window groups)
    snapshots: tuple[int, ...] = ()  # ascending prefix lengths (0 < n < len(token_ids)) at
    # which a recurrent model's state was written with the session (KeySpace.state_key of
    # KeySpace.prefix_chain_key); empty: none (and every manifest of an older kvpool)

    def encode(self, key: bytes | None = None, context: bytes = b"") -> bytes:
        """The manifest's JSON; with ``key`` (:func:`~kvpool.tier.codec.mac_key`) a last
        field ``mac`` binds it to ``context`` (the key it is stored under)."""
        body: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "agent_id": self.agent_id,
            "fingerprint": self.fingerprint,
            "block_format": self.block_format,
            "block_tokens": self.block_tokens,
            "salt": self.salt,
            "token_ids": list(self.token_ids),
            "blocks": [f"{k:016x}" for k in self.chain],
        }
        if self.valid_from:
            body["valid_from"] = list(self.valid_from)
        if self.snapshots:
            body["snapshots"] = list(self.snapshots)
        if key is not None:
            body["mac"] = _manifest_mac(_dump(body), key, context)
        return _dump(body)

    @classmethod
    def decode(
        cls,
        data: bytes,
        keys: KeySpace,
        agent_id: str,
        what: str,
        key: bytes | None = None,
        context: bytes = b"",
    ) -> SessionManifest:
        """Parse and check a manifest for ``agent_id`` under ``keys`` (and its MAC, with
        ``key`` and ``context`` as :meth:`encode` had them).

        Raises IncompatibleCacheError for another model, block format or size, and
        CacheCorruptionError for anything malformed, inconsistent or failing its MAC.
        """
        try:
            body: Any = json.loads(data)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise CacheCorruptionError(f"{what}: the manifest is not JSON: {exc}") from exc
        if not isinstance(body, dict) or body.get("format") != MANIFEST_FORMAT:
            raise CacheCorruptionError(f"{what}: not a {MANIFEST_FORMAT}")
        if key is not None:
            mac = body.pop("mac", None)
            if not isinstance(mac, str) or not hmac.compare_digest(
                mac, _manifest_mac(_dump(body), key, context)
            ):
                raise CacheCorruptionError(
                    f"{what}: the manifest fails its MAC (written without this --cache-secret?)"
                )
        if body.get("version") != MANIFEST_VERSION:
            raise IncompatibleCacheError(
                f"{what}: manifest version {body.get('version')!r}, this kvpool reads "
                f"{MANIFEST_VERSION}"
            )
        for name, mine in (
            ("fingerprint", keys.fingerprint),
            ("block_format", keys.block_format),
            ("block_tokens", keys.block_tokens),
        ):
            if body.get(name) != mine:
                raise IncompatibleCacheError(
                    f"{what}: written for {name} {body.get(name)!r}, this pool has {mine!r}"
                )
        tokens, blocks, salt = body.get("token_ids"), body.get("blocks"), body.get("salt")
        if (
            body.get("agent_id") != agent_id
            or not isinstance(salt, str)
            or not isinstance(tokens, list)
            or not tokens
            or not all(isinstance(t, int) and 0 <= t < 2**32 for t in tokens)
            or not isinstance(blocks, list)
            or not all(isinstance(b, str) and len(b) == 16 for b in blocks)
        ):
            raise CacheCorruptionError(f"{what}: a malformed manifest for agent {agent_id!r}")
        try:
            chain = tuple(int(b, 16) for b in blocks)
        except ValueError as exc:
            raise CacheCorruptionError(f"{what}: a block key is not hex") from exc
        if list(chain) != keys.chain(tokens, salt):
            raise CacheCorruptionError(
                f"{what}: its {len(chain)} block keys do not match its {len(tokens)} tokens"
            )
        valid_from = body.get("valid_from", [])
        if not isinstance(valid_from, list) or not all(
            isinstance(v, int) and 0 <= v < len(tokens) for v in valid_from
        ):
            raise CacheCorruptionError(f"{what}: a malformed valid_from {valid_from!r}")
        snapshots = body.get("snapshots", [])
        if (
            not isinstance(snapshots, list)
            or not all(type(n) is int and 0 < n < len(tokens) for n in snapshots)
            or any(a >= b for a, b in itertools.pairwise(snapshots))
        ):
            raise CacheCorruptionError(f"{what}: malformed snapshot lengths {snapshots!r}")
        return cls(
            agent_id,
            tuple(tokens),
            chain,
            salt,
            keys.fingerprint,
            keys.block_format,
            keys.block_tokens,
            tuple(valid_from),
            tuple(snapshots),
        )
