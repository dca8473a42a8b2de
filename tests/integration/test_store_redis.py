"""RedisTier against a real ``redis-server`` (no mlx: FakeStorage pools): TTLs and the
memory bound (``maxmemory`` with ``allkeys-lru``), the choice docs/DEPLOY.md documents."""

from __future__ import annotations

from pathlib import Path

from redis_process import RedisProcess

from kvpool import BlockPool, BlockPoolBatchEngine, ModelCacheSpec
from kvpool.store import AgentCacheStore
from kvpool.testing import FakeBatchGenerator, FakeModel, FakeStorage, FakeTokenizer
from kvpool.tier.redis import RedisTier

SPEC = ModelCacheSpec.uniform(2, 2, 64, dtype="float16", block_tokens=64)  # 64 KiB blocks
FP = "sha256:" + "12" * 32


def make_store(url: str, num_blocks: int = 64) -> AgentCacheStore:
    pool = BlockPool(SPEC, num_blocks=num_blocks, storage=FakeStorage)
    engine = BlockPoolBatchEngine(
        FakeModel(SPEC), FakeTokenizer(), pool, SPEC, batch_gen_factory=FakeBatchGenerator
    )
    return AgentCacheStore(
        engine, RedisTier.from_url(url, spec=SPEC, fingerprint=FP), fingerprint=FP
    )


def context(seed: int, n: int = 200) -> list[int]:
    return [1 + (seed * 7919 + i * 104729) % 997 for i in range(n)]


def run(store: AgentCacheStore, agent: str, prompt: list[int]) -> tuple[list[int], int]:
    store.submit(agent, prompt, 2)
    (done,) = store.drain()
    assert done.error is None, done.error
    return [*prompt, *done.token_ids], done.cached_tokens


def test_every_key_has_a_ttl_refreshed_on_use(tmp_path: Path) -> None:
    with RedisProcess(tmp_path / "redis") as server:
        client = server.client()
        a = make_store(server.url + "?ttl=300")
        run(a, "s", context(1))
        a.flush()
        keys = client.keys("kvpool:*")
        assert len(keys) == 5  # 4 blocks (202 tokens) and the manifest
        assert all(0 < client.ttl(k) <= 300 for k in keys)
        for k in keys:
            client.expire(k, 10)
        b = make_store(server.url + "?ttl=300")
        _, cached = run(b, "s", [*context(1), 5, 6, 7])
        assert cached > 0 and all(client.ttl(k) > 10 for k in keys)


def test_maxmemory_with_allkeys_lru_bounds_redis_and_evictions_are_misses(tmp_path: Path) -> None:
    limit = 4 * 2**20
    with RedisProcess(
        tmp_path / "redis", "--maxmemory", str(limit), "--maxmemory-policy", "allkeys-lru"
    ) as server:
        client = server.client()
        writer = make_store(server.url + "?ttl=0")  # no TTL: the LRU alone bounds memory
        contexts = {f"s{i}": run(writer, f"s{i}", context(i))[0] for i in range(40)}
        writer.flush()  # 40 sessions x 4 blocks x 64 KiB = 10 MiB into 4 MiB
        info = client.info("memory")
        assert info["used_memory"] <= limit * 1.05, info["used_memory"]
        assert client.info("stats")["evicted_keys"] > 0
        assert writer.stats.num_tier_errors == 0
        reader = make_store(server.url + "?ttl=0", num_blocks=256)
        outcomes = {"hit": 0, "miss": 0}
        for agent, ctx in contexts.items():
            _, cached = run(reader, agent, [*ctx, 9])
            outcomes["hit" if cached == len(ctx) else "miss"] += 1
        stats = reader.stats
        assert outcomes["hit"] > 0 and outcomes["miss"] > 0, outcomes
        assert stats.num_tier_errors == 0 and stats.tier.num_blocks_corrupt == 0


def test_a_redis_that_is_down_at_start_is_counted_not_fatal(tmp_path: Path) -> None:
    with RedisProcess(tmp_path / "redis") as server:
        url = server.url
    store = make_store(url)  # nothing listens there now
    _, cached = run(store, "s", context(3))
    assert cached == 0 and store.stats.num_tier_errors >= 1
    assert store.flush() == 0
