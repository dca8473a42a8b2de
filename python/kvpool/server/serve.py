"""``kvpool serve``: build the engine, the store and the loop, run uvicorn until a signal.

Startup: load the model (a recipe, built offline on first use, or an mlx-lm directory), a
pool of ``pool_mb`` MiB, the engine and an :class:`~kvpool.store.AgentCacheStore` over
``cache_url`` (a directory, ``file:///path``, or ``redis://host:port/db``: a cache tier shared
by several servers, docs/DEPLOY.md) or ``cache_dir`` (default: a folder per model under the
user cache directory), start the engine loop, bind, and print
``kvpool serve: listening on http://HOST:PORT`` on stdout.

SIGTERM / SIGINT: uvicorn stops accepting connections and waits up to ``shutdown_timeout_s``
for requests in flight to finish (streams included), then cancels what is left; the engine
loop then cancels anything still running and writes every idle session to disk, and the
process exits 0.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvpool.errors import InvalidRequestError
from kvpool.server.params import Limits

__all__ = ["ServerConfig", "build_state", "default_cache_dir", "serve"]

MIB = 2**20
logger = logging.getLogger("kvpool.server")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Options of ``kvpool serve`` (see ``kvpool serve --help``)."""

    model: str = "demo"
    host: str = "127.0.0.1"
    port: int = 8000
    pool_mb: int = 256
    kv_bits: int | None = None  # blocks at rest: None dense, 8 or 4 affine-quantized
    kv_group_size: int = 64
    state_snapshot_blocks: int | None = None  # a state / window snapshot every N blocks
    cache_dir: Path | None = None
    cache_url: str | None = None  # wins over cache_dir; file:///path, a path, redis://...
    api_keys: tuple[str, ...] = ()  # "KEY" (the default tenant) or "KEY:TENANT"; none: open
    api_keys_file: Path | None = None  # one KEY[:TENANT] per line
    env_api_key: str | None = None  # $KVPOOL_API_KEY: one default-tenant key, taken whole
    cache_secret: bytes | None = None  # keys the MAC of shared-tier (Redis) blocks
    max_queue: int = 64
    max_body_bytes: int = 8 * MIB
    max_tokens_cap: int = 4096
    default_max_tokens: int = 256
    served_model_names: tuple[str, ...] = ()  # the first is what responses carry
    flush_interval_s: float = 2.0
    shutdown_timeout_s: float = 10.0
    max_batch_size: int = 32
    log_level: str = "warning"


def default_cache_dir(model_name: str, fingerprint: str) -> Path:
    """``$XDG_CACHE_HOME/kvpool/sessions/<model>-<fingerprint prefix>`` (or ~/.cache/...)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = fingerprint.split(":")[-1][:12]
    return base / "kvpool" / "sessions" / f"{model_name}-{digest}"


_QUANT_DIR = re.compile(r"q\d+g\d+-\w+")  # a quantized format's sessions: BlockFormat.name


def format_dir(cache_dir: Path, spec: Any) -> Path:
    """Where sessions of ``spec``'s block format live under ``cache_dir``: the directory
    itself for dense blocks (as always), a subdirectory named after a quantized format
    (``q4g64-float16``). Servers of different ``--kv-bits`` on one directory never read or
    overwrite each other's sessions."""
    fmt = spec.format
    return cache_dir / fmt.name if fmt.is_quantized else cache_dir


def adopt_files(cache_dir: Path, ours: Path, spec: Any) -> int:
    """Move session files of ``spec``'s quantized format that an older kvpool wrote into
    ``cache_dir`` itself to ``ours`` (its format's directory); returns how many. Only the
    header of each file is read; files of other formats, and names already taken in
    ``ours``, stay where they are."""
    from kvpool.errors import KvpoolError
    from kvpool.persist import agent_id_of, read_cache_info

    if ours == cache_dir:
        return 0
    moved = 0
    for path in sorted(cache_dir.iterdir()):
        if agent_id_of(path) is None or (ours / path.name).exists():
            continue
        try:
            if read_cache_info(path).spec != spec:
                continue
            os.rename(path, ours / path.name)
        except (KvpoolError, OSError) as exc:
            logger.warning("not moving %s to %s: %s", path, ours, exc)
            continue
        moved += 1
    return moved


def other_formats(cache_dir: Path, ours: Path) -> dict[str, int]:
    """Session files of other block formats under ``cache_dir`` (not ``ours``): the
    format's directory name (``"."`` for dense) -> how many, for the start-up log."""
    from kvpool.persist import agent_id_of

    def count(directory: Path) -> int:
        try:
            return sum(1 for p in directory.iterdir() if agent_id_of(p) is not None)
        except OSError:
            return 0

    found = {}
    candidates = [cache_dir, *(p for p in cache_dir.iterdir() if _QUANT_DIR.fullmatch(p.name))]
    for directory in candidates:
        if directory != ours and directory.is_dir() and (n := count(directory)):
            found["." if directory == cache_dir else directory.name] = n
    return found


def _model_names(config: ServerConfig) -> tuple[str, ...]:
    """The names requests may use, the one responses carry first: ``--served-model-name``
    (all of them) or else the string given to ``--model`` and its directory name."""
    if config.served_model_names:
        return tuple(dict.fromkeys(config.served_model_names))
    return tuple(dict.fromkeys((config.model, _dir_name(config))))


def _dir_name(config: ServerConfig) -> str:
    """The model's directory (or recipe) name: what the default cache directory is named by."""
    return Path(config.model).name or config.model


def build_state(config: ServerConfig) -> Any:
    """Load everything; returns the :class:`~kvpool.server.app.ServerState` (loop started)."""
    from kvpool import AgentCacheStore, BlockPool, BlockPoolBatchEngine, ModelCacheSpec
    from kvpool.engine import model_vocab_size
    from kvpool.models import load_model
    from kvpool.persist import model_fingerprint
    from kvpool.server.app import ServerState
    from kvpool.server.loop import EngineLoop
    from kvpool.server.metrics import ServerMetrics
    from kvpool.server.sessions import SessionRegistry
    from kvpool.server.tenants import ApiKeys
    from kvpool.server.tools import ToolFormat
    from kvpool.tier import local_path, open_tier

    keys = ApiKeys.parse(  # before the model loads
        config.api_keys, config.api_keys_file, whole=[config.env_api_key or ""]
    )
    model, tokenizer = load_model(config.model)
    spec = ModelCacheSpec.from_model(model).with_format(config.kv_bits, config.kv_group_size)
    pool = BlockPool(spec, max_bytes=config.pool_mb * MIB)
    if pool.num_blocks < 1:
        raise InvalidRequestError(
            f"--pool-mb {config.pool_mb} holds no block of {spec.bytes_per_block} bytes"
        )
    engine = BlockPoolBatchEngine(
        model,
        tokenizer,
        pool,
        spec,
        max_batch_size=config.max_batch_size,
        state_snapshot_blocks=config.state_snapshot_blocks,
    )
    if config.state_snapshot_blocks is not None and not (spec.has_recurrent or spec.has_window):
        logger.warning(
            "--state-snapshot-blocks has no effect: %s has no recurrent or sliding-window layers",
            config.model,
        )
    fingerprint = model_fingerprint(model)
    names = _model_names(config)
    cache_dir: Path | None
    if config.cache_url is not None:
        cache_dir = local_path(config.cache_url)
    else:
        cache_dir = config.cache_dir or default_cache_dir(_dir_name(config), fingerprint)
    if cache_dir is not None:
        root = cache_dir.expanduser()
        cache_dir = format_dir(root, spec)
        cache_dir.mkdir(parents=True, exist_ok=True)
        if moved := adopt_files(root, cache_dir, spec):
            logger.warning("moved %d %s sessions to %s", moved, spec.format.name, cache_dir)
        for name, n in sorted(other_formats(root, cache_dir).items()):
            logger.warning(
                "%d sessions of another block format are kept in %s (this server keeps %s "
                "blocks in %s); a server with that --kv-bits resumes them",
                n,
                root if name == "." else root / name,
                spec.format.name,
                cache_dir,
            )
        sessions = SessionRegistry(cache_dir)  # before the store: drops stale ephemeral files
        store = AgentCacheStore(engine, cache_dir, fingerprint=fingerprint)
    else:
        assert config.cache_url is not None
        tier = open_tier(
            config.cache_url, spec=spec, fingerprint=fingerprint, secret=config.cache_secret
        )
        if config.cache_secret is None:
            logger.warning(
                "no --cache-secret: every client that can write to %s is trusted (it can "
                "replace cached blocks and so change generated text; docs/DEPLOY.md)",
                tier.describe(),
            )
        sessions = SessionRegistry(None)
        store = AgentCacheStore(engine, tier, fingerprint=fingerprint)
    metrics = ServerMetrics()
    loop = EngineLoop(
        engine,
        store,
        pool,
        sessions,
        metrics,
        max_queue=config.max_queue,
        flush_interval_s=config.flush_interval_s,
    )
    context = pool.max_context_tokens()
    model_context = getattr(getattr(model, "args", None), "max_position_embeddings", None)
    if isinstance(model_context, int) and model_context > 0:
        context = min(context, model_context)
    limits = Limits(
        max_context_tokens=context,
        max_tokens_cap=config.max_tokens_cap,
        default_max_tokens=config.default_max_tokens,
    )
    state = ServerState(
        loop=loop,
        tokenizer=tokenizer,
        model_name=names[0],
        model_aliases=names[1:],
        limits=limits,
        metrics=metrics,
        keys=keys,
        max_body_bytes=config.max_body_bytes,
        vocab_size=model_vocab_size(model),
        created=int(time.time()),
        cache_dir=cache_dir,
    )
    state.cache_where = store.cold.describe()
    state.constrain = _constrainer(tokenizer, state.vocab_size)
    state.tool_format = ToolFormat.of(tokenizer)
    loop.start()
    return state


def _constrainer(tokenizer: Any, vocab_size: int | None) -> Any:
    """``grammar -> a fresh logits processor`` for this tokenizer, or None if it has no
    Hugging Face fast tokenizer (llguidance's tokenizer is built on the first request)."""
    from kvpool.grammar import GrammarCompiler
    from kvpool.mlx.constrain import GrammarLogitsProcessor

    if not GrammarCompiler.supports(tokenizer):
        return None
    compiler = GrammarCompiler(
        tokenizer, vocab_size or int(tokenizer.vocab_size), tokenizer.eos_token_ids
    )

    def constrain(grammar: str) -> GrammarLogitsProcessor:
        return GrammarLogitsProcessor(compiler.matcher(grammar))

    return constrain


def serve(config: ServerConfig) -> int:
    """Run the server until SIGTERM / SIGINT; returns the exit code.

    0: stopped and every session is in the cold tier; 1: stopped, but some sessions could
    not be written (named on stdout); 2: could not listen.
    """
    import uvicorn

    from kvpool.server.app import create_app

    logging.basicConfig(
        level=config.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    if config.cache_secret is not None and config.cache_url is None:
        logger.warning("--cache-secret has no effect without a shared --cache-url redis://...")
    state = build_state(config)
    app = create_app(state)
    pool = state.loop.pool

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn's re-raises the signal after its graceful shutdown (the process then
            # dies of it); a server that shut down cleanly exits 0 instead.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.should_exit:
                return
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            print(
                f"kvpool serve: listening on http://{shown}:{port} (model {state.model_name!r}, "
                f"pool {pool.num_blocks} blocks = {pool.bytes_total / MIB:.0f} MiB, sessions in "
                f"{state.cache_where})",
                flush=True,
            )

    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        timeout_graceful_shutdown=max(1, round(config.shutdown_timeout_s)),
        lifespan="on",
        access_log=False,
    )
    server = _Server(uv_config)
    try:
        server.run()
    except SystemExit:  # uvicorn exits this way when it cannot bind
        if server.started:
            raise
    finally:
        state.loop.stop()  # idempotent; covers a failed startup
    if not server.started:
        print(f"kvpool serve: could not listen on {config.host}:{config.port}", file=sys.stderr)
        return 2
    report = state.loop.close_report
    if report is None:
        print("kvpool serve: stopped; writing sessions failed (see the log)", flush=True)
    else:
        print(f"kvpool serve: stopped; sessions: {report.summary()}", flush=True)
    gc.collect()  # MLX objects in reference cycles go now, not from another thread at exit
    return 1 if report is None or report.failed else 0
