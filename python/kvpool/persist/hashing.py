"""sha256 of cache tensors, on a small shared thread pool (hashlib releases the GIL)."""

from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from kvpool.cache.storage import HostArray

_HASH_THREADS = 2
_THREAD_HASH_BYTES = 1 << 20  # smaller tensors are hashed inline: a thread costs more


def _bytes_of(array: HostArray) -> memoryview:
    """The array's bytes, without a copy when it is C-contiguous."""
    return np.ascontiguousarray(array).data.cast("B")


def _sha256(array: HostArray) -> str:
    return hashlib.sha256(_bytes_of(array)).hexdigest()


_executor: tuple[int, ThreadPoolExecutor] | None = None  # (pid that made it, executor)
_executor_lock = threading.Lock()


def _hash_async(array: HostArray) -> Future[str]:
    """sha256 of ``array``: on a shared thread pool (hashlib releases the GIL) if large."""
    global _executor
    if array.nbytes < _THREAD_HASH_BYTES:
        done: Future[str] = Future()
        done.set_result(_sha256(array))
        return done
    with _executor_lock:
        if _executor is None or _executor[0] != os.getpid():  # none yet, or we were forked
            pool = ThreadPoolExecutor(_HASH_THREADS, thread_name_prefix="kvpool-hash")
            _executor = (os.getpid(), pool)
        executor = _executor[1]
    return executor.submit(_sha256, array)


class _Hasher:
    """sha256 of tensors in the background, for saving.

    ``window`` bounds how many groups of tensors may wait to be hashed, which bounds the
    memory their arrays hold.
    """

    def __init__(self, window: int = 2) -> None:
        self._window = window
        self._groups: deque[list[Future[str]]] = deque()
        self.name_to_digest: dict[str, Future[str]] = {}

    def add_group(self, named: Sequence[tuple[str, HostArray]]) -> None:
        group = []
        for name, array in named:
            future = _hash_async(array)
            self.name_to_digest[name] = future
            group.append(future)
        self._groups.append(group)
        while len(self._groups) > self._window:
            for future in self._groups.popleft():
                future.result()

    def digests(self) -> dict[str, str]:
        return {name: future.result() for name, future in self.name_to_digest.items()}
