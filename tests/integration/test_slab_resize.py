"""Slabs resized when a byte budget moves between layer groups (real MLX, CPU device).

A resize keeps every kept block's bits (dense, quantized and recurrent states; the C++ and
the portable kernels, whose zero block must stay zero), frees a shrunk slab's old buffer,
and an engine whose budget moves turn after turn still equals fresh mlx-lm runs.
"""

from __future__ import annotations

import random
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from helpers import LoadedModel, Reference, fresh, words

from kvpool import BlockPool, BlockPoolBatchEngine, ModelCacheSpec, PoolExhaustedError
from kvpool.cache.spec import AttentionKind, LayerSpec, StateSpec
from kvpool.cache.storage import LayerState
from kvpool.mlx.mlx_lm import arrays_cache, kv_cache
from kvpool.mlx.slab_kernels import KERNELS_ENV, ExtensionKernels, PortableKernels
from kvpool.mlx.slabs import make_slab_storage

SLIDING = LayerSpec(AttentionKind.SLIDING, 2, 64, 64, window=24)
FULL = LayerSpec(AttentionKind.GLOBAL, 2, 64, 64)
STATE = LayerSpec.recurrent((StateSpec((3, 16), "float32"), StateSpec((2, 8, 8), "float32")))
SPEC = ModelCacheSpec((SLIDING, FULL, STATE, FULL), "bfloat16", 16)
N = 40  # positions stored: 3 blocks of 16


def _rows(rng: np.random.Generator) -> mx.array:
    return mx.array(rng.standard_normal((1, 2, 64, 64)).astype(np.float32)).astype(mx.bfloat16)


def _snapshot(storage: Any, tables: list[list[int]]) -> list[np.ndarray]:
    """Every stored bit of the tables' blocks, on the host."""
    attention = [0, 1, 3]
    out: list[np.ndarray] = []
    if storage.format.is_quantized:
        for c in storage.read_codes(tables, attention, 0, N):
            out += [getattr(rows, f) for rows in (c.keys, c.values) for f in ("codes", "scales")]
    else:
        for kv in storage.read_layers(tables, attention, 0, N):
            out += [kv.keys, kv.values]
    (state,) = storage.read_states(tables, [2], N)
    return [*out, *state.arrays]


@pytest.mark.parametrize("kv_bits", [None, 4])
@pytest.mark.parametrize("kernels", [ExtensionKernels(), PortableKernels()], ids=lambda k: k.name)
def test_a_resize_keeps_every_kept_block_bit_for_bit(kv_bits: int | None, kernels: Any) -> None:
    spec = SPEC if kv_bits is None else SPEC.with_format(kv_bits, group_size=32)
    groups = len(spec.groups)
    storage: Any = make_slab_storage(spec, (8,) * groups, kernels)
    rng = np.random.default_rng(3)
    caches: list[Any] = [kv_cache(_rows(rng), _rows(rng), N) for _ in range(4)]
    caches[2] = arrays_cache(
        [mx.array(rng.standard_normal((1, *s.shape)).astype(np.float32)) for s in STATE.states]
    )
    tables = [[2, 0, 3]] * groups
    storage.store(caches, tables, 0)
    before = _snapshot(storage, tables)
    nbytes = storage.nbytes

    storage.resize((4,) * groups)  # ids 4..7 go; 0, 2, 3 stay
    assert storage.blocks_per_group == (8,) * groups  # nothing until the next K/V call
    after = _snapshot(storage, tables)
    assert storage.blocks_per_group == (4,) * groups
    assert storage.nbytes < nbytes
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    storage.resize((11,) * groups)
    again = _snapshot(storage, tables)
    assert all(np.array_equal(a, b) for a, b in zip(before, again, strict=True))
    kv = [a for s in storage._slabs() for a in (s if isinstance(s, tuple) else (s,)) if a.size]
    assert {a.shape[0] for a in kv} == {11 + kernels.extra_blocks}
    assert {a.shape[0] for s in storage.states for a in s} == {11}
    if kernels.extra_blocks:  # the portable gather reads NULL entries from the zero block
        assert all(not mx.any(a[-1]).item() for a in kv)
    # The added blocks take writes like any other.
    moved = [[9, 10, 3]] * groups
    storage.store(caches, moved, 0)
    assert all(np.array_equal(a, b) for a, b in zip(before, _snapshot(storage, moved), strict=True))
    # Negative control: the snapshot sees a changed bit.
    storage.write_states(tables, [LayerState(2, N, tuple(a + 1 for a in before[-2:]))])
    assert not np.array_equal(_snapshot(storage, tables)[-1], before[-1])


@pytest.mark.parametrize("kv_bits", [None, 4])
@pytest.mark.parametrize("kernels", [ExtensionKernels(), PortableKernels()], ids=lambda k: k.name)
def test_blocks_moved_by_a_shrink_keep_every_bit(kv_bits: int | None, kernels: Any) -> None:
    """A shrink that moves blocks 6 and 7 down to 1 and 0 (the pool moving blocks handles
    hold off the ids taken away): they read back bit for bit at their new ids."""
    spec = SPEC if kv_bits is None else SPEC.with_format(kv_bits, group_size=32)
    groups = len(spec.groups)
    storage: Any = make_slab_storage(spec, (8,) * groups, kernels)
    rng = np.random.default_rng(4)
    caches: list[Any] = [kv_cache(_rows(rng), _rows(rng), N) for _ in range(4)]
    caches[2] = arrays_cache(
        [mx.array(rng.standard_normal((1, *s.shape)).astype(np.float32)) for s in STATE.states]
    )
    tables = [[2, 6, 7]] * groups
    storage.store(caches, tables, 0)
    before = _snapshot(storage, tables)
    storage.resize((4,) * groups, [{6: 1, 7: 0}] * groups)
    moved = [[2, 1, 0]] * groups
    after = _snapshot(storage, moved)
    assert storage.blocks_per_group == (4,) * groups
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    kv = [a for s in storage._slabs() for a in (s if isinstance(s, tuple) else (s,)) if a.size]
    if kernels.extra_blocks:  # the zero block stays zero
        assert all(not mx.any(a[-1]).item() for a in kv)
    # Negative control: without the moves, blocks 1 and 0 hold something else.
    other: Any = make_slab_storage(spec, (8,) * groups, kernels)
    other.store(caches, tables, 0)
    other.resize((4,) * groups)
    unmoved = _snapshot(other, moved)
    assert not all(np.array_equal(a, b) for a, b in zip(before, unmoved, strict=True))


def test_a_shrunk_slab_gives_its_memory_back() -> None:
    spec = ModelCacheSpec((FULL,), "float32", 256)
    storage: Any = make_slab_storage(spec, (64,), ExtensionKernels())
    mx.synchronize()
    start = mx.get_active_memory()
    storage.resize((16,))
    storage.read_layers([[0]], [0], 0, 1)  # a K/V call carries the resize out
    mx.synchronize()
    freed = start - mx.get_active_memory()
    assert freed >= 48 * spec.bytes_per_block * 0.99, freed


@pytest.mark.parametrize("kernels", ["cpu-extension", "mlx-portable"])
def test_engine_turns_equal_fresh_runs_while_the_budget_moves(
    tiny_swa_model: LoadedModel,
    reference_generate: Reference,
    kernels: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gemma3 with a 64-token window and 256-token blocks: a budget split for 8K agents
    gives the sliding group a few blocks; five agents of a few hundred tokens need more, turn
    after turn, and take it from the global group."""
    monkeypatch.setenv(KERNELS_ENV, kernels)
    model, tokenizer, _ = tiny_swa_model
    spec = ModelCacheSpec.from_model(model)
    per_agent = sum(spec.group_bytes_per_block(g) for g in range(len(spec.groups)))
    budget = 60 * per_agent
    pool = BlockPool(spec, max_bytes=budget)
    first = pool.blocks_per_group[0]
    assert first < 2 * 5 and spec.groups[0].window == 64  # 2 blocks for each of 5 agents
    engine = BlockPoolBatchEngine(model, tokenizer, pool, spec)
    rng = random.Random(5)
    agents = [f"a{i}" for i in range(5)]
    contexts = {a: words(rng, tokenizer, 120 + 40 * i) for i, a in enumerate(agents)}
    caches: dict[str, Any] = dict.fromkeys(agents)
    for turn in range(3):
        for a in agents:
            engine.submit(a, contexts[a], caches[a], 6)
        for c in engine.drain():
            assert c.error is None, c.error
            want = fresh(reference_generate, tiny_swa_model, contexts[c.agent_id], 6)
            assert list(c.token_ids) == want
            if turn:
                assert c.cached_tokens > 0
            caches[c.agent_id] = c.blocks
            contexts[c.agent_id] = [*contexts[c.agent_id], *c.token_ids, *words(rng, tokenizer, 30)]
        assert pool.bytes_total <= budget
        pool.check_invariants()
    assert pool.num_resizes > 0
    assert pool.blocks_per_group[0] > first


def test_an_agent_whose_blocks_moved_resumes_equal_to_a_fresh_run(
    tiny_swa_model: LoadedModel, reference_generate: Reference
) -> None:
    """gemma3 (64-token window, 256-token blocks) in a fragmented pool: long agents fill the
    global group, all but the one holding its highest block are let go, and short agents
    then need sliding-window blocks: the global group's bytes go to them after the kept
    agent's blocks move down. Every turn equals a fresh mlx-lm run, the kept agent's next
    turn included, which reads its whole cache from the moved blocks."""
    model, tokenizer, _ = tiny_swa_model
    spec = ModelCacheSpec.from_model(model)
    per_agent = sum(spec.group_bytes_per_block(g) for g in range(len(spec.groups)))
    pool = BlockPool(spec, max_bytes=40 * per_agent)
    engine = BlockPoolBatchEngine(model, tokenizer, pool, spec)
    rng = random.Random(6)
    longs = []
    for i in range(40):
        prompt = words(rng, tokenizer, 1200)
        try:
            engine.submit(f"long{i}", prompt, None, 6)
        except PoolExhaustedError:
            break
        (done,) = engine.drain()
        assert done.error is None, done.error
        longs.append((prompt, done))
    assert len(longs) > 3
    top = max(b for _, d in longs for b in d.blocks.tables[1].held)
    (kept,) = [(p, d) for p, d in longs if top in d.blocks.tables[1].held]
    for _, done in longs:
        if done is not kept[1]:
            pool.release(done.blocks)
    shorts = []
    for i in range(16):
        prompt = words(rng, tokenizer, 300)
        engine.submit(f"short{i}", prompt, None, 6)
        (done,) = engine.drain()
        assert done.error is None, done.error
        assert list(done.token_ids) == fresh(reference_generate, tiny_swa_model, prompt, 6)
        shorts.append(done)
        pool.check_invariants()
    assert pool.num_blocks_moved > 0
    prompt, done = kept
    assert max(done.blocks.tables[1].held) < top
    for short in shorts:
        pool.release(short.blocks)
    nxt = [*prompt, *done.token_ids, *words(rng, tokenizer, 20)]
    engine.submit(done.agent_id, nxt, done.blocks, 6)
    (again,) = engine.drain()
    assert again.error is None, again.error
    assert again.cached_tokens == done.blocks.total_tokens
    assert list(again.token_ids) == fresh(reference_generate, tiny_swa_model, nxt, 6)
    pool.check_invariants()


def _gemma3_engine(loaded: LoadedModel) -> tuple[BlockPoolBatchEngine, int, int]:
    """An engine on a byte budget of 40 agents' blocks, its global group, and that group's
    block count."""
    model, tokenizer, _ = loaded
    spec = ModelCacheSpec.from_model(model)
    (g,) = [g for g, group in enumerate(spec.groups) if group.window is None]
    per_agent = sum(spec.group_bytes_per_block(k) for k in range(len(spec.groups)))
    pool = BlockPool(spec, max_bytes=40 * per_agent)
    return BlockPoolBatchEngine(model, tokenizer, pool, spec), g, pool.blocks_per_group[g]


def _shorts_arriving(engine: BlockPoolBatchEngine, rng: random.Random) -> dict[str, list[int]]:
    """Up to 12 agents of 300 words (6 tokens each) submitted while they fit, checking the
    pool's invariants after each: agent id -> prompt."""
    shorts = {}
    for i in range(12):
        short = words(rng, engine.tokenizer, 300)
        try:
            engine.submit(f"short{i}", short, None, 6)
        except PoolExhaustedError:
            break
        shorts[f"short{i}"] = short
        engine.pool.check_invariants()
    return shorts


def _shorts_equal_fresh_and_next_turn_resumes_whole(
    engine: BlockPoolBatchEngine,
    loaded: LoadedModel,
    reference: Reference,
    rng: random.Random,
    shorts: dict[str, list[int]],
    done: dict[str, Any],
    prompt: list[int],
) -> None:
    """The short agents' turns equal fresh mlx-lm runs (their blocks are released), and
    the "long" agent's next turn after ``prompt`` and its reply reads back its whole cache
    from wherever the moves put it, equal to a fresh run."""
    for agent, short in shorts.items():
        assert list(done[agent].token_ids) == fresh(reference, loaded, short, 6)
        engine.pool.release(done[agent].blocks)
    long = done["long"]
    nxt = [*prompt, *long.token_ids, *words(rng, engine.tokenizer, 20)]
    engine.submit("long", nxt, long.blocks, 6)
    (again,) = engine.drain()
    assert again.error is None, again.error
    assert again.cached_tokens == long.blocks.total_tokens
    assert list(again.token_ids) == fresh(reference, loaded, nxt, 6)
    engine.pool.check_invariants()


def test_a_running_request_whose_unwritten_blocks_moved_equals_a_fresh_run(
    tiny_swa_model: LoadedModel, reference_generate: Reference
) -> None:
    """gemma3: a request in flight holds the top blocks of the global group, nothing written
    into them yet (a short prompt, a long generation). Short agents arriving meanwhile need
    sliding-window blocks: the global group's bytes go to them, the running request's blocks
    moving down under it. Its tokens, and its next turn read from the moved blocks, equal
    fresh mlx-lm runs."""
    engine, g, n = _gemma3_engine(tiny_swa_model)
    pool, spec, tokenizer = engine.pool, engine.spec, engine.tokenizer
    rng = random.Random(8)
    alloc = pool.manager.allocator(g)
    alloc.allocate(999, n - 4)  # a holder outside the manager: the request gets the top ids
    prompt, max_tokens = words(rng, tokenizer, 100), 3 * spec.block_tokens
    engine.submit("long", prompt, None, max_tokens)
    alloc.release(999)
    engine.step()  # running; its fresh blocks sit at the top of the global group
    assert engine.is_in_flight("long")
    shorts = _shorts_arriving(engine, rng)
    assert pool.num_blocks_moved > 0 and pool.blocks_per_group[g] < n - 2 and len(shorts) > 3
    done = {d.agent_id: d for d in engine.drain()}
    assert all(d.error is None for d in done.values()), [d.error for d in done.values()]
    long = done["long"]
    assert max(long.blocks.tables[g].held) < n - 4
    assert list(long.token_ids) == fresh(reference_generate, tiny_swa_model, prompt, max_tokens)
    _shorts_equal_fresh_and_next_turn_resumes_whole(
        engine, tiny_swa_model, reference_generate, rng, shorts, done, prompt
    )


def test_a_resumed_turn_in_flight_whose_read_blocks_moved_equals_a_fresh_run(
    tiny_swa_model: LoadedModel, reference_generate: Reference
) -> None:
    """gemma3: an agent's next turn is running; the blocks it resumed from (read already,
    shared with its old handle) sit at the top of the global group. Short agents arriving
    meanwhile take the group's bytes, those blocks moving under the running turn. Its
    tokens and its following turn equal fresh mlx-lm runs."""
    engine, g, n = _gemma3_engine(tiny_swa_model)
    pool, spec, tokenizer = engine.pool, engine.spec, engine.tokenizer
    rng = random.Random(9)
    alloc = pool.manager.allocator(g)
    alloc.allocate(999, n - 8)  # a holder outside the manager: the agent gets the top ids
    prompt = words(rng, tokenizer, 900)
    engine.submit("long", prompt, None, 6)
    (first,) = engine.drain()
    alloc.release(999)
    read = set(first.blocks.tables[g].held)
    assert first.error is None and min(read) >= n - 8
    nxt = [*prompt, *first.token_ids, *words(rng, tokenizer, 20)]
    engine.submit("long", nxt, first.blocks, 2 * spec.block_tokens)
    engine.step()  # its prefix is read
    assert engine.is_in_flight("long")
    shorts = _shorts_arriving(engine, rng)
    assert read - set(range(pool.blocks_per_group[g])), "none of the blocks it read moved"
    done = {d.agent_id: d for d in engine.drain()}
    assert all(d.error is None for d in done.values()), [d.error for d in done.values()]
    second = done["long"]
    assert second.cached_tokens > 0
    want = fresh(reference_generate, tiny_swa_model, nxt, 2 * spec.block_tokens)
    assert list(second.token_ids) == want
    _shorts_equal_fresh_and_next_turn_resumes_whole(
        engine, tiny_swa_model, reference_generate, rng, shorts, done, nxt
    )
