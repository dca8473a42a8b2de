"""Deprecated location of :mod:`kvpool.cache.storage` (kept so old imports keep working)."""

from __future__ import annotations

import warnings

from kvpool.cache.storage import *  # noqa: F403
from kvpool.cache.storage import __all__ as __all__

warnings.warn("kvpool.storage moved to kvpool.cache.storage", DeprecationWarning, stacklevel=2)
