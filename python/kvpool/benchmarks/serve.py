"""Serve: ``kvpool serve`` vs ``mlx_lm.server`` on the same model, workload and client.

Both servers run on 127.0.0.1 in subprocesses, one after the other, over the same model
directory (a built-in recipe written with :func:`kvpool.models.build_model`) and with the
same BLAS (MLX's bundled one: ``kvpool --no-fast-blas serve``). A workload: ``sessions``
agents share one system prompt and each has its own task; in each of ``turns`` turns every
session sends its whole conversation (grown by its reply and a new user message) to
``/v1/chat/completions``, all sessions at once, streamed, greedy. kvpool gets each session's
id in ``X-Session-ID``; mlx_lm.server reuses what its own prompt cache holds (10 caches by
default: the 8-session workload fits it, the 16-session one does not).

Reported per workload and server: time to first token (first non-empty content chunk)
p50/p95 over all requests, first turns and resumed turns (turn >= 2), total wall time, and
whether both servers returned the same text for every request. kvpool's own overhead per
request (a 1-token completion, no session): its round trip minus the engine's own time for
that same request (the ``X-Kvpool-Engine-Ms`` response header), and the round trip minus
the same request through the engine called directly in this process, interleaved.

Targets: total time <= 0.8x mlx_lm.server's, resumed turns' TTFT p50 <= 0.5x, overhead < 5 ms.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvpool.benchmarks.measure import Summary, interleave, median, percentile, ratio
from kvpool.benchmarks.records import BenchRecord, Section, Target

RECIPE = "demo"
TASK_WORDS = 24
USER_WORDS = 12


@dataclass(frozen=True, slots=True)
class Shape:
    """A workload: ``sessions`` chats of ``turns`` turns, ``max_tokens`` per reply."""

    name: str
    sessions: int
    turns: int
    max_tokens: int
    system_words: int


# 8 sessions fit mlx_lm.server's prompt cache (10 distinct caches by default); 16 do not.
WORKLOADS = (
    Shape("8 sessions", sessions=8, turns=4, max_tokens=16, system_words=160),
    Shape("16 sessions", sessions=16, turns=3, max_tokens=8, system_words=80),
)
QUICK_WORKLOADS = (Shape("2 sessions", sessions=2, turns=2, max_tokens=4, system_words=20),)
OVERHEAD_ITERS = {False: 30, True: 5}
STARTUP_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 600.0
TARGET_TOTAL = 0.8
TARGET_TTFT = 0.5
TARGET_OVERHEAD_MS = 5.0
_WORDS = [
    "plan", "agent", "cache", "block", "disk", "turn", "tool", "file", "route", "memo",
    "search", "write", "read", "check", "list", "report", "task", "step", "note", "update",
    "review", "merge", "test", "build", "deploy", "fix", "query", "answer",
]  # fmt: skip


_KVPOOL_MAIN = "import sys; from kvpool.cli import main; sys.exit(main())"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _process(
    args: list[str], env: dict[str, str], ready_url: str
) -> Iterator[subprocess.Popen[bytes]]:
    """A server subprocess, up once ``ready_url`` answers 200; terminated on exit."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield _wait_ready(proc, log, args, ready_url)
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(60)


def _wait_ready(
    proc: subprocess.Popen[bytes], log: Any, args: list[str], ready_url: str
) -> subprocess.Popen[bytes]:
    """``proc`` once ``ready_url`` answers 200; raises if it exits or the wait times out."""
    import httpx

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{args[:4]} exited: {log.read()[-2000:].decode(errors='replace')}")
        try:
            if httpx.get(ready_url, timeout=2.0).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{args[:4]} did not start in {STARTUP_TIMEOUT_S} s")
        time.sleep(0.2)
    return proc


@dataclass(slots=True)
class _Result:
    ttft_s: list[tuple[int, float]] = field(default_factory=list)  # (turn, seconds)
    texts: dict[tuple[int, int], str] = field(default_factory=dict)  # (session, turn) -> text
    cached: list[int] = field(default_factory=list)
    total_s: float = 0.0


def _stream_chat(
    url: str, model: str, messages: list[dict[str, str]], max_tokens: int, headers: dict[str, str]
) -> tuple[float, str, int | None]:
    """(TTFT, text, cached prompt tokens) of one streamed, greedy chat request."""
    import httpx

    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft = None
    text, cached = [], None
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=REQUEST_TIMEOUT_S
    ) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.read()[:500]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{url}: {chunk['error']}")
            for choice in chunk.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece and ttft is None:
                    ttft = time.perf_counter() - t0
                text.append(piece)
            usage = chunk.get("usage")
            if usage:
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    return (ttft if ttft is not None else time.perf_counter() - t0), "".join(text), cached


def _conversations(n: int, system_words: int, seed: int = 13) -> tuple[str, list[str]]:
    rng = random.Random(seed)
    system = "You are one of several agents. " + " ".join(rng.choices(_WORDS, k=system_words))
    tasks = [
        f"Agent {i}, your task: " + " ".join(rng.choices(_WORDS, k=TASK_WORDS)) for i in range(n)
    ]
    return system, tasks


def _user(session: int, turn: int) -> str:
    rng = random.Random(session * 1000 + turn)  # the same for both servers
    return f"Turn {turn}: " + " ".join(rng.choices(_WORDS, k=USER_WORDS))


def _workload(url: str, model: str, cfg: Shape, *, sessions_header: bool) -> _Result:
    seed = cfg.sessions * 7919 + cfg.system_words  # each workload its own prompts
    system, tasks = _conversations(cfg.sessions, cfg.system_words, seed)
    histories = [
        [{"role": "system", "content": system}, {"role": "user", "content": t}] for t in tasks
    ]
    result = _Result()
    lock = threading.Lock()

    def one(i: int, turn: int) -> None:
        headers = {"X-Session-ID": f"bench-{seed}-{i}"} if sessions_header else {}
        ttft, text, cached = _stream_chat(url, model, histories[i], cfg.max_tokens, headers)
        with lock:
            result.ttft_s.append((turn, ttft))
            result.texts[(i, turn)] = text
            if cached is not None and turn > 0:
                result.cached.append(cached)
        histories[i] += [
            {"role": "assistant", "content": text},
            {"role": "user", "content": _user(i, turn + 1)},
        ]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(cfg.sessions) as pool:
        for turn in range(cfg.turns):
            list(pool.map(lambda i, t=turn: one(i, t), range(cfg.sessions)))
    result.total_s = time.perf_counter() - t0
    return result


@dataclass(frozen=True, slots=True)
class ServerResult:
    """One server on one workload; TTFT summaries over all, first and resumed turns."""

    total_s: float
    ttft_all: Summary
    ttft_first_turn: Summary
    ttft_resumed: Summary | None
    cached_tokens_resumed_mean: float | None


@dataclass(frozen=True, slots=True)
class WorkloadResult:
    """Both servers on one workload; ``*_ratio``: kvpool's figure / mlx_lm.server's."""

    name: str
    sessions: int
    turns: int
    max_tokens: int
    system_words: int
    task_words: int
    user_words: int
    requests: int
    kvpool: ServerResult
    mlx_lm_server: ServerResult
    total_ratio: float | None
    ttft_resumed_p50_ratio: float | None
    same_text: bool
    num_same: int
    first_difference: tuple[int, int] | None  # (session, turn) of the first other text


@dataclass(frozen=True, slots=True)
class Overhead:
    """kvpool's own cost per request, ms."""

    http: Summary
    direct: Summary
    overhead_ms_p50: float
    overhead_ms_p95: float
    same_request_overhead_ms_p50: float
    same_request_overhead_ms_p95: float


@dataclass(frozen=True, slots=True)
class ServeRecord(BenchRecord):
    model: str
    workloads: tuple[WorkloadResult, ...]
    overhead: Overhead


RECORD = ServeRecord


def _summary(r: _Result) -> ServerResult:
    every = [s for _, s in r.ttft_s]
    first = [s for t, s in r.ttft_s if t == 0]
    resumed = [s for t, s in r.ttft_s if t > 0]
    return ServerResult(
        total_s=round(r.total_s, 3),
        ttft_all=Summary.of(every),
        ttft_first_turn=Summary.of(first),
        ttft_resumed=Summary.of(resumed) if resumed else None,
        cached_tokens_resumed_mean=(sum(r.cached) / len(r.cached)) if r.cached else None,
    )


def _overhead(url: str, model: str, model_dir: Path, iters: int) -> Overhead:
    """kvpool's HTTP round trip minus the engine called directly, same 1-token request."""
    import httpx

    from kvpool import AgentCacheStore, BlockPool, BlockPoolBatchEngine, ModelCacheSpec
    from kvpool.models import load_model
    from kvpool.persist import model_fingerprint

    m, tokenizer = load_model(model_dir)
    spec = ModelCacheSpec.from_model(m)
    engine = BlockPoolBatchEngine(m, tokenizer, BlockPool(spec, max_bytes=16 * 2**20), spec)
    prompt = "Agent, one word:"
    ids = list(tokenizer.encode(prompt))
    client = httpx.Client(timeout=REQUEST_TIMEOUT_S)
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0}
    with tempfile.TemporaryDirectory() as tmp:
        store = AgentCacheStore(engine, tmp, fingerprint=model_fingerprint(m))
        counter = iter(range(10**9))

        engine_s: list[float] = []  # the server engine's own time for each HTTP request
        round_trip_s: list[float] = []

        def http() -> None:
            t0 = time.perf_counter()
            r = client.post(url + "/v1/completions", json=body)
            round_trip_s.append(time.perf_counter() - t0)
            r.raise_for_status()
            engine_s.append(float(r.headers["x-kvpool-engine-ms"]) / 1e3)

        def direct() -> None:  # what the server does for it, minus HTTP
            agent = f"direct-{next(counter)}"
            store.submit(agent, ids, 1)
            store.drain()
            store.forget(agent)

        http_s, direct_s = interleave([http, direct], iters=iters, warmup=2)
    client.close()
    diffs = [a - b for a, b in zip(http_s, direct_s, strict=True)]
    # The same request seen twice: the client's round trip and the engine's time inside it.
    inside = [a - b for a, b in zip(round_trip_s, engine_s, strict=True)][-len(http_s) :]
    return Overhead(
        http=Summary.of(http_s),
        direct=Summary.of(direct_s),
        overhead_ms_p50=round(median(diffs) * 1e3, 3),
        overhead_ms_p95=round(percentile(diffs, 95) * 1e3, 3),
        same_request_overhead_ms_p50=round(median(inside) * 1e3, 3),
        same_request_overhead_ms_p95=round(percentile(inside, 95) * 1e3, 3),
    )


def _kvpool_args(model_dir: Path, port: int, cache_dir: Path) -> list[str]:
    return [
        sys.executable, "-c", _KVPOOL_MAIN, "--no-fast-blas", "serve",
        "--model", str(model_dir), "--port", str(port), "--cache-dir", str(cache_dir),
        "--served-model-name", "bench", "--pool-mb", "256",
    ]  # fmt: skip


def _mlx_args(model_dir: Path, port: int) -> list[str]:
    return [
        sys.executable, "-m", "mlx_lm", "server", "--model", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING",
    ]  # fmt: skip


def _compare(cfg: Shape, kv: _Result, mlx: _Result) -> WorkloadResult:
    same = [k for k in mlx.texts if mlx.texts[k] == kv.texts.get(k)]
    differ = sorted(k for k in mlx.texts if mlx.texts[k] != kv.texts.get(k))
    kv_s, mlx_s = _summary(kv), _summary(mlx)
    ttft_ratio = (
        ratio(kv_s.ttft_resumed.p50_ms, mlx_s.ttft_resumed.p50_ms)
        if kv_s.ttft_resumed and mlx_s.ttft_resumed
        else None
    )
    return WorkloadResult(
        name=cfg.name,
        sessions=cfg.sessions,
        turns=cfg.turns,
        max_tokens=cfg.max_tokens,
        system_words=cfg.system_words,
        task_words=TASK_WORDS,
        user_words=USER_WORDS,
        requests=cfg.sessions * cfg.turns,
        kvpool=kv_s,
        mlx_lm_server=mlx_s,
        total_ratio=ratio(kv.total_s, mlx.total_s),
        ttft_resumed_p50_ratio=ttft_ratio,
        same_text=not differ,
        num_same=len(same),
        first_difference=differ[0] if differ else None,
    )


def run(quick: bool, model_ref: str | None = None) -> ServeRecord:
    """The record; ``model_ref``: any model reference, whose directory both servers load
    (default: the ``RECIPE`` built into a temporary directory, as in the committed record)."""
    from kvpool.models import build_model, locate_and_load

    workloads = QUICK_WORKLOADS if quick else WORKLOADS
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        if model_ref is None:
            model_dir = build_model(RECIPE, Path(tmp) / RECIPE)
        else:
            model_dir, _, _ = locate_and_load(model_ref)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        with _process(_mlx_args(model_dir, port), env, url + "/health"):
            mlx = [_workload(url, "default_model", w, sessions_header=False) for w in workloads]
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        with _process(_kvpool_args(model_dir, port, Path(tmp) / "sessions"), env, url + "/health"):
            kv = [_workload(url, "bench", w, sessions_header=True) for w in workloads]
            overhead = _overhead(url, "bench", model_dir, OVERHEAD_ITERS[quick])
    results = [_compare(w, k, m) for w, k, m in zip(workloads, kv, mlx, strict=True)]
    targets = []
    for r in results:
        total, ttft = r.total_ratio, r.ttft_resumed_p50_ratio
        targets += [
            Target(f"{r.name}: total time vs mlx_lm.server", f"<= {TARGET_TOTAL}x", total,
                   None if total is None else total <= TARGET_TOTAL),
            Target(f"{r.name}: resumed TTFT p50 vs mlx_lm.server", f"<= {TARGET_TTFT}x", ttft,
                   None if ttft is None else ttft <= TARGET_TTFT),
            Target(f"{r.name}: same text as mlx_lm.server", "every request", r.num_same,
                   r.same_text),
        ]  # fmt: skip
    inside = overhead.same_request_overhead_ms_p50
    targets.append(
        Target("server overhead per request (round trip - engine time)",
               f"< {TARGET_OVERHEAD_MS} ms", inside, inside < TARGET_OVERHEAD_MS)
    )  # fmt: skip
    return ServeRecord(
        model=model_ref or RECIPE,
        workloads=tuple(results),
        overhead=overhead,
        targets=tuple(targets),
    )


def render_section(r: ServeRecord) -> list[str]:
    """The markdown section of ``kvpool bench`` 's report."""
    lines = [
        f"Model `{r.model}`; every session shares one system prompt; greedy, streamed. "
        "TTFT in ms (first non-empty content chunk).",
        "",
        "| workload | server | total s | TTFT p50 | TTFT p95 | first turn p50 | resumed p50 "
        "| resumed p95 | same text |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for w in r.workloads:
        label = f"{w.sessions} sessions x {w.turns} turns, {w.max_tokens} tokens"
        for name, s in (("kvpool serve", w.kvpool), ("mlx_lm.server", w.mlx_lm_server)):
            res = s.ttft_resumed
            lines.append(
                f"| {label} | {name} | {s.total_s:.1f} | {s.ttft_all.p50_ms:.0f} | "
                f"{s.ttft_all.p95_ms:.0f} | {s.ttft_first_turn.p50_ms:.0f} | "
                f"{res.p50_ms if res else 0:.0f} | {res.p95_ms if res else 0:.0f} | "
                f"{'yes' if w.same_text else 'no'} |"
            )
        lines.append(
            f"| {label} | kvpool / mlx_lm | {w.total_ratio}x | | | | "
            f"{w.ttft_resumed_p50_ratio}x | | |"
        )
    o = r.overhead
    lines += [
        "",
        f"Server overhead per 1-token request: round trip minus the engine's own time "
        f"{o.same_request_overhead_ms_p50} ms p50 ({o.same_request_overhead_ms_p95} ms "
        f"p95); round trip minus the engine called directly, interleaved: "
        f"{o.overhead_ms_p50} ms p50 (HTTP {o.http.p50_ms} ms, direct "
        f"{o.direct.p50_ms} ms).",
    ]
    return lines


SECTION = Section(RECORD, render_section)
