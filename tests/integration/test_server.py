"""``kvpool serve`` in a subprocess, driven by the official ``openai`` and ``anthropic`` clients.

One server (demo model, greedy requests, an API key) serves the whole module. Every
response that can be checked against the engine is: the reference runs the same model in
this process, without any cache.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from server_process import ServerProcess, wait_until

from kvpool import BlockPool, BlockPoolBatchEngine, ModelCacheSpec
from kvpool.models import build_model, load_model

API_KEY = "test-key-13"
MAX_TOKENS = 6
TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("server-models")
    build_model("demo", path / "demo")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[ServerProcess]:
    cache_dir = tmp_path_factory.mktemp("server-sessions")
    with ServerProcess(
        cache_dir, models_dir, "--api-key", API_KEY, "--pool-mb", "96", "--max-tokens-cap", "512"
    ) as proc:
        yield proc
        code = proc.stop()
    assert code == 0, proc.log()


@pytest.fixture(scope="module")
def demo(models_dir: Path) -> tuple[Any, Any]:
    return load_model(models_dir / "demo")


def reference(demo: tuple[Any, Any], contexts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """What the engine generates for each context from no cache (greedy), batched."""
    model, tokenizer = demo
    spec = ModelCacheSpec.from_model(model)
    engine = BlockPoolBatchEngine(model, tokenizer, BlockPool(spec, max_bytes=96 * 2**20), spec)
    uids = [engine.submit(f"ref-{i}", c, None, max_tokens) for i, c in enumerate(contexts)]
    done = {c.uid: list(c.token_ids) for c in engine.drain()}
    return [done[u] for u in uids]


def oai(server: ServerProcess, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=TIMEOUT_S, **kwargs
    )


def claude(server: ServerProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=server.url, api_key=API_KEY, max_retries=0, timeout=TIMEOUT_S
    )


def stats(server: ServerProcess) -> dict[str, Any]:
    r = httpx.get(server.url + "/v1/cache/stats", headers=_auth(), timeout=TIMEOUT_S)
    r.raise_for_status()
    return dict(r.json())


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def _words(rng: random.Random, n: int) -> str:
    vocab = ["plan", "agent", "cache", "block", "disk", "turn", "tool", "file", "route", "memo"]
    return " ".join(rng.choice(vocab) for _ in range(n))


def _data_lines(response: httpx.Response) -> Iterator[str]:
    """The ``data:`` lines of an SSE response, as they arrive."""
    return (line for line in response.iter_lines() if line.startswith("data: "))


def _idle_baseline(server: ServerProcess) -> int:
    """Pool blocks in use once nothing runs."""
    snap = wait_until(
        lambda: (s := stats(server))["requests"]["running"] == 0 and s, 10.0, "an idle server"
    )
    return int(snap["pool"]["num_used"])


# -- the official clients, unchanged ------------------------------------------------------


def test_openai_chat_session_reuses_its_cache(server: ServerProcess) -> None:
    client = oai(server)
    rng = random.Random(1)
    messages = [
        {"role": "system", "content": "You are a planner. " + _words(rng, 20)},
        {"role": "user", "content": _words(rng, 12)},
    ]
    session = {"X-Session-ID": "chat-1"}
    first = client.chat.completions.create(
        model="demo", messages=messages, max_tokens=MAX_TOKENS, temperature=0, extra_headers=session
    )
    assert first.object == "chat.completion"
    assert first.choices[0].message.role == "assistant"
    assert first.choices[0].finish_reason in ("stop", "length")
    assert first.usage is not None and first.usage.prompt_tokens_details is not None
    # A new session reuses only what other sessions share (the chat template's opening).
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens // 2
    assert first.usage.completion_tokens <= MAX_TOKENS
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content or ""},
        {"role": "user", "content": _words(rng, 10)},
    ]
    second = client.chat.completions.create(
        model="demo", messages=messages, max_tokens=MAX_TOKENS, temperature=0, extra_headers=session
    )
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens
    # at least the whole first prompt came from the cache (the reply may retokenize)
    assert first.usage.prompt_tokens - 1 <= cached < second.usage.prompt_tokens
    # the same turn, streamed, in a fresh session: same text, nothing cached (control)
    chunks = list(
        client.chat.completions.create(
            model="demo",
            messages=messages,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"session_id": "chat-1-copy"},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == second.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens == second.usage.prompt_tokens
    assert usage.prompt_tokens_details.cached_tokens < 256  # no session cache to read


def test_openai_completions_match_the_engine(server: ServerProcess, demo: Any) -> None:
    client = oai(server)
    prompt = "The planner writes every cache block to disk, then"
    ids = list(demo[1].encode(prompt))
    (expected,) = reference(demo, [ids], MAX_TOKENS)
    plain = client.completions.create(
        model="demo", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"return_token_ids": True},
    )  # fmt: skip
    assert plain.object == "text_completion"
    assert plain.choices[0].model_extra is not None
    assert plain.choices[0].model_extra["token_ids"] == expected
    assert plain.usage is not None and plain.usage.prompt_tokens == len(ids)
    streamed = list(
        client.completions.create(
            model="demo", prompt=ids, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text
    assert streamed[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_anthropic_messages_session_reuses_its_cache(server: ServerProcess) -> None:
    client = claude(server)
    rng = random.Random(2)
    messages: list[Any] = [{"role": "user", "content": _words(rng, 30)}]
    session = {"X-Session-ID": "claude-1"}
    system = "You are terse. " + _words(rng, 10)
    first = client.messages.create(
        model="demo", max_tokens=MAX_TOKENS, system=system, messages=messages,
        extra_body={"temperature": 0}, extra_headers=session,
    )  # fmt: skip
    assert first.type == "message" and first.role == "assistant"
    assert first.content[0].type == "text"
    assert first.stop_reason in ("end_turn", "max_tokens")
    # A new session reuses only what other sessions share (the chat template's opening).
    assert first.usage.cache_read_input_tokens < first.usage.input_tokens // 2
    prompt_1 = first.usage.input_tokens
    messages += [
        {"role": "assistant", "content": first.content[0].text},
        {"role": "user", "content": [{"type": "text", "text": _words(rng, 8)}]},
    ]
    with client.messages.stream(
        model="demo", max_tokens=MAX_TOKENS, system=system, messages=messages,
        extra_body={"temperature": 0}, extra_headers=session,
    ) as stream:  # fmt: skip
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.content[0].type == "text" and final.content[0].text == text
    read = final.usage.cache_read_input_tokens
    assert read is not None and read >= prompt_1 - 1
    assert final.usage.output_tokens <= MAX_TOKENS
    # the same second turn without streaming, from the session's cache again: same text
    again = httpx.delete(server.url + "/v1/sessions/claude-1", headers=_auth(), timeout=TIMEOUT_S)
    assert again.status_code == 200
    plain = client.messages.create(
        model="demo", max_tokens=MAX_TOKENS, system=system, messages=messages,
        extra_body={"temperature": 0}, extra_headers=session,
    )  # fmt: skip
    assert plain.content[0].type == "text" and plain.content[0].text == text
    # Deleted: the session is gone, but its blocks stay in the tenant's prefix cache (free,
    # evictable) until the pool needs them, so the same prompt may still read them.
    assert httpx.get(
        server.url + "/v1/sessions/claude-1", headers=_auth(), timeout=TIMEOUT_S
    ).status_code in (200, 404)


def test_models_sessions_metrics_health(server: ServerProcess) -> None:
    client = oai(server)
    assert [m.id for m in client.models.list()] == ["demo"]
    with server.client(headers=_auth()) as http:
        assert http.get("/health").json()["status"] == "ok"
        ids = [s["id"] for s in http.get("/v1/sessions").json()["data"]]
        assert "chat-1" in ids
        one = http.get("/v1/sessions/chat-1").json()
        assert one["tier"] == "hot" and one["turns"] >= 2
        off = http.post("/v1/sessions/chat-1/offload").json()
        assert off["offloaded"] is True and off["tier"] == "cold"
        assert http.get("/v1/sessions/nope").status_code == 404
        metrics = http.get("/metrics").text
        for name in (
            "kvpool:time_to_first_token_seconds_bucket",
            "kvpool:prefix_cache_queries_total",
            "kvpool:prefix_cache_hits_total",
            "kvpool:kv_cache_usage_perc",
            "kvpool:num_requests_waiting",
            "kvpool:cache_evictions",
        ):
            assert name in metrics, name
        hits = next(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("kvpool:prefix_cache_hits_total")
        )
        assert hits > 0
        cache = http.get("/v1/cache/stats").json()
        prefix = cache["prefix_cache"]
        assert prefix["hit_tokens"] == hits and 0 < prefix["hit_rate"] < 1
        assert cache["evictions"] == cache["store"]["num_evictions"] >= 1  # the offload
        assert cache["store"]["num_cold"] >= 1


# -- concurrency ------------------------------------------------------------------------------


class EngineSessions:
    """The engine called directly, each agent with its previous turn's cache: the reference
    of a multi-turn workload (cached turns equal fresh ones; tests/integration shows it)."""

    def __init__(self, demo: tuple[Any, Any]) -> None:
        model, tokenizer = demo
        spec = ModelCacheSpec.from_model(model)
        pool = BlockPool(spec, max_bytes=96 * 2**20)
        self.engine = BlockPoolBatchEngine(model, tokenizer, pool, spec)
        self.caches: dict[int, Any] = {}

    def turn(self, contexts: list[list[int]], max_tokens: int) -> list[list[int]]:
        uids = [
            self.engine.submit(f"ref-{i}", c, self.caches.get(i), max_tokens)
            for i, c in enumerate(contexts)
        ]
        done = {c.uid: c for c in self.engine.drain()}
        for i, uid in enumerate(uids):
            self.caches[i] = done[uid].blocks
        return [list(done[u].token_ids) for u in uids]


def test_32_sessions_x_3_turns_each_equal_the_engine(server: ServerProcess, demo: Any) -> None:
    tokenizer = demo[1]
    rng = random.Random(32)
    n, turns = 32, 3
    baseline = _idle_baseline(server)
    contexts = [list(tokenizer.encode(f"session {i}: " + _words(rng, 12))) for i in range(n)]
    client = oai(server)
    direct = EngineSessions(demo)

    def turn(i: int) -> tuple[list[int], int]:
        r = client.completions.create(
            model="demo", prompt=contexts[i], max_tokens=MAX_TOKENS, temperature=0,
            extra_body={"return_token_ids": True, "session_id": f"conc-{i}"},
        )  # fmt: skip
        assert r.usage is not None and r.usage.prompt_tokens_details is not None
        extra = r.choices[0].model_extra
        assert extra is not None
        return list(extra["token_ids"]), r.usage.prompt_tokens_details.cached_tokens

    with ThreadPoolExecutor(n) as pool:
        for t in range(turns):
            expected = direct.turn(contexts, MAX_TOKENS)
            results = list(pool.map(turn, range(n)))
            for i, (got, cached) in enumerate(results):
                assert got == expected[i], f"session {i} turn {t}"
                if t > 0:  # everything but the new user tokens came from the cache
                    assert cached >= len(contexts[i]) - 8, (i, t, cached)
            outputs = [tuple(g) for g, _ in results]
            for i, (got, _) in enumerate(results):
                contexts[i] = [*contexts[i], *got, *tokenizer.encode(f" next {i} {t}.")]
            assert len(set(outputs)) > 1  # distinct contexts, distinct answers
    assert stats(server)["pool"]["num_used"] > baseline
    with server.client(headers=_auth()) as http:
        for i in range(n):
            assert http.delete(f"/v1/sessions/conc-{i}").status_code == 200
        assert http.delete("/v1/sessions/conc-0").status_code == 404
    assert stats(server)["pool"]["num_used"] == baseline


def test_second_request_for_a_busy_session_is_409(server: ServerProcess) -> None:
    body = {"model": "demo", "prompt": "a long answer", "max_tokens": 300, "temperature": 0,
            "stream": True, "session_id": "busy-1"}  # fmt: skip
    with (
        httpx.Client(base_url=server.url, headers=_auth(), timeout=TIMEOUT_S) as http,
        http.stream("POST", "/v1/completions", json=body) as stream,
    ):
        lines = _data_lines(stream)
        assert next(lines).startswith("data: ")
        second = http.post("/v1/completions", json={**body, "stream": False})
        assert second.status_code == 409
        assert second.json()["error"]["code"] == "session_busy"
        assert "busy-1" in second.json()["error"]["message"]
        rest = list(lines)  # the first request is not affected
        assert rest[-1] == "data: [DONE]"
        assert http.delete("/v1/sessions/busy-1").status_code == 200


def test_disconnect_mid_stream_frees_the_request_blocks(server: ServerProcess) -> None:
    baseline = _idle_baseline(server)
    body = {"model": "demo", "prompt": "tell a very long story", "max_tokens": 500,
            "temperature": 0, "stream": True}  # fmt: skip
    with (
        httpx.Client(base_url=server.url, headers=_auth(), timeout=TIMEOUT_S) as http,
        http.stream("POST", "/v1/completions", json=body) as stream,
    ):
        lines = _data_lines(stream)
        for _ in range(3):
            assert next(lines).startswith("data: ")
        during = stats(server)
        assert during["requests"]["running"] == 1  # control: it holds blocks now
        assert during["pool"]["num_used"] > baseline
    # the client closed the connection: the request is cancelled and its blocks freed
    wait_until(
        lambda: (
            (s := stats(server))["requests"]["running"] == 0 and s["pool"]["num_used"] == baseline
        ),
        10.0,
        "the cancelled request's blocks back in the pool",
    )


def test_slow_reader_does_not_stall_other_sessions(server: ServerProcess, demo: Any) -> None:
    body = {"model": "demo", "prompt": "a slow reader", "max_tokens": 200, "temperature": 0,
            "stream": True, "session_id": "slow-reader"}  # fmt: skip
    client = oai(server)
    with (
        httpx.Client(base_url=server.url, headers=_auth(), timeout=TIMEOUT_S) as http,
        http.stream("POST", "/v1/completions", json=body) as stream,
    ):
        lines = _data_lines(stream)
        assert next(lines).startswith("data: ")  # admitted; now read nothing for a while
        t0 = time.monotonic()
        for k in range(3):
            r = client.completions.create(
                model="demo", prompt=f"quick one {k}", max_tokens=MAX_TOKENS, temperature=0,
                extra_body={"session_id": "fast-reader"},
            )  # fmt: skip
            assert r.choices[0].finish_reason in ("stop", "length")
        assert time.monotonic() - t0 < 30.0
        rest = list(lines)
    assert rest[-1] == "data: [DONE]"
    text = "".join(
        json.loads(line[6:])["choices"][0]["text"] for line in rest[:-1]
    )  # the slow stream lost nothing
    ids = list(demo[1].encode("a slow reader"))
    (expected,) = reference(demo, [ids], 200)
    eos = set(demo[1].eos_token_ids)
    expected_text = demo[1].decode([t for t in expected if t not in eos])
    assert text.endswith(expected_text[-20:])


# -- bad input --------------------------------------------------------------------------------

_CHAT = "/v1/chat/completions"
_COMPLETIONS = "/v1/completions"
_MESSAGES = "/v1/messages"
_OK_CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
_OK_MSG = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

BAD_INPUT: list[tuple[str, str, Any, dict[str, str], int, str]] = [
    # (case, path, body (bytes: raw), extra headers, status, message fragment)
    ("malformed json", _CHAT, b'{"model": "demo",', {}, 400, "not valid JSON"),
    ("malformed json anthropic", _MESSAGES, b"{nope", {}, 400, "not valid JSON"),
    ("not an object", _CHAT, b"[1, 2]", {}, 400, "must be a JSON object"),
    ("missing messages", _CHAT, {"model": "demo"}, {}, 400, "missing required field 'messages'"),
    ("missing model", _COMPLETIONS, {"prompt": "x"}, {}, 400, "missing required field 'model'"),
    ("missing max_tokens", _MESSAGES, {"model": "demo", "messages": _OK_MSG["messages"]}, {},
     400, "missing required field 'max_tokens'"),
    ("wrong type temperature", _CHAT, {**_OK_CHAT, "temperature": "hot"}, {}, 400,
     "temperature must be a number"),
    ("wrong type max_tokens", _MESSAGES, {**_OK_MSG, "max_tokens": "4"}, {}, 400,
     "max_tokens must be an integer"),
    ("wrong type messages", _CHAT, {**_OK_CHAT, "messages": "hi"}, {}, 400,
     "messages must be a non-empty array"),
    ("unknown model", _CHAT, {**_OK_CHAT, "model": "gpt-9"}, {}, 404, "'gpt-9' is not served"),
    ("unknown model anthropic", _MESSAGES, {**_OK_MSG, "model": "claude-9"}, {}, 404,
     "'claude-9' is not served"),
    ("max_tokens too large", _CHAT, {**_OK_CHAT, "max_tokens": 100_000}, {}, 400,
     "max_tokens=100000 is too large"),
    ("max_completion_tokens too large", _CHAT,
     {**_OK_CHAT, "max_tokens": None, "max_completion_tokens": 600}, {}, 400,
     "max_completion_tokens=600 is too large"),
    ("prompt too long", _COMPLETIONS, {"model": "demo", "prompt": [5] * 30_000}, {}, 400,
     "the prompt is 30000 tokens"),
    ("bad session id header", _CHAT, _OK_CHAT, {"X-Session-ID": "../etc/passwd"}, 400,
     "may only hold letters"),
    ("bad session id body", _MESSAGES, {**_OK_MSG, "session_id": "x" * 200}, {}, 400,
     "200 characters long"),
    ("conflicting session ids", _CHAT, {**_OK_CHAT, "session_id": "a"}, {"X-Session-ID": "b"},
     400, "conflicting session ids"),
    ("invalid utf-8", _CHAT, b'{"model": "demo", "messages": "\xff\xfe"}', {}, 400,
     "not valid UTF-8"),
    ("oversized body", _COMPLETIONS, b'{"prompt": "' + b"a" * (9 * 2**20) + b'"}', {}, 413,
     "larger than"),
    ("unsupported parameter", _CHAT, {**_OK_CHAT, "n": 3}, {}, 400, "n=3 is not supported"),
    ("unknown field", _CHAT, {**_OK_CHAT, "frobnicate": 1}, {}, 400, "unsupported field(s)"),
    ("tool without a schema", _MESSAGES, {**_OK_MSG, "tools": [{"name": "x"}]}, {}, 400,
     "tools[0] is missing input_schema"),
    ("seed with sampling", _CHAT, {**_OK_CHAT, "seed": 1, "temperature": 0.7}, {}, 400,
     "seed is not supported"),
    ("token id out of vocabulary", _COMPLETIONS, {"model": "demo", "prompt": [10**6]}, {}, 400,
     "outside [0,"),
    ("bad api key", _CHAT, _OK_CHAT, {"Authorization": "Bearer wrong"}, 401, "invalid or missing"),
    ("bad api key anthropic", _MESSAGES, _OK_MSG, {"x-api-key": "wrong"}, 401,
     "invalid or missing"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "fragment"),
    [case[1:] for case in BAD_INPUT],
    ids=[case[0] for case in BAD_INPUT],
)
def test_bad_input_is_refused_in_the_api_error_shape(
    server: ServerProcess,
    path: str,
    body: Any,
    headers: dict[str, str],
    status: int,
    fragment: str,
) -> None:
    sent = {**_auth(), **headers} if "Authorization" not in headers else dict(headers)
    if "x-api-key" in headers:
        sent = dict(headers)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(
        server.url + path,
        content=content,
        headers={**sent, "Content-Type": "application/json"},
        timeout=TIMEOUT_S,
    )
    assert r.status_code == status, r.text
    data = r.json()
    if path == _MESSAGES:
        assert data["type"] == "error"
        message = data["error"]["message"]
        assert data["error"]["type"] in (
            "invalid_request_error", "authentication_error", "not_found_error",
            "request_too_large",
        )  # fmt: skip
    else:
        message = data["error"]["message"]
        assert data["error"]["type"] in (
            "invalid_request_error", "authentication_error", "not_found_error"
        )  # fmt: skip
    assert fragment in message, message


def test_the_official_clients_raise_on_errors(server: ServerProcess) -> None:
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError, match="not served"):
        oai(server).chat.completions.create(
            model="gpt-9", messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(anthropic.BadRequestError, match="too large"):
        claude(server).messages.create(
            model="demo", max_tokens=100_000, messages=[{"role": "user", "content": "hi"}]
        )


def test_no_cross_session_tokens_under_threads(server: ServerProcess, demo: Any) -> None:
    """Two sessions streaming at once: each stream equals its own reference."""
    tokenizer = demo[1]
    prompts = ["alpha " * 20, "omega route " * 12]
    ids = [list(tokenizer.encode(p)) for p in prompts]
    expected = reference(demo, ids, 40)
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        body = {"model": "demo", "prompt": ids[i], "max_tokens": 40, "temperature": 0,
                "stream": True, "return_token_ids": True, "session_id": f"x-{i}"}  # fmt: skip
        got: list[int] = []
        with httpx.stream("POST", server.url + _COMPLETIONS, json=body, headers=_auth(),
                          timeout=TIMEOUT_S) as r:  # fmt: skip
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    got.extend(json.loads(line[6:])["choices"][0].get("token_ids") or [])
        results[i] = got

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    assert results == {0: expected[0], 1: expected[1]}
