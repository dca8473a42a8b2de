"""The ``kvpool`` command: ``demo``, ``serve``, ``models``, ``info`` and ``bench``.

Without ``--model``, ``demo``, ``serve`` and ``info`` run the trained default model
(:mod:`kvpool.pretrained`), or say in one line why not and run the random-weight recipe.
Exit codes: 0 done; 1 a generation failed; 2 bad input (an option value, a model that cannot
be loaded, a pool too small), reported as one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

from kvpool.blas import use_fast_cpu_blas
from kvpool.demo import CACHED, REPREFILL, DemoConfig, DemoResult, Progress, RunResult, run_demo
from kvpool.errors import GenerationError, InvalidRequestError, KvpoolError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

_DEFAULTS = DemoConfig()
FALLBACK_MODEL = "demo"  # the random-weight recipe, when the default trained model is missing


class UsageError(Exception):
    """A command line argparse refused; the message is one line."""


class _Parser(argparse.ArgumentParser):
    """Raises UsageError instead of printing the usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def _int_at_least(minimum: int) -> Callable[[str], int]:
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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def _add_format_arguments(parser: argparse.ArgumentParser) -> None:
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


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
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
        _error(
            f"kvpool: the trained model {DEFAULT_MODEL} is not available, running the "
            f"random-weight model '{FALLBACK_MODEL}' instead (retry: kvpool models fetch): {exc}"
        )
        return FALLBACK_MODEL
    return DEFAULT_MODEL


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kvpool",
        description="Per-agent KV caches in a shared block pool, batched generation on MLX.",
    )
    parser.add_argument(
        "--no-fast-blas",
        action="store_true",
        help="keep MLX's bundled reference BLAS (Linux; by default float32 matmuls run in "
        "OpenBLAS, see BLAS.md)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    demo = commands.add_parser(
        "demo",
        help="run a multi-agent, multi-turn workload with and without cache reuse",
        description=(
            "Run N agents for T turns through the block-pool engine twice: reusing "
            "each agent's cache turn after turn, then re-prefilling every turn from scratch "
            "with the same prompts. Prints a per-turn table and a summary; checks that both "
            "runs generate the same tokens (greedy decoding)."
        ),
    )
    _add_model_argument(demo)
    demo.add_argument(
        "--agents",
        type=_int_at_least(1),
        default=_DEFAULTS.num_agents,
        metavar="N",
        help="number of agents (default: %(default)s)",
    )
    demo.add_argument(
        "--turns",
        type=_int_at_least(1),
        default=_DEFAULTS.num_turns,
        metavar="T",
        help="turns per agent (default: %(default)s)",
    )
    demo.add_argument(
        "--max-tokens",
        type=_int_at_least(1),
        default=_DEFAULTS.max_tokens,
        metavar="M",
        help="tokens generated per turn, at most (default: %(default)s)",
    )
    demo.add_argument(
        "--pool-mb",
        type=_positive_float,
        default=None,
        metavar="MB",
        help="K/V pool size in MiB (default: the workload's worst case)",
    )
    _add_format_arguments(demo)
    demo.add_argument(
        "--seed",
        type=_int_at_least(0),
        default=_DEFAULTS.seed,
        metavar="S",
        help="picks the agents' text (default: %(default)s)",
    )
    demo.add_argument(
        "--json", action="store_true", help="print the result as JSON on stdout, nothing else"
    )
    demo.set_defaults(handler=_cmd_demo)

    info = commands.add_parser(
        "info",
        help="versions, model cache directory and a model's cache geometry",
        description="Print kvpool's and MLX's versions and a model's cache geometry.",
    )
    _add_model_argument(info)
    info.add_argument("--json", action="store_true", help="print JSON on stdout")
    info.set_defaults(handler=_cmd_info)

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
        help="model of the benchmarks that take one ("
        + ", ".join(_bench_names(takes_model=True))
        + "; default: theirs, the trained default model); the others keep their "
        "fixed models. Any reference --model of demo takes",
    )
    bench.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    bench.set_defaults(handler=_cmd_bench)
    _add_serve_parser(commands)
    _add_models_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kvpool`` command line; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    if sys.platform == "linux" and not args.no_fast_blas:
        use_fast_cpu_blas()
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except GenerationError as exc:
        _error(f"kvpool {args.command}: generation failed: {exc}")
        return EXIT_FAILED
    except KvpoolError as exc:
        _error(f"kvpool {args.command}: error: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _error(f"kvpool {args.command}: interrupted")
        return 130


def _error(message: str) -> None:
    print(" ".join(message.split()), file=sys.stderr)


# --------------------------------------------------------------------------- demo


def _cmd_demo(args: argparse.Namespace) -> int:
    progress = ProgressLine(sys.stderr)
    model = resolve_model_argument(args.model, progress)
    config = DemoConfig(
        model=model,
        num_agents=args.agents,
        num_turns=args.turns,
        max_tokens=args.max_tokens,
        pool_mb=args.pool_mb,
        seed=args.seed,
        kv_bits=args.kv_bits,
        kv_group_size=args.kv_group_size,
    )
    progress.note(f"loading {config.model} ...")
    try:
        result = run_demo(config, progress)
    finally:
        progress.close()
    if args.json:
        print(result.to_json())
    else:
        print(format_result(result))
    return EXIT_OK


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


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _speedup(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.2f} MiB"


def format_table(cached: RunResult, reprefill: RunResult, identical: set[tuple[int, str]]) -> str:
    """Per turn and agent: the cached run's numbers, then the re-prefill run's."""
    head = (
        f"{'turn':>4}  {'agent':<10} {'prompt':>6}  "
        f"{'cached':>6} {'prefill':>7} {'TTFT ms':>8} {'tok/s':>6}  | "
        f"{'prefill':>7} {'TTFT ms':>8} {'tok/s':>6}  {'same':>4}"
    )
    group = f"{'':24}{'--- ' + CACHED + ' ---':^31}| {'--- ' + REPREFILL + ' ---':^24}"
    lines = [group, head, "-" * len(head)]
    previous_turn = None
    for a in cached.records:
        b = reprefill.record(a.turn, a.agent_id)
        if previous_turn is not None and a.turn != previous_turn:
            lines.append("")
        previous_turn = a.turn
        lines.append(
            f"{a.turn:>4}  {a.agent_id:<10} {a.prompt_tokens:>6}  "
            f"{a.cached_tokens:>6} {a.prefilled_tokens:>7} {_ms(a.ttft_ms):>8} "
            f"{_rate(a.decode_tokens_per_s):>6}  | "
            f"{b.prefilled_tokens:>7} {_ms(b.ttft_ms):>8} {_rate(b.decode_tokens_per_s):>6}  "
            f"{'yes' if (a.turn, a.agent_id) in identical else 'NO':>4}"
        )
    return "\n".join(lines)


def format_result(result: DemoResult) -> str:
    """The human-readable report: the table, then the summary."""
    config, model, pool = result.config, result.model, result.pool
    cached, reprefill = result.cached, result.reprefill
    different = {(m.turn, m.agent_id) for m in result.mismatches}
    identical = {(r.turn, r.agent_id) for r in cached.records} - different
    lines = [format_table(cached, reprefill, identical), "", "summary"]

    def row(label: str, a: str, b: str, speedup: str = "") -> str:
        return f"  {label:<20} {a:>12} {b:>12} {speedup:>9}"

    total_a, total_b = f"{cached.total_s:.2f} s", f"{reprefill.total_s:.2f} s"
    ttft_a, ttft_b = f"{_ms(cached.mean_ttft_ms)} ms", f"{_ms(reprefill.mean_ttft_ms)} ms"
    lines += [
        row("", CACHED, REPREFILL, "speedup"),
        row("total time", total_a, total_b, _speedup(result.speedup_total)),
        row("mean TTFT", ttft_a, ttft_b, _speedup(result.speedup_ttft)),
        row("prefilled tokens", f"{cached.prefilled_tokens:,}", f"{reprefill.prefilled_tokens:,}"),
        row("cached tokens", f"{cached.cached_tokens:,}", f"{reprefill.cached_tokens:,}"),
        row("generated tokens", f"{cached.generated_tokens:,}", f"{reprefill.generated_tokens:,}"),
    ]
    num_equal = result.num_compared - len(result.mismatches)
    if config.kv_bits is None:
        verdict = "yes" if result.outputs_identical else "NO"
        lines.append(
            f"  outputs identical: {verdict} ({num_equal}/{result.num_compared} generations "
            f"equal, {len(result.mismatches)} mismatches)"
        )
    else:
        # Quantized blocks change the resumed caches, not the re-prefilled ones: agreement
        # is the measure, not identity.
        first_equal = result.num_compared - sum(m.first_difference == 0 for m in result.mismatches)
        lines.append(
            f"  agreement            {num_equal}/{result.num_compared} generations equal to the "
            f"re-prefill run, first token equal in {first_equal}/{result.num_compared}; "
            f"{config.kv_bits}-bit blocks at rest are lossy, so some resumed turns are expected "
            "to differ"
        )
    for m in result.mismatches:
        lines.append(
            f"    turn {m.turn} {m.agent_id}: first difference at generated token "
            f"{m.first_difference} ({m.cached_tokens} vs {m.reprefill_tokens} tokens)"
        )
    lines += [
        f"  workload             {config.num_agents} agents x {config.num_turns} turns, "
        f"up to {config.max_tokens} new tokens per turn, greedy, seed {config.seed}; "
        f"prompts {_prompt_range(cached)} tokens",
        f"  pool                 {pool.num_blocks} blocks x {_mib(pool.bytes_per_block)} = "
        f"{_mib(pool.bytes_total)}; after the cached run {pool.num_used} used "
        f"({_mib(pool.bytes_used)}), {pool.num_free} free; peak {pool.peak_used} used",
        f"  model                {model.name}: {model.model_type}, {model.num_layers} layers, "
        f"hidden {model.hidden_size}, {model.num_attention_heads} heads, "
        f"{model.num_kv_heads} KV heads x {model.head_dim}, vocab {model.vocab_size}, "
        f"{model.num_params / 1e6:.1f}M params",
        f"  cache                {model.cache_spec}",
        f"  blas                 {result.blas}",
    ]
    if model.random_weights:
        lines += [
            "  note                 this model has RANDOM weights: its text is not meaningful "
            "(the geometry and the timings are real)",
            f"  sample text          {_clip(result.sample_text, 60)}",
        ]
    else:
        lines += [
            f"  conversation         agent-0, turn {config.num_turns} (cached run; "
            f"at most {config.max_tokens} tokens per answer)",
            *_wrapped("    user:      ", result.sample_question),
            *_wrapped("    assistant: ", result.sample_text),
        ]
    return "\n".join(lines)


def _wrapped(label: str, text: str, width: int = 100) -> list[str]:
    """``text`` on lines of at most ``width`` columns, the first after ``label``."""
    import textwrap

    return textwrap.wrap(
        " ".join(text.split()) or "(nothing)",
        width=width,
        initial_indent=label,
        subsequent_indent=" " * len(label),
    )


def _prompt_range(run: RunResult) -> str:
    lengths = [r.prompt_tokens for r in run.records]
    return f"{min(lengths)}-{max(lengths)}"


def _clip(text: str, limit: int) -> str:
    shown = ascii(text[:limit])
    return shown + (" ..." if len(text) > limit else "")


# --------------------------------------------------------------------------- bench


def _bench_names(*, takes_model: bool = False) -> list[str]:
    from kvpool.benchmarks.registry import REGISTRY

    return [n for n, b in REGISTRY.items() if b.takes_model or not takes_model]


def _cmd_bench(args: argparse.Namespace) -> int:
    from kvpool.benchmarks.environment import default_out_dir
    from kvpool.benchmarks.registry import REGISTRY
    from kvpool.benchmarks.runner import run_benchmarks

    if args.list:
        for bench in REGISTRY.values():
            print(f"{bench.name:<16} {bench.summary}")
        return EXIT_OK
    unknown = [n for n in args.names if n not in REGISTRY]
    if unknown:
        _error(
            f"kvpool bench: error: no benchmark named {', '.join(map(repr, unknown))} "
            f"(benchmarks: {', '.join(REGISTRY)})"
        )
        return EXIT_USAGE
    out_dir = args.out if args.out is not None else default_out_dir(args.quick)
    if out_dir.exists() and not out_dir.is_dir():
        _error(f"kvpool bench: error: --out {str(out_dir)!r} exists and is not a directory")
        return EXIT_USAGE
    names = args.names or list(REGISTRY)
    if args.model is not None and not any(REGISTRY[n].takes_model for n in names):
        _error(
            f"kvpool bench: error: --model applies to {', '.join(_bench_names(takes_model=True))}"
            f", none of which is chosen ({', '.join(names)})"
        )
        return EXIT_USAGE
    records = run_benchmarks(
        names, quick=args.quick, out_dir=out_dir, json_path=args.json, model=args.model
    )
    return EXIT_FAILED if any(r["error"] for r in records) else EXIT_OK


# --------------------------------------------------------------------------- serve


def _add_serve_parser(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="an OpenAI- and Anthropic-compatible server with per-session caches (docs/SERVER.md)",
        description=(
            "Serve /v1/chat/completions, /v1/completions and /v1/messages; each session "
            "(X-Session-ID header, session_id or prompt_cache_key) keeps its KV cache in the "
            "pool or on disk across turns and restarts. Needs pip install 'kvpool[serve]'."
        ),
    )
    _add_model_argument(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve.add_argument(
        "--port",
        type=_int_at_least(0),
        default=8000,
        help="port (0: any free one; default: %(default)s)",
    )
    serve.add_argument(
        "--pool-mb",
        type=_int_at_least(1),
        default=256,
        help="KV block pool size in MiB (default: %(default)s)",
    )
    _add_format_arguments(serve)
    serve.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="where sessions' caches are kept on disk (default: per model, under "
        "~/.cache/kvpool/sessions)",
    )
    serve.add_argument(
        "--cache-url",
        metavar="URL",
        help="the cold tier instead: file:///path (or a path) or redis://host:port/db"
        "[?ttl=SECONDS] shared by several servers (docs/DEPLOY.md); needs "
        "pip install 'kvpool[redis]'",
    )
    serve.add_argument(
        "--cache-secret",
        metavar="SECRET",
        help="the secret itself (visible to other users in ps: prefer --cache-secret-file "
        "or $KVPOOL_CACHE_SECRET)",
    )
    serve.add_argument(
        "--cache-secret-file",
        type=Path,
        metavar="FILE",
        help="a secret shared by every server of a deployment (the file's bytes; default: "
        "$KVPOOL_CACHE_SECRET): keys a MAC of every block and session in a shared "
        "--cache-url redis://..., so nobody else who can write to Redis can change them "
        "(docs/DEPLOY.md)",
    )
    serve.add_argument(
        "--api-key",
        metavar="KEY[:TENANT]",
        action="append",
        default=[],
        help="require a key (Authorization: Bearer KEY or x-api-key: KEY); repeat for several; "
        "KEY:TENANT gives the key's requests that tenant's cache salt and sessions "
        "(docs/SERVER.md#tenants); default: $KVPOOL_API_KEY, else none",
    )
    serve.add_argument(
        "--api-keys-file",
        type=Path,
        metavar="FILE",
        help="more keys, one KEY[:TENANT] per line ('#' starts a comment)",
    )
    serve.add_argument(
        "--max-queue",
        type=_int_at_least(0),
        default=64,
        help="requests that may wait for pool room before 503 (default: %(default)s)",
    )
    serve.add_argument(
        "--served-model-name",
        metavar="NAME",
        nargs="+",
        default=[],
        help="the model ids clients may send, the first in responses (default: the string "
        "given to --model, and its directory name)",
    )
    serve.add_argument(
        "--max-tokens-cap",
        type=_int_at_least(1),
        default=4096,
        help="the most tokens one request may generate (default: %(default)s)",
    )
    serve.add_argument(
        "--max-body-mb",
        type=_positive_float,
        default=8.0,
        help="largest request body in MiB (default: %(default)s)",
    )
    serve.add_argument(
        "--flush-interval",
        type=_positive_float,
        default=2.0,
        metavar="SECONDS",
        help="while busy, write finished sessions to disk this often (they are "
        "also written whenever the server is idle; default: %(default)s)",
    )
    serve.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    serve.set_defaults(handler=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    import os
    from importlib.util import find_spec

    missing = [m for m in ("starlette", "uvicorn", "prometheus_client") if find_spec(m) is None]
    if missing:
        _error(
            f"kvpool serve: error: {', '.join(missing)} not installed; install the server: "
            "pip install 'kvpool[serve]'"
        )
        return EXIT_USAGE
    from kvpool.server.serve import ServerConfig, serve

    progress = ProgressLine(sys.stderr)
    model = resolve_model_argument(args.model, progress)
    progress.close()
    config = ServerConfig(
        model=model,
        host=args.host,
        port=args.port,
        pool_mb=args.pool_mb,
        kv_bits=args.kv_bits,
        kv_group_size=args.kv_group_size,
        cache_dir=args.cache_dir,
        cache_url=args.cache_url,
        api_keys=tuple(args.api_key),
        env_api_key=None
        if args.api_key or args.api_keys_file
        else os.environ.get("KVPOOL_API_KEY") or None,
        api_keys_file=args.api_keys_file,
        cache_secret=_cache_secret(args.cache_secret, args.cache_secret_file),
        max_queue=args.max_queue,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_tokens_cap=args.max_tokens_cap,
        served_model_names=tuple(args.served_model_name),
        flush_interval_s=args.flush_interval,
        log_level=args.log_level,
    )
    return serve(config)


def _cache_secret(given: str | None, path: Path | None) -> bytes | None:
    """The deployment secret: ``--cache-secret``, the file's bytes (surrounding whitespace
    stripped), else ``$KVPOOL_CACHE_SECRET``, else None."""
    import os

    if given is not None and path is not None:
        raise InvalidRequestError("give --cache-secret or --cache-secret-file, not both")
    if given is not None:
        if not given.strip():
            raise InvalidRequestError("--cache-secret is empty")
        return given.strip().encode()
    if path is not None:
        try:
            secret = path.read_bytes().strip()
        except OSError as exc:
            raise InvalidRequestError(
                f"--cache-secret-file {str(path)!r}: {exc.strerror or exc}"
            ) from exc
        if not secret:
            raise InvalidRequestError(f"--cache-secret-file {str(path)!r} is empty")
        return secret
    env = os.environ.get("KVPOOL_CACHE_SECRET", "").strip()
    return env.encode() if env else None


# --------------------------------------------------------------------------- models


def _add_models_parser(commands: Any) -> None:
    models = commands.add_parser(
        "models",
        help="list the cached models and where they are; fetch the trained model ahead of time",
        description=(
            "Without ACTION (or with 'list'): the model cache directory, the trained models "
            "(fetched with pip from the package index, converted once) and the built-in "
            "random-weight recipes, with what is on disk. 'fetch [NAME]' downloads and "
            "converts a trained model now (default: the default model)."
        ),
    )
    models.add_argument("action", nargs="?", choices=("list", "fetch"), default="list")
    models.add_argument("name", nargs="?", metavar="NAME", help="trained model to fetch")
    models.add_argument("--json", action="store_true", help="print JSON on stdout (list)")
    models.set_defaults(handler=_cmd_models)


def _cmd_models(args: argparse.Namespace) -> int:
    from kvpool.pretrained import DEFAULT_MODEL, ensure_trained_model

    if args.action == "fetch":
        progress = ProgressLine(sys.stderr)
        try:
            path = ensure_trained_model(args.name or DEFAULT_MODEL, note=progress.note)
        finally:
            progress.close()
        print(path)
        return EXIT_OK
    if args.name is not None:
        _error(f"kvpool models: error: 'list' takes no NAME, got {args.name!r}")
        return EXIT_USAGE
    listing = model_listing()
    if args.json:
        print(json.dumps(listing, indent=2))
        return EXIT_OK
    print(f"model cache   {listing['cache_dir']}")
    print("trained models (downloaded with pip from the package index, converted once):")
    for m in listing["trained"]:
        state = "ready" if m["converted"] else "not fetched (kvpool models fetch)"
        default = "  [default]" if m["default"] else ""
        print(f"  {m['name']:<24} {state}{default}")
        if m["converted"]:
            print(f"  {'':<24} {m['path']} ({_mib(m['bytes'])})")
        if m["wheel_bytes"]:
            print(f"  {'':<24} wheel {m['wheel']} ({_mib(m['wheel_bytes'])})")
    print("built-in recipes (random weights, built on first use):")
    for r in listing["recipes"]:
        where = f"{r['path']} ({_mib(r['bytes'])})" if r["built"] else "not built"
        print(f"  {r['name']:<24} {where}")
    print("also: any mlx-lm model directory, or a Hugging Face repo id (owner/name)")
    return EXIT_OK


def model_listing() -> dict[str, Any]:
    """What ``kvpool models`` prints: the cache directory and each model's state on disk."""
    from kvpool.models import RECIPES, model_cache_dir
    from kvpool.pretrained import (
        DEFAULT_MODEL,
        TRAINED_MODELS,
        is_converted,
        trained_model_dir,
        wheel_path,
    )

    def size(path: Path) -> int:
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0

    trained = []
    for name, model in sorted(TRAINED_MODELS.items()):
        path, wheel = trained_model_dir(model), wheel_path(model)
        converted = is_converted(model)
        trained.append(
            {
                "name": name,
                "default": name == DEFAULT_MODEL,
                "converted": converted,
                "path": str(path),
                "bytes": size(path) if converted else 0,
                "wheel": str(wheel),
                "wheel_bytes": size(wheel),
                "source": model.requirement,
            }
        )
    recipes = []
    for name in sorted(RECIPES):
        path = model_cache_dir() / name
        built = path.is_dir()
        recipes.append(
            {"name": name, "built": built, "path": str(path), "bytes": size(path) if built else 0}
        )
    return {"cache_dir": str(model_cache_dir()), "trained": trained, "recipes": recipes}


# --------------------------------------------------------------------------- info


def _cmd_info(args: argparse.Namespace) -> int:
    import kvpool
    from kvpool.cache.spec import ModelCacheSpec
    from kvpool.demo import resolve_and_load
    from kvpool.mlx.slab_kernels import device_report
    from kvpool.models import RECIPES, model_cache_dir

    progress = ProgressLine(sys.stderr)
    name = resolve_model_argument(args.model, progress)
    progress.close()
    path, model, _ = resolve_and_load(name)
    spec = ModelCacheSpec.from_model(model)
    data: dict[str, Any] = {
        "kvpool": kvpool.__version__,
        "mlx": _version("mlx"),
        "mlx_lm": _version("mlx-lm"),
        "model_cache_dir": str(model_cache_dir()),
        "recipes": sorted(RECIPES),
        "model": name,
        "model_path": str(path),
        "cache_spec": spec.describe(),
        "bytes_per_block": spec.bytes_per_block,
        "block_tokens": spec.block_tokens,
        **device_report(),
    }
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        for key, value in data.items():
            shown = ", ".join(value) if isinstance(value, list) else value
            print(f"{key:<16} {shown}")
    return EXIT_OK


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
