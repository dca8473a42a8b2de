"""Unit tests run without MLX: importing mlx here fails loudly."""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Sequence
from types import ModuleType


class _RefuseMLX(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> None:
        if fullname == "mlx" or fullname.startswith(("mlx.", "mlx_lm")):
            raise ImportError(f"tests/unit must not import MLX (tried to import {fullname!r})")
        return None


def pytest_configure() -> None:
    loaded = [m for m in sys.modules if m == "mlx" or m.startswith(("mlx.", "mlx_lm"))]
    if loaded:
        raise RuntimeError(f"MLX was imported before the unit tests started: {loaded}")
    sys.meta_path.insert(0, _RefuseMLX())
