"""The exceptions kvpool raises. Every one derives from :class:`KvpoolError`."""

from __future__ import annotations


class KvpoolError(Exception):
    """Base class of every error kvpool raises on purpose."""


class InvalidRequestError(KvpoolError, ValueError):
    """The caller passed something kvpool cannot accept; nothing was changed."""


class PoolExhaustedError(KvpoolError):
    """The pool has too few free blocks for the request; nothing was taken."""

    def __init__(self, message: str, *, needed: int, free: int, capacity: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.free = free
        self.capacity = capacity


class PoolAllocationError(KvpoolError, MemoryError):
    """The pool's memory could not be allocated; nothing was kept."""


class CacheWriteError(KvpoolError, OSError):
    """A cache file could not be written (disk full, permissions); the old file is intact.

    The message names the file; ``__cause__`` is the OSError.
    """


class ModelNotFoundError(KvpoolError):
    """A model directory is missing or is not an mlx-lm model."""


class UnsupportedModelError(KvpoolError):
    """The model's cache layout is one kvpool cannot hold in blocks."""


class GenerationError(KvpoolError):
    """The model or the batch generator failed; the request's blocks were freed."""


class CacheCorruptionError(KvpoolError):
    """A saved cache failed its integrity check."""


class IncompatibleCacheError(KvpoolError):
    """A saved cache belongs to another model, block size or dtype."""


class ModelConversionError(ModelNotFoundError):
    """A model file could not be fetched or converted (offline, a wrong checksum, a truncated
    or unsupported GGUF); nothing was left in the model cache."""
