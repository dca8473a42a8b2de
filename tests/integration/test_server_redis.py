"""Two ``kvpool serve`` processes sharing one ``redis-server`` (``--cache-url redis://...``).

Sessions are driven with token-id prompts (``/v1/completions``, ``return_token_ids``) so a
saved context is known exactly (the manifest in Redis lists it). A third server with a local
cache directory gives the reference tokens of a fresh prefill.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis_process import RedisProcess, require_redis_server
from server_process import ServerProcess, wait_until

from kvpool import ModelCacheSpec
from kvpool.errors import CacheCorruptionError
from kvpool.models import build_model, load_model
from kvpool.tier.codec import decode_block
from kvpool.tier.layout import KeySpace

MAX_TOKENS = 6
TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("redis-models")
    build_model("demo", path / "demo")
    return path


@pytest.fixture(scope="module")
def model(models_dir: Path) -> tuple[Any, Any]:
    return load_model(models_dir / "demo")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    require_redis_server()
    # An append-only file (in the temporary directory) so a SIGKILLed Redis restarts with
    # what it had: the kill test then checks what a reader finds after it.
    with RedisProcess(tmp_path_factory.mktemp("redis"), persist=True) as server:
        yield server


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, redis_server: RedisProcess
) -> Iterator[dict[str, ServerProcess]]:
    shared = ("--cache-url", redis_server.url, "--flush-interval", "0.5")
    procs = {
        "A": ServerProcess(tmp_path_factory.mktemp("a"), models_dir, *shared),
        "B": ServerProcess(tmp_path_factory.mktemp("b"), models_dir, *shared),
        "ref": ServerProcess(tmp_path_factory.mktemp("ref"), models_dir),
    }
    try:
        for proc in procs.values():
            proc.start()
        yield procs
    finally:
        for proc in procs.values():
            try:
                proc.stop()
            finally:
                proc.kill()


def turn(
    server: ServerProcess, session: str | None, context: list[int], max_tokens: int = MAX_TOKENS
) -> tuple[list[int], int, int]:
    """One greedy turn; returns (generated ids, prompt tokens, cached tokens)."""
    body = {"model": "demo", "prompt": context, "max_tokens": max_tokens, "temperature": 0,
            "return_token_ids": True}  # fmt: skip
    headers = {"X-Session-ID": session} if session else {}
    r = httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=TIMEOUT_S)
    assert r.status_code == 200, r.text
    data = r.json()
    usage = data["usage"]
    return (
        data["choices"][0]["token_ids"],
        usage["prompt_tokens"],
        usage["prompt_tokens_details"]["cached_tokens"],
    )


def stats(server: ServerProcess) -> dict[str, Any]:
    return dict(httpx.get(server.url + "/v1/cache/stats", timeout=TIMEOUT_S).json()["store"])


def manifests(redis_server: RedisProcess) -> dict[str, dict[str, Any]]:
    client = redis_server.client()
    out = {}
    for key in client.keys("kvpool:ses:*"):
        data = client.get(key)
        if data is not None:
            body = json.loads(data)
            out[body["agent_id"]] = body
    client.close()
    return out


def saved_tokens(redis_server: RedisProcess, session: str, at_least: int) -> list[int]:
    def found() -> list[int] | None:
        body = manifests(redis_server).get(session)
        return body["token_ids"] if body and len(body["token_ids"]) >= at_least else None

    tokens: list[int] = wait_until(found, 60.0, f"the manifest of {session} in Redis")
    return tokens


def block_keys(body: dict[str, Any]) -> list[str]:
    keys = KeySpace(body["fingerprint"], body["block_format"], body["block_tokens"])
    return [keys.block_key(body["salt"], int(h, 16)) for h in body["blocks"]]


def text_ids(tokenizer: Any, what: str, words: int) -> list[int]:
    return list(tokenizer.encode(" ".join(f"{what}-{i % 37} step {i}" for i in range(words))))


def test_a_session_started_on_a_continues_on_b_with_nothing_prefilled_again(
    servers: dict[str, ServerProcess], redis_server: RedisProcess, model: tuple[Any, Any]
) -> None:
    tokenizer = model[1]
    a, b = servers["A"], servers["B"]
    context = text_ids(tokenizer, "handoff", 150)
    assert len(context) > 512  # several full blocks and a partial one
    gen1, _, cached = turn(a, "hand-off", context)
    assert cached == 0
    saved = saved_tokens(redis_server, "hand-off", len(context))
    assert saved == [*context, *gen1][: len(saved)] and len(saved) >= len(context)
    turn2 = [*context, *gen1, *tokenizer.encode(" and now the next step")]
    gen2, prompt, cached = turn(b, "hand-off", turn2)
    assert cached == len(saved), (prompt, cached, len(saved))  # 0 saved tokens prefilled again
    assert stats(b)["num_cold_hits"] == 1
    reference, _, ref_cached = turn(servers["ref"], None, turn2)
    assert ref_cached == 0 and gen2 == reference
    # negative control: a session Redis does not hold is prefilled in full on B
    _, _, none_cached = turn(b, "never-seen", text_ids(tokenizer, "unseen", 150))
    assert none_cached == 0


def test_a_system_prompt_prefilled_on_a_is_a_prefix_hit_on_b(
    servers: dict[str, ServerProcess], redis_server: RedisProcess, model: tuple[Any, Any]
) -> None:
    tokenizer = model[1]
    a, b = servers["A"], servers["B"]
    system = text_ids(tokenizer, "system", 140)
    full = len(system) // 256 * 256
    assert full >= 512
    turn(a, "sys-a", [*system, *tokenizer.encode(" first question")])
    saved_tokens(redis_server, "sys-a", len(system))
    before = stats(b)["tier"]["prefix_tokens_imported"]
    question = [*system, *tokenizer.encode(" another question entirely")]
    gen, _, cached = turn(b, "sys-b", question)
    assert cached >= full, (cached, full)
    assert stats(b)["tier"]["prefix_tokens_imported"] - before >= full
    reference, _, _ = turn(servers["ref"], None, question)
    assert gen == reference


def test_a_corrupt_block_is_detected_not_loaded_and_the_session_prefills(
    servers: dict[str, ServerProcess], redis_server: RedisProcess, model: tuple[Any, Any]
) -> None:
    tokenizer = model[1]
    a, b = servers["A"], servers["B"]
    context = text_ids(tokenizer, "corrupt", 150)
    gen1, _, _ = turn(a, "bad", context)
    saved_tokens(redis_server, "bad", len(context))
    body = manifests(redis_server)["bad"]
    first = block_keys(body)[0]
    client = redis_server.client()
    record = client.get(first)
    client.setrange(first, len(record) - 3, bytes([record[-3] ^ 0xFF]))
    client.close()
    corrupt_before = stats(b)["tier"]["num_blocks_corrupt"]
    turn2 = [*context, *gen1, *tokenizer.encode(" go on")]
    gen2, _, cached = turn(b, "bad", turn2)
    assert cached == 0  # the session's first block failed: nothing of it was used
    assert stats(b)["tier"]["num_blocks_corrupt"] == corrupt_before + 1
    reference, _, _ = turn(servers["ref"], None, turn2)
    assert gen2 == reference


def check_every_manifest(redis_server: RedisProcess, spec: ModelCacheSpec) -> int:
    """Every manifest in Redis names only blocks that are there and pass their checksum."""
    client = redis_server.client()
    bodies = manifests(redis_server)
    for agent, body in bodies.items():
        for j, key in enumerate(block_keys(body)):
            record = client.get(key)
            assert record is not None, f"torn manifest: {agent} block {j} ({key}) is missing"
            try:
                decode_block(record, spec, j * spec.block_tokens, key)
            except CacheCorruptionError as exc:
                if agent != "bad":  # the block corrupted on purpose above
                    raise AssertionError(f"{agent}: {exc}") from exc
    client.close()
    return len(bodies)


def test_sigkill_redis_during_session_writes(
    servers: dict[str, ServerProcess], redis_server: RedisProcess, model: tuple[Any, Any]
) -> None:
    tokenizer = model[1]
    spec = ModelCacheSpec.from_model(model[0])
    a, b = servers["A"], servers["B"]
    errors_before = stats(a)["num_tier_errors"] + stats(b)["num_tier_errors"]
    for i, delay in enumerate((0.2, 0.3, 0.4)):
        contexts = {s: text_ids(tokenizer, f"kill{i}{s}", 200) for s in ("x", "y")}
        done: dict[str, list[int]] = {}

        def first_turn(
            name: str, server: ServerProcess, ctx: list[int], out: dict[str, list[int]]
        ) -> None:
            out[name] = turn(server, name, ctx)[0]

        threads = [
            threading.Thread(target=first_turn, args=(f"k{i}{s}", srv, contexts[s], done))
            for s, srv in (("x", a), ("y", b))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT_S)
        assert len(done) == 2
        time.sleep(delay)  # the servers write those sessions about now (0.25 s after idle)
        redis_server.kill()
        # both servers keep serving while Redis is down: from the pool, or by prefill
        _, _, cached = turn(a, f"k{i}x", [*contexts["x"], *done[f"k{i}x"], 5])
        assert cached >= len(contexts["x"])  # A's own pool still has it
        turn(b, f"down{i}", text_ids(tokenizer, f"down{i}", 60))  # new on B: prefilled, served
        redis_server.start()  # the same port, the same append-only file
        check_every_manifest(redis_server, spec)
    wait_until(
        lambda: stats(a)["num_tier_errors"] + stats(b)["num_tier_errors"] > errors_before,
        10.0,
        "the errors counted",
    )
    metrics = httpx.get(a.url + "/metrics", timeout=TIMEOUT_S).text
    assert "kvpool:cache_tier_errors" in metrics
    # writes resume once Redis is back (within the back-off): a new session appears
    context = text_ids(tokenizer, "after-restart", 120)
    gen, _, _ = turn(a, "after", context)
    saved_tokens(redis_server, "after", len(context))
    turn2 = [*context, *gen, 7]
    _, _, cached = turn(b, "after", turn2)
    assert cached >= len(context)
    assert check_every_manifest(redis_server, spec) >= 3
    for server in (a, b):
        assert httpx.get(server.url + "/health", timeout=TIMEOUT_S).status_code == 200
