"""Issue 20, items 4, 5, 6 on FakeRedis: keyed MACs of blocks and manifests (a secret), a
wrong-type key as one session's miss, hot sessions whose keys vanished written again."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import pytest
from fake_redis import FakeRedis

from kvpool import BlockPool, BlockPoolBatchEngine, CompletedGeneration, ModelCacheSpec
from kvpool.errors import CacheCorruptionError
from kvpool.store import AgentCacheStore
from kvpool.testing import FakeBatchGenerator, FakeModel, FakeStorage, FakeTokenizer
from kvpool.tier.codec import decode_block
from kvpool.tier.redis import RedisTier

B = 4
SPEC = ModelCacheSpec.uniform(2, 2, 8, dtype="float32", block_tokens=B)
FP = "sha256:" + "ab" * 32
SECRET = b"correct horse battery staple"
_HEAD = struct.Struct("<4sII32s")


def make_store(fake: FakeRedis, secret: bytes | None = None) -> AgentCacheStore:
    pool = BlockPool(SPEC, num_blocks=64, storage=FakeStorage)
    engine = BlockPoolBatchEngine(
        FakeModel(SPEC), FakeTokenizer(), pool, SPEC, batch_gen_factory=FakeBatchGenerator
    )
    tier = RedisTier(fake, spec=SPEC, fingerprint=FP, ttl_s=600, secret=secret)
    return AgentCacheStore(engine, tier, fingerprint=FP)


def tier_of(store: AgentCacheStore) -> RedisTier:
    assert isinstance(store.cold, RedisTier)
    return store.cold


def prompt_of(n: int, seed: int = 1) -> list[int]:
    return [1 + (seed * 7919 + i * 104729) % 997 for i in range(n)]


def run(store: AgentCacheStore, agent: str, prompt: Sequence[int]) -> CompletedGeneration:
    store.submit(agent, list(prompt), 3)
    (done,) = store.drain()
    assert done.error is None, done.error
    return done


def fresh(prompt: Sequence[int]) -> tuple[int, ...]:
    return run(make_store(FakeRedis()), "ref", prompt).token_ids


def forge(record: bytes, donor: bytes) -> bytes:
    """``record``'s tokens over ``donor``'s K/V (another context's block of as many tokens),
    the public checksum recomputed: what anyone who can write to Redis can store."""
    magic, n, n_layers, _ = _HEAD.unpack_from(record)
    assert _HEAD.unpack_from(donor)[1] == n and len(donor) == len(record)
    rest = record[_HEAD.size : _HEAD.size + 4 * n] + donor[_HEAD.size + 4 * n :]
    digest = hashlib.blake2b(rest, digest_size=32, person=b"kvpool.block.1").digest()
    return _HEAD.pack(magic, n, n_layers, digest) + rest


def donors(secret: bytes | None, n: int) -> list[bytes]:
    """Block records of an unrelated context of ``n`` tokens (every block's, in order)."""
    fake = FakeRedis()
    store = make_store(fake, secret)
    prompt = prompt_of(n - 3, seed=99)
    done = run(store, "donor", prompt)  # + 3 generated
    store.flush()
    return [fake.data[k] for k in block_keys(store, [*prompt, *done.token_ids])]


def block_keys(store: AgentCacheStore, tokens: Sequence[int]) -> list[str]:
    keys = tier_of(store).keys
    return [keys.block_key("", c) for c in keys.chain(tokens, "")]


@pytest.mark.parametrize("secret", [None, SECRET], ids=["no-secret", "secret"])
def test_a_forged_block_is_refused_deleted_and_counted_with_a_secret(secret: bytes | None) -> None:
    fake = FakeRedis()
    a = make_store(fake, secret)
    done = run(a, "s", prompt_of(10))
    a.flush()
    context = prompt_of(10) + list(done.token_ids)
    keys = block_keys(a, context)
    for key, donor in zip(keys, donors(secret, len(context)), strict=True):
        fake.data[key] = forge(fake.data[key], donor)
    forged = dict(fake.data)
    b = make_store(fake, secret)
    turn2 = [*context, 5]
    got = run(b, "s", turn2)
    if secret is None:  # the control: every Redis writer is trusted, the forgery is used
        assert got.cached_tokens == len(context) and b.stats.tier.num_blocks_corrupt == 0
        assert got.token_ids != fresh(turn2)  # it changed the output
        return
    assert got.cached_tokens == 0 and got.token_ids == fresh(turn2)
    assert b.stats.tier.num_blocks_corrupt == 1 and b.stats.num_load_errors == 1
    assert keys[0] not in fake.data  # deleted: the next writer stores the real one
    assert all(fake.data.get(k) != forged[k] for k in keys[:1])


@pytest.mark.parametrize("secret", [None, SECRET], ids=["no-secret", "secret"])
def test_a_block_planted_before_the_first_write_does_not_survive_set_nx(
    secret: bytes | None,
) -> None:
    fake = FakeRedis()
    writer = make_store(fake, secret)
    system = prompt_of(8, seed=3)  # two full blocks of a prompt the attacker knows
    honest = make_store(FakeRedis(), secret)  # the real records, to plant forgeries of
    run(honest, "x", system)
    honest.flush()
    real = honest.cold.client.data  # type: ignore[attr-defined]
    other = make_store(FakeRedis(), secret)
    run(other, "y", prompt_of(8, seed=4))
    other.flush()
    fakes = other.cold.client.data  # type: ignore[attr-defined]
    planted = {
        k: forge(real[k], fakes[d])
        for k, d in zip(
            block_keys(honest, system), block_keys(other, prompt_of(8, seed=4)), strict=True
        )
    }
    fake.data.update(planted)
    done = run(writer, "s", [*system, 9, 9])
    writer.flush()
    survived = [k for k, v in planted.items() if fake.data.get(k) == v]
    if secret is None:  # the control: SET NX keeps what was there
        assert len(survived) == 2
        return
    assert survived == [] and writer.stats.tier.num_blocks_corrupt == 2
    tier = tier_of(writer)
    for j, key in enumerate(planted):
        decode_block(fake.data[key], SPEC, j * B, key, tier._mac, key.encode())  # passes
    reader = make_store(fake, secret)
    context = [*system, 9, 9, *done.token_ids]
    got = run(reader, "s", [*context, 1])
    assert got.cached_tokens == len(context) and got.token_ids == fresh([*context, 1])


def test_a_manifest_without_the_secrets_mac_is_refused_and_secrets_keep_apart() -> None:
    fake = FakeRedis()
    plain, keyed = make_store(fake), make_store(fake, SECRET)
    run(plain, "s", prompt_of(10))
    plain.flush()
    run(keyed, "k", prompt_of(10, seed=2))
    keyed.flush()
    assert run(make_store(fake, SECRET), "s", prompt_of(10)).cached_tokens == 0
    assert run(make_store(fake, b"other"), "k", prompt_of(10, seed=2)).cached_tokens == 0
    assert len(fake.data) == 10  # 2 x (4 blocks + a manifest): separate key spaces, kept
    key = tier_of(keyed).keys.session_key("k")
    data = fake.data[key].replace(b'"salt":""', b'"salt":"x"')  # an edited manifest
    fake.data[key] = data
    reader = make_store(fake, SECRET)
    with pytest.raises(CacheCorruptionError, match="MAC"):
        tier_of(reader).load(reader.pool, "k", "x")


def test_a_wrong_type_key_is_a_miss_for_that_session_only() -> None:
    fake = FakeRedis()
    a = make_store(fake)
    done_s = run(a, "s", prompt_of(10))
    done_t = run(a, "t", prompt_of(10, seed=2))
    a.flush()
    fake.lpush(tier_of(a).keys.session_key("s"), b"junk")
    b = make_store(fake)
    got = run(b, "s", [*prompt_of(10), *done_s.token_ids, 5])
    assert b.stats.num_cold_hits == 0 and b.stats.num_load_errors == 1  # its session: a miss
    assert got.cached_tokens == 12  # its full blocks still come in as a published prefix
    tier = b.stats.tier
    assert tier.available and tier.num_errors == 0 and b.stats.num_tier_errors == 0
    context_t = [*prompt_of(10, seed=2), *done_t.token_ids]
    assert run(b, "t", [*context_t, 5]).cached_tokens == len(context_t)  # Redis still used
    # a wrong-type *block* key: that session's miss too, and it is deleted
    c = make_store(fake)
    victim = block_keys(c, context_t)[0]
    fake.data.pop(victim)
    fake.lpush(victim, b"junk")
    assert run(c, "t", [*context_t, 5, 6]).cached_tokens == 0
    assert c.stats.tier.available and c.stats.tier.num_blocks_corrupt == 1
    assert victim not in fake.lists
    key_s = tier_of(b).keys.session_key("s")
    assert key_s not in fake.lists  # set aside (deleted) when it was met
    b.flush()
    assert key_s in fake.data  # the next write of "s" stored its manifest again


def test_a_hot_sessions_vanished_keys_are_written_again_on_check_and_close() -> None:
    fake = FakeRedis()
    a = make_store(fake)
    done = run(a, "s", prompt_of(10))
    context = [*prompt_of(10), *done.token_ids]
    a.flush()
    fake.flushall()  # FLUSHALL, a restart without persistence, LRU eviction
    assert a.flush() == 0  # nothing looks unsaved to a plain flush
    assert a.check_saved() == 1 and a.flush() == 1  # the scheduled check finds it
    assert run(make_store(fake), "s", [*context, 5]).cached_tokens == len(context)
    fake.flushall()
    report = a.close()  # SIGTERM: checked again, written again
    assert report.num_written == 1 and not report.failed
    assert run(make_store(fake), "s", [*context, 5]).cached_tokens == len(context)


def test_while_redis_is_down_stats_agree_and_shutdown_reports_what_was_not_written() -> None:
    fake = FakeRedis()
    store = make_store(fake)
    tier = tier_of(store)
    tier.backoff_s = tier.max_backoff_s = 0.0  # every call reaches the fake
    run(store, "s", prompt_of(10))
    fake.fail_after = 0  # Redis dies
    run(store, "t", prompt_of(10, seed=2))  # served anyway: a load and a prefix import fail
    assert store.flush() == 0
    stats = store.stats
    assert not stats.tier.available  # the back-off (none here) is over, Redis is not back
    assert stats.num_tier_errors == stats.tier.num_errors + stats.tier.num_skipped > 0
    report = store.close()  # SIGTERM with Redis down: nothing claimed as written
    assert report.num_written == 0 and set(report.failed) == {"s", "t"}
    assert all("unreachable" in why for why in report.failed.values())
    fake.fail_after = None
    store2 = make_store(fake)
    run(store2, "u", prompt_of(5))
    assert store2.stats.tier.available


def test_the_engine_loop_rewrites_lost_sessions_on_its_schedule(tmp_path: object) -> None:
    """While idle, the server's loop asks Redis what it lost (every check_saved_s) and writes
    it again: FLUSHALL while nobody sends a request is repaired without a restart."""
    import time

    from server_app import app_client, complete

    fake = FakeRedis()
    store = make_store(fake)
    key = tier_of(store).keys.session_key("s1")
    with app_client(store) as client:
        client.app_state.loop.check_saved_s = 0.1  # type: ignore[attr-defined]
        complete(client, "a session that stays hot", session="s1")
        deadline = time.monotonic() + 10
        while key not in fake.data:
            assert time.monotonic() < deadline, "the session was never written"
            time.sleep(0.02)
        fake.flushall()
        while key not in fake.data:
            assert time.monotonic() < deadline, "the lost session was not written again"
            time.sleep(0.02)
