"""``kvpool bench``: run benchmarks, print their records, write the report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kvpool.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    error_line,
)


def add_parser(commands: Any) -> None:
    bench = commands.add_parser(
        "bench",
        help="benchmarks against plain mlx-lm and other baselines (see BENCHMARKS.md)",
        description=(
            "Run benchmarks (all when no NAME is given) and print one JSON record per "
            "benchmark on stdout, progress on stderr. Records, a markdown table and plots "
            "(with matplotlib: pip install 'kvpool[bench]') go to --out."
        ),
    )
    bench.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help="benchmarks to run: " + ", ".join(_bench_names()) + " (default: all)",
    )
    bench.add_argument(
        "--quick", action="store_true", help="a short smoke run of each (numbers not meaningful)"
    )
    bench.add_argument(
        "--json", type=Path, metavar="FILE", help="also write every record, as a JSON list"
    )
    bench.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="results folder (default: bench/results in a kvpool checkout, else "
        "./kvpool-bench-results; --quick runs use its quick/ subfolder)",
    )
    bench.add_argument(
        "--model",
        metavar="MODEL",
        help="model of the benchmarks that run one ("
        + ", ".join(_bench_names(takes_model=True))
        + "; default: each one's own, the model of its committed record; quality: the "
        "trained default model); the record's config names the model that ran. Any "
        "reference --model of demo takes",
    )
    bench.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    bench.set_defaults(handler=run)


def _bench_names(*, takes_model: bool = False) -> list[str]:
    from kvpool.benchmarks.registry import REGISTRY

    return [n for n, b in REGISTRY.items() if b.takes_model or not takes_model]


def run(args: argparse.Namespace) -> int:
    from kvpool.benchmarks.environment import default_out_dir
    from kvpool.benchmarks.registry import REGISTRY
    from kvpool.benchmarks.runner import run_benchmarks

    if args.list:
        for bench in REGISTRY.values():
            print(f"{bench.name:<16} {bench.summary}")
        return EXIT_OK
    unknown = [n for n in args.names if n not in REGISTRY]
    if unknown:
        error_line(
            f"kvpool bench: error: no benchmark named {', '.join(map(repr, unknown))} "
            f"(benchmarks: {', '.join(REGISTRY)})"
        )
        return EXIT_USAGE
    out_dir = args.out if args.out is not None else default_out_dir(args.quick)
    if out_dir.exists() and not out_dir.is_dir():
        error_line(f"kvpool bench: error: --out {str(out_dir)!r} exists and is not a directory")
        return EXIT_USAGE
    names = args.names or list(REGISTRY)
    if args.model is not None and not any(REGISTRY[n].takes_model for n in names):
        error_line(
            f"kvpool bench: error: --model applies to {', '.join(_bench_names(takes_model=True))}"
            f", none of which is chosen ({', '.join(names)})"
        )
        return EXIT_USAGE
    records = run_benchmarks(
        names, quick=args.quick, out_dir=out_dir, json_path=args.json, model=args.model
    )
    return EXIT_FAILED if any(r["error"] for r in records) else EXIT_OK
