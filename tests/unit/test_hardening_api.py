"""Hardening (issue 11): the BLAS switch and the new errors at kvpool's top level."""

from __future__ import annotations

from pathlib import Path

import kvpool
import kvpool.blas
from kvpool.errors import KvpoolError

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_blas_switch_is_exported_at_the_top_level_and_documented() -> None:
    assert kvpool.use_fast_cpu_blas is kvpool.blas.use_fast_cpu_blas
    assert kvpool.blas_info is kvpool.blas.blas_info
    assert {"use_fast_cpu_blas", "blas_info"} <= set(kvpool.__all__)
    assert kvpool.blas_info()["mlx_loaded"] is False  # asking does not load MLX
    assert "kvpool.use_fast_cpu_blas()" in README and "kvpool.blas_info()" in README


def test_new_errors_are_kvpool_errors_and_exported() -> None:
    assert issubclass(kvpool.CacheWriteError, KvpoolError)
    assert issubclass(kvpool.CacheWriteError, OSError)  # old `except OSError` still catches it
    assert issubclass(kvpool.PoolAllocationError, KvpoolError)
    assert issubclass(kvpool.PoolAllocationError, MemoryError)
    assert {"CacheWriteError", "PoolAllocationError"} <= set(kvpool.__all__)
