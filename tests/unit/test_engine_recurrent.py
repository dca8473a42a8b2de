"""The engine on a recurrent hybrid (fakes): end states resume the agent's next turn, state
snapshots taken at segment ends let other agents share a prefix, all token-exact."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes import HYBRID, B, prompt_of

from kvpool import BlockPool, BlockPoolBatchEngine
from kvpool.cache import KVCacheManager, PoolFull, Reservation
from kvpool.cache.manager import StateLease
from kvpool.cache.storage import LayerState
from kvpool.errors import CacheCorruptionError, InvalidRequestError
from kvpool.persist import load_cache, read_cache_info, save_cache
from kvpool.testing import (
    FakeBatchGenerator,
    FakeModel,
    FakeStorage,
    FakeTokenizer,
    reference_tokens,
)


def _engine(snapshots: int | None, num_blocks: int = 64) -> tuple[BlockPoolBatchEngine, BlockPool]:
    pool = BlockPool(HYBRID, num_blocks=num_blocks, storage=FakeStorage)
    engine = BlockPoolBatchEngine(
        FakeModel(HYBRID), FakeTokenizer(), pool, HYBRID,
        batch_gen_factory=FakeBatchGenerator, state_snapshot_blocks=snapshots,
    )  # fmt: skip
    return engine, pool


def test_turns_resume_from_the_end_state() -> None:
    engine, pool = _engine(None)
    context, cache = prompt_of(10), None
    for turn in range(4):
        engine.submit("a", context, cache, max_tokens=3)
        (c,) = engine.drain()
        assert list(c.token_ids) == reference_tokens(engine.model, context, 3)
        assert c.cached_tokens == (cache.total_tokens if cache is not None else 0)
        cache = c.blocks
        context = [*context, *c.token_ids, *prompt_of(1 + turn, seed=turn)]
    assert cache is not None
    assert len(cache.tables[1].held) == 1  # one state: at the end
    pool.check_invariants()


@pytest.mark.parametrize(("every", "reused"), [(None, 0), (1, 8), (2, 8), (4, 0)])
def test_snapshots_let_a_later_agent_share_a_prefix(every: int | None, reused: int) -> None:
    """Agent a prefills 14 tokens; b arrives later with a's first 11. With snapshots every
    block (of 4) or every 2nd, b resumes at 8; every 4th (16) or none: nothing (the
    attention blocks alone cannot serve a model with a state; a's prompt-end snapshot is
    after 13 tokens, not a prefix of b)."""
    engine, pool = _engine(every)
    a = prompt_of(14)
    engine.submit("a", a, max_tokens=2)
    (done_a,) = engine.drain()
    b = [*a[:11], 99, 98]
    engine.submit("b", b, max_tokens=3)
    (done_b,) = engine.drain()
    assert done_b.cached_tokens == reused
    assert list(done_b.token_ids) == reference_tokens(engine.model, b, 3)
    # snapshots are cached-free once a finished (evictable like any cached block): a's at
    # block boundaries (4, 8, 12 / 8) and each prompt's end (a's after 13 tokens, b's
    # after 12: a boundary of its own, b[11] differs from a[11])
    usage = pool.usage().groups[1]
    assert usage.num_used == 2  # a's end state and b's
    assert usage.num_cached == {None: 2, 1: 5, 2: 3, 4: 2}[every]
    pool.check_invariants()
    pool.release(done_a.blocks)
    pool.release(done_b.blocks)
    assert pool.num_used == 0


def test_a_prompt_end_snapshot_serves_the_next_turn_of_a_chat() -> None:
    """A chat re-templates the reply, so the next prompt does not continue the cached
    sequence; it does start with the previous prompt: its end state after all but the
    last prompt token is kept, and the next turn resumes there (token-exact)."""
    engine, _ = _engine(None)
    first = prompt_of(14)
    engine.submit("a", first, max_tokens=3)
    (done,) = engine.drain()
    nxt = [*first, 7, 7, 7, 7, 7]  # the reply as the template re-renders it: not the tokens
    engine.submit("a", nxt, done.blocks, max_tokens=3)
    (second,) = engine.drain()
    assert second.cached_tokens == len(first) - 1
    assert list(second.token_ids) == reference_tokens(engine.model, nxt, 3)
    # negative control: without prefix sharing no snapshot is kept, nothing is reused
    pool2 = BlockPool(HYBRID, num_blocks=64, storage=FakeStorage)
    plain = BlockPoolBatchEngine(
        FakeModel(HYBRID), FakeTokenizer(), pool2, HYBRID,
        batch_gen_factory=FakeBatchGenerator, prefix_sharing=False,
    )  # fmt: skip
    plain.submit("a", first, max_tokens=3)
    (d,) = plain.drain()
    plain.submit("a", nxt, d.blocks, max_tokens=3)
    (s2,) = plain.drain()
    assert s2.cached_tokens == 0


def test_snapshots_do_not_change_the_tokens_of_a_batch() -> None:
    prompts = {f"a{i}": [*prompt_of(9), *prompt_of(3 + 2 * i, seed=i)] for i in range(3)}
    outs = {}
    for every in (None, 1):
        engine, pool = _engine(every)
        for agent, prompt in prompts.items():
            engine.submit(agent, prompt, max_tokens=4)
        outs[every] = {c.agent_id: list(c.token_ids) for c in engine.drain()}
        pool.check_invariants()
    assert outs[None] == outs[1]
    for agent, prompt in prompts.items():
        assert outs[1][agent] == reference_tokens(FakeModel(HYBRID), prompt, 4)


def test_a_snapshot_that_does_not_fit_is_skipped() -> None:
    """Snapshots take recurrent blocks beyond the request's own end state: with none free
    ``place_prefix`` says so and changes nothing (the engine's publish returns False and
    the prefill goes on)."""
    m = KVCacheManager(HYBRID, [8, 1])
    res = m.reserve("a", prompt_of(9), 2, m.lookup(prompt_of(9)))
    assert isinstance(res, Reservation)
    m.release_pin(res)
    before = m.usage()
    assert isinstance(m.place_prefix(res, 4), PoolFull)
    assert m.usage() == before
    m.rollback(res)
    assert m.usage().num_used == 0


def test_a_byte_budget_gives_a_recurrent_group_two_states_per_reference_agent() -> None:
    pool = BlockPool(HYBRID, max_bytes=1 << 20, storage=FakeStorage, reference_tokens=64)
    full, states = pool.blocks_per_group
    assert full // states == 64 // B // 2  # 16 blocks of 4 tokens : 2 states, per agent
    assert sum(n * pool.spec.group_bytes_per_block(g) for g, n in enumerate((full, states))) <= (
        1 << 20
    )


def test_a_saved_hybrid_cache_loads_and_resumes(tmp_path: Path) -> None:
    """The end states go to the file and back, bit for bit (the fake's digest), and the
    loaded cache resumes the next turn token-exact. The prompt-end snapshot (after 9
    tokens) makes it a version-4 file."""
    engine, pool = _engine(None)
    context = prompt_of(10)
    engine.submit("a", context, max_tokens=3)
    (done,) = engine.drain()
    path = tmp_path / "a.kvcache.safetensors"
    save_cache(path, pool, done.blocks, fingerprint="fp")
    info = read_cache_info(path)
    assert info.format_version == 4 and info.spec == HYBRID
    assert info.snapshot_lengths == (9,)
    assert [t.name for t in info.tensors if t.layer == 1] == [
        "layers.1.state.0",
        "layers.1.state.1",
        "snapshots.9.layers.1.state.0",
        "snapshots.9.layers.1.state.1",
    ]
    pool.release(done.blocks)
    assert pool.num_used == 0
    loaded = load_cache(path, pool, fingerprint="fp")
    assert loaded.token_ids == done.blocks.token_ids
    nxt = [*context, *done.token_ids, 7]
    engine.submit("a", nxt, loaded, max_tokens=3)
    (second,) = engine.drain()
    assert second.cached_tokens == loaded.total_tokens
    assert list(second.token_ids) == reference_tokens(engine.model, nxt, 3)
    pool.check_invariants()


def test_a_corrupt_state_in_a_file_leaves_nothing_behind(tmp_path: Path) -> None:
    engine, pool = _engine(None)
    engine.submit("a", prompt_of(10), max_tokens=3)
    (done,) = engine.drain()
    path = tmp_path / "a.kvcache.safetensors"
    save_cache(path, pool, done.blocks, fingerprint="fp")
    pool.release(done.blocks)
    info = read_cache_info(path)
    clean = path.read_bytes()
    for name in ("layers.2.state.1", "snapshots.9.layers.2.state.1"):
        (tensor,) = [t for t in info.tensors if t.name == name]
        data = bytearray(clean)
        data[info.data_offset + tensor.end - 1] ^= 0xFF  # its last byte
        path.write_bytes(bytes(data))
        before = pool.usage()
        with pytest.raises(CacheCorruptionError, match=name.replace(".", r"\.")):
            load_cache(path, pool, fingerprint="fp")
        # nothing held, nothing published (a snapshot is checked before any block)
        assert pool.usage().groups == before.groups and pool.num_used == 0
        pool.check_invariants()


def test_the_pool_reads_the_snapshots_it_holds_for_a_handles_prefix() -> None:
    """``snapshot_lengths`` names the lengths below a handle's end where every recurrent
    group holds a published snapshot (what a later lookup reuses): block boundaries and the
    prompt's end; ``read_snapshot`` reads one: the state after exactly those tokens (the
    fake's digest of them), None where the pool holds none; without boundary snapshots only
    the prompt-end one is there (control)."""
    a = prompt_of(14)
    lengths = {}
    for every in (1, 2, None):
        engine, pool = _engine(every)
        engine.submit("a", a, max_tokens=3)
        (done,) = engine.drain()
        lengths[every] = pool.snapshot_lengths(done.blocks)
        if every == 2:
            assert pool.read_snapshot(done.blocks, 4, [1, 2]) is None
            assert pool.read_snapshot(done.blocks, 6, [1, 2]) is None
            for length in (8, 13):
                states = pool.read_snapshot(done.blocks, length, [1, 2])
                assert states is not None and [(s.layer, s.num_tokens) for s in states] == [
                    (1, length),
                    (2, length),
                ]
                other = FakeStorage(HYBRID, (1, 1))
                other.write_states(((), (-1,) * ((length - 1) // B) + (0,)), states)
                # the fake state: a digest of its tokens
                assert other.states[1][0] == other.states[2][0] == tuple(a[:length])
            for bad in (0, 17, 20):
                with pytest.raises(InvalidRequestError, match=r"must hold 1\.\.16"):
                    pool.read_snapshot(done.blocks, bad, [1])
        pool.check_invariants()
    # none at 16: the state after the generated tokens is the end state (17), mid-block;
    # 13: the prompt's end (all but its last token)
    assert lengths == {1: [4, 8, 12, 13], 2: [8, 13], None: [13]}


def _saved(tmp_path: Path, every: int | None, prompt: list[int]) -> Path:
    """The file of agent a after serving ``prompt`` on an engine with ``every``."""
    engine, pool = _engine(every)
    engine.submit("a", prompt, max_tokens=3)
    (done,) = engine.drain()
    path = tmp_path / f"a-{every}.kvcache.safetensors"
    save_cache(path, pool, done.blocks, fingerprint="fp")
    return path


@pytest.mark.parametrize(("every", "lengths", "reused"), [(1, (4, 8, 12, 13), 8), (None, (13,), 0)])
def test_a_file_keeps_the_snapshots_of_the_prefix(
    tmp_path: Path, every: int | None, lengths: tuple[int, ...], reused: int
) -> None:
    """Version 4: the snapshots the pool holds for a's prefix (block boundaries, its
    prompt's end) go to the file; loaded into a fresh pool they serve b, which shares
    a's first 11 tokens, from 8 (token-exact), and c, which continues a's first 13, from
    13. Without boundary snapshots (control) b reuses nothing."""
    a = prompt_of(14)
    path = _saved(tmp_path, every, a)
    info = read_cache_info(path)
    assert info.format_version == 4 and info.snapshot_lengths == lengths
    engine, pool = _engine(None)
    loaded = load_cache(path, pool, fingerprint="fp")
    assert pool.snapshot_lengths(loaded) == list(lengths)
    for prompt, cached in (([*a[:11], 99, 98], reused), ([*a[:13], 5, 6], 13)):
        engine.submit("b", prompt, max_tokens=3)
        (done,) = engine.drain()
        assert done.cached_tokens == cached
        assert list(done.token_ids) == reference_tokens(engine.model, prompt, 3)
        pool.release(done.blocks)
    pool.release(loaded)
    assert pool.num_used == 0
    pool.check_invariants()


def test_a_file_without_snapshots_is_version_3_and_loads(tmp_path: Path) -> None:
    """A cache written from the host holds no snapshots: the file stays version 3 (what
    older kvpools write and read), with no snapshot tensors, and loads."""
    engine, pool = _engine(None)
    engine.submit("a", prompt_of(10), max_tokens=3)
    (done,) = engine.drain()
    other = BlockPool(HYBRID, num_blocks=64, storage=FakeStorage)
    copy = other.write_cache(
        "a",
        done.blocks.token_ids,
        [*pool.read_layers(done.blocks, [0], 0, 13), *pool.read_states(done.blocks, [1, 2])],
    )
    assert other.snapshot_lengths(copy) == []
    path = tmp_path / "a.kvcache.safetensors"
    save_cache(path, other, copy, fingerprint="fp")
    info = read_cache_info(path)
    assert info.format_version == 3 and info.snapshot_lengths == ()
    assert not any(t.name.startswith("snapshots.") for t in info.tensors)
    assert "snapshot_lengths" not in _metadata(path)
    fresh = BlockPool(HYBRID, num_blocks=64, storage=FakeStorage)
    loaded = load_cache(path, fresh, fingerprint="fp")
    assert _state_bytes(fresh.read_states(loaded, [1, 2])) == _state_bytes(
        other.read_states(copy, [1, 2])
    )


def _state_bytes(states: list[LayerState]) -> list[bytes]:
    return [a.tobytes() for st in states for a in st.arrays]


def _metadata(path: Path) -> dict[str, str]:
    import json
    import struct

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    assert isinstance(meta, dict)
    return meta


@pytest.mark.parametrize(("spare", "kept"), [(1, [13]), (0, [])])
def test_snapshots_that_do_not_fit_are_skipped_on_load(
    tmp_path: Path, spare: int, kept: list[int]
) -> None:
    """Snapshots are registered shortest first, each cached-free once published: with one
    state block to spare after the handle's own, each evicts the one before (the longest,
    the prompt's end, stays); with none, all are skipped. The load succeeds either way and
    nothing leaks."""
    path = _saved(tmp_path, 1, prompt_of(14))
    engine, pool = _engine(None, num_blocks=8)
    engine.submit("x", prompt_of(6, seed=3), max_tokens=1)
    (x,) = engine.drain()
    leases = []  # held state blocks: leave the loaded end state's and ``spare`` more
    while pool.manager.num_free(1) > 1 + spare:
        snap = pool.manager.place_snapshot(x.blocks, 1 + len(leases))
        assert isinstance(snap, StateLease)
        leases.append(snap)
    loaded = load_cache(path, pool, fingerprint="fp")
    assert pool.snapshot_lengths(loaded) == kept
    for snap in leases:
        pool.manager.abort_snapshot(snap)
    pool.release(loaded)
    pool.release(x.blocks)
    assert pool.num_used == 0
    pool.check_invariants()


def test_a_host_write_without_its_end_state_is_refused() -> None:
    """A recurrent model's cache written from the host needs every recurrent layer's end
    state: committing without it would publish an empty state block."""
    engine, pool = _engine(None)
    engine.submit("a", prompt_of(10), max_tokens=3)
    (done,) = engine.drain()
    kvs = pool.read_layers(done.blocks, [0], 0, 13)
    states = pool.read_states(done.blocks, [1, 2])
    other = BlockPool(HYBRID, num_blocks=64, storage=FakeStorage)
    got = other.write_from_host("a", done.blocks.token_ids)
    assert not isinstance(got, PoolFull)
    with got as write:
        write.write([*kvs, states[0]])
        with pytest.raises(InvalidRequestError, match=r"no end state for recurrent layers \[2\]"):
            write.commit()
    assert other.num_used == 0 and other.num_cached == 0  # rolled back, nothing published
    got = other.write_from_host("a", done.blocks.token_ids)
    assert not isinstance(got, PoolFull)
    with got as write:
        write.write([*kvs, *states])
        handle = write.commit()
    assert _state_bytes(other.read_states(handle, [1, 2])) == _state_bytes(states)
