"""Issue 20, items 4, 5, 6 against a real ``redis-server``: what another Redis client (or
Redis itself) does to the keys never costs a session more than its own cache.

The store tests run FakeStorage pools (no mlx); the last one runs ``kvpool serve``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from redis_process import RedisProcess, require_redis_server
from server_process import ServerProcess, wait_until

from kvpool import BlockPool, BlockPoolBatchEngine, ModelCacheSpec
from kvpool.models import build_model
from kvpool.store import AgentCacheStore
from kvpool.testing import FakeBatchGenerator, FakeModel, FakeStorage, FakeTokenizer
from kvpool.tier.redis import RedisTier

SPEC = ModelCacheSpec.uniform(2, 2, 16, dtype="float16", block_tokens=16)
FP = "sha256:" + "34" * 32
SECRET = b"a deployment secret"


def make_store(url: str, secret: bytes | None = None) -> AgentCacheStore:
    pool = BlockPool(SPEC, num_blocks=64, storage=FakeStorage)
    engine = BlockPoolBatchEngine(
        FakeModel(SPEC), FakeTokenizer(), pool, SPEC, batch_gen_factory=FakeBatchGenerator
    )
    tier = RedisTier.from_url(url, spec=SPEC, fingerprint=FP, secret=secret)
    return AgentCacheStore(engine, tier, fingerprint=FP)


def context(seed: int, n: int = 50) -> list[int]:
    return [1 + (seed * 7919 + i * 104729) % 997 for i in range(n)]


def run(store: AgentCacheStore, agent: str, prompt: list[int]) -> tuple[list[int], int]:
    store.submit(agent, prompt, 2)
    (done,) = store.drain()
    assert done.error is None, done.error
    return [*prompt, *done.token_ids], done.cached_tokens


def test_lpush_under_a_sessions_key_is_that_sessions_miss_only(tmp_path: Path) -> None:
    require_redis_server()
    with RedisProcess(tmp_path / "redis") as server:
        client = server.client()
        writer = make_store(server.url)
        s, _ = run(writer, "s", context(1))
        t, _ = run(writer, "t", context(2))
        writer.flush()
        key = writer.cold.keys.session_key("s")  # type: ignore[attr-defined]
        client.delete(key)
        client.lpush(key, b"not a manifest")
        reader = make_store(server.url)
        for _ in range(3):  # every request of "s" again: never an outage
            run(reader, "s", [*s, 5])
            reader.forget("s")
        _, cached_t = run(reader, "t", [*t, 5])
        stats = reader.stats
        assert cached_t == len(t)  # Redis is still used for everyone else
        assert stats.tier.available and stats.tier.num_errors == 0 and stats.num_tier_errors == 0
        assert client.type(key) in (b"none", b"string")  # set aside, then maybe written again


def test_with_a_secret_a_planted_block_never_survives_and_a_forged_one_is_never_read(
    tmp_path: Path,
) -> None:
    require_redis_server()
    with RedisProcess(tmp_path / "redis") as server:
        client = server.client()
        honest = make_store(server.url, SECRET)
        prompt = context(3, 48)  # three full blocks an attacker can guess (a system prompt)
        keys = [honest.cold.keys.block_key("", c) for c in honest.cold.keys.chain(prompt, "")]  # type: ignore[attr-defined]
        for key in keys:  # planted before any server wrote them
            client.set(key, b"KVB1" + b"\x00" * 64)
        full, _ = run(honest, "s", prompt)
        honest.flush()
        assert all(client.get(k) != b"KVB1" + b"\x00" * 64 for k in keys)
        assert honest.stats.tier.num_blocks_corrupt == 3
        reader = make_store(server.url, SECRET)
        _, cached = run(reader, "s", [*full, 9])
        assert cached == len(full) and reader.stats.tier.num_blocks_corrupt == 0
        # a block rewritten afterwards by someone without the secret: refused, deleted
        record = bytearray(client.get(keys[1]))
        record[-1] ^= 1
        client.set(keys[1], bytes(record))
        late = make_store(server.url, SECRET)
        _, cached = run(late, "s", [*full, 9])
        assert cached == 16  # the first block only (the prefix before the bad one)
        assert late.stats.tier.num_blocks_corrupt == 1 and client.exists(keys[1]) == 0


def _turn(server: ServerProcess, session: str, prompt: list[int]) -> tuple[list[int], int]:
    body = {"model": "demo", "prompt": prompt, "max_tokens": 4, "temperature": 0,
            "return_token_ids": True}  # fmt: skip
    r = httpx.post(
        server.url + "/v1/completions", json=body, headers={"X-Session-ID": session}, timeout=120
    )
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data["choices"][0]["token_ids"], data["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_sigterm_after_flushall_writes_the_hot_session_again(tmp_path: Path) -> None:
    require_redis_server()
    models = tmp_path / "models"
    build_model("demo", models / "demo")
    prompt = [1 + (i * 37) % 400 for i in range(300)]
    with RedisProcess(tmp_path / "redis") as redis_server:
        client = redis_server.client()
        shared = ("--cache-url", redis_server.url, "--flush-interval", "0.5")
        with ServerProcess(tmp_path / "a", models, *shared) as a:
            generated, _ = _turn(a, "hot-1", prompt)
            wait_until(lambda: client.keys("kvpool:ses:*"), 30.0, "the session in Redis")
            client.flushall()
            assert a.stop() == 0, a.log()
            assert "1 written" in a.log(), a.log()
            assert "no --cache-secret: every client that can write to" in a.log()
        assert client.keys("kvpool:ses:*")
        with ServerProcess(tmp_path / "b", models, *shared) as b:
            context = [*prompt, *generated]
            _, cached = _turn(b, "hot-1", [*context, 7])
            assert cached >= len(prompt), (cached, len(context))
            assert b.stop() == 0


def test_a_server_with_a_secret_file_keys_its_own_key_space(tmp_path: Path) -> None:
    require_redis_server()
    models = tmp_path / "models"
    build_model("demo", models / "demo")
    secret = tmp_path / "secret"
    secret.write_text("  s3cret-of-the-deployment\n")
    prompt = [1 + (i * 53) % 400 for i in range(80)]
    with RedisProcess(tmp_path / "redis") as redis_server:
        client = redis_server.client()
        args = ("--cache-url", redis_server.url, "--cache-secret-file", str(secret))
        with ServerProcess(tmp_path / "a", models, *args) as a:
            generated, _ = _turn(a, "keyed", prompt)
            assert a.stop() == 0, a.log()
            assert "every client that can write" not in a.log()
        (key,) = client.keys("kvpool:ses:*")
        assert b"+m" in key  # the secret's id in the block format
        assert b'"mac":' in client.get(key)
        with ServerProcess(tmp_path / "b", models, *args) as b:
            _, cached = _turn(b, "keyed", [*prompt, *generated, 5])
            assert cached >= len(prompt)
            assert b.stop() == 0
