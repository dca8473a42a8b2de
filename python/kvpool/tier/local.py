"""LocalTier: one safetensors file per agent in a directory (:mod:`kvpool.persist`).

The store's behaviour before cold tiers were pluggable, moved behind
:class:`~kvpool.tier.base.ColdTier`: files are written atomically, checked on load, a bad one
is renamed to ``{name}.corrupt`` (the store never reads or deletes those).
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path

from kvpool.cache.tables import CacheHandle
from kvpool.errors import CacheWriteError, InvalidRequestError
from kvpool.persist import (
    agent_id_of,
    cache_path,
    load_cache,
    remove_stale_temp_files,
    save_cache,
)
from kvpool.pool import BlockPool
from kvpool.tier.base import StoredCache, TierStats

__all__ = ["CORRUPT_SUFFIX", "LocalTier"]

logger = logging.getLogger(__name__)

CORRUPT_SUFFIX = ".corrupt"  # a bad file set aside: "{cache file name}.corrupt"


class LocalTier:
    """Cache files of model ``fingerprint`` in ``directory`` (created if missing)."""

    kind = "file"
    shared = False
    epoch = 0  # a directory does not forget what it holds

    def __init__(self, directory: str | os.PathLike[str], *, fingerprint: str) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(self.directory)
        except OSError as exc:
            raise InvalidRequestError(
                f"cache directory {str(self.directory)!r} cannot be used: {exc.strerror or exc}"
            ) from exc

    def describe(self) -> str:
        return str(self.directory)

    def path(self, agent_id: str) -> Path:
        return cache_path(self.directory, agent_id)

    def scan(self) -> list[StoredCache]:
        found = []
        bad = []
        try:
            entries = list(self.directory.iterdir())
        except OSError as exc:
            raise InvalidRequestError(
                f"cache directory {str(self.directory)!r} cannot be read: {exc.strerror or exc}"
            ) from exc
        for path in entries:
            agent_id = agent_id_of(path)
            if agent_id is None:
                continue
            try:
                st = path.lstat()  # a symlink is not followed: not ours, set aside
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                logger.warning("setting aside %s: not a regular file", path)
                bad.append(StoredCache(agent_id, 0, bad=True))
                continue
            found.append((st.st_mtime_ns, agent_id, st.st_size))
        return bad + [StoredCache(agent_id, size) for _, agent_id, size in sorted(found)]

    def save(self, pool: BlockPool, handle: CacheHandle) -> int:
        return save_cache(self.path(handle.agent_id), pool, handle, fingerprint=self.fingerprint)

    def load(self, pool: BlockPool, agent_id: str, salt: str = "") -> CacheHandle | None:
        path = self.path(agent_id)
        try:
            return load_cache(
                path, pool, fingerprint=self.fingerprint, agent_id=agent_id, cache_salt=salt
            )
        except FileNotFoundError:
            logger.warning("cache file %s disappeared", path)
            return None

    def missing(self, pool: BlockPool, handles: Sequence[CacheHandle]) -> set[str]:
        return {h.agent_id for h in handles if not self.path(h.agent_id).is_file()}

    def delete(self, agent_id: str) -> None:
        """Remove the agent's file; something else at its path (a directory) is set aside.

        Raises CacheWriteError (naming the path: for logs) if neither works."""
        path = self.path(agent_id)
        try:
            path.unlink(missing_ok=True)
            return
        except OSError as exc:
            error = exc
        if not path.is_file() and self.set_aside(agent_id):
            logger.warning("set aside %s on delete: %s", path, error)
            return
        raise CacheWriteError(f"could not delete {path}: {error.strerror or error}") from error

    def set_aside(self, agent_id: str) -> bool:
        """Rename a bad file to ``{name}.corrupt`` (or a unique variant)."""
        path = self.path(agent_id)
        target = path.with_name(path.name + CORRUPT_SUFFIX)
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return False
        except OSError:  # e.g. a directory onto a file set aside before
            try:
                os.rename(path, target.with_name(f"{target.name}-{secrets.token_hex(4)}"))
            except OSError as exc:
                logger.warning("could not set aside %s: %s", path, exc)
                return False
        return True

    def import_prefix(self, pool: BlockPool, tokens: Sequence[int], salt: str, have: int) -> int:
        return 0  # a private directory holds no blocks the pool has not seen

    def stats(self) -> TierStats:
        return TierStats(self.kind)

    def close(self) -> None:
        pass
