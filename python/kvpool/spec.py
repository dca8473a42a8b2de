"""Deprecated location of :mod:`kvpool.cache.spec` (kept so old imports keep working)."""

from __future__ import annotations

import warnings

from kvpool.cache.spec import *  # noqa: F403
from kvpool.cache.spec import __all__ as __all__

warnings.warn(
    "kvpool.spec moved to kvpool.cache.spec (or import from kvpool)",
    DeprecationWarning,
    stacklevel=2,
)
