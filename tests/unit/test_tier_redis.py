"""RedisTier's layout, codec and faults on fakes (FakeRedis, FakeStorage): no mlx, no server."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence

import numpy as np
import pytest
from fake_redis import FakeRedis
from fakes import SPEC, B, fake_engine, prompt_of, run_one

from kvpool import (
    AttentionKind,
    BlockPool,
    BlockPoolBatchEngine,
    CompletedGeneration,
    LayerSpec,
    ModelCacheSpec,
)
from kvpool.cache.manager import StateLease
from kvpool.cache.storage import LayerCodes, LayerKV, QuantizedRows
from kvpool.errors import CacheCorruptionError, IncompatibleCacheError
from kvpool.store import AgentCacheStore, Tier
from kvpool.testing import FakeBatchGenerator, FakeModel, FakeStorage, FakeTokenizer
from kvpool.tier import local_path, open_tier
from kvpool.tier.base import TierUnavailableError
from kvpool.tier.codec import (
    block_format_id,
    decode_block,
    decode_state,
    encode_block,
    record_bytes,
)
from kvpool.tier.layout import KeySpace, SessionManifest
from kvpool.tier.local import LocalTier
from kvpool.tier.redis import RedisTier

FP = "sha256:" + "ab" * 32
TTL = 600
DENSE64 = ModelCacheSpec.uniform(2, 2, 64, dtype="float16", block_tokens=B)  # groups of 64
Q4 = DENSE64.with_format(4)
Q8 = DENSE64.with_format(8)


def make_store(
    fake: FakeRedis, num_blocks: int = 64, spec: ModelCacheSpec = SPEC, **tier_kw: float
) -> AgentCacheStore:
    engine = fake_engine(spec, num_blocks)
    tier = RedisTier(fake, spec=spec, fingerprint=FP, ttl_s=TTL, **tier_kw)  # type: ignore[arg-type]
    return AgentCacheStore(engine, tier, fingerprint=FP)


def run(
    store: AgentCacheStore, agent: str, prompt: Sequence[int], salt: str = ""
) -> CompletedGeneration:
    return run_one(store, agent, prompt, salt=salt)


def fresh(prompt: Sequence[int]) -> tuple[int, ...]:
    """What a store with nothing cached generates for ``prompt``."""
    return run(make_store(FakeRedis()), "ref", prompt).token_ids


def keyspace() -> KeySpace:
    return KeySpace(FP, block_format_id(SPEC), B)


def blocks_of(fake: FakeRedis) -> list[str]:
    return sorted(k for k in fake.data if ":blk:" in k)


# --------------------------------------------------------------------------- codec, keys


def test_codec_round_trip_and_every_corruption_is_refused() -> None:
    rng = np.random.default_rng(0)
    kvs = [
        LayerKV(i, 8, rng.random((2, 3, 8), dtype=np.float32), rng.random((2, 3, 8), np.float32))
        for i in range(2)
    ]
    record = encode_block([5, 6, 7], kvs)
    block = decode_block(record, SPEC, 8, "k")
    assert block.token_ids == (5, 6, 7)
    for got, want in zip(block.layers, kvs, strict=True):
        assert got.start == 8 and np.array_equal(got.keys, want.keys)
        assert np.array_equal(got.values, want.values)
    flipped = bytearray(record)
    flipped[-1] ^= 1
    with pytest.raises(CacheCorruptionError, match="checksum"):
        decode_block(bytes(flipped), SPEC, 8, "k")
    with pytest.raises(CacheCorruptionError, match="bytes, expected"):
        decode_block(record[:-4], SPEC, 8, "k")
    with pytest.raises(CacheCorruptionError, match="magic"):
        decode_block(b"XXXX" + record[4:], SPEC, 8, "k")
    assert block_format_id(SPEC) == "dense-float32-v1"


def test_keys_separate_tenants_models_and_formats() -> None:
    ks = keyspace()
    tokens = prompt_of(10)
    chain = ks.chain(tokens, "")
    assert len(chain) == 3  # two full blocks and a partial one
    assert chain[:2] == ks.chain(tokens[:8], "")  # a full block's key depends on its prefix only
    assert ks.chain(tokens, "tenant-b") != chain
    assert ks.block_key("", chain[0]) != ks.block_key("tenant-b", chain[0])
    other_model = KeySpace("sha256:" + "cd" * 32, ks.block_format, B)
    assert other_model.block_key("", chain[0]) != ks.block_key("", chain[0])
    q8 = KeySpace(FP, "q8-float32-v1", B)
    assert q8.block_key("", chain[0]) != ks.block_key("", chain[0])


def test_manifest_round_trip_and_checks() -> None:
    ks = keyspace()
    tokens = tuple(prompt_of(10))
    manifest = SessionManifest(
        "a", tokens, tuple(ks.chain(tokens, "s")), "s", FP, ks.block_format, B
    )
    data = manifest.encode()
    assert SessionManifest.decode(data, ks, "a", "m") == manifest
    body = json.loads(data)
    body["token_ids"][3] += 1  # tokens that do not match the keys
    with pytest.raises(CacheCorruptionError, match="do not match"):
        SessionManifest.decode(json.dumps(body).encode(), ks, "a", "m")
    with pytest.raises(CacheCorruptionError, match="malformed"):
        SessionManifest.decode(data, ks, "b", "m")  # another agent's
    with pytest.raises(CacheCorruptionError, match="not JSON"):
        SessionManifest.decode(data[:-3], ks, "a", "m")
    with pytest.raises(IncompatibleCacheError, match="fingerprint"):
        SessionManifest.decode(data, KeySpace("sha256:" + "cd" * 32, ks.block_format, B), "a", "m")
    with_snapshots = dataclasses.replace(manifest, snapshots=(4, 9))
    assert SessionManifest.decode(with_snapshots.encode(), ks, "a", "m") == with_snapshots
    assert "snapshots" not in body  # none: the field is left out, as older kvpools wrote
    for bad in ([9, 4], [4, 4], [0], [10], [True], ["4"], 4):
        body = json.loads(with_snapshots.encode())
        body["snapshots"] = bad
        with pytest.raises(CacheCorruptionError, match="malformed snapshot lengths"):
            SessionManifest.decode(json.dumps(body).encode(), ks, "a", "m")


def test_a_prefix_chain_key_is_the_key_a_session_of_those_tokens_ends_with() -> None:
    ks = keyspace()
    tokens = prompt_of(11)
    chain = ks.chain(tokens, "s")
    for n in range(1, 12):
        assert ks.prefix_chain_key("s", tokens, chain, n) == ks.chain(tokens[:n], "s")[-1], n


def _damage(fake: FakeRedis, key: str, how: str | None) -> None:
    """Flip a bit of the record under ``key`` ("flip"), delete it ("delete"), or neither."""
    if how == "flip":
        record = bytearray(fake.data[key])
        record[-1] ^= 0x40
        fake.data[key] = bytes(record)
    elif how == "delete":
        del fake.data[key]


SWA = ModelCacheSpec(
    (
        LayerSpec(AttentionKind.SLIDING, 2, 8, 8, window=6),
        LayerSpec(AttentionKind.GLOBAL, 2, 8, 8),
    ),
    block_tokens=B,
)


def _window_keys(fake: FakeRedis) -> set[str]:
    return {k for k in fake.data if ":blk:" in k and ":g" in k}


@pytest.mark.parametrize("corrupt", [None, "flip", "delete"])
def test_a_sliding_window_session_continues_on_another_store(corrupt: str | None) -> None:
    """A gemma-style model (window 6, blocks of 4): block records hold the global layer, and
    the sliding group's rows are records of their own, for the positions its window holds
    at the session's end (and whole window blocks the pool holds at its boundaries).
    Another store resumes from both; a corrupt window record is refused (deleted), a
    missing one is a miss (what a prefix import covers is reused): token-exact either way."""
    fake = FakeRedis()
    a = make_store(fake, spec=SWA)
    first = run(a, "s", prompt_of(14))
    assert a.flush() == 1
    context = prompt_of(14) + list(first.token_ids)  # 17 tokens
    handle = first.blocks
    (sliding,) = [g for g, grp in enumerate(SWA.groups) if grp.window]
    valid_from = handle.tables[sliding].valid_from
    assert 0 < valid_from <= len(context) - 5  # the window: the last 5 positions, at least
    ks = KeySpace(FP, block_format_id(SWA), B)
    chain = ks.chain(context, "")
    want = {
        ks.window_key("", chain[j], sliding, max(j * B, valid_from) - j * B)
        for j in range(valid_from // B, len(chain))
    }
    # and blocks 1 and 2 whole: the prefill stopped at the prompt's last boundary (12)
    # holding all 12 rows and published the window there (rows 7..11), which stays cached
    whole = {ks.window_key("", chain[j], sliding, 0) for j in (1, 2)}
    assert _window_keys(fake) == want | whole  # nothing else before the window
    assert len(blocks_of(fake)) == len(chain) + len(want) + len(whole)
    victim = sorted(want)[0]
    _damage(fake, victim, corrupt)
    turn2 = context + prompt_of(3, seed=9)
    b = make_store(fake, spec=SWA)
    done = run(b, "s", turn2)
    reference = run(make_store(FakeRedis(), spec=SWA), "ref", turn2).token_ids
    assert done.token_ids == reference
    if corrupt is None:
        assert done.cached_tokens == len(context)
    else:  # the session is a miss; a prefix import may bring what boundary windows cover
        assert done.cached_tokens == b.stats.prefix_tokens_imported < len(context)
    if corrupt == "flip":
        assert b.stats.tier.num_blocks_corrupt == 1 and victim not in fake.data
    b.pool.check_invariants()


def test_a_sliding_window_prefix_no_pool_held_is_not_imported() -> None:
    """A session served alone leaves its sliding group's rows in the pool for its own window
    at its end and for the window at its prompt's last block boundary (16, past the
    system prompt's 12): Redis gets no window at the system prompt's boundaries, so a new
    agent sharing it imports nothing (its turn is prefilled, token-exact), where an
    attention-only model imports the prompt's blocks. (Agents that arrive together
    publish their shared prefix: tests/integration/test_redis_sliding.py imports that.)"""
    for spec, imported in ((SWA, 0), (SPEC, 12)):
        fake = FakeRedis()
        a = make_store(fake, spec=spec)
        system = prompt_of(12, seed=3)
        run(a, "a", system + prompt_of(5, seed=4))
        assert a.flush() == 1
        b = make_store(fake, spec=spec)
        new = system + prompt_of(4, seed=5)
        got = run(b, "n", new)
        assert got.cached_tokens == imported == b.stats.prefix_tokens_imported
        assert got.token_ids == run(make_store(FakeRedis(), spec=spec), "ref", new).token_ids
        b.pool.check_invariants()


SWA8 = ModelCacheSpec(  # window 8: its window at a block boundary is two whole blocks
    (
        LayerSpec(AttentionKind.SLIDING, 2, 8, 8, window=8),
        LayerSpec(AttentionKind.GLOBAL, 2, 8, 8),
    ),
    block_tokens=B,
)


Q8_SWA8 = ModelCacheSpec(  # SWA8 with heads of 64, quantized to 8 bits at rest
    (
        LayerSpec(AttentionKind.SLIDING, 2, 64, 64, window=8),
        LayerSpec(AttentionKind.GLOBAL, 2, 64, 64),
    ),
    "float16",
    B,
).with_format(8)


def _swa_sessions(
    fake: FakeRedis, secret: bytes | None = None, spec: ModelCacheSpec = SWA8
) -> tuple[AgentCacheStore, list[int], list[str]]:
    """Store A serves two agents arriving together with a 13-token system prompt: the
    leader publishes the prefix at 12, leaving the sliding group's blocks 1 and 2 (the
    window at 12 starts at 5) cached in the pool; both sessions are saved. Returns store
    A, the system prompt and the keys of those two window records (row 0)."""
    a = make_store(fake, spec=spec, secret=secret)  # type: ignore[arg-type]
    system = prompt_of(13, seed=3)
    a.submit("a", [*system, *prompt_of(5, seed=4)], 3)
    a.submit("b", [*system, *prompt_of(6, seed=6)], 3)
    assert sorted(c.cached_tokens for c in a.drain()) == [0, 12]  # a leader and a follower
    assert a.flush() == 2
    assert a.stats.tier.num_blocks_written == len(blocks_of(fake))  # each record once
    tier = a.cold
    assert isinstance(tier, RedisTier)
    chain = tier.keys.chain(system[:12], "")
    return a, system, [tier.keys.window_key("", chain[j], 0, 0) for j in (1, 2)]


@pytest.mark.parametrize(
    ("damage", "imported", "spec"),
    [(None, 12, SWA8), ("flip", 0, SWA8), ("delete", 0, SWA8), (None, 12, Q8_SWA8)],
)
def test_a_sliding_window_prefix_a_leader_published_is_imported_by_another_store(
    damage: str | None, imported: int, spec: ModelCacheSpec
) -> None:
    """The window blocks a published prefix leaves in store A's pool go to Redis at row 0
    of their block (where the importer looks, no scan), once; store B (an empty pool)
    imports the 3 global blocks and both window blocks and its new agent reuses all 12
    tokens, token-exact (a quantized pool's too: codes bit for bit). A window record
    failing its checksum (deleted, counted) or missing: nothing imported, the turn
    prefilled, token-exact."""
    fake = FakeRedis()
    _, system, windows = _swa_sessions(fake, spec=spec)
    ks = KeySpace(FP, block_format_id(spec), B)
    assert set(windows) <= _window_keys(fake)  # beside the sessions' own, from block 3 on
    _damage(fake, windows[1], damage)
    b = make_store(fake, spec=spec)
    new = [*system, *prompt_of(4, seed=5)]
    got = run(b, "n", new)
    assert got.cached_tokens == imported == b.stats.prefix_tokens_imported
    assert got.token_ids == run(make_store(FakeRedis(), spec=spec), "ref", new).token_ids
    if damage == "flip":
        assert b.stats.tier.num_blocks_corrupt == 1 and windows[1] not in fake.data
    b.pool.check_invariants()
    assert [h.agent_id for h in b.pool.manager.handles] == ["n"]
    assert ks.block_key("", ks.chain(system[:12], "")[2]) in fake.data


def test_a_window_record_redis_evicted_is_written_again_after_the_check() -> None:
    """Redis evicts a window record of store A's published prefix (LRU; the sessions' own
    keys stay): the scheduled check finds the sessions that left it, and the next flush
    sends that record alone again, so store B imports the whole prefix (without the
    check nothing would send it until a session's next save, and B would prefill)."""
    fake = FakeRedis()
    a, system, windows = _swa_sessions(fake)
    assert a.check_saved() == 0
    del fake.data[windows[1]]
    assert a.check_saved() == 2  # both sessions' prefix held those windows
    written = a.stats.tier.num_blocks_written
    assert a.flush() == 2
    assert windows[1] in fake.data and a.stats.tier.num_blocks_written == written + 1
    assert a.check_saved() == 0
    b = make_store(fake, spec=SWA8)
    new = [*system, *prompt_of(4, seed=5)]
    assert run(b, "n", new).cached_tokens == 12


def test_a_failed_sliding_window_prefix_import_leaves_nothing_in_the_pool() -> None:
    """A bad window record, a missing one, or a pool without room: the import returns 0
    and the pool holds nothing, neither blocks nor cached ones (control: with the records
    intact the same call imports 12 tokens, which the pool's lookup then supplies)."""
    fake = FakeRedis()
    _, system, windows = _swa_sessions(fake)
    good = fake.data[windows[0]]
    new = [*system, 99, 98]
    for case in ("bad window", "missing window", "no room", "control"):
        fake.data[windows[0]] = good
        _damage(fake, windows[0], {"bad window": "flip", "missing window": "delete"}.get(case))
        b = make_store(fake, num_blocks=2 if case == "no room" else 64, spec=SWA8)
        got = b.cold.import_prefix(b.pool, new, "", 0)
        usage = b.pool.usage()
        assert usage.num_used == 0 and usage.num_handles == 0
        if case == "control":
            assert got == 12 and usage.groups[0].num_cached == 2
            assert b.pool.lookup(new, salt="").num_tokens == 12
        else:
            assert got == 0 and usage.num_cached == 0, case
            assert b.pool.lookup(new, salt="").num_tokens == 0
        b.pool.check_invariants()


def test_window_records_are_written_once_and_a_planted_one_is_replaced_with_a_secret() -> None:
    """With a secret: a bad record planted under a window block's key before the first
    write is checked and replaced (SET NX alone would keep it), the second session on the
    same prefix sends neither window block again, and a store with the same secret imports
    the prefix (one without it: nothing)."""
    fake, secret = FakeRedis(), b"s3cret"
    probe = RedisTier(fake, spec=SWA8, fingerprint=FP, secret=secret)  # type: ignore[arg-type]
    chain = probe.keys.chain(prompt_of(12, seed=3), "")
    planted = probe.keys.window_key("", chain[2], 0, 0)
    fake.data[planted] = b"KVB1" + bytes(100)  # fails its MAC
    _, system, windows = _swa_sessions(fake, secret)
    assert planted == windows[1]
    decode_block(fake.data[planted], SWA8, 8, planted, probe._mac, planted.encode(), 0)
    b = make_store(fake, spec=SWA8, secret=secret)  # type: ignore[arg-type]
    assert run(b, "n", [*system, *prompt_of(4, seed=5)]).cached_tokens == 12
    unkeyed = make_store(fake, spec=SWA8)  # another deployment's (or a forger's) records
    assert run(unkeyed, "n", [*system, *prompt_of(4, seed=5)]).cached_tokens == 0


def _hybrid() -> ModelCacheSpec:
    from kvpool import StateSpec

    return ModelCacheSpec(
        (
            LayerSpec(AttentionKind.GLOBAL, 2, 8, 8),
            LayerSpec.recurrent((StateSpec((2, 8), "float32"), StateSpec((3,), "float32"))),
        ),
        block_tokens=B,
    )


@pytest.mark.parametrize("corrupt", [None, "flip", "delete"])
def test_a_hybrid_session_continues_on_another_store_from_its_end_state(
    corrupt: str | None,
) -> None:
    """A recurrent model's session: K/V blocks, its end-state record and its prompt-end
    snapshot's; another store resumes from blocks and end state. A corrupt end state is
    refused (and deleted), a missing one is a miss: the session's prompt end (9 tokens) still
    comes in as a prefix and the rest is prefilled, token-exact either way, nothing held."""
    spec, fake = _hybrid(), FakeRedis()
    a = make_store(fake, spec=spec)
    first = run(a, "s", prompt_of(10))
    assert a.flush() == 1
    ks = KeySpace(FP, block_format_id(spec), B)
    context = prompt_of(10) + list(first.token_ids)
    state_key = ks.state_key("", ks.chain(context, "")[-1])
    prompt_end = ks.state_key("", ks.chain(context[:9], "")[-1])
    assert {k for k in fake.data if ":st:" in k} == {state_key, prompt_end}
    _damage(fake, state_key, corrupt)
    turn2 = context + prompt_of(3, seed=9)
    b = make_store(fake, spec=spec)
    done = run(b, "s", turn2)
    reference = run(make_store(FakeRedis(), spec=spec), "ref", turn2).token_ids
    assert done.token_ids == reference
    assert done.cached_tokens == (len(context) if corrupt is None else 9)
    assert b.stats.prefix_tokens_imported == (0 if corrupt is None else 9)
    if corrupt == "flip":
        assert b.stats.tier.num_blocks_corrupt == 1 and state_key not in fake.data
    b.pool.check_invariants()
    assert b.pool.usage().num_used == b.pool.num_blocks - b.pool.num_free


def hybrid_store(
    fake: FakeRedis, snapshots: int | None, num_blocks: int = 64, secret: bytes | None = None
) -> AgentCacheStore:
    """A store over :func:`_hybrid`'s model whose engine takes a state snapshot every
    ``snapshots`` blocks (None: at prompts' ends only)."""
    spec = _hybrid()
    pool = BlockPool(spec, num_blocks=num_blocks, storage=FakeStorage)
    engine = BlockPoolBatchEngine(
        FakeModel(spec), FakeTokenizer(), pool, spec,
        batch_gen_factory=FakeBatchGenerator, state_snapshot_blocks=snapshots,
    )  # fmt: skip
    tier = RedisTier(fake, spec=spec, fingerprint=FP, ttl_s=TTL, secret=secret)
    return AgentCacheStore(engine, tier, fingerprint=FP)


def state_keys(fake: FakeRedis) -> set[str]:
    return {k for k in fake.data if ":st:" in k}


def boundary_state_key(tokens: Sequence[int], boundary: int) -> str:
    ks = KeySpace(FP, block_format_id(_hybrid()), B)
    return ks.state_key("", ks.chain(tokens[:boundary], "")[-1])


@pytest.mark.parametrize(
    ("case", "reused"), [("ok", 8), ("flip", 0), ("missing", 4), ("no snapshots", 0)]
)
def test_a_hybrid_prefix_comes_in_with_the_snapshot_at_its_last_boundary(
    case: str, reused: int
) -> None:
    """Store A (a snapshot every block of 4) saves session a (14 prompt tokens): Redis gets
    the states at boundaries 4, 8 and 12 beside the end state and the prompt end's (13).
    Store B, an empty pool, gets agent n sharing a's first 11 tokens: it imports 2 blocks and
    the state at 8, and prefills the rest. A state at 8 failing its checksum: nothing
    imported (deleted, counted); missing: the one at 4; A without snapshots: only the end
    and prompt-end states, nothing to import (a prefix comes in at block boundaries only).
    Token-exact."""
    fake = FakeRedis()
    a = hybrid_store(fake, None if case == "no snapshots" else 1)
    prompt = prompt_of(14)
    done = run(a, "a", prompt)
    assert a.flush() == 1
    session = [*prompt, *done.token_ids]  # 17 tokens: its end state is mid-block
    ends = {boundary_state_key(session, n) for n in (len(session), len(prompt) - 1)}
    snapshots = {boundary_state_key(session, b) for b in (4, 8, 12)}
    assert state_keys(fake) == (ends if case == "no snapshots" else ends | snapshots)
    at8 = boundary_state_key(session, 8)
    if case == "flip":
        record = bytearray(fake.data[at8])
        record[-1] ^= 0x40
        fake.data[at8] = bytes(record)
    elif case == "missing":
        del fake.data[at8]
    b = hybrid_store(fake, None)
    new = [*prompt[:11], 99, 98]
    got = run(b, "n", new)
    assert got.cached_tokens == reused
    assert b.stats.prefix_tokens_imported == reused
    assert got.token_ids == run(hybrid_store(FakeRedis(), None), "ref", new).token_ids
    if case == "flip":
        assert b.stats.tier.num_blocks_corrupt == 1 and at8 not in fake.data
    b.pool.check_invariants()


@pytest.mark.parametrize(
    ("case", "reused"),
    [("ok", 9), ("flip", 0), ("delete", 0), ("older manifest", 9)],
)
def test_a_hybrid_chat_turn_on_another_store_resumes_at_the_prompts_end(
    case: str, reused: int
) -> None:
    """A chat's next turn re-templates the reply, so its tokens leave the session inside
    it: on the same server the prompt-end snapshot (after all but the prompt's last token)
    serves it. Written with the session and listed in its manifest, it comes with the
    session to store B, which reuses those 9 tokens. A snapshot record failing its check
    (deleted, counted) or a missing one: the session still loads, and the turn is
    prefilled (its recurrent layers have no state inside the reply). A manifest that lists
    none (an older kvpool's): the session loads without it, and the prompt end comes in as a
    prefix instead (what another agent with that prompt would get). Token-exact."""
    fake = FakeRedis()
    prompt, at9 = _chat_session(fake)
    _damage(fake, at9, {"flip": "flip", "delete": "delete"}.get(case))
    if case == "older manifest":
        manifest_key = KeySpace(FP, block_format_id(_hybrid()), B).session_key("s")
        body = json.loads(fake.data[manifest_key])
        del body["snapshots"]
        fake.data[manifest_key] = json.dumps(body).encode()
    b = hybrid_store(fake, None)
    turn2 = [*prompt, 7, 7, 7, *prompt_of(3, seed=9)]  # the reply re-templated: 7s
    got = run(b, "s", turn2)
    assert got.error is None
    assert got.cached_tokens == reused
    assert b.stats.tier.num_snapshots_read == (1 if case == "ok" else 0)
    assert b.stats.prefix_tokens_imported == (9 if case == "older manifest" else 0)
    assert got.token_ids == run(hybrid_store(FakeRedis(), None), "ref", turn2).token_ids
    if case == "flip":
        assert b.stats.tier.num_blocks_corrupt == 1 and at9 not in fake.data
    b.pool.check_invariants()


def _chat_session(fake: FakeRedis) -> tuple[list[int], str]:
    """Store A serves agent s a 10-token prompt and saves the session; returns the prompt
    and the key of its prompt-end snapshot (after 9 tokens), which the manifest lists."""
    a = hybrid_store(fake, None)
    prompt = prompt_of(10)
    first = run(a, "s", prompt)
    assert a.flush() == 1
    at9 = boundary_state_key([*prompt, *first.token_ids], 9)
    assert at9 in fake.data
    manifest_key = KeySpace(FP, block_format_id(_hybrid()), B).session_key("s")
    assert json.loads(fake.data[manifest_key])["snapshots"] == [9]
    return prompt, at9


@pytest.mark.parametrize("evicted", ["state", "rows", "listing"])
def test_a_prompt_end_redis_evicted_is_written_again_after_the_check(evicted: str) -> None:
    """Redis evicts one key of a hot hybrid session's prompt end (LRU; the others stay): its
    state, its partial block's rows or the set listing it. The scheduled check finds it and
    the next flush writes it alone again, so a new agent on store B imports the prompt end
    (without the check nothing would send it until the session's next save)."""
    fake = FakeRedis()
    a = hybrid_store(fake, None)
    prompt = prompt_of(10)
    first = run(a, "s", prompt)
    assert a.flush() == 1 and a.check_saved() == 0
    at9 = boundary_state_key([*prompt, *first.token_ids], 9)
    rows, listing = _prompt_end_keys(prompt)
    stats = a.stats.tier
    if evicted == "listing":
        del fake.sets[listing]
    else:
        del fake.data[at9 if evicted == "state" else rows]
    assert a.check_saved() == 1
    assert a.flush() == 1 and a.check_saved() == 0
    assert at9 in fake.data and rows in fake.data and fake.sets[listing] == {b"1"}
    after = a.stats.tier
    assert after.num_snapshots_written == stats.num_snapshots_written + (evicted == "state")
    assert after.num_blocks_written == stats.num_blocks_written + (evicted == "rows")
    b = hybrid_store(fake, None)
    got = run(b, "t", [*prompt, 7, 7, 7, *prompt_of(3, seed=9)])
    assert got.cached_tokens == 9 == b.stats.prefix_tokens_imported


def _prompt_end_keys(prompt: Sequence[int]) -> tuple[str, str]:
    """The keys of the K/V rows of the prompt end after ``prompt[:9]`` (its partial block
    8..9: the last block record of a session of exactly those tokens) and of the set that
    lists its length (1) after block 1."""
    ks = KeySpace(FP, block_format_id(_hybrid()), B)
    chain = ks.chain(prompt[:9], "")
    return ks.block_key("", chain[-1]), ks.prompt_ends_key("", chain[1])


@pytest.mark.parametrize(
    ("damage", "imported"),
    [
        (None, 9),
        ("flip state", 0),
        ("delete state", 0),
        ("flip rows", 0),
        ("delete rows", 0),
        ("unlisted", 0),
        ("junk listed", 9),
        ("listing of another type", 0),
    ],
)
def test_a_new_agent_on_another_store_imports_a_sessions_prompt_end(
    damage: str | None, imported: int
) -> None:
    """Session s on store A leaves its prompt end (after 9 of its 10 tokens, mid-block) in
    Redis: the state, the K/V rows of its partial block, and its length in the set of the
    prompt ends after block 1. A new agent on store B whose prompt starts with those tokens
    imports the 9 as a prefix (the rows as cached blocks, the state as the pool's snapshot
    of exactly them) and prefills the rest, token-exact. A state or rows record failing its
    check (deleted, counted), gone, or not listed: nothing imported, nothing left in the
    pool. Junk listed beside it is ignored (one page of a bloated listing is read); a
    listing key of another type is a miss, not an outage."""
    fake = FakeRedis()
    prompt, at9 = _chat_session(fake)
    rows, listing = _prompt_end_keys(prompt)
    assert fake.sets[listing] == {b"1"} and rows in fake.data
    target = at9 if damage and damage.endswith("state") else rows
    if damage and damage.split()[0] in ("flip", "delete"):
        _damage(fake, target, damage.split()[0])
    elif damage == "unlisted":
        del fake.sets[listing]
    elif damage == "junk listed":  # 3: a length with no records; the others are no lengths
        fake.sets[listing] |= {b"x", b"0", b"4", b"999", b"-1", b"3"}
        fake.sets[listing] |= {f"z{i}".encode() for i in range(5000)}  # read a page only
    elif damage == "listing of another type":
        del fake.sets[listing]
        fake.data[listing] = b"junk"
    b = hybrid_store(fake, None)
    new = [*prompt, 7, 7, 7, *prompt_of(3, seed=9)]  # a new agent, the 10 tokens first
    got = run(b, "t", new)
    assert ("smembers", listing) not in fake.log  # the listing is paged (SSCAN)
    assert got.error is None
    assert got.cached_tokens == imported == b.stats.prefix_tokens_imported
    assert got.token_ids == run(hybrid_store(FakeRedis(), None), "ref", new).token_ids
    tier = b.stats.tier
    assert tier.available and tier.num_errors == 0
    if damage and damage.startswith("flip"):
        assert tier.num_blocks_corrupt == 1 and target not in fake.data
    b.pool.check_invariants()
    assert [h.agent_id for h in b.pool.manager.handles] == ["t"]


def test_a_listing_key_of_another_type_is_replaced_when_the_session_is_written() -> None:
    """A key of another type planted where store A lists its prompt end: the save is not an
    outage (no error, nothing skipped), the key becomes the set listing 1, and a new agent
    on store B imports the prompt end."""
    fake = FakeRedis()
    prompt = prompt_of(10)
    _, listing = _prompt_end_keys(prompt)
    fake.data[listing] = b"planted"
    a = hybrid_store(fake, None)
    run(a, "s", prompt)
    assert a.flush() == 1
    tier = a.stats.tier
    assert tier.available and tier.num_errors == 0 and a.stats.num_tier_errors == 0
    assert listing not in fake.data and fake.sets[listing] == {b"1"}
    assert fake.ttl[listing] == TTL
    b = hybrid_store(fake, None)
    assert run(b, "t", [*prompt, 7, 7, 7]).cached_tokens == 9


@pytest.mark.parametrize(("damage", "imported"), [(None, 9), ("flip", 8), ("delete", 8)])
def test_a_prompt_end_that_fails_falls_back_to_the_last_boundary_snapshot(
    damage: str | None, imported: int
) -> None:
    """Store A takes a snapshot at every block boundary too (4 and 8): with the prompt end's
    rows bad or gone, the new agent on store B imports up to 8, token-exact."""
    fake = FakeRedis()
    a = hybrid_store(fake, 1)
    prompt = prompt_of(10)
    run(a, "s", prompt)
    assert a.flush() == 1
    rows, _ = _prompt_end_keys(prompt)
    _damage(fake, rows, damage)
    b = hybrid_store(fake, None)
    new = [*prompt, 7, 7, 7, *prompt_of(3, seed=9)]
    got = run(b, "t", new)
    assert got.cached_tokens == imported == b.stats.prefix_tokens_imported
    assert got.token_ids == run(hybrid_store(FakeRedis(), None), "ref", new).token_ids
    b.pool.check_invariants()


def test_redis_failing_mid_prompt_end_import_leaves_nothing_in_the_pool() -> None:
    """Redis goes down after ``n`` commands of the import of a prompt end, for every ``n``:
    the import raises TierUnavailableError or imports all 9 tokens; the pool holds nothing
    but that prefix's cached blocks either way (no handle, nothing leased). A pool without
    room for it imports nothing and holds nothing."""
    fake = FakeRedis()
    prompt, _ = _chat_session(fake)
    new = [*prompt, 7, 7, 7, *prompt_of(3, seed=9)]
    outcomes = set()
    for n in range(40):
        b = hybrid_store(fake, None)
        fake.fail_after = n
        got = None
        try:
            got = b.cold.import_prefix(b.pool, new, "", 0)
        except TierUnavailableError:
            outcomes.add("refused")
        else:
            outcomes.add(f"imported {got}")
        finally:
            fake.fail_after = None
        usage = b.pool.usage()
        assert usage.num_used == 0 and usage.num_handles == 0
        b.pool.check_invariants()
        if got == 9 and "refused" in outcomes:
            assert b.pool.lookup(new, salt="").num_tokens == 9
            break
    assert outcomes == {"refused", "imported 9"}
    small = hybrid_store(fake, None, num_blocks=2)  # no room for the prefix: nothing
    assert small.cold.import_prefix(small.pool, new, "", 0) == 0
    assert small.pool.usage().num_used == 0 and small.pool.usage().num_cached == 0
    small.pool.check_invariants()


def test_a_session_loads_without_its_snapshots_when_the_pool_has_no_state_block() -> None:
    """Every state block but the session's end state's is leased: the load registers no
    snapshot (nothing written, nothing leaked) and returns the session whole."""
    fake = FakeRedis()
    _chat_session(fake)
    b = hybrid_store(fake, None, num_blocks=8)
    run(b, "x", prompt_of(6, seed=3))  # a live handle to lease against
    (x,) = b.pool.manager.handles
    leases = []
    while b.pool.manager.num_free(1) > 1:
        lease = b.pool.manager.place_snapshot(x, 1 + len(leases))
        assert isinstance(lease, StateLease)
        leases.append(lease)
    handle = b.cold.load(b.pool, "s")
    assert leases and handle is not None and handle.total_tokens == 13
    assert b.pool.snapshot_lengths(handle) == []
    assert b.stats.tier.num_snapshots_read == 0
    for lease in leases:
        b.pool.manager.abort_snapshot(lease)
    b.pool.release(handle)
    b.pool.check_invariants()


@pytest.mark.parametrize(("case", "reused"), [("ok", 16), ("latest gone", 9)])
def test_a_loaded_session_brings_only_its_longest_snapshot(case: str, reused: int) -> None:
    """Two turns on store A leave prompt-end snapshots at 9 and 16 in Redis, both listed.
    Store B registers only the longest (one record, one state block) and turn 3, its reply
    re-templated, resumes at 16; with that record gone it falls back to the one at 9."""
    fake = FakeRedis()
    a = hybrid_store(fake, None)
    first = run(a, "s", prompt_of(10))
    a.flush()
    prompt2 = [*prompt_of(10), *first.token_ids, *prompt_of(4, seed=2)]  # 17 tokens
    second = run(a, "s", prompt2)
    assert second.cached_tokens == 13
    assert a.flush() == 1
    ks = KeySpace(FP, block_format_id(_hybrid()), B)
    assert json.loads(fake.data[ks.session_key("s")])["snapshots"] == [9, 16]
    if case == "latest gone":
        del fake.data[boundary_state_key(prompt2, 16)]
    b = hybrid_store(fake, None)
    handle = b.cold.load(b.pool, "s")
    assert handle is not None
    assert b.pool.snapshot_lengths(handle) == [reused]
    assert b.stats.tier.num_snapshots_read == 1
    b.pool.release(handle)
    turn3 = [*prompt2, 7, 7, 7, *prompt_of(2, seed=5)]
    got = run(b, "s", turn3)
    assert got.cached_tokens == reused
    assert got.token_ids == run(hybrid_store(FakeRedis(), None), "ref", turn3).token_ids
    b.pool.check_invariants()


def test_redis_failing_mid_load_leaves_nothing_or_the_whole_session() -> None:
    """Redis goes down after ``n`` commands of a hybrid session's load, for every ``n``:
    before the session is committed the load raises TierUnavailableError and the pool holds
    nothing; while its snapshots come in it returns the session whole, with the snapshots
    registered so far. Nothing leaks either way."""
    fake = FakeRedis()
    _chat_session(fake)
    outcomes = set()
    for n in range(100):
        b = hybrid_store(fake, None)
        tier = b.cold
        assert isinstance(tier, RedisTier)
        fake.fail_after = n
        try:
            handle = tier.load(b.pool, "s")
        except TierUnavailableError:
            assert b.pool.usage().num_used == 0
            outcomes.add("refused")
        else:
            fake.fail_after = None
            assert handle is not None and handle.total_tokens == 13
            registered = b.pool.snapshot_lengths(handle)
            outcomes.add(f"loaded with {registered}")
            b.pool.release(handle)
            if registered:
                break
        finally:
            fake.fail_after = None
        b.pool.check_invariants()
    assert outcomes == {"refused", "loaded with []", "loaded with [9]"}


def test_snapshots_are_written_once_and_a_planted_one_is_replaced_with_a_secret() -> None:
    """With a secret: a bad record planted under a snapshot's key before the first write is
    checked and replaced (SET NX alone would keep it); a second session on the same prefix
    finds every boundary snapshot there and sends only its own prompt end's."""
    fake, secret = FakeRedis(), b"s3cret"
    a = hybrid_store(fake, 1, secret=secret)
    prompt = prompt_of(14)
    tier = a.cold
    assert isinstance(tier, RedisTier)
    at8 = tier.keys.state_key("", tier.keys.chain(prompt[:8], "")[-1])
    fake.data[at8] = b"KVS1" + bytes(100)  # planted: fails its MAC
    run(a, "a", prompt)
    a.flush()
    assert a.stats.tier.num_snapshots_written == 4  # at 4, 8, 12 and the prompt's end, 13
    decode_state(fake.data[at8], _hybrid(), 8, at8, tier._mac, at8.encode())  # passes now
    run(a, "c", [*prompt[:12], 5, 6])  # reuses a's state at 12; its own boundaries are a's
    a.flush()
    assert a.stats.tier.num_snapshots_written == 5  # c's prompt end: other tokens than a's
    assert a.stats.tier.num_blocks_corrupt == 1


def test_a_failed_hybrid_prefix_import_leaves_nothing_in_the_pool() -> None:
    """A bad K/V block after the state was checked, or a pool without room: the import
    returns 0 and the pool holds nothing, neither blocks nor a cached snapshot (control:
    with the block intact the same call imports 8 tokens)."""
    fake = FakeRedis()
    a = hybrid_store(fake, 1)
    prompt = prompt_of(14)
    done = run(a, "a", prompt)
    a.flush()
    session = [*prompt, *done.token_ids]
    tier = a.cold
    assert isinstance(tier, RedisTier)
    block1 = tier.keys.block_key("", tier.keys.chain(session, "")[1])
    good = fake.data[block1]
    new = [*prompt[:11], 99, 98]
    for case in ("bad block", "no room", "control"):
        fake.data[block1] = good if case == "control" else good[:-1] + bytes([good[-1] ^ 1])
        b = hybrid_store(fake, None, num_blocks=2 if case == "no room" else 64)
        imported = b.cold.import_prefix(b.pool, new, "", 0)
        usage = b.pool.usage()
        assert usage.num_used == 0
        if case == "control":
            assert imported == 8 and usage.groups[1].num_cached == 1
            assert b.pool.lookup(new, salt="").num_tokens == 8
        else:
            assert imported == 0 and usage.num_cached == 0, case
            assert b.pool.lookup(new, salt="").num_tokens == 0
        b.pool.check_invariants()


def test_state_codec_refuses_every_corruption() -> None:
    from kvpool.cache.storage import LayerState
    from kvpool.tier.codec import decode_state, encode_state

    spec = _hybrid()
    state = LayerState(
        1, 5, (np.arange(16, dtype=np.float32).reshape(2, 8), np.ones(3, np.float32))
    )
    record = encode_state(5, [state])
    (back,) = decode_state(record, spec, 5, "k")
    assert back.layer == 1 and all(
        x.tobytes() == y.tobytes() for x, y in zip(back.arrays, state.arrays, strict=True)
    )
    for bad, n in (
        (record[:-1], 5),
        (record[:-1] + b"x", 5),
        (record, 6),
        (b"KVB1" + record[4:], 5),
    ):
        with pytest.raises(CacheCorruptionError):
            decode_state(bad, spec, n, "k")


def test_cache_url_picks_the_tier(tmp_path: object) -> None:
    assert local_path("file:///var/x") is not None and str(local_path("file:///var/x")) == "/var/x"
    assert str(local_path("some/dir")) == "some/dir"
    assert local_path("redis://127.0.0.1:6379/0") is None
    tier = open_tier(f"file://{tmp_path}/c", spec=SPEC, fingerprint=FP)
    assert isinstance(tier, LocalTier)
    redis_tier = open_tier("redis://127.0.0.1:1/0?ttl=60", spec=SPEC, fingerprint=FP)
    assert isinstance(redis_tier, RedisTier) and redis_tier.ttl_s == 60
    assert redis_tier.describe() == "redis://127.0.0.1:1/0"


# --------------------------------------------------------------------------- sessions


def test_a_session_continues_on_another_store_with_nothing_prefilled_again() -> None:
    fake = FakeRedis()
    a = make_store(fake)
    first = run(a, "s", prompt_of(10))
    assert a.flush() == 1
    context = prompt_of(10) + list(first.token_ids)  # what the cache holds: 13 tokens
    turn2 = context + prompt_of(3, seed=9)
    b = make_store(fake)  # another server: its own pool, nothing in it
    done = run(b, "s", turn2)
    assert b.stats.num_cold_hits == 1
    assert done.cached_tokens == len(context) == 13
    assert done.token_ids == fresh(turn2)
    # negative control: without Redis the same turn is prefilled in full
    assert run(make_store(FakeRedis()), "s", turn2).cached_tokens == 0


def test_writing_a_session_sends_only_the_blocks_redis_lacks() -> None:
    fake = FakeRedis()
    store = make_store(fake)
    system = prompt_of(12, seed=3)  # three full blocks
    run(store, "a", system + prompt_of(5, seed=4))
    store.flush()
    written = store.stats.tier.num_blocks_written
    assert written == 5  # 17 prompt + 3 generated = 20 tokens: 5 blocks
    run(store, "b", system + prompt_of(5, seed=5))
    store.flush()
    stats = store.stats.tier
    assert stats.num_blocks_deduplicated == 3  # the shared system prompt's blocks
    assert stats.num_blocks_written == written + 2
    assert len(blocks_of(fake)) == 7
    assert all(fake.ttl[k] == TTL for k in fake.data)  # every key is bounded by a TTL


def test_reading_refreshes_the_ttl() -> None:
    fake = FakeRedis()
    a = make_store(fake)
    done = run(a, "s", prompt_of(10))
    a.flush()
    for key in fake.ttl:
        fake.ttl[key] = 5  # about to expire
    b = make_store(fake)
    run(b, "s", prompt_of(10) + list(done.token_ids) + [7])
    assert all(ttl == TTL for ttl in fake.ttl.values())


def test_a_prefix_published_on_one_store_is_a_hit_on_another_same_tenant_only() -> None:
    fake = FakeRedis()
    a = make_store(fake)
    system = prompt_of(12, seed=3)
    run(a, "a", system + prompt_of(2, seed=4))
    run(a, "t", system + prompt_of(2, seed=4), salt="tenant-1")
    a.flush()
    b = make_store(fake)
    prompt = system + prompt_of(3, seed=6)
    done = run(b, "new", prompt)
    assert b.stats.num_misses == 1  # no session: a prefix hit
    assert done.cached_tokens == 12 and b.stats.prefix_tokens_imported == 12
    assert done.token_ids == fresh(prompt)
    other = run(b, "x", prompt, salt="tenant-2")  # another tenant shares nothing
    assert other.cached_tokens == 0
    assert b.stats.prefix_tokens_imported == 12


def test_a_pool_without_room_imports_nothing_and_changes_nothing() -> None:
    fake = FakeRedis()
    a = make_store(fake)
    run(a, "a", [*prompt_of(12, seed=3), 5])
    a.flush()
    b = make_store(fake, num_blocks=6)
    pool = b.pool
    before = pool.usage()
    assert b.cold.import_prefix(pool, prompt_of(12, seed=3) * 3, "", 0) == 12
    pool2 = make_store(fake, num_blocks=2).pool
    assert b.cold.import_prefix(pool2, prompt_of(12, seed=3), "", 0) == 0
    assert pool2.usage().num_used == 0 and before.num_used == 0


# --------------------------------------------------------------------------- faults


def test_redis_down_never_fails_a_request_and_writes_resume() -> None:
    fake = FakeRedis()
    a = make_store(fake, backoff_s=0.05, max_backoff_s=0.05)
    done = run(a, "s", prompt_of(10))
    fake.fail_after = 0  # Redis dies
    assert a.flush() == 0  # counted, not raised
    assert a.stats.num_tier_errors == 1 and a.stats.tier.num_errors == 1
    again = run(a, "s", prompt_of(10) + list(done.token_ids) + [3])  # served from the pool
    assert again.cached_tokens == 13
    b = make_store(fake)
    cold = run(b, "s", prompt_of(10))  # the other server: a miss, prefilled
    assert cold.cached_tokens == 0 and b.stats.num_tier_errors >= 1
    a.flush()  # inside the back-off: refused without a call
    assert a.stats.tier.num_skipped >= 1 and not a.stats.tier.available
    fake.fail_after = None  # Redis is back
    time.sleep(0.06)
    assert a.flush() == 1
    assert a.cold.epoch == 1 and a.stats.tier.available
    c = make_store(fake)
    turn3 = prompt_of(10) + list(done.token_ids) + [3] + list(again.token_ids) + [4]
    assert run(c, "s", turn3).cached_tokens == len(turn3) - 1


def test_a_write_killed_midway_leaves_the_old_manifest_whole() -> None:
    fake = FakeRedis()
    a = make_store(fake, backoff_s=0.01, max_backoff_s=0.01)
    done = run(a, "s", prompt_of(6))
    a.flush()
    old_manifest = fake.data[keyspace().session_key("s")]
    turn2 = prompt_of(6) + list(done.token_ids) + prompt_of(20, seed=8)
    run(a, "s", turn2)
    for n in range(1, 60):  # kill Redis after n commands of the write, at every point
        fake.fail_after = n
        a.flush()
        fake.fail_after = None
        manifest = fake.data[keyspace().session_key("s")]
        if manifest != old_manifest:
            break  # the write got through
        decoded = SessionManifest.decode(manifest, keyspace(), "s", "m")
        for chain in decoded.chain:  # the manifest a reader sees names only blocks that exist
            assert keyspace().block_key("", chain) in fake.data
        time.sleep(0.02)
    else:
        raise AssertionError("the write never completed")
    b = make_store(fake)
    assert run(b, "s", [*turn2, 9]).cached_tokens >= len(turn2)


def test_a_corrupt_block_is_never_loaded_and_the_session_resumes_by_prefill() -> None:
    fake = FakeRedis()
    a = make_store(fake)
    done = run(a, "s", prompt_of(10))
    a.flush()
    ks = keyspace()
    first_block = ks.block_key("", ks.chain(prompt_of(10), "")[0])
    record = bytearray(fake.data[first_block])
    record[-1] ^= 0x40
    fake.data[first_block] = bytes(record)
    b = make_store(fake)
    turn2 = prompt_of(10) + list(done.token_ids) + [5]
    got = run(b, "s", turn2)
    assert got.cached_tokens == 0 and got.token_ids == fresh(turn2)
    stats = b.stats
    assert stats.tier.num_blocks_corrupt == 1 and stats.num_load_errors == 1
    assert first_block not in fake.data or fake.data[first_block] != bytes(record)
    assert b.pool.usage().num_used == b.pool.num_blocks - b.pool.num_free
    b.pool.check_invariants()


def test_a_missing_block_is_a_miss_but_the_prefix_before_it_is_used() -> None:
    fake = FakeRedis()
    a = make_store(fake)
    done = run(a, "s", prompt_of(14))
    a.flush()
    ks = keyspace()
    chain = ks.chain(prompt_of(14) + list(done.token_ids), "")
    del fake.data[ks.block_key("", chain[2])]  # evicted by maxmemory-policy
    b = make_store(fake)
    turn2 = prompt_of(14) + list(done.token_ids) + [5]
    got = run(b, "s", turn2)
    assert b.stats.tier.num_incomplete == 1 and b.tier("s") is Tier.HOT
    assert got.cached_tokens == 8  # the two blocks before the gap, as a prefix hit
    assert got.token_ids == fresh(turn2)


def test_forget_while_down_is_retried_and_the_session_is_not_resumed() -> None:
    fake = FakeRedis()
    a = make_store(fake, backoff_s=0.01, max_backoff_s=0.01)
    run(a, "s", prompt_of(6))
    a.flush()
    fake.fail_after = 0
    assert a.forget("s")
    assert a.num_unsaved == 1
    fake.fail_after = None
    time.sleep(0.02)
    a.flush()
    assert keyspace().session_key("s") not in fake.data and a.num_unsaved == 0


# --------------------------------------------------------------------------- quantized pools


def random_codes(spec: ModelCacheSpec, n: int, seed: int = 0) -> list[LayerCodes]:
    rng = np.random.default_rng(seed)
    fmt, out = spec.format, []
    for i, layer in enumerate(spec.layers):
        rows = []
        for dim in (layer.k_head_dim, layer.v_head_dim):
            h = layer.n_kv_heads
            codes = rng.integers(0, 2**32, (h, n, fmt.codes_dim(dim)), dtype=np.uint32)
            small = rng.integers(0, 2**16, (2, h, n, fmt.scales_dim(dim)), dtype=np.uint16)
            rows.append(QuantizedRows(codes, small[0].view(np.float16), small[1].view(np.float16)))
        out.append(LayerCodes(i, 4, rows[0], rows[1]))
    return out


@pytest.mark.parametrize("spec", [Q4, Q8], ids=["q4", "q8"])
def test_quantized_codec_round_trip_is_bit_for_bit_and_corruption_is_refused(
    spec: ModelCacheSpec,
) -> None:
    kvs = random_codes(spec, 3)  # random bits: NaN and inf scales must survive too
    record = encode_block([5, 6, 7], kvs)
    assert len(record) == record_bytes(spec, 3) < record_bytes(DENSE64, 3) * 0.6
    block = decode_block(record, spec, 4, "k")
    assert block.token_ids == (5, 6, 7)
    for got, want in zip(block.layers, kvs, strict=True):
        assert isinstance(got, LayerCodes) and got.start == 4
        for g, w in zip((got.keys, got.values), (want.keys, want.values), strict=True):
            for name in ("codes", "scales", "biases"):
                a, b = getattr(g, name), getattr(w, name)
                assert a.dtype == b.dtype and a.shape == b.shape
                assert a.tobytes() == b.tobytes()
    flipped = bytearray(record)
    flipped[len(record) // 2] ^= 1  # a code bit
    with pytest.raises(CacheCorruptionError, match="checksum"):
        decode_block(bytes(flipped), spec, 4, "k")
    with pytest.raises(CacheCorruptionError, match="bytes, expected"):
        decode_block(record[:-2], spec, 4, "k")
    other = Q8 if spec is Q4 else Q4  # the same magic, other lengths
    with pytest.raises(CacheCorruptionError, match="bytes, expected"):
        decode_block(record, other, 4, "k")
    with pytest.raises(CacheCorruptionError, match="magic"):
        decode_block(record, DENSE64, 4, "k")  # a dense pool never reads codes as K/V
    dense = encode_block(
        [5],
        [
            LayerKV(i, 0, np.zeros((2, 1, 64), np.float16), np.zeros((2, 1, 64), np.float16))
            for i in range(2)
        ],
    )
    with pytest.raises(CacheCorruptionError, match="magic"):
        decode_block(dense, spec, 0, "k")


def test_block_format_ids_name_the_pools_real_format() -> None:
    assert block_format_id(DENSE64) == "dense-float16-v1"  # unchanged for dense pools
    assert block_format_id(Q4) == "q4g64-float16-v1"
    assert block_format_id(Q8) == "q8g64-float16-v1"
    assert block_format_id(DENSE64.with_format(4, 32)) == "q4g32-float16-v1"


@pytest.mark.parametrize("spec", [Q4, Q8], ids=["q4", "q8"])
def test_a_quantized_session_continues_on_another_store_bit_for_bit(spec: ModelCacheSpec) -> None:
    fake = FakeRedis()
    a = make_store(fake, spec=spec)
    first = run(a, "s", prompt_of(10))
    assert a.flush() == 1
    context = prompt_of(10) + list(first.token_ids)  # 13 tokens: three full blocks, one of 1
    fmt = block_format_id(spec)
    keys = blocks_of(fake)
    assert len(keys) == 4 and all(f":{fmt}:" in k for k in keys)
    # each record is the pool's codes as they are at rest, bit for bit
    ks = KeySpace(FP, fmt, B)
    handle = a.get("s")
    assert handle is not None
    for j, chain in enumerate(ks.chain(context, "")):
        record = fake.data[ks.block_key("", chain)]
        start, stop = j * B, min((j + 1) * B, len(context))
        assert len(record) == record_bytes(spec, stop - start)
        block = decode_block(record, spec, start, "k")
        assert block.token_ids == tuple(context[start:stop])
        want = a.pool.read_codes(handle, [0, 1], start, stop)
        for got, w in zip(block.layers, want, strict=True):
            assert isinstance(got, LayerCodes)
            for g, x in ((got.keys, w.keys), (got.values, w.values)):
                assert g.codes.tobytes() == x.codes.tobytes()
                assert g.scales.tobytes() == x.scales.tobytes()
                assert g.biases.tobytes() == x.biases.tobytes()
    a.put_back("s")
    assert fake.bytes_in < sum(record_bytes(DENSE64, n) for n in (4, 4, 4, 1))
    turn2 = context + prompt_of(3, seed=9)
    b = make_store(fake, spec=spec)  # FakeStorage.write_codes asserts every code is the token's
    done = run(b, "s", turn2)
    assert b.stats.num_cold_hits == 1 and done.cached_tokens == len(context)
    assert done.token_ids == run(make_store(FakeRedis(), spec=spec), "ref", turn2).token_ids


def test_dense_and_q4_servers_sharing_one_redis_never_read_each_others_blocks() -> None:
    fake = FakeRedis()
    dense = make_store(fake, spec=DENSE64)
    system = prompt_of(12, seed=3)  # three full blocks: a prefix either could import
    first = run(dense, "s", system + prompt_of(2, seed=4))
    dense.flush()
    dense_keys = set(fake.data)
    q4 = make_store(fake, spec=Q4)
    turn2 = system + prompt_of(2, seed=4) + list(first.token_ids) + [5]
    fake.log.clear()
    got = run(q4, "s", turn2)
    assert got.cached_tokens == 0 and q4.stats.num_misses == 1
    assert q4.stats.num_cold_hits == 0 and q4.stats.prefix_tokens_imported == 0
    assert q4.stats.num_load_errors == 0 and q4.stats.tier.num_blocks_corrupt == 0
    assert not {key for _, key in fake.log} & dense_keys  # never even asked for one
    q4.flush()
    q4_keys = set(fake.data) - dense_keys
    assert q4_keys and all(":q4g64-float16-v1:" in k for k in q4_keys)
    assert all(fake.data[k] for k in dense_keys)  # the dense session is untouched
    # negative control: another dense server does resume the dense session
    again = make_store(fake, spec=DENSE64)
    assert run(again, "s", turn2).cached_tokens == len(turn2) - 1
    # and the q4 server resumes its own
    q4b = make_store(fake, spec=Q4)
    assert run(q4b, "s", [*turn2, *got.token_ids, 6]).cached_tokens == len(turn2) + 3


def test_a_corrupt_quantized_block_is_refused_and_the_session_prefills() -> None:
    fake = FakeRedis()
    a = make_store(fake, spec=Q4)
    done = run(a, "s", prompt_of(10))
    a.flush()
    ks = KeySpace(FP, block_format_id(Q4), B)
    key = ks.block_key("", ks.chain(prompt_of(10), "")[1])
    record = bytearray(fake.data[key])
    record[60] ^= 0x01  # one bit of the first layer's key codes
    fake.data[key] = bytes(record)
    b = make_store(fake, spec=Q4)
    turn2 = prompt_of(10) + list(done.token_ids) + [5]
    got = run(b, "s", turn2)
    assert got.cached_tokens == B  # only the good block before it, as a prefix import
    assert got.token_ids == run(make_store(FakeRedis(), spec=Q4), "r", turn2).token_ids
    assert b.stats.tier.num_blocks_corrupt == 1 and b.stats.num_load_errors == 1
    assert fake.data.get(key) != bytes(record)
    b.pool.check_invariants()
