"""Cold tiers of :class:`~kvpool.store.AgentCacheStore`: where caches live outside the pool.

``open_tier(url, ...)`` picks one from ``--cache-url``: ``file:///path`` or a plain path
(:class:`~kvpool.tier.local.LocalTier`, the default) or ``redis://host:port/db``
(:class:`~kvpool.tier.redis.RedisTier`, needs ``pip install 'kvpool[redis]'``).
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path

from kvpool.cache.spec import ModelCacheSpec
from kvpool.errors import InvalidRequestError
from kvpool.tier.base import ColdTier, StoredCache, TierStats, TierUnavailableError
from kvpool.tier.local import LocalTier

__all__ = [
    "ColdTier",
    "LocalTier",
    "StoredCache",
    "TierStats",
    "TierUnavailableError",
    "local_path",
    "open_tier",
]


def local_path(url: str) -> Path | None:
    """The directory of a ``file://`` URL or plain path; None for another scheme."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InvalidRequestError(f"--cache-url {url!r}: a file URL names a local path")
        return Path(urllib.parse.unquote(parts.path))
    if parts.scheme in ("redis", "rediss", "unix"):
        return None
    if "://" in url:
        raise InvalidRequestError(
            f"--cache-url {url!r}: use file:///path, a path or redis://host:port/db"
        )
    return Path(url)


def open_tier(
    url: str, *, spec: ModelCacheSpec, fingerprint: str, secret: bytes | None = None
) -> ColdTier:
    """The cold tier ``url`` names (see the module docstring); ``secret`` keys a shared
    tier's MACs (a local directory has no other writers to authenticate)."""
    path = local_path(url)
    if path is not None:
        return LocalTier(path.expanduser(), fingerprint=fingerprint)
    import importlib.util

    if importlib.util.find_spec("redis") is None:  # the tier imports it only when it connects
        raise InvalidRequestError(
            "--cache-url redis://... needs redis-py: pip install 'kvpool[redis]'"
        )
    from kvpool.tier.redis import RedisTier

    return RedisTier.from_url(url, spec=spec, fingerprint=fingerprint, secret=secret)
