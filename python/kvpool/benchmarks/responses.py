"""Responses chain: prompt tokens prefilled per turn on ``/v1/responses``, and time to first
token against the same chain sent as full chat history to ``mlx_lm.server``.

One conversation of ``turns`` turns (instructions of ``system_words`` words, a new user
message of ``USER_WORDS`` words each turn, ``max_tokens`` per reply, greedy, streamed):

* kvpool serve: ``POST /v1/responses`` with ``previous_response_id`` (the client sends only
  the new input). Per turn: input tokens, cached tokens, prefilled = input - cached, and the
  whole previous conversation (its input + output tokens): the target is that every
  continuing turn's cached tokens equal it (so only the new input is prefilled).
* mlx_lm.server: ``POST /v1/chat/completions`` with the whole history each turn (its own
  replies), which its prompt cache may reuse.

TTFT: from sending the request to the first non-empty text delta. Both servers run on
127.0.0.1 in subprocesses, one after the other, over the same model directory (default: the
``demo`` recipe; ``--model`` for another, e.g. the trained default model).

    kvpool bench responses [--quick] [--model MODEL]
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvpool.benchmarks.measure import Summary, ratio
from kvpool.benchmarks.records import BenchRecord, Section, Target
from kvpool.benchmarks.serve import (
    _WORDS,
    REQUEST_TIMEOUT_S,
    _free_port,
    _kvpool_args,
    _mlx_args,
    _process,
    _stream_chat,
)
from kvpool.benchmarks.tables import table

RECIPE = "demo"
USER_WORDS = 16


@dataclass(frozen=True, slots=True)
class Shape:
    turns: int
    max_tokens: int
    system_words: int


FULL = Shape(turns=10, max_tokens=32, system_words=200)
QUICK = Shape(turns=3, max_tokens=4, system_words=20)


@dataclass(frozen=True, slots=True)
class Turn:
    """One turn; ``previous_tokens``: the whole previous conversation (0 on the first)."""

    turn: int
    input_tokens: int
    cached_tokens: int
    prefilled_tokens: int
    previous_tokens: int
    kvpool_ttft_ms: float
    mlx_lm_ttft_ms: float
    mlx_lm_cached_tokens: int | None


@dataclass(frozen=True, slots=True)
class ResponsesRecord(BenchRecord):
    model: str
    turns: int
    max_tokens: int
    system_words: int
    user_words: int
    rows: tuple[Turn, ...]
    kvpool_ttft_resumed: Summary
    mlx_lm_ttft_resumed: Summary
    ttft_resumed_p50_ratio: float | None  # kvpool / mlx_lm.server


RECORD = ResponsesRecord


def _texts(shape: Shape) -> tuple[str, list[str]]:
    rng = random.Random(29)
    system = "You are a planning agent. " + " ".join(rng.choices(_WORDS, k=shape.system_words))
    users = [
        f"Step {t}: " + " ".join(rng.choices(_WORDS, k=USER_WORDS)) for t in range(shape.turns)
    ]
    return system, users


def _stream_response(url: str, model: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(TTFT, the final response object) of one streamed ``/v1/responses`` request."""
    import httpx

    t0 = time.perf_counter()
    ttft, final = None, None
    with httpx.stream(
        "POST",
        url + "/v1/responses",
        json={"model": model, "stream": True, "temperature": 0, **body},
        timeout=REQUEST_TIMEOUT_S,
    ) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.read()[:500]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event["type"] == "response.output_text.delta" and event["delta"] and ttft is None:
                ttft = time.perf_counter() - t0
            elif event["type"] in ("response.completed", "response.incomplete"):
                final = event["response"]
            elif event["type"] == "error":
                raise RuntimeError(f"{url}: {event}")
    if final is None:
        raise RuntimeError(f"{url}: the stream ended without a final response")
    return (ttft if ttft is not None else time.perf_counter() - t0), final


def _kvpool_chain(url: str, shape: Shape) -> list[tuple[float, dict[str, Any]]]:
    system, users = _texts(shape)
    out: list[tuple[float, dict[str, Any]]] = []
    previous: str | None = None
    for user in users:
        body: dict[str, Any] = {
            "input": user,
            "instructions": system,
            "max_output_tokens": shape.max_tokens,
        }
        if previous is not None:
            body["previous_response_id"] = previous
        ttft, final = _stream_response(url, "bench", body)
        out.append((ttft, final))
        previous = final["id"]
    return out


def _mlx_chain(url: str, shape: Shape) -> list[tuple[float, int | None]]:
    system, users = _texts(shape)
    history = [{"role": "system", "content": system}]
    out = []
    for user in users:
        history.append({"role": "user", "content": user})
        ttft, text, cached = _stream_chat(url, "default_model", history, shape.max_tokens, {})
        out.append((ttft, cached))
        history.append({"role": "assistant", "content": text})
    return out


def run(quick: bool, model_ref: str | None = None) -> ResponsesRecord:
    from kvpool.models import build_model, locate_and_load

    shape = QUICK if quick else FULL
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        if model_ref is None:
            model_dir = build_model(RECIPE, Path(tmp) / RECIPE)
        else:
            model_dir, _, _ = locate_and_load(model_ref)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        with _process(_mlx_args(model_dir, port), env, url + "/health"):
            mlx = _mlx_chain(url, shape)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        with _process(_kvpool_args(model_dir, port, Path(tmp) / "sessions"), env, url + "/health"):
            kv = _kvpool_chain(url, shape)
    rows, previous = [], 0
    for t, ((kv_ttft, final), (mlx_ttft, mlx_cached)) in enumerate(zip(kv, mlx, strict=True)):
        usage = final["usage"]
        cached = int(usage["input_tokens_details"]["cached_tokens"])
        rows.append(
            Turn(
                turn=t + 1,
                input_tokens=int(usage["input_tokens"]),
                cached_tokens=cached,
                prefilled_tokens=int(usage["input_tokens"]) - cached,
                previous_tokens=previous,
                kvpool_ttft_ms=round(kv_ttft * 1e3, 2),
                mlx_lm_ttft_ms=round(mlx_ttft * 1e3, 2),
                mlx_lm_cached_tokens=mlx_cached,
            )
        )
        previous = int(usage["input_tokens"]) + int(usage["output_tokens"])
    kv_resumed = Summary.of([r.kvpool_ttft_ms / 1e3 for r in rows[1:]])
    mlx_resumed = Summary.of([r.mlx_lm_ttft_ms / 1e3 for r in rows[1:]])
    warm = all(r.cached_tokens == r.previous_tokens for r in rows[1:])
    ttft_ratio = ratio(kv_resumed.p50_ms, mlx_resumed.p50_ms)
    return ResponsesRecord(
        targets=(
            Target(
                "continuing turns: cached tokens = the whole previous conversation",
                "every turn",
                sum(r.cached_tokens == r.previous_tokens for r in rows[1:]),
                warm,
            ),
            Target("continuing turns' TTFT p50 vs mlx_lm.server", "reported", ttft_ratio, None),
        ),
        model=model_ref or RECIPE,
        turns=shape.turns,
        max_tokens=shape.max_tokens,
        system_words=shape.system_words,
        user_words=USER_WORDS,
        rows=tuple(rows),
        kvpool_ttft_resumed=kv_resumed,
        mlx_lm_ttft_resumed=mlx_resumed,
        ttft_resumed_p50_ratio=ttft_ratio,
    )


def render_section(r: ResponsesRecord) -> list[str]:
    rows = [
        (
            t.turn,
            t.input_tokens,
            t.cached_tokens,
            t.prefilled_tokens,
            t.previous_tokens,
            f"{t.kvpool_ttft_ms:.1f}",
            f"{t.mlx_lm_ttft_ms:.1f}",
            "-" if t.mlx_lm_cached_tokens is None else t.mlx_lm_cached_tokens,
        )
        for t in r.rows
    ]
    head = (
        "turn",
        "input",
        "cached",
        "prefilled",
        "previous conversation",
        "kvpool TTFT ms",
        "mlx_lm.server TTFT ms",
        "mlx_lm cached",
    )
    return [
        f"Model `{r.model}`: one chain of {r.turns} turns ({r.system_words}-word instructions, "
        f"{r.user_words}-word inputs, {r.max_tokens} tokens per reply), greedy, streamed. "
        f"Continuing turns' TTFT p50: kvpool {r.kvpool_ttft_resumed.p50_ms} ms, "
        f"mlx_lm.server {r.mlx_lm_ttft_resumed.p50_ms} ms ({r.ttft_resumed_p50_ratio}x).",
        "",
        *table(head, rows),
    ]


SECTION = Section(RECORD, render_section)
