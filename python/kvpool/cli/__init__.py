"""The ``kvpool`` command: ``demo``, ``serve``, ``models``, ``info`` and ``bench``.

Without ``--model``, ``demo``, ``serve`` and ``info`` run the trained default model
(:mod:`kvpool.pretrained`), or say in one line why not and run the random-weight recipe.
Exit codes: 0 done; 1 a generation failed; 2 bad input (an option value, a model that cannot
be loaded, a pool too small), reported as one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from kvpool.blas import use_fast_cpu_blas
from kvpool.cli import bench, demo, info, models, serve
from kvpool.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Parser, UsageError, error_line
from kvpool.errors import GenerationError, KvpoolError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="kvpool",
        description="Per-agent KV caches in a shared block pool, batched generation on MLX.",
    )
    parser.add_argument(
        "--no-fast-blas",
        action="store_true",
        help="keep MLX's bundled reference BLAS (Linux; by default float32 matmuls run in "
        "OpenBLAS, see BLAS.md)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands.required = True

    for command in (demo, info, bench, serve, models):
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kvpool`` command line; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        error_line(str(exc))
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    if sys.platform == "linux" and not args.no_fast_blas:
        use_fast_cpu_blas()
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except GenerationError as exc:
        error_line(f"kvpool {args.command}: generation failed: {exc}")
        return EXIT_FAILED
    except KvpoolError as exc:
        error_line(f"kvpool {args.command}: error: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        error_line(f"kvpool {args.command}: interrupted")
        return 130
