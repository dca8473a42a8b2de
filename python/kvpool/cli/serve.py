"""``kvpool serve``: the OpenAI/Anthropic-compatible server over the engine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from kvpool.cli.common import (
    EXIT_USAGE,
    ProgressLine,
    add_format_arguments,
    add_model_argument,
    error_line,
    int_at_least,
    positive_float,
    resolve_model_argument,
)
from kvpool.errors import InvalidRequestError


def add_parser(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="an OpenAI- and Anthropic-compatible server with per-session caches (docs/SERVER.md)",
        description=(
            "Serve /v1/chat/completions, /v1/completions and /v1/messages; each session "
            "(X-Session-ID header, session_id or prompt_cache_key) keeps its KV cache in the "
            "pool or on disk across turns and restarts. Needs pip install 'kvpool[serve]'."
        ),
    )
    add_model_argument(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve.add_argument(
        "--port",
        type=int_at_least(0),
        default=8000,
        help="port (0: any free one; default: %(default)s)",
    )
    serve.add_argument(
        "--pool-mb",
        type=int_at_least(1),
        default=256,
        help="KV block pool size in MiB (default: %(default)s)",
    )
    add_format_arguments(serve)
    serve.add_argument(
        "--state-snapshot-blocks",
        type=int_at_least(1),
        default=None,
        metavar="N",
        help="hybrid and sliding-window models: stop every prefill each N blocks of 256 "
        "tokens to keep a snapshot of the recurrent state or the sliding window there, so "
        "later prompts that share that prefix resume from it (also stored in a redis:// "
        "--cache-url); each snapshot takes one state, or a window's blocks, of the pool "
        "(docs/CACHE_MANAGER.md); default: none (only at sessions' ends, prompts' ends and "
        "shared prefixes prefilled together)",
    )
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
        type=int_at_least(0),
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
        type=int_at_least(1),
        default=4096,
        help="the most tokens one request may generate (default: %(default)s)",
    )
    serve.add_argument(
        "--max-body-mb",
        type=positive_float,
        default=8.0,
        help="largest request body in MiB (default: %(default)s)",
    )
    serve.add_argument(
        "--flush-interval",
        type=positive_float,
        default=2.0,
        metavar="SECONDS",
        help="while busy, write finished sessions to disk this often (they are "
        "also written whenever the server is idle; default: %(default)s)",
    )
    serve.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    serve.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import os
    from importlib.util import find_spec

    missing = [m for m in ("starlette", "uvicorn", "prometheus_client") if find_spec(m) is None]
    if missing:
        error_line(
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
        state_snapshot_blocks=args.state_snapshot_blocks,
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
