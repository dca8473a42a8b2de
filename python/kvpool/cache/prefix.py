"""Chained block keys: the name under which a full block's K/V is shared.

``key(block j) = H(key(block j-1), tokens of block j)``, starting from
``root_key(model_salt, salt)``. Two prompts get the same key for block ``j`` only if they
agree on every token up to the end of that block *and* on the salt (model
fingerprint plus an optional per-tenant ``cache_salt``), so tenants with
different salts never share a block. Keys are 64-bit: a collision is possible
in principle, which is why the allocator also compares the tokens before it
hands a block out (:meth:`kvpool._blocks.BlockAllocator.lookup`).

Keys are stable across processes and machines (blake2b, not Python's
``hash``), so they can name blocks in files and shared tiers.
"""

from __future__ import annotations

import array
import hashlib
from collections.abc import Sequence

__all__ = ["block_keys", "chain_key", "root_key"]

_PERSON = b"kvpool.prefix.1"  # versions the scheme: change it and no old key matches


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=_PERSON).digest(), "little")


def root_key(model_salt: str, salt: str) -> int:
    """The parent key of every sequence's first block of one model (``model_salt``: its
    fingerprint, or the pool's key salt) under one tenant ``salt``."""
    return _digest(b"root\x00" + f"{model_salt}\x00{salt}".encode())


def chain_key(parent: int, tokens: Sequence[int]) -> int:
    """The key of a block holding ``tokens`` whose predecessor has key ``parent``."""
    return _digest(parent.to_bytes(8, "little") + array.array("q", tokens).tobytes())


def block_keys(tokens: Sequence[int], block_tokens: int, root: int) -> list[int]:
    """Keys of the full blocks of ``tokens`` (``len(tokens) // block_tokens`` of them)."""
    keys: list[int] = []
    parent = root
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        parent = chain_key(parent, tokens[start : start + block_tokens])
        keys.append(parent)
    return keys
