"""The runner behind ``kvpool bench`` (the benchmarks are in
:mod:`kvpool.benchmarks.registry`).

:func:`run_benchmarks` runs some, adds to each record where and how it ran, prints it as
one JSON line on stdout, writes ``<out>/<name>.json`` and then the report (``results.md``
and plots, :mod:`kvpool.benchmarks.report`) over every record in ``out``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from kvpool.benchmarks import environment, report
from kvpool.benchmarks.measure import round_floats
from kvpool.benchmarks.registry import REGISTRY, Benchmark


def _log(stream: IO[str], text: str) -> None:
    stream.write(text + "\n")
    stream.flush()


def run_one(bench: Benchmark, quick: bool, model: str | None = None) -> dict[str, Any]:
    """Run ``bench`` and wrap its record: name, mode, timing, environment (BLAS included).

    A benchmark that raises gives a record with ``error`` set instead.
    """
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    gc.collect()
    try:
        result = round_floats(bench.run(quick, model), 4)
        error = None
    except Exception as exc:  # one benchmark failing must not lose the others
        result = {}
        error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc(file=sys.stderr)
    record: dict[str, Any] = {
        "bench": bench.name,
        "quick": quick,
        "started": started,
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "error": error,
        **{k: v for k, v in result.items() if k not in ("bench", "quick")},
        "environment": environment.describe(),
    }
    if bench.uses_mlx:
        import mlx.core as mx

        from kvpool.benchmarks.turns import load_recipe

        load_recipe.cache_clear()  # the next benchmark starts without this one's model
        gc.collect()
        mx.clear_cache()
    return record


def run_benchmarks(
    names: Sequence[str],
    *,
    quick: bool,
    out_dir: Path,
    json_path: Path | None = None,
    model: str | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> list[dict[str, Any]]:
    """Run the named benchmarks in registry order; returns their records.

    ``model`` goes to the benchmarks that take one (``Benchmark.takes_model``); the others
    keep their fixed models.
    Progress goes to ``stderr``, one JSON line per record to ``stdout``. Records are written
    to ``out_dir/<name>.json`` as they finish; the report is rewritten at the end.
    """

    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    chosen = [REGISTRY[n] for n in REGISTRY if n in set(names)]
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    t0 = time.perf_counter()
    for i, bench in enumerate(chosen, start=1):
        mode = " --quick" if quick else ""
        _log(stderr, f"[{i}/{len(chosen)}] {bench.name}{mode}: {bench.summary} ...")
        record = run_one(bench, quick, model if bench.takes_model else None)
        records.append(record)
        (out_dir / f"{bench.name}.json").write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(record), file=stdout, flush=True)
        status = "FAILED: " + record["error"] if record["error"] else "done"
        _log(stderr, f"[{i}/{len(chosen)}] {bench.name} {status} in {record['elapsed_s']:.1f} s")
    total = time.perf_counter() - t0
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(records, indent=2) + "\n")
    finished = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    run = {
        "benchmarks": [b.name for b in chosen],
        "quick": quick,
        "total_s": round(total, 1),
        "finished": finished,
    }
    (out_dir / report.RUN_NAME).write_text(json.dumps(run, indent=2) + "\n")
    written = report.write_report(out_dir)
    for note in written.notes:
        _log(stderr, f"note: {note}")
    _log(stderr, f"{len(chosen)} benchmark(s) in {total:.1f} s; report: {written.markdown}")
    return records


def script_main(name: str, argv: Sequence[str] | None = None) -> None:
    """``python bench/bench_<name>.py [--quick] [--json FILE] [--no-fast-blas]``: run one
    benchmark in this process and print its record (the thin scripts in ``bench/``)."""
    bench = REGISTRY[name]
    parser = argparse.ArgumentParser(description=f"kvpool benchmark {name}: {bench.summary}")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the record here")
    parser.add_argument(
        "--no-fast-blas", action="store_true", help="keep MLX's reference BLAS (Linux)"
    )
    args = parser.parse_args(argv)
    if sys.platform == "linux" and not args.no_fast_blas:
        from kvpool.blas import use_fast_cpu_blas

        use_fast_cpu_blas()  # like the kvpool command: before MLX loads
    record = run_one(bench, args.quick)
    text = json.dumps(record, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    if record["error"]:
        sys.exit(1)
