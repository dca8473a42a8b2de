"""Bookkeeping: nanoseconds per block of the block allocator, from Python and from C++.

Python: ``kvpool._blocks.BlockAllocator`` through its nanobind binding, the way
``BlockPool`` calls it. Each repetition, as in ``bench/cpp/bench_block_allocator.cpp``:
fill the whole pool with ``num_blocks / batch`` owners (``allocate``), share every table
with a second owner (``share``), drop the shared references (``free`` or ``release``,
alternating by repetition) then the last ones (the other one); plus ``ref_cnt`` of every
block while they are held. Medians over repetitions, in ns per block.

C++: the microbenchmark ``bench/cpp/bench_block_allocator.cpp``, built with CMake from the
kvpool source tree (``-DKVPOOL_BUILD_PYTHON=OFF -DKVPOOL_BUILD_KERNELS=OFF
-DKVPOOL_BUILD_BENCH=ON``, into ``build/bench-cpp``) when a source tree, CMake and a C++
compiler are there; from a wheel installed elsewhere it is reported unavailable.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvpool import _blocks
from kvpool.benchmarks.environment import source_tree
from kvpool.benchmarks.measure import median
from kvpool.benchmarks.records import BenchRecord, Section, from_json
from kvpool.benchmarks.tables import table as md_table

POOL_SIZES = (256, 4096, 65536)
QUICK_POOL_SIZES = (256, 4096)
BATCHES = (1, 32, 256)
REPS = 11
QUICK_REPS = 3
OPS = ("allocate", "share", "free_shared", "release_shared", "free", "release", "ref_cnt")
CPP_TARGET = "bench_block_allocator"
CPP_BUILD_SUBDIR = Path("build") / "bench-cpp"
BUILD_TIMEOUT_S = 600


@dataclass(frozen=True, slots=True)
class Point:
    """ns per block of each operation at one (pool size, blocks per call); an operation
    that did not run at this point is None (``ref_cnt`` is measured from Python only)."""

    num_blocks: int
    batch: int
    allocate: float
    share: float
    free_shared: float | None = None
    release_shared: float | None = None
    free: float | None = None
    release: float | None = None
    ref_cnt: float | None = None


@dataclass(frozen=True, slots=True)
class PrefixPoint:
    """The C++ prefix index, ns per block (see bench/cpp/bench_block_allocator.cpp)."""

    num_blocks: int
    publish: float
    lookup: float
    best_child: float
    allocate_evict: float


@dataclass(frozen=True, slots=True)
class PrefixIndex:
    block_tokens: int
    reps: int
    results: tuple[PrefixPoint, ...]


@dataclass(frozen=True, slots=True)
class CppResult:
    """The C++ microbenchmark, or why it did not run (``available`` False, ``reason``)."""

    available: bool
    reason: str | None = None
    binary: str | None = None
    build_s: float | None = None
    reps: int | None = None
    results: tuple[Point, ...] = ()
    prefix: PrefixIndex | None = None


@dataclass(frozen=True, slots=True)
class BookkeepingConfig:
    pool_sizes: tuple[int, ...]
    batches: tuple[int, ...]
    reps: int


@dataclass(frozen=True, slots=True)
class BookkeepingRecord(BenchRecord):
    config: BookkeepingConfig
    unit: str
    stat: str
    python: tuple[Point, ...]
    cpp: CppResult


RECORD = BookkeepingRecord


def _python_point(num_blocks: int, batch: int, reps: int) -> Point:
    allocator = _blocks.BlockAllocator(num_blocks)
    num_owners = num_blocks // batch
    num_ids = num_owners * batch
    samples: dict[str, list[float]] = {op: [] for op in OPS}
    clock = time.perf_counter_ns

    def drop(first: int, tables: list[list[int]], use_free: bool) -> float:
        t0 = clock()
        if use_free:
            for i, table in enumerate(tables):
                allocator.free(first + i, table)
        else:
            for i in range(len(tables)):
                allocator.release(first + i)
        return (clock() - t0) / num_ids

    for rep in range(reps):
        t0 = clock()
        tables = [allocator.allocate(i, batch) for i in range(num_owners)]
        samples["allocate"].append((clock() - t0) / num_ids)
        t0 = clock()
        for i, table in enumerate(tables):
            allocator.share(num_owners + i, table)
        samples["share"].append((clock() - t0) / num_ids)
        ref_cnt = allocator.ref_cnt
        t0 = clock()
        for b in range(num_blocks):
            ref_cnt(b)
        samples["ref_cnt"].append((clock() - t0) / num_blocks)
        free_first = rep % 2 == 0
        shared = drop(num_owners, tables, free_first)
        samples["free_shared" if free_first else "release_shared"].append(shared)
        last = drop(0, tables, not free_first)
        samples["release" if free_first else "free"].append(last)
        if allocator.num_free != num_blocks or allocator.num_owners != 0:
            raise AssertionError("the benchmark did not return every block: this is a bug")
    allocator.check_invariants()
    ops: dict[str, Any] = {op: round(median(v), 2) for op, v in samples.items() if v}
    return Point(num_blocks=num_blocks, batch=batch, **ops)


def _cpp() -> CppResult:
    """The C++ microbenchmark's results, or why it did not run."""
    root = source_tree()
    if root is None:
        return _unavailable(
            "no kvpool source tree above the working directory (installed from a wheel?): "
            "bench/cpp is not in the wheel"
        )
    cmake = shutil.which("cmake") or shutil.which("cmake", path=str(Path(sys.executable).parent))
    if cmake is None:
        return _unavailable("cmake not found on PATH")
    build = root / CPP_BUILD_SUBDIR
    configure = [
        cmake,
        "-S",
        str(root),
        "-B",
        str(build),
        "-DCMAKE_BUILD_TYPE=Release",
        "-DKVPOOL_BUILD_PYTHON=OFF",
        "-DKVPOOL_BUILD_KERNELS=OFF",
        "-DKVPOOL_BUILD_BENCH=ON",
    ]
    t0 = time.perf_counter()
    for argv in (configure, [cmake, "--build", str(build), "--target", CPP_TARGET, "-j", "2"]):
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return _unavailable(f"{' '.join(argv[:2])} failed: {exc}")
        if proc.returncode != 0:
            tail = " ".join((proc.stderr or proc.stdout).split())[-300:]
            return _unavailable(f"building {CPP_TARGET} failed ({proc.returncode}): {tail}")
    build_s = time.perf_counter() - t0
    binary = build / CPP_TARGET
    proc = subprocess.run([str(binary)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return _unavailable(f"{binary} exited with {proc.returncode}: {proc.stderr.strip()}")
    data: dict[str, Any] = json.loads(proc.stdout)
    return CppResult(
        available=True,
        binary=str(binary),
        build_s=round(build_s, 1),
        reps=data.get("reps"),
        results=from_json(tuple[Point, ...], data.get("results", [])),
        prefix=None if "prefix" not in data else from_json(PrefixIndex, data["prefix"]),
    )


def _unavailable(reason: str) -> CppResult:
    return CppResult(available=False, reason=reason)


def run(quick: bool) -> BookkeepingRecord:
    sizes = QUICK_POOL_SIZES if quick else POOL_SIZES
    reps = QUICK_REPS if quick else REPS
    python = [_python_point(n, batch, reps) for n in sizes for batch in BATCHES if batch <= n]
    return BookkeepingRecord(
        config=BookkeepingConfig(pool_sizes=sizes, batches=BATCHES, reps=reps),
        unit="ns_per_block",
        stat="median",
        python=tuple(python),
        cpp=_cpp(),
        targets=(),
    )


# --------------------------------------------------------------------------- report

_SHOWN = ("allocate", "share", "free_shared", "free", "release", "ref_cnt")


def _ns(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_section(r: BookkeepingRecord) -> list[str]:
    cpp = r.cpp
    cpp_points = {(p.num_blocks, p.batch): p for p in cpp.results}
    rows = []
    for p in r.python:
        c = cpp_points.get((p.num_blocks, p.batch))
        cells = [
            f"{_ns(getattr(p, o), 0)} / {_ns(None if c is None else getattr(c, o), 1)}"
            for o in _SHOWN
        ]
        rows.append((p.num_blocks, p.batch, *cells))
    lines = [
        f"ns per block, median of {r.config.reps} repetitions (Python) and of "
        f"{cpp.reps if cpp.reps is not None else '-'} (C++); cells are Python / C++:",
        "",
        *md_table(("pool blocks", "batch", *_SHOWN), rows),
    ]
    if not cpp.available:
        lines += ["", f"C++: unavailable ({cpp.reason})"]
    return lines


def plot(figure: Any, r: BookkeepingRecord) -> None:
    cpp = {(p.num_blocks, p.batch): p for p in r.cpp.results}
    points = r.python
    labels = [f"{p.num_blocks}\nx{p.batch}" for p in points]
    xs = list(range(len(points)))
    for i, op in enumerate(("allocate", "free")):
        ax = figure.add_subplot(1, 2, i + 1)
        width = 0.4
        ax.bar(
            [x - width / 2 for x in xs],
            [getattr(p, op) or 0 for p in points],
            width,
            label="Python",
        )
        cpp_values = [getattr(cpp.get((p.num_blocks, p.batch)), op, None) or 0 for p in points]
        ax.bar([x + width / 2 for x in xs], cpp_values, width, label="C++")
        ax.set_yscale("log")
        ax.set_xticks(xs, labels, fontsize=8)
        ax.set_xlabel("pool blocks x blocks per call")
        ax.set_ylabel("ns per block (median)")
        ax.set_title(f"bookkeeping: {op}")
        ax.legend()


SECTION = Section(RECORD, render_section, plot)
