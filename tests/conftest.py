"""Shared by every test directory: tests run on MLX's reference BLAS.

Exact-token equality tests need it (OpenBLAS changes summation order, see
BLAS.md), so an exported KVPOOL_FAST_BLAS must not switch the test process.
"""

from __future__ import annotations

import os

os.environ.pop("KVPOOL_FAST_BLAS", None)
