"""Where a benchmark ran: versions, machine, BLAS, and the kvpool source tree if any.

Every record carries :func:`describe` so a number can be traced to the machine, the BLAS and
the versions that produced it. :func:`source_tree` finds a kvpool checkout above the working
directory: results go to its ``bench/results/`` and the C++ microbenchmarks build from it;
from a wheel installed elsewhere there is none.
"""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from kvpool.blas import blas_info

RESULTS_SUBDIR = Path("bench") / "results"
QUICK_SUBDIR = "quick"  # --quick results never overwrite the full ones
OUTSIDE_REPO_DIR = Path("kvpool-bench-results")


def package_version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "unknown"


def describe() -> dict[str, Any]:
    """Versions, machine and BLAS of this process, for a benchmark record."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "kvpool": package_version("kvpool"),
        "mlx": package_version("mlx"),
        "mlx_lm": package_version("mlx-lm"),
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}",
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average": load,
        "blas": blas_info(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def source_tree(start: Path | None = None) -> Path | None:
    """The kvpool checkout holding ``start`` (default: the working directory), or None.

    A checkout is a directory with a ``pyproject.toml`` naming the ``kvpool`` project and
    the ``bench/cpp`` sources.
    """
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        pyproject = directory / "pyproject.toml"
        if not (directory / "bench" / "cpp").is_dir() or not pyproject.is_file():
            continue
        try:
            text = pyproject.read_text()
        except OSError:
            continue
        if any(line.replace(" ", "") == 'name="kvpool"' for line in text.splitlines()):
            return directory
    return None


def default_out_dir(quick: bool) -> Path:
    """``<checkout>/bench/results`` in a checkout, else ``./kvpool-bench-results``;
    ``--quick`` runs write into a ``quick/`` folder below it."""
    root = source_tree()
    base = root / RESULTS_SUBDIR if root is not None else Path.cwd() / OUTSIDE_REPO_DIR
    return base / QUICK_SUBDIR if quick else base
