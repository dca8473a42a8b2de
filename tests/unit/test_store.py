"""AgentCacheStore on the fakes: hits, eviction to disk, budgets, restarts, bad files."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from fakes import SPEC, B, fake_engine, prompt_of, run_one

from kvpool import (
    AttentionKind,
    CompletedGeneration,
    InvalidRequestError,
    LayerSpec,
    ModelCacheSpec,
    PoolExhaustedError,
    RequestTooLargeError,
)
from kvpool.persist import cache_path, read_cache_info
from kvpool.store import AgentCacheStore, StoreStats, Tier
from kvpool.testing import (
    FakeModel,
    reference_tokens,
)

SWA_SPEC = ModelCacheSpec(
    (
        LayerSpec(AttentionKind.SLIDING, 2, 8, 8, window=6),
        LayerSpec(AttentionKind.GLOBAL, 2, 8, 8),
    ),
    dtype="float16",
    block_tokens=B,
)
FP = "sha256:fake-model"


def make_store(
    directory: Path,
    num_blocks: int = 64,
    spec: ModelCacheSpec = SPEC,
    fingerprint: str = FP,
    **kwargs: int,
) -> AgentCacheStore:
    """A store over a fresh engine and pool of fakes (a new pool: nothing carried over)."""
    engine = fake_engine(spec, num_blocks)
    return AgentCacheStore(engine, directory, fingerprint=fingerprint, **kwargs)


def run(
    store: AgentCacheStore, agent: str, prompt: Sequence[int], max_tokens: int = 3
) -> CompletedGeneration:
    return run_one(store, agent, prompt, max_tokens)


def counters(stats: StoreStats) -> tuple[int, int, int, int]:
    return stats.num_hot_hits, stats.num_cold_hits, stats.num_misses, stats.num_evictions


# --------------------------------------------------------------------------- tiers


def test_miss_hot_hit_evict_cold_hit_equal_fresh_runs(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    context = prompt_of(9)
    first = run(store, "a", context)
    assert list(first.token_ids) == reference_tokens(FakeModel(SPEC), context, 3)
    assert store.tier("a") is Tier.HOT and counters(store.stats) == (0, 0, 1, 0)
    assert first.blocks is not None

    context = [*first.blocks.token_ids, *prompt_of(3, seed=2)]
    second = run(store, "a", context)
    assert list(second.token_ids) == reference_tokens(FakeModel(SPEC), context, 3)
    assert second.cached_tokens == first.blocks.total_tokens
    assert counters(store.stats) == (1, 0, 1, 0)
    assert not cache_path(tmp_path, "a").exists()  # nothing written yet

    assert second.blocks is not None
    assert store.evict("a")
    assert store.tier("a") is Tier.COLD
    assert store.pool.num_used == 0 and store.pool.num_handles == 0
    info = read_cache_info(cache_path(tmp_path, "a"))
    assert (info.agent_id, info.num_tokens, info.fingerprint) == ("a", 18, FP)  # 9+3+3+3

    context = [*second.blocks.token_ids, *prompt_of(5, seed=3)]
    third = run(store, "a", context)
    assert list(third.token_ids) == reference_tokens(FakeModel(SPEC), context, 3)
    assert third.cached_tokens == second.blocks.total_tokens  # nothing saved was prefilled again
    stats = store.stats
    assert counters(stats) == (1, 1, 1, 1)
    assert stats.tokens_saved == first.blocks.total_tokens + second.blocks.total_tokens
    assert (stats.num_saves, stats.num_hot, stats.num_cold) == (1, 1, 0)
    assert stats.bytes_on_disk == stats.bytes_written == info.file_bytes
    assert stats.hot_bytes == 7 * SPEC.bytes_per_block  # 18 + 5 + 3 = 26 tokens, 4 per block
    # the file is still the turn-2 cache: an eviction now must write the turn-3 one
    assert store.evict("a") and store.stats.num_saves == 2
    assert read_cache_info(cache_path(tmp_path, "a")).num_tokens == 26


def test_sliding_window_cache_survives_the_disk(tmp_path: Path) -> None:
    store = make_store(tmp_path, spec=SWA_SPEC)
    context = prompt_of(13)
    first = run(store, "a", context, max_tokens=4)
    assert first.blocks is not None
    sliding = next(g for g, group in enumerate(SWA_SPEC.groups) if group.window)
    valid_from = first.blocks.tables[sliding].valid_from
    assert valid_from > 0
    store.evict("a")
    info = read_cache_info(cache_path(tmp_path, "a"))
    assert info.sliding_valid_from == valid_from
    context = [*first.blocks.token_ids, *prompt_of(3, seed=4)]
    second = run(store, "a", context, max_tokens=4)
    assert second.cached_tokens == first.blocks.total_tokens
    assert list(second.token_ids) == reference_tokens(FakeModel(SWA_SPEC), context, 4)


def test_twelve_agents_through_a_pool_for_three(tmp_path: Path) -> None:
    """3 turns of 12 agents; the pool holds 3 final caches (6 blocks each) at a time."""
    agents = [f"agent-{i:02d}" for i in range(12)]

    def turns(store: AgentCacheStore) -> list[dict[str, CompletedGeneration]]:
        prompts = {a: prompt_of(9, seed=i) for i, a in enumerate(agents)}
        out: list[dict[str, CompletedGeneration]] = []
        for turn in range(3):
            done = store.run_turns(prompts, max_tokens=3)
            assert sorted(done) == agents
            assert all(c.error is None for c in done.values())
            for i, a in enumerate(agents):
                blocks = done[a].blocks
                assert blocks is not None
                if turn:
                    previous = out[-1][a].blocks
                    assert previous is not None
                    assert done[a].cached_tokens == previous.total_tokens
                prompts[a] = [*blocks.token_ids, *prompt_of(2, seed=100 * turn + i)]
            out.append(done)
        return out

    unlimited = make_store(tmp_path / "unlimited", num_blocks=256)
    expected = turns(unlimited)
    assert unlimited.stats.num_evictions == 0

    store = make_store(tmp_path / "tight", num_blocks=18)
    start_free = store.pool.num_free
    got = turns(store)
    for turn, (want, have) in enumerate(zip(expected, got, strict=True)):
        for a in agents:
            assert have[a].token_ids == want[a].token_ids, f"turn {turn} agent {a}"
            assert have[a].cached_tokens == want[a].cached_tokens, f"turn {turn} agent {a}"
    stats = store.stats
    # Round robin over 12 agents with room for about 3: LRU evicts each agent before it
    # comes back, so every later turn is a cold hit (first turns are misses).
    assert (stats.num_hot_hits, stats.num_cold_hits, stats.num_misses) == (0, 24, 12)
    assert stats.num_evictions >= 24 and stats.num_saves == stats.num_evictions
    assert stats.tokens_saved == unlimited.stats.tokens_saved
    store.pool.check_invariants()
    store.close()
    assert store.pool.num_free == start_free and store.pool.num_handles == 0
    assert store.stats.num_hot == 0 and store.stats.num_cold == 12
    assert sorted(p.name for p in (tmp_path / "tight").iterdir()) == sorted(
        cache_path(tmp_path, a).name for a in agents
    )


def test_agent_in_flight_is_never_evicted(tmp_path: Path) -> None:
    store = make_store(tmp_path, num_blocks=8)
    a = run(store, "a", prompt_of(7), max_tokens=1)  # 8 tokens: 2 blocks
    run(store, "b", prompt_of(7, seed=2), max_tokens=1)
    assert a.blocks is not None
    store.submit("a", [*a.blocks.token_ids, 5], max_tokens=3)  # in flight; "a" is the LRU
    # a's turn reserves 1 fresh block (2 shared): 5 used. "c" takes the last 3 blocks as
    # is; "d" needs 2 more: "b" (idle) is evicted, never "a" although it is older.
    store.submit("c", prompt_of(9, seed=3), max_tokens=3)
    store.submit("d", prompt_of(5, seed=4), max_tokens=3)
    assert store.tier("a") is Tier.HOT and store.tier("b") is Tier.COLD
    assert store.stats.num_evictions == 1
    # nothing idle is left: "e" cannot fit and is not checked out afterwards
    with pytest.raises(PoolExhaustedError):
        store.submit("e", prompt_of(9, seed=5), max_tokens=3)
    assert store.tier("a") is Tier.HOT
    done = {c.agent_id: c for c in store.drain()}
    assert sorted(done) == ["a", "c", "d"] and all(c.error is None for c in done.values())
    assert done["a"].cached_tokens == 8
    run(store, "e", prompt_of(9, seed=5), max_tokens=3)  # fits after evicting idle agents


def test_checkout_is_exclusive_until_put(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    first = run(store, "a", prompt_of(6))
    assert first.blocks is not None
    blocks = store.get("a")
    assert blocks == first.blocks
    with pytest.raises(InvalidRequestError, match="checked out"):
        store.get("a")
    with pytest.raises(InvalidRequestError, match="checked out"):
        store.evict("a")
    with pytest.raises(InvalidRequestError, match="checked out"):
        store.submit("a", prompt_of(6))
    # driving the engine directly with a checked-out cache, then checking in
    assert blocks is not None
    store.engine.submit("a", [*blocks.token_ids, 9], blocks, 2)
    (done,) = store.engine.drain()
    store.put(done)
    assert store.get("a") == done.blocks
    store.put_back("a")
    # a request that fails to submit puts the cache back
    with pytest.raises(InvalidRequestError):
        store.submit("a", [])
    uid = store.submit("a", prompt_of(4), max_tokens=2)
    assert store.cancel(uid)
    assert store.tier("a") is Tier.HOT and store.pool.is_live(done.blocks)  # type: ignore[arg-type]
    run(store, "a", prompt_of(4), max_tokens=2)


def test_a_saved_cache_larger_than_the_pool_is_a_miss(tmp_path: Path) -> None:
    big = make_store(tmp_path, num_blocks=64)
    run(big, "a", prompt_of(30), max_tokens=2)  # 32 tokens: 8 blocks
    big.close()
    small = make_store(tmp_path, num_blocks=6)
    run(small, "b", prompt_of(5, seed=2), max_tokens=3)  # 2 blocks, idle
    done = run(small, "a", prompt_of(10), max_tokens=2)  # its 8-block cache cannot load
    assert done.cached_tokens == 0 and small.stats.num_misses == 2
    assert small.tier("b") is Tier.HOT and small.stats.num_evictions == 0  # b was not evicted
    assert cache_path(tmp_path, "a").exists()


def test_request_too_large_evicts_nothing(tmp_path: Path) -> None:
    store = make_store(tmp_path, num_blocks=4)
    run(store, "a", prompt_of(5), max_tokens=1)
    with pytest.raises(RequestTooLargeError):
        store.submit("b", prompt_of(30), max_tokens=1)
    assert store.tier("a") is Tier.HOT and store.stats.num_evictions == 0


# --------------------------------------------------------------------------- restarts


def test_a_new_store_resumes_from_disk(tmp_path: Path) -> None:
    first = make_store(tmp_path)
    saved = {a: run(first, a, prompt_of(10, seed=i)) for i, a in enumerate(["a", "b", "c"])}
    assert first.flush() == 3 and first.flush() == 0  # second flush: files are current
    first.close()  # no writes left to do
    assert first.pool.num_used == 0 and first.stats.num_saves == 3

    second = make_store(tmp_path)  # a new pool: only the files carry the caches over
    assert {a: second.tier(a) for a in "abc"} == dict.fromkeys("abc", Tier.COLD)
    for i, a in enumerate("abc"):
        blocks = saved[a].blocks
        assert blocks is not None
        context = [*blocks.token_ids, *prompt_of(4, seed=10 + i)]
        done = run(second, a, context)
        assert done.cached_tokens == blocks.total_tokens
        assert list(done.token_ids) == reference_tokens(FakeModel(SPEC), context, 3)
    assert counters(second.stats) == (0, 3, 0, 0)


def test_another_model_or_layout_is_a_miss_and_its_file_is_kept(tmp_path: Path) -> None:
    first = make_store(tmp_path)
    run(first, "a", prompt_of(10))
    first.close()
    path = cache_path(tmp_path, "a")
    before = path.read_bytes()
    for store in (
        make_store(tmp_path, fingerprint="sha256:another-model"),
        make_store(tmp_path, spec=ModelCacheSpec.uniform(2, 2, 8, dtype="float32", block_tokens=8)),
    ):
        done = run(store, "a", prompt_of(10))
        assert done.cached_tokens == 0
        assert (store.stats.num_misses, store.stats.num_load_errors) == (1, 1)
        assert path.read_bytes() == before
    third = make_store(tmp_path, fingerprint="sha256:another-model")
    run(third, "a", prompt_of(10))
    third.close()  # the next save replaces it
    assert read_cache_info(path).fingerprint == "sha256:another-model"


def test_a_corrupt_file_is_a_miss_and_is_set_aside(tmp_path: Path) -> None:
    first = make_store(tmp_path)
    run(first, "a", prompt_of(10))
    first.close()
    path = cache_path(tmp_path, "a")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # a bit of the last layer's values
    path.write_bytes(bytes(data))
    store = make_store(tmp_path)
    done = run(store, "a", prompt_of(10))
    assert done.cached_tokens == 0 and list(done.token_ids) == reference_tokens(
        FakeModel(SPEC), prompt_of(10), 3
    )
    assert (store.stats.num_misses, store.stats.num_load_errors) == (1, 1)
    assert not path.exists() and store.stats.num_set_aside == 1
    assert path.with_name(path.name + ".corrupt").read_bytes() == bytes(data)
    assert done.blocks is not None  # the failed load took nothing: only a's new cache is held
    assert store.pool.num_used == len(done.blocks.block_ids) and store.pool.num_handles == 1


def test_stale_temp_files_are_removed_live_ones_kept(tmp_path: Path) -> None:
    child = [sys.executable, "-c", "import os; print(os.getpid())"]
    dead_pid = int(subprocess.run(child, capture_output=True, text=True, check=True).stdout)
    final = cache_path(tmp_path, "a").name
    stale = tmp_path / f".{final}.tmp-{dead_pid}-0123abcd.safetensors"
    live = tmp_path / f".{final}.tmp-{os.getpid()}-89abcdef.safetensors"
    other = tmp_path / "notes.txt"
    for p in (stale, live, other):
        p.write_bytes(b"x" * 10)
    store = make_store(tmp_path)
    assert not stale.exists() and live.exists() and other.exists()
    assert store.stats.num_cold == 0 and store.stats.bytes_on_disk == 0


# --------------------------------------------------------------------------- budgets


def test_disk_budget_drops_least_recently_used_files(tmp_path: Path) -> None:
    probe = make_store(tmp_path / "probe")
    run(probe, "x", prompt_of(10))
    probe.close()
    one_file = probe.stats.bytes_on_disk

    store = make_store(tmp_path / "d", max_disk_bytes=2 * one_file + one_file // 2)
    for i, a in enumerate("abcd"):
        run(store, a, prompt_of(10, seed=i))
    store.close()  # writes a, b, c, d in LRU order: a and b are dropped
    stats = store.stats
    assert stats.num_saves == 4 and stats.num_dropped == 2 and stats.num_evictions == 4
    assert stats.bytes_on_disk == 2 * one_file <= store.max_disk_bytes  # type: ignore[operator]
    assert [store.tier(a) for a in "abcd"] == [None, None, Tier.COLD, Tier.COLD]
    again = run(store, "a", prompt_of(10))  # no file: a miss (blocks still cached may serve)
    assert store.stats.num_misses == 5
    assert list(again.token_ids) == reference_tokens(FakeModel(SPEC), prompt_of(10), 3)

    # a new store over a directory already past its budget trims it
    tight = make_store(tmp_path / "d", max_disk_bytes=one_file)
    assert tight.stats.bytes_on_disk <= one_file and tight.stats.num_dropped == 1


def test_pool_budget_evicts_idle_caches_after_each_turn(tmp_path: Path) -> None:
    # each agent's cache: 10 + 3 tokens = 4 blocks; the budget holds 2 agents
    store = make_store(tmp_path, max_pool_bytes=8 * SPEC.bytes_per_block)
    for i, a in enumerate("abc"):
        run(store, a, prompt_of(10, seed=i))
    assert [store.tier(a) for a in "abc"] == [Tier.COLD, Tier.HOT, Tier.HOT]
    assert store.stats.hot_bytes == 8 * SPEC.bytes_per_block


def test_forget_deletes_everywhere(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    run(store, "a", prompt_of(10))
    store.flush()
    assert store.forget("a")
    assert store.tier("a") is None and not cache_path(tmp_path, "a").exists()
    assert store.pool.num_used == 0
    assert not store.forget("a")


# --------------------------------------------------------------------------- agent ids


@pytest.mark.parametrize(
    "bad", ["../escape", "a/b", "/abs", "..", ".hidden", "-x", "nul\x00", "x" * 129, "", "a\\b"]
)
def test_agent_ids_cannot_escape_the_directory(tmp_path: Path, bad: str) -> None:
    directory = tmp_path / "caches"
    store = make_store(directory)
    for call in (store.get, store.evict, store.tier, store.forget):
        with pytest.raises(InvalidRequestError):
            call(bad)
    with pytest.raises(InvalidRequestError):
        store.submit(bad, prompt_of(4))
    with pytest.raises(InvalidRequestError):
        cache_path(directory, bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["caches"]
    assert list(directory.iterdir()) == []


def test_ids_differing_in_case_get_their_own_files(tmp_path: Path) -> None:
    assert cache_path(tmp_path, "Alice").name.lower() != cache_path(tmp_path, "alice").name.lower()
    store = make_store(tmp_path)
    run(store, "Alice", prompt_of(10, seed=1))
    run(store, "alice", prompt_of(10, seed=2))
    store.close()
    assert len(list(tmp_path.iterdir())) == 2
    assert read_cache_info(cache_path(tmp_path, "Alice")).agent_id == "Alice"


def test_run_turns_raises_when_a_turn_can_never_fit(tmp_path: Path) -> None:
    store = make_store(tmp_path, num_blocks=4)
    with pytest.raises(RequestTooLargeError):
        store.run_turns({"a": prompt_of(9), "b": prompt_of(100)}, max_tokens=3)
    assert store.engine.pool.num_used == 0 and not store.engine.has_work
