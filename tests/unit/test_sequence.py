"""SequenceCache and HostWrite: one owner of a sequence's cache, its verbs and their states."""

from __future__ import annotations

import pytest
from fakes import SPEC

from kvpool import BlockPool, InvalidRequestError
from kvpool.cache.manager import PoolFull
from kvpool.cache.sequence import HostWrite, SequenceCache, SequenceState
from kvpool.testing import FakeCache, FakeStorage


def make_pool(num_blocks: int = 8) -> BlockPool:
    return BlockPool(SPEC, num_blocks=num_blocks, storage=FakeStorage)


def caches_of(tokens: list[int]) -> list[FakeCache]:
    return [FakeCache(list(tokens), len(tokens)) for _ in SPEC.layers]


def open_seq(pool: BlockPool, agent: str, tokens: list[int], **kw: object) -> SequenceCache:
    seq = pool.open_sequence(agent, tokens, 2, **kw)  # type: ignore[arg-type]
    assert isinstance(seq, SequenceCache)
    return seq


def test_open_read_close_gives_a_handle_and_the_next_turn_reuses_it() -> None:
    pool = make_pool()
    tokens = list(range(10))
    seq = open_seq(pool, "a", tokens)
    assert seq.state is SequenceState.OPEN and seq.reused_tokens == 0
    assert seq.read() is None and seq.state is SequenceState.READ
    handle = seq.close(caches_of(tokens), tokens)
    assert seq.state is SequenceState.CLOSED and handle.token_ids == tuple(tokens)
    # 10 tokens in blocks of 4: 3 blocks held
    assert pool.num_used == 3 and pool.num_handles == 1

    nxt = open_seq(pool, "a", [*tokens, 10, 11], own=handle)
    assert nxt.reused_tokens == 10
    (cache, _) = nxt.read()  # type: ignore[misc]
    assert cache.tokens == tokens
    new = nxt.close(caches_of([*tokens, 10, 11]), [*tokens, 10, 11])
    assert not pool.is_live(handle) and pool.is_live(new)  # the old handle was replaced
    pool.check_invariants()


def test_abort_gives_everything_back_and_is_idempotent() -> None:
    pool = make_pool()
    free = pool.num_free
    seq = open_seq(pool, "a", list(range(9)))
    assert pool.num_free < free
    seq.abort()
    seq.abort()
    assert seq.state is SequenceState.ABORTED and pool.num_free == free
    with pytest.raises(InvalidRequestError, match="'a' is aborted; expected open"):
        seq.read()
    pool.check_invariants()


def test_a_failing_close_aborts_and_the_old_handle_stays_live() -> None:
    pool = make_pool()
    tokens = list(range(6))
    first = open_seq(pool, "a", tokens)
    first.read()
    old = first.close(caches_of(tokens), tokens)
    free = pool.num_free
    seq = open_seq(pool, "a", [*tokens, 6], own=old)
    seq.read()
    with pytest.raises(InvalidRequestError, match="fresh blocks"):  # 100 tokens: too many
        seq.close(caches_of(list(range(100))), list(range(100)))
    assert seq.state is SequenceState.ABORTED
    assert pool.is_live(old) and pool.num_free == free
    pool.check_invariants()


def test_the_context_manager_aborts_on_an_exception_only() -> None:
    pool = make_pool()
    free = pool.num_free
    with pytest.raises(RuntimeError), open_seq(pool, "a", list(range(5))):
        raise RuntimeError("prefill failed")
    assert pool.num_free == free
    with open_seq(pool, "b", list(range(5))) as seq:
        seq.read()
        seq.close(caches_of(list(range(5))), list(range(5)))
    assert pool.num_handles == 1


def test_pool_full_is_a_result_and_nothing_changes() -> None:
    pool = make_pool(3)
    got = pool.open_sequence("a", list(range(20)), 2)
    assert isinstance(got, PoolFull) and got.never_fits
    assert pool.num_free == 3 and pool.num_used == 0


def test_extend_takes_a_prefix_published_after_open() -> None:
    """A follower opened before its leader published the shared prompt grows its match."""
    pool = make_pool(16)
    system = list(range(100, 108))  # two whole blocks
    leader = open_seq(pool, "leader", [*system, 1, 2])
    follower = open_seq(pool, "follower", [*system, 3])
    assert follower.reused_tokens == 0
    leader.read()
    assert leader.publish_prefix(caches_of(system), 8)
    assert follower.extend(None) and follower.reused_tokens == 8
    assert not follower.extend(None)  # nothing longer now
    (cache, _) = follower.read()  # type: ignore[misc]
    assert cache.tokens == system
    with pytest.raises(InvalidRequestError, match="is read; expected open"):
        follower.extend(None)


def test_host_write_commits_or_rolls_back() -> None:
    pool = make_pool()
    free = pool.num_free
    tokens = tuple(range(7))
    got = pool.write_from_host("a", tokens)
    assert isinstance(got, HostWrite)
    with got:  # left without commit: rolled back
        pass
    assert got.state is SequenceState.ABORTED and pool.num_free == free
    with pytest.raises(InvalidRequestError, match="is aborted"):
        got.commit()

    source = make_pool()
    seq = open_seq(source, "a", list(tokens))
    seq.read()
    handle = seq.close(caches_of(list(tokens)), list(tokens))
    kvs = source.read_layers(handle, [0, 1], 0, len(tokens))
    write = pool.write_from_host("a", tokens)
    assert isinstance(write, HostWrite) and write.shared_tokens == 0
    with write:
        write.write(kvs)
        copied = write.commit()
    assert write.state is SequenceState.CLOSED and pool.is_live(copied)
    assert pool.read_layers(copied, [0, 1], 0, 7)[1].keys.tobytes() == kvs[1].keys.tobytes()
    # a second copy shares the first one's whole blocks and writes only the rest
    again = pool.write_from_host("b", tokens)
    assert isinstance(again, HostWrite) and again.shared_tokens == 4
    with again:
        again.write(kvs)
        again.commit()
    pool.check_invariants()
