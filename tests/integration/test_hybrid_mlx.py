"""Recurrent-state hybrids (#23) on real mlx-lm: every resumed turn equals a fresh, uncached
mlx-lm run, on the tiny configurations of mlx-lm's own test suite and five built from
mlx-lm modules' ``ModelArgs`` (:mod:`hybrid_configs`)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from helpers import LoadedModel, Reference
from hybrid_configs import HYBRID_CONFIGS, build_hybrid

from kvpool import AttentionKind, BlockPool, BlockPoolBatchEngine, ModelCacheSpec
from kvpool.errors import PoolExhaustedError
from kvpool.persist import (
    cache_path,
    export_prompt_cache,
    import_prompt_cache,
    load_cache,
    model_fingerprint,
    read_cache_info,
    save_cache,
)
from kvpool.store import AgentCacheStore

BLOCK = 16  # small blocks: every turn crosses several of them
MAX_TOKENS = 8

# mlx-lm 0.32.2's own BatchGenerator gives a left-padded row other tokens than the same
# prompt alone on these (checked below): their agents take turns one at a time.
UNBATCHABLE = {"nemotron_h", "mamba", "jamba", "bailing_moe_linear", "olmo_hybrid"}


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    return {}


def _model(models: dict[str, Any], name: str) -> Any:
    if name not in models:
        models[name] = build_hybrid(name)
    return models[name]


def _engine(
    model: Any, tokenizer: Any, num_blocks: int = 64, snapshots: int | None = None
) -> tuple[Any, BlockPool]:
    spec = ModelCacheSpec.from_model(model, block_tokens=BLOCK)
    pool = BlockPool(spec, num_blocks=num_blocks)
    engine = BlockPoolBatchEngine(model, tokenizer, pool, spec, state_snapshot_blocks=snapshots)
    return engine, pool


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 250) for _ in range(n)]


def _fresh(reference: Reference, model: Any, tokenizer: Any, prompt: list[int]) -> list[int]:
    (out,) = reference(model, [prompt], MAX_TOKENS, stop_tokens=sorted(tokenizer.eos_token_ids))
    return out


def check_resumed_turns(
    model: Any,
    tokenizer: Any,
    reference: Reference,
    lengths: dict[str, int],
    *,
    batched: bool,
) -> set[AttentionKind]:
    """Agents (``lengths``: first prompt's length each) x 3 turns on a fresh pool, all of a
    turn's agents submitted before one drain if ``batched``, else one at a time: every turn
    equals a fresh mlx-lm run, from turn 2 on the whole previous sequence comes from the
    pool, invariants hold and nothing is left in use. Returns the pool's group kinds."""
    engine, pool = _engine(model, tokenizer)
    rng = random.Random(1)
    contexts = {agent: _ids(rng, n) for agent, n in lengths.items()}
    caches: dict[str, Any] = dict.fromkeys(contexts)
    for turn in range(3):
        done = {}
        for agent in contexts:
            engine.submit(agent, contexts[agent], caches[agent], MAX_TOKENS)
            if not batched:
                done.update({c.agent_id: c for c in engine.drain()})
        if batched:
            done = {c.agent_id: c for c in engine.drain()}
        assert sorted(done) == sorted(contexts)
        for agent, c in done.items():
            assert c.error is None, c.error
            expected = _fresh(reference, model, tokenizer, contexts[agent])
            assert list(c.token_ids) == expected, f"turn {turn} agent {agent}"
            previous = caches[agent]
            assert c.cached_tokens == (previous.total_tokens if previous is not None else 0)
            if turn > 0:
                assert c.cached_tokens > 0
            caches[agent] = c.blocks
            contexts[agent] = [*contexts[agent], *c.token_ids, *_ids(rng, 1 + 6 * turn)]
        pool.check_invariants()
    for handle in caches.values():
        pool.release(handle)
    assert pool.usage().num_used == 0
    pool.check_invariants()
    return {g.kind for g in pool.spec.groups}


@pytest.mark.parametrize("name", sorted(HYBRID_CONFIGS))
def test_resumed_turns_equal_fresh_runs(
    name: str, models: dict[str, Any], tiny_model: LoadedModel, reference_generate: Reference
) -> None:
    """2 agents (1 for the 24-layer mamba) x 3 turns, batched where mlx-lm batches the
    architecture exactly; from turn 2 on the whole previous sequence comes from the pool."""
    model, tokenizer = _model(models, name), tiny_model[1]
    kinds = check_resumed_turns(
        model,
        tokenizer,
        reference_generate,
        {"a": 40} if name == "mamba" else {"a": 40, "b": 23},
        batched=name not in UNBATCHABLE,
    )
    assert AttentionKind.RECURRENT in kinds


def test_negative_control_a_garbled_state_changes_the_output(
    models: dict[str, Any], tiny_model: LoadedModel, reference_generate: Reference
) -> None:
    """The equality test can fail: noise in the stored end state breaks the resumed turn.

    On mamba2 (every layer recurrent) with one new token: these random-weight states forget
    within a few tokens (on qwen3_next even noise x10 in every state left the greedy tokens
    of a 9-token turn as they were)."""
    model, tokenizer = _model(models, "mamba2"), tiny_model[1]
    engine, pool = _engine(model, tokenizer)
    rng = random.Random(2)
    context = _ids(rng, 40)
    engine.submit("a", context, max_tokens=MAX_TOKENS)
    (first,) = engine.drain()
    g = next(g for g, grp in enumerate(pool.spec.groups) if grp.kind is AttentionKind.RECURRENT)
    block = first.blocks.tables[g].block_ids[-1]
    storage: Any = pool.storage
    for layer in pool.spec.groups[g].layers:
        for slab in storage.states[layer]:
            noise = 10 * mx.random.normal((1, *slab.shape[1:]), key=mx.random.key(0))
            slab[block : block + 1] = noise.astype(slab.dtype)
    nxt = [*context, *first.token_ids, *_ids(rng, 1)]
    engine.submit("a", nxt, first.blocks, MAX_TOKENS)
    (second,) = engine.drain()
    assert second.cached_tokens == first.blocks.total_tokens
    assert list(second.token_ids) != _fresh(reference_generate, model, tokenizer, nxt)


@pytest.mark.parametrize("name", sorted(UNBATCHABLE - {"mamba"}))
def test_mlx_lm_itself_batches_these_inexactly(name: str, models: dict[str, Any]) -> None:
    """Why UNBATCHABLE agents go one at a time: mlx-lm's own BatchGenerator gives a
    left-padded row other tokens than the same prompt alone (when this fails, mlx-lm was
    fixed: batch them). mamba (24 layers of 768, 40 s here) did the same when checked by hand."""
    assert batches_inexactly(_model(models, name))


def batches_inexactly(model: Any) -> bool:
    """Whether mlx-lm's own BatchGenerator gives the left-padded (shorter) row of a batch of
    two other greedy tokens than that prompt alone."""
    from helpers import reference_generate

    rng = random.Random(1)
    a, b = _ids(rng, 40), _ids(rng, 23)
    batched = reference_generate(model, [a, b], MAX_TOKENS)
    return batched[1] != reference_generate(model, [b], MAX_TOKENS)[0]


@pytest.mark.parametrize("name", ["qwen3_next", "lfm2"])
def test_shared_system_prompt_prefills_once_and_matches(
    name: str, models: dict[str, Any], tiny_model: LoadedModel, reference_generate: Reference
) -> None:
    """Agents arriving together on one system prompt: the leader publishes the prefix's
    blocks and its recurrent state at the block boundary (a snapshot taken at the segment
    end mlx-lm's prefill stops at); the followers start from it, token-equal."""
    model, tokenizer = _model(models, name), tiny_model[1]
    engine, pool = _engine(model, tokenizer)
    rng = random.Random(3)
    system = _ids(rng, 45)  # shared: 2 whole blocks of 16
    prompts = {agent: [*system, *_ids(rng, 6 + i)] for i, agent in enumerate("abc")}
    for agent, prompt in prompts.items():
        engine.submit(agent, prompt, max_tokens=MAX_TOKENS)
    done = {c.agent_id: c for c in engine.drain()}
    for agent, c in done.items():
        assert c.error is None, c.error
        assert list(c.token_ids) == _fresh(reference_generate, model, tokenizer, prompts[agent])
    assert sorted(c.cached_tokens for c in done.values()) == [0, 32, 32]
    pool.check_invariants()


def test_fork_resumes_from_another_agents_end_state(
    models: dict[str, Any], tiny_model: LoadedModel, reference_generate: Reference
) -> None:
    """Agent b starts from agent a's cache (a fork): a's end state and KV are reused, a keeps
    its own, both continue token-equal."""
    model, tokenizer = _model(models, "qwen3_5"), tiny_model[1]
    engine, pool = _engine(model, tokenizer)
    rng = random.Random(4)
    context = _ids(rng, 37)
    engine.submit("a", context, max_tokens=MAX_TOKENS)
    (a,) = engine.drain()
    base = [*context, *a.token_ids]
    forks = {"a": [*base, *_ids(rng, 5)], "b": [*base, *_ids(rng, 7)]}
    engine.submit("b", forks["b"], a.blocks, MAX_TOKENS)
    (b,) = engine.drain()
    assert pool.is_live(a.blocks)
    engine.submit("a", forks["a"], a.blocks, MAX_TOKENS)
    (a2,) = engine.drain()
    for c in (b, a2):
        assert c.cached_tokens == a.blocks.total_tokens
        assert list(c.token_ids) == _fresh(reference_generate, model, tokenizer, forks[c.agent_id])
    pool.check_invariants()


def test_a_request_that_does_not_fit_leaves_nothing_behind(
    models: dict[str, Any], tiny_model: LoadedModel
) -> None:
    model, tokenizer = _model(models, "qwen3_next"), tiny_model[1]
    engine, pool = _engine(model, tokenizer, num_blocks=2)
    rng = random.Random(5)
    with pytest.raises(PoolExhaustedError):
        engine.submit("a", _ids(rng, 60), max_tokens=MAX_TOKENS)
    assert pool.usage().num_used == 0
    pool.check_invariants()


@pytest.mark.parametrize(("every", "reused"), [(None, 0), (1, 32), (2, 32), (3, 0)])
def test_state_snapshots_serve_a_later_agent(
    every: int | None,
    reused: int,
    models: dict[str, Any],
    tiny_model: LoadedModel,
    reference_generate: Reference,
) -> None:
    """Agent a prefills 45 tokens with a snapshot every ``every`` blocks of 16; agent b comes
    later with a's first 40: it resumes at the last snapshot below 40 (none at 48 for
    every 3rd block), token-equal to a fresh run."""
    model, tokenizer = _model(models, "qwen3_next"), tiny_model[1]
    engine, pool = _engine(model, tokenizer, snapshots=every)
    rng = random.Random(6)
    a = _ids(rng, 45)
    engine.submit("a", a, max_tokens=MAX_TOKENS)
    (done_a,) = engine.drain()
    assert list(done_a.token_ids) == _fresh(reference_generate, model, tokenizer, a)
    b = [*a[:40], *_ids(rng, 6)]
    engine.submit("b", b, max_tokens=MAX_TOKENS)
    (done_b,) = engine.drain()
    assert done_b.cached_tokens == reused
    assert list(done_b.token_ids) == _fresh(reference_generate, model, tokenizer, b)
    pool.check_invariants()


@pytest.mark.parametrize("name", ["qwen3_next", "lfm2"])
@pytest.mark.parametrize(("every", "reused"), [(1, 32), (None, 0)])
def test_a_file_carries_state_snapshots_to_a_fresh_pool(
    name: str,
    every: int | None,
    reused: int,
    tmp_path: Path,
    models: dict[str, Any],
    tiny_model: LoadedModel,
    reference_generate: Reference,
) -> None:
    """Format version 4: agent a (45 tokens, a snapshot every ``every`` blocks of 16) is
    saved, its file loaded into a fresh pool; b, with a's first 40 tokens, resumes at the
    snapshot after 32 and c, with a's first 44 (its prompt's end), at 44, each token-equal
    to a fresh mlx-lm run. Without boundary snapshots (control) b reuses nothing."""
    model, tokenizer = _model(models, name), tiny_model[1]
    engine, pool = _engine(model, tokenizer, snapshots=every)
    rng = random.Random(8)
    a = _ids(rng, 45)
    engine.submit("a", a, max_tokens=MAX_TOKENS)
    (done_a,) = engine.drain()
    path, fp = tmp_path / "a.kvcache.safetensors", model_fingerprint(model)
    save_cache(path, pool, done_a.blocks, fingerprint=fp)
    info = read_cache_info(path)
    assert info.format_version == 4
    assert info.snapshot_lengths == ((16, 32, 44) if every else (44,))
    other, other_pool = _engine(model, tokenizer)
    load_cache(path, other_pool, fingerprint=fp)
    for agent, prompt, cached in (
        ("b", [*a[:40], *_ids(rng, 6)], reused),
        ("c", [*a[:44], *_ids(rng, 3)], 44),
    ):
        other.submit(agent, prompt, max_tokens=MAX_TOKENS)
        (done,) = other.drain()
        assert done.cached_tokens == cached
        assert list(done.token_ids) == _fresh(reference_generate, model, tokenizer, prompt)
    other_pool.check_invariants()


@pytest.mark.parametrize("name", ["qwen3_next", "mamba2", "granitemoehybrid"])
def test_store_evicts_to_disk_and_resumes_from_the_file(
    name: str,
    tmp_path: Path,
    models: dict[str, Any],
    tiny_model: LoadedModel,
    reference_generate: Reference,
) -> None:
    """The store writes a hybrid agent's cache (KV blocks, end states and the prompt-end
    snapshot, format version 4: through save_cache) to disk, frees its blocks, reads it back
    on the next turn: token-equal, every prompt token but the new ones reused."""
    model, tokenizer = _model(models, name), tiny_model[1]
    engine, pool = _engine(model, tokenizer)
    store = AgentCacheStore(engine, tmp_path, fingerprint=model_fingerprint(model))
    rng = random.Random(7)
    context = _ids(rng, 37)
    store.submit("a", context, max_tokens=MAX_TOKENS)
    (first,) = store.drain()
    assert store.evict("a")
    assert pool.usage().num_used == 0
    info = read_cache_info(cache_path(tmp_path, "a"))
    assert info.format_version == 4 and info.snapshot_lengths == (36,)
    nxt = [*context, *first.token_ids, *_ids(rng, 1)]
    store.submit("a", nxt, max_tokens=MAX_TOKENS)
    (second,) = store.drain()
    assert second.error is None, second.error
    assert second.cached_tokens == info.num_tokens
    assert list(second.token_ids) == _fresh(reference_generate, model, tokenizer, nxt)
    store.close()
    pool.check_invariants()


def test_a_reloaded_state_is_bit_exact(
    tmp_path: Path, models: dict[str, Any], tiny_model: LoadedModel
) -> None:
    model, tokenizer = _model(models, "qwen3_next"), tiny_model[1]
    engine, pool = _engine(model, tokenizer)
    engine.submit("a", _ids(random.Random(8), 30), max_tokens=MAX_TOKENS)
    (done,) = engine.drain()
    layers = [i for i, layer in enumerate(pool.spec.layers) if layer.states]
    before = pool.read_states(done.blocks, layers)
    save_cache(tmp_path / "a.kvcache.safetensors", pool, done.blocks, fingerprint="fp")
    pool.release(done.blocks)
    loaded = load_cache(tmp_path / "a.kvcache.safetensors", pool, fingerprint="fp")
    after = pool.read_states(loaded, layers)
    for a, b in zip(before, after, strict=True):
        assert a.num_tokens == b.num_tokens == loaded.total_tokens
        for x, y in zip(a.arrays, b.arrays, strict=True):
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
            assert x.any()


def test_prompt_cache_export_runs_in_mlx_lm_and_imports_back(
    tmp_path: Path, models: dict[str, Any], tiny_model: LoadedModel, reference_generate: Reference
) -> None:
    """mlx-lm's own prompt-cache file of a hybrid agent (KVCache + ArraysCache layers): mlx-lm
    resumes from it token-equal, and it imports back into a pool that resumes equally."""
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.models.cache import ArraysCache, load_prompt_cache

    model, tokenizer = _model(models, "qwen3_5"), tiny_model[1]
    engine, pool = _engine(model, tokenizer)
    rng = random.Random(9)
    context = _ids(rng, 33)
    engine.submit("a", context, max_tokens=MAX_TOKENS)
    (done,) = engine.drain()
    path = tmp_path / "a.safetensors"
    export_prompt_cache(path, pool, done.blocks)
    nxt = [*context, *done.token_ids, *_ids(rng, 1)]
    expected = _fresh(reference_generate, model, tokenizer, nxt)
    caches = load_prompt_cache(str(path))
    assert sum(type(c) is ArraysCache for c in caches) == 3
    held = list(done.blocks.token_ids)
    gen = BatchGenerator(model, stop_tokens=[[t] for t in sorted(tokenizer.eos_token_ids)])
    gen.insert([nxt[len(held) :]], [MAX_TOKENS], caches=[caches], all_tokens=[list(held)])
    got: list[int] = []
    finished = False
    while not finished:
        for r in gen.next()[1]:
            got.append(int(r.token))
            finished = finished or r.finish_reason is not None
    gen.close()
    assert got == expected
    pool.release(done.blocks)
    handle = import_prompt_cache(path, pool)
    engine.submit("a", nxt, handle, MAX_TOKENS)
    (second,) = engine.drain()
    assert second.cached_tokens == len(held)
    assert list(second.token_ids) == expected
    pool.check_invariants()


def test_a_quantized_pool_keeps_states_dense(
    tmp_path: Path, models: dict[str, Any], tiny_model: LoadedModel
) -> None:
    """``--kv-bits 8`` quantizes the attention blocks only: the states stay float32 (bit for
    bit through a file too), and turns resume from the end state."""
    model, tokenizer = _model(models, "qwen3_next"), tiny_model[1]
    spec = ModelCacheSpec.from_model(model, block_tokens=BLOCK).with_format(8)
    pool = BlockPool(spec, num_blocks=64)
    engine = BlockPoolBatchEngine(model, tokenizer, pool, spec)
    storage: Any = pool.storage
    layers = [i for i, layer in enumerate(spec.layers) if layer.states]
    assert all(slab.dtype == mx.float32 for i in layers for slab in storage.states[i])
    rng = random.Random(10)
    context = _ids(rng, 35)
    engine.submit("a", context, max_tokens=MAX_TOKENS)
    (first,) = engine.drain()
    nxt = [*context, *first.token_ids, *_ids(rng, 3)]
    before = pool.read_states(first.blocks, layers)
    save_cache(tmp_path / "a.kvcache.safetensors", pool, first.blocks, fingerprint="fp")
    pool.release(first.blocks)
    loaded = load_cache(tmp_path / "a.kvcache.safetensors", pool, fingerprint="fp")
    for a, b in zip(before, pool.read_states(loaded, layers), strict=True):
        assert all(x.tobytes() == y.tobytes() for x, y in zip(a.arrays, b.arrays, strict=True))
    engine.submit("a", nxt, loaded, MAX_TOKENS)
    (second,) = engine.drain()
    assert second.error is None and second.cached_tokens == loaded.total_tokens
    pool.check_invariants()


@pytest.mark.parametrize("name", ["qwen3_next", "lfm2"])
def test_a_redis_round_trip_resumes_on_another_engine(
    name: str,
    tmp_path: Path,
    models: dict[str, Any],
    tiny_model: LoadedModel,
    reference_generate: Reference,
) -> None:
    """Store A writes a hybrid session to a real redis-server (K/V blocks, the end-state
    record and the prompt-end snapshot's); store B, another pool, resumes from it
    token-equal with nothing prefilled again. Store C gets the session's next turn with the
    reply re-templated (other tokens than were generated): the prompt-end snapshot comes
    with the session and C prefills only from the prompt's last token on."""
    from redis_process import RedisProcess

    from kvpool.tier.redis import RedisTier

    model, tokenizer = _model(models, name), tiny_model[1]
    fingerprint = model_fingerprint(model)
    rng = random.Random(11)
    context = _ids(rng, 37)
    with RedisProcess(tmp_path / "redis") as server:

        def store() -> AgentCacheStore:
            engine, pool = _engine(model, tokenizer)
            tier = RedisTier.from_url(server.url, spec=pool.spec, fingerprint=fingerprint)
            return AgentCacheStore(engine, tier, fingerprint=fingerprint)

        a = store()
        a.submit("s", context, max_tokens=MAX_TOKENS)
        (first,) = a.drain()
        assert a.flush() == 1
        assert len(server.client().keys("kvpool:st:*")) == 2  # the end and the prompt's end
        retemplated = [*context, *_ids(random.Random(99), 4), *_ids(rng, 3)]
        assert retemplated[len(context)] != first.token_ids[0]
        client = server.client()
        (manifest_key,) = client.keys("kvpool:ses:*")
        manifest = client.get(manifest_key)  # A's: C's close writes C's session over it
        c = store()
        c.submit("s", retemplated, max_tokens=MAX_TOKENS)
        (turn,) = c.drain()
        assert turn.error is None, turn.error
        assert turn.cached_tokens == len(context) - 1 and c.stats.tier.num_snapshots_read == 1
        assert list(turn.token_ids) == _fresh(reference_generate, model, tokenizer, retemplated)
        c.close()
        client.set(manifest_key, manifest)
        nxt = [*context, *first.token_ids, *_ids(rng, 1)]
        b = store()
        b.submit("s", nxt, max_tokens=MAX_TOKENS)
        (second,) = b.drain()
        assert second.error is None, second.error
        assert second.cached_tokens == len(context) + len(first.token_ids)  # all it held
        assert list(second.token_ids) == _fresh(reference_generate, model, tokenizer, nxt)
        a.close()
        b.close()


def _snapshot_bytes(store: AgentCacheStore, done: Any, length: int) -> list[bytes]:
    """The bytes of the state snapshot ``store``'s pool holds after ``length`` tokens of
    ``done``'s cache (every recurrent layer's arrays, in order)."""
    layers = [i for i, layer in enumerate(store.pool.spec.layers) if layer.states]
    states = store.pool.read_snapshot(done.blocks, length, layers)
    assert states is not None, f"no snapshot after {length} tokens"
    return [x.tobytes() for st in states for x in st.arrays]


@pytest.mark.parametrize("name", ["qwen3_next", "lfm2"])
def test_a_redis_prefix_import_resumes_another_agent_at_a_state_snapshot(
    name: str,
    tmp_path: Path,
    models: dict[str, Any],
    tiny_model: LoadedModel,
    reference_generate: Reference,
) -> None:
    """Engine A (a state snapshot every block of 16) saves session a (45 prompt tokens) to a
    real redis-server: its K/V blocks, the snapshots at 16, 32 and 44 (its prompt's end) and
    its end state. Engine
    B, an empty pool on the same Redis, gets agent n with a's first 40 tokens: it imports 2
    blocks and the state at 32 and prefills only the 14 tokens after it, token-equal to a
    fresh mlx-lm run. Controls: the state at 32 corrupt, nothing is imported (the record is
    deleted); missing, the one at 16 is; a bad K/V block after the state passed leaves the
    pool empty."""
    from redis_process import RedisProcess

    from kvpool.tier.redis import RedisTier

    model, tokenizer = _model(models, name), tiny_model[1]
    fingerprint = model_fingerprint(model)
    rng = random.Random(13)
    a = _ids(rng, 45)
    new = [*a[:40], *_ids(rng, 6)]
    expected = _fresh(reference_generate, model, tokenizer, new)
    with RedisProcess(tmp_path / "redis") as server:
        client = server.client()

        def store(snapshots: int | None) -> tuple[AgentCacheStore, RedisTier]:
            engine, pool = _engine(model, tokenizer, snapshots=snapshots)
            tier = RedisTier.from_url(server.url, spec=pool.spec, fingerprint=fingerprint)
            return AgentCacheStore(engine, tier, fingerprint=fingerprint), tier

        sa, tier = store(1)
        sa.submit("a", a, max_tokens=MAX_TOKENS)
        (done,) = sa.drain()
        assert sa.flush() == 1
        chain = tier.keys.chain([*a, *done.token_ids], "")
        at16, at32, end = (tier.keys.state_key("", chain[j]) for j in (0, 1, -1))
        at44 = tier.keys.state_key("", tier.keys.chain(a[:44], "")[-1])
        assert {k.decode() for k in client.keys("kvpool:st:*")} == {at16, at32, at44, end}
        good = client.get(at32)
        for case, reused in (("ok", 32), ("corrupt state", 0), ("missing state", 16)):
            client.set(at32, good)
            if case == "corrupt state":
                client.set(at32, good[:-1] + bytes([good[-1] ^ 1]))
            elif case == "missing state":
                client.delete(at32)
            b, _ = store(None)
            agent = "n-" + case.replace(" ", "-")  # one per case: no session of n to load
            b.submit(agent, new, max_tokens=MAX_TOKENS)
            (got,) = b.drain()
            assert got.error is None, got.error
            assert got.cached_tokens == b.stats.prefix_tokens_imported == reused, case
            assert list(got.token_ids) == expected, case
            if case == "corrupt state":
                assert client.get(at32) is None and b.stats.tier.num_blocks_corrupt == 1
            if case == "ok":  # B's snapshot at 32 is A's, bit for bit
                assert _snapshot_bytes(b, got, 32) == _snapshot_bytes(sa, done, 32)
            b.pool.check_invariants()
            # not closed: a close saves its agent, whose prompt end (the same prompt) the
            # next case would import
        client.set(at32, good)
        block1 = tier.keys.block_key("", chain[1])
        bad = client.get(block1)
        client.set(block1, bad[:-1] + bytes([bad[-1] ^ 1]))
        b, _ = store(None)
        assert b.cold.import_prefix(b.pool, new, "", 0) == 0
        usage = b.pool.usage()
        assert usage.num_used == 0 and usage.num_cached == 0
        b.pool.check_invariants()
        sa.close()


@pytest.mark.parametrize("name", ["qwen3_next", "lfm2"])
def test_a_redis_prefix_import_resumes_another_agent_at_a_sessions_prompt_end(
    name: str,
    tmp_path: Path,
    models: dict[str, Any],
    tiny_model: LoadedModel,
    reference_generate: Reference,
) -> None:
    """Engine A saves session s (37 prompt tokens, blocks of 16) to a real redis-server with
    its prompt end (the state after 36 tokens, mid-block), the K/V rows of that block
    (32..36) and the listing of its length. Engine B, an empty pool on the same Redis, gets
    a new agent whose prompt is s's prompt and more: it imports those 36 tokens (the state
    bit-equal to A's snapshot) and prefills the rest, token-equal to a fresh mlx-lm run.
    Control: with the rows record deleted nothing is imported, and the answer is the same."""
    from redis_process import RedisProcess

    from kvpool.tier.redis import RedisTier

    model, tokenizer = _model(models, name), tiny_model[1]
    fingerprint = model_fingerprint(model)
    rng = random.Random(17)
    context = _ids(rng, 37)
    new = [*context, *_ids(rng, 5)]
    expected = _fresh(reference_generate, model, tokenizer, new)
    with RedisProcess(tmp_path / "redis") as server:
        client = server.client()

        def store() -> tuple[AgentCacheStore, RedisTier]:
            engine, pool = _engine(model, tokenizer)
            tier = RedisTier.from_url(server.url, spec=pool.spec, fingerprint=fingerprint)
            return AgentCacheStore(engine, tier, fingerprint=fingerprint), tier

        a, tier = store()
        a.submit("s", context, max_tokens=MAX_TOKENS)
        (done,) = a.drain()
        assert a.flush() == 1
        chain36 = tier.keys.chain(context[:36], "")
        rows = tier.keys.block_key("", chain36[-1])
        assert client.smembers(tier.keys.prompt_ends_key("", chain36[1])) == {b"4"}
        for case, reused in (("ok", 36), ("rows deleted", 0)):
            if case == "rows deleted":
                client.delete(rows)
            b, _ = store()
            agent = "t-" + case.replace(" ", "-")
            b.submit(agent, new, max_tokens=MAX_TOKENS)
            (got,) = b.drain()
            assert got.error is None, got.error
            assert got.cached_tokens == b.stats.prefix_tokens_imported == reused, case
            assert list(got.token_ids) == expected, case
            if case == "ok":
                assert _snapshot_bytes(b, got, 36) == _snapshot_bytes(a, done, 36)
            b.pool.check_invariants()
            # not closed: a close saves its agent, whose prompt end (the same prompt) the
            # next case would import
        a.close()


def test_bench_hybrid_quick_record() -> None:
    """``kvpool bench hybrid --quick``: resumed tokens (from the pool and from mlx-lm's
    LRUPromptCache holding the same cache) equal re-prefilled ones; snapshots every block
    save prefill and cost state memory; states are a fraction of the K/V an all-attention
    model would hold."""
    from kvpool.benchmarks import hybrid

    r = hybrid.run(True)
    assert r.resume.tokens_equal and r.resume.lru_tokens_equal
    assert r.resume.speedup is not None and r.resume.speedup > 1
    assert r.resume.lru.n == r.resume.pool.n == r.resume.reprefill.n == 1
    assert r.resume.pool_vs_lru is not None
    rows = {s.snapshot_blocks: s for s in r.shared}
    assert rows[1].prefilled_tokens < rows[None].prefilled_tokens == rows[None].prompt_tokens
    assert rows[1].snapshots_cached > rows[None].snapshots_cached  # prompt ends: in both
    assert rows[1].state_bytes > rows[None].state_bytes
    b = r.bytes_per_agent
    assert b.saved_x is not None and b.saved_x > 1 and b.state_bytes > 0
    assert r.targets[0].met is None  # judged at 2K only


def _model_dir(tmp_path: Path, name: str) -> Path:
    """An mlx-lm model directory of the tiny ``name`` hybrid, with the tiny recipe's
    tokenizer and chat template (what ``kvpool serve --model DIR`` loads)."""
    import json
    import shutil

    from mlx.utils import tree_flatten

    from kvpool.models import build_model

    tiny = build_model("tiny", tmp_path / "tiny")
    out = tmp_path / name
    out.mkdir()
    model = build_hybrid(name)
    eos = json.loads((tiny / "config.json").read_text())["eos_token_id"]
    config = {**HYBRID_CONFIGS[name], "vocab_size": 512, "eos_token_id": eos}
    (out / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / file, out / file)
    return out


SYSTEM = {"role": "system", "content": "You plan. the agent cache block pool reads"}


def _chat(
    server: Any, model_dir: Path, session: str | None, messages: list[dict[str, str]]
) -> Any:
    """One greedy chat turn of ``session`` (None: a request without one) through the
    official openai client."""
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    return client.chat.completions.create(
        model=str(model_dir), messages=messages, max_tokens=MAX_TOKENS, temperature=0,  # type: ignore[arg-type]
        extra_headers={"X-Session-ID": session} if session is not None else None,
    )  # fmt: skip


def _reply_and_ask(reply: Any, question: str) -> list[dict[str, str]]:
    """The assistant's reply as the next turn's message (re-templated) and a new question."""
    return [
        {"role": "assistant", "content": reply.choices[0].message.content or ""},
        {"role": "user", "content": question},
    ]


def test_kvpool_serve_chat_resumes_a_hybrid_session(tmp_path: Path) -> None:
    """``kvpool serve`` on a hybrid model directory (tiny qwen3_5, the tiny recipe's
    tokenizer), driven by the official openai client: the second turn of a chat session
    reuses the whole first prompt but its last token (the prompt-end state snapshot: the
    re-templated reply does not continue the cached tokens); the same turn after an edited
    first message reuses only what precedes the edit (control)."""
    from server_process import ServerProcess

    out = _model_dir(tmp_path, "qwen3_5")
    with ServerProcess(tmp_path / "cache", tmp_path / "models", "--model", str(out)) as server:

        def chat(session: str, messages: list[dict[str, str]]) -> Any:
            return _chat(server, out, session, messages)

        messages = [SYSTEM, {"role": "user", "content": "the pool grows quickly again"}]
        first = chat("s1", messages)
        messages += _reply_and_ask(first, "every turn context memory")
        second = chat("s1", messages)
        assert second.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens - 1
        edited = [SYSTEM, {"role": "user", "content": "a different question"}, *messages[2:]]
        other = chat("s2", edited)
        assert other.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens // 2


def test_a_chat_turn_on_another_kvpool_serve_resumes_at_the_prompt_end_from_redis(
    tmp_path: Path,
) -> None:
    """Three ``kvpool serve`` processes on the tiny qwen3_5 share one redis-server: turn 1
    of a chat on A, turn 2 (the reply re-templated) on B, through the official openai
    client. A's session in Redis carries its prompt-end snapshot, so B reuses the first
    prompt but its last token, as A itself would; B's answer equals A's for the same
    messages in another session. C gets the same messages without a session: it imports
    A's prompt end as a prefix and reuses as much, with the same answer."""
    from redis_process import RedisProcess, require_redis_server
    from server_process import ServerProcess, wait_until

    require_redis_server()
    out = _model_dir(tmp_path, "qwen3_5")
    with RedisProcess(tmp_path / "redis") as redis_server:
        shared = ("--model", str(out), "--cache-url", redis_server.url, "--flush-interval", "0.5")
        with (
            ServerProcess(tmp_path / "a", tmp_path / "models", *shared) as a,
            ServerProcess(tmp_path / "b", tmp_path / "models", *shared) as b,
            ServerProcess(tmp_path / "c", tmp_path / "models", *shared) as c,
        ):

            def chat(server: ServerProcess, session: str, messages: list[dict[str, str]]) -> Any:
                return _chat(server, out, session, messages)

            messages = [SYSTEM, {"role": "user", "content": "the pool grows quickly again"}]
            first = chat(a, "s1", messages)
            wait_until(
                lambda: redis_server.client().keys("kvpool:ses:*"), 60.0, "A's session in Redis"
            )
            messages += _reply_and_ask(first, "every turn context memory")
            second = chat(b, "s1", messages)
            details = second.usage.prompt_tokens_details
            assert details.cached_tokens == first.usage.prompt_tokens - 1
            fresh = chat(a, "s-ref", messages)
            assert fresh.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens
            assert second.choices[0].message.content == fresh.choices[0].message.content
            stateless = chat(c, None, messages)
            details = stateless.usage.prompt_tokens_details
            assert details.cached_tokens == first.usage.prompt_tokens - 1
            assert stateless.choices[0].message.content == fresh.choices[0].message.content


def test_kvpool_serve_state_snapshot_blocks_lets_another_session_share_a_prefix(
    tmp_path: Path,
) -> None:
    """``kvpool serve --state-snapshot-blocks 1`` on the tiny qwen3_5: session a's prompt
    (2 blocks of 256 and 40 tokens) leaves a state snapshot at each block boundary, so
    session b, which shares a's first 532 tokens, prefills only past 512. Without the flag
    nothing at a block boundary would exist and b would reuse 0 (the engine-level control:
    ``test_state_snapshots_serve_a_later_agent[None-0]``); a prompt differing from the
    first token on reuses 0 here too (control)."""
    from server_process import ServerProcess

    out = _model_dir(tmp_path, "qwen3_5")
    rng = random.Random(12)
    a = _ids(rng, 2 * 256 + 40)
    prompts = {"a": a, "b": [*a[:532], *_ids(rng, 5)], "c": [a[0] + 1, *a[1:532]]}
    args = ("--model", str(out), "--state-snapshot-blocks", "1")
    with ServerProcess(tmp_path / "cache", tmp_path / "models", *args) as server:
        cached = {}
        with server.client() as client:
            for session, prompt in prompts.items():
                r = client.post(
                    "/v1/completions",
                    json={"model": str(out), "prompt": prompt, "max_tokens": 2},
                    headers={"X-Session-ID": session},
                )
                assert r.status_code == 200, r.text
                cached[session] = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == {"a": 0, "b": 512, "c": 0}
