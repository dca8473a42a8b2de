"""Serve: ``kvpool serve`` vs ``mlx_lm.server`` on the same model, workload and client.

Both servers run on 127.0.0.1 in subprocesses, one after the other, over the same model
directory (a built-in recipe written with :func:`kvpool.models.build_model`) and with the
same BLAS (MLX's bundled one: ``kvpool --no-fast-blas serve``). The workload: ``sessions``
agents, each with the same system prompt and its own task, run ``turns`` turns; in each
turn every session sends its whole conversation (its history grows by the reply and a new
user message) to ``/v1/chat/completions``, all sessions at once, streamed, greedy. kvpool
gets each session's id in ``X-Session-ID``; mlx_lm.server reuses what its own prompt cache
holds.

Reported for each server: time to first token (first non-empty content chunk) p50/p95 over
all requests, over first turns and over resumed turns (turn >= 2), and the workload's total
wall time; whether both returned the same text for every request; and kvpool's own
overhead per request: the HTTP round trip of a 1-token generation (non-streamed, no session)
minus the same request through the engine called directly in this process, interleaved.

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

from kvpool.benchmarks.measure import interleave, median, percentile, ratio, summary_ms, target

RECIPE = "demo"
TASK_WORDS = 24
USER_WORDS = 12
FULL = {"sessions": 8, "turns": 4, "max_tokens": 16, "overhead_iters": 30, "system_words": 160}
QUICK = {"sessions": 2, "turns": 2, "max_tokens": 4, "overhead_iters": 5, "system_words": 20}
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
    rng = random.Random(session * 1000 + turn)
    return f"Turn {turn}: " + " ".join(rng.choices(_WORDS, k=USER_WORDS))


def _workload(url: str, model: str, cfg: dict[str, int], *, sessions_header: bool) -> _Result:
    system, tasks = _conversations(cfg["sessions"], cfg["system_words"])
    histories = [
        [{"role": "system", "content": system}, {"role": "user", "content": t}] for t in tasks
    ]
    result = _Result()
    lock = threading.Lock()

    def one(i: int, turn: int) -> None:
        headers = {"X-Session-ID": f"bench-{i}"} if sessions_header else {}
        ttft, text, cached = _stream_chat(url, model, histories[i], cfg["max_tokens"], headers)
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
    with ThreadPoolExecutor(cfg["sessions"]) as pool:
        for turn in range(cfg["turns"]):
            list(pool.map(lambda i, t=turn: one(i, t), range(cfg["sessions"])))
    result.total_s = time.perf_counter() - t0
    return result


def _summary(r: _Result) -> dict[str, Any]:
    every = [s for _, s in r.ttft_s]
    first = [s for t, s in r.ttft_s if t == 0]
    resumed = [s for t, s in r.ttft_s if t > 0]
    return {
        "total_s": round(r.total_s, 3),
        "ttft_all": summary_ms(every),
        "ttft_first_turn": summary_ms(first),
        "ttft_resumed": summary_ms(resumed) if resumed else None,
        "cached_tokens_resumed_mean": (sum(r.cached) / len(r.cached)) if r.cached else None,
    }


def _overhead(url: str, model: str, model_dir: Path, iters: int) -> dict[str, Any]:
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

        def http() -> None:
            r = client.post(url + "/v1/completions", json=body)
            r.raise_for_status()

        def direct() -> None:  # what the server does for it, minus HTTP
            agent = f"direct-{next(counter)}"
            store.submit(agent, ids, 1)
            store.drain()
            store.forget(agent)

        http_s, direct_s = interleave([http, direct], iters=iters, warmup=2)
    client.close()
    diffs = [a - b for a, b in zip(http_s, direct_s, strict=True)]
    return {
        "http": summary_ms(http_s),
        "direct": summary_ms(direct_s),
        "overhead_ms_p50": round(median(diffs) * 1e3, 3),
        "overhead_ms_p95": round(percentile(diffs, 95) * 1e3, 3),
    }


def run(quick: bool) -> dict[str, Any]:
    from kvpool.models import build_model

    cfg = QUICK if quick else FULL
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(RECIPE, Path(tmp) / RECIPE)
        port = _free_port()
        mlx_url = f"http://127.0.0.1:{port}"
        mlx_args = [
            sys.executable,
            "-m",
            "mlx_lm",
            "server",
            "--model",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "WARNING",
        ]
        with _process(mlx_args, env, mlx_url + "/health"):
            mlx = _workload(mlx_url, "default_model", cfg, sessions_header=False)
        port = _free_port()
        kv_url = f"http://127.0.0.1:{port}"
        kv_args = [
            sys.executable,
            "-c",
            _KVPOOL_MAIN,
            "--no-fast-blas",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            str(port),
            "--cache-dir",
            str(Path(tmp) / "sessions"),
            "--served-model-name",
            "bench",
            "--pool-mb",
            "256",
        ]
        with _process(kv_args, env, kv_url + "/health"):
            kv = _workload(kv_url, "bench", cfg, sessions_header=True)
            overhead = _overhead(kv_url, "bench", model_dir, cfg["overhead_iters"])
    same = [k for k in mlx.texts if mlx.texts[k] == kv.texts.get(k)]
    differ = sorted(k for k in mlx.texts if mlx.texts[k] != kv.texts.get(k))
    kv_s, mlx_s = _summary(kv), _summary(mlx)
    total_ratio = ratio(kv.total_s, mlx.total_s)
    ttft_ratio = (
        ratio(kv_s["ttft_resumed"]["p50_ms"], mlx_s["ttft_resumed"]["p50_ms"])
        if kv_s["ttft_resumed"] and mlx_s["ttft_resumed"]
        else None
    )
    return {
        "model": RECIPE,
        "workload": {
            **cfg,
            "task_words": TASK_WORDS,
            "user_words": USER_WORDS,
            "requests": cfg["sessions"] * cfg["turns"],
        },
        "kvpool": kv_s,
        "mlx_lm_server": mlx_s,
        "total_ratio": total_ratio,
        "ttft_resumed_p50_ratio": ttft_ratio,
        "same_text": len(differ) == 0,
        "num_same": len(same),
        "first_difference": list(differ[0]) if differ else None,
        "overhead": overhead,
        "targets": [
            target(
                "total time vs mlx_lm.server",
                f"<= {TARGET_TOTAL}x",
                total_ratio,
                None if total_ratio is None else total_ratio <= TARGET_TOTAL,
            ),
            target(
                "resumed TTFT p50 vs mlx_lm.server",
                f"<= {TARGET_TTFT}x",
                ttft_ratio,
                None if ttft_ratio is None else ttft_ratio <= TARGET_TTFT,
            ),
            target(
                "server overhead per request",
                f"< {TARGET_OVERHEAD_MS} ms",
                overhead["overhead_ms_p50"],
                overhead["overhead_ms_p50"] < TARGET_OVERHEAD_MS,
            ),
            target("same text as mlx_lm.server", "every request", len(same), not differ),
        ],
    }


def report_lines(r: dict[str, Any]) -> list[str]:
    """The markdown section of ``kvpool bench`` 's report."""
    w = r["workload"]
    lines = [
        f"{w['sessions']} sessions x {w['turns']} turns, shared system prompt, "
        f"{w['max_tokens']} tokens per reply, greedy, streamed; model `{r['model']}`.",
        "",
        "| server | total s | TTFT p50 ms | TTFT p95 ms | first turn p50 | resumed p50 "
        "| resumed p95 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, key in (("kvpool serve", "kvpool"), ("mlx_lm.server", "mlx_lm_server")):
        s = r[key]
        res = s["ttft_resumed"] or {}
        lines.append(
            f"| {name} | {s['total_s']:.2f} | {s['ttft_all']['p50_ms']:.1f} | "
            f"{s['ttft_all']['p95_ms']:.1f} | {s['ttft_first_turn']['p50_ms']:.1f} | "
            f"{res.get('p50_ms', '-')} | {res.get('p95_ms', '-')} |"
        )
    o = r["overhead"]
    lines += [
        "",
        f"total ratio {r['total_ratio']}x, resumed TTFT p50 ratio {r['ttft_resumed_p50_ratio']}x, "
        f"same text: {'yes' if r['same_text'] else 'no'} ({r['num_same']} requests equal); "
        f"server overhead per request p50 {o['overhead_ms_p50']} ms "
        f"(HTTP {o['http']['p50_ms']} ms vs engine {o['direct']['p50_ms']} ms).",
    ]
    return lines
