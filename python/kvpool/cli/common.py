"""What every ``kvpool`` command shares: exit codes, the parser that reports a bad command
line in one line, argument types, the model argument and the progress line."""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from typing import IO, NoReturn

from kvpool.demo import DemoConfig, Progress
from kvpool.errors import KvpoolError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

DEMO_DEFAULTS = DemoConfig()
FALLBACK_MODEL = "demo"  # the random-weight recipe, when the default trained model is missing


class UsageError(Exception):
    """A command line argparse refused; the message is one line."""


class Parser(argparse.ArgumentParser):
    """Raises UsageError instead of printing the usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def add_format_arguments(parser: argparse.ArgumentParser) -> None:
    """``--kv-bits`` and ``--kv-group-size``: the pool's block format at rest."""
    parser.add_argument(
        "--kv-bits",
        type=int,
        choices=(8, 4),
        default=None,
        help="keep K/V blocks quantized at rest, 8 or 4 bits (MLX affine format; caches "
        "are dequantized for generation); default: dense, the model's dtype",
    )
    parser.add_argument(
        "--kv-group-size",
        type=int,
        choices=(64, 32),
        default=64,
        help="values per scale and bias with --kv-bits (default: %(default)s)",
    )


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        metavar="MODEL",
        help=f"a trained model ({', '.join(_trained_names())}), a built-in random-weight "
        f"recipe ({', '.join(_recipe_names())}), an mlx-lm model directory or a Hugging Face "
        f"repo id (default: {_default_model_name()}, fetched and converted on first use; "
        f"'{FALLBACK_MODEL}' when that cannot be done)",
    )


def _trained_names() -> list[str]:
    from kvpool.pretrained import TRAINED_MODELS

    return sorted(TRAINED_MODELS)


def _recipe_names() -> list[str]:
    from kvpool.models import RECIPES

    return sorted(RECIPES)


def _default_model_name() -> str:
    from kvpool.pretrained import DEFAULT_MODEL

    return DEFAULT_MODEL


def resolve_model_argument(model: str | None, progress: ProgressLine) -> str:
    """``model``, or the default trained model when None, fetched first if needed.

    When the default cannot be fetched or converted (offline, a wrong checksum), says so in
    one line on stderr and returns FALLBACK_MODEL, the random-weight recipe.
    """
    if model is not None:
        return model
    from kvpool.pretrained import DEFAULT_MODEL, ensure_trained_model

    try:
        ensure_trained_model(DEFAULT_MODEL, note=progress.note)
    except KvpoolError as exc:
        progress.close()
        error_line(
            f"kvpool: the trained model {DEFAULT_MODEL} is not available, running the "
            f"random-weight model '{FALLBACK_MODEL}' instead (retry: kvpool models fetch): {exc}"
        )
        return FALLBACK_MODEL
    return DEFAULT_MODEL


def error_line(message: str) -> None:
    print(" ".join(message.split()), file=sys.stderr)


class ProgressLine:
    """One status line on ``stream``, rewritten in place on a terminal.

    Elsewhere (a pipe, a log file) it writes a line only when a turn finishes, so logs stay
    short and an error before the first turn is the only line on stderr.
    """

    def __init__(self, stream: IO[str], min_interval_s: float = 0.1) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self.min_interval_s = min_interval_s
        self._last = 0.0
        self._width = 0

    def note(self, text: str) -> None:
        """A transient status (terminal only)."""
        if self.live:
            self._show(text, final=False)

    def __call__(self, p: Progress) -> None:
        finished = p.num_done == p.num_agents
        now = time.monotonic()
        if not finished and now - self._last < self.min_interval_s:
            return
        self._last = now
        text = (
            f"[{p.run}] turn {p.turn}/{p.num_turns}: {p.num_done}/{p.num_agents} agents done, "
            f"{p.num_generated} tokens generated"
        )
        if self.live:
            self._show(text, final=False)
        elif finished:
            self._show(text, final=True)

    def close(self) -> None:
        if self.live and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

    def _show(self, text: str, *, final: bool) -> None:
        if self.live:
            pad = " " * max(0, self._width - len(text))
            self.stream.write(f"\r{text}{pad}")
            self._width = len(text)
        elif final:
            self.stream.write(text + "\n")
        self.stream.flush()


def mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.2f} MiB"
