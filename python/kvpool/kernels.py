"""The C++ gather/scatter kernels on MLX arrays (``kvpool._kernels``).

Importing this module imports MLX. See ``csrc/kernels/gather_scatter.h`` for
the exact semantics of the block table, headroom and in-place writes.
"""

from __future__ import annotations

from kvpool._kernels import gather, reset_scatter_stats, scatter, scatter_stats, set_strict_in_place

__all__ = ["gather", "reset_scatter_stats", "scatter", "scatter_stats", "set_strict_in_place"]
