"""Quantized blocks at rest on real MLX slabs and mlx-lm: bytes, disk, eviction, sharing."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import LoadedModel, words

from kvpool import (
    BlockPool,
    BlockPoolBatchEngine,
    CacheHandle,
    CompletedGeneration,
    IncompatibleCacheError,
    InvalidBlockFormatError,
    ModelCacheSpec,
)
from kvpool.cache.storage import LayerKV
from kvpool.mlx import kernels
from kvpool.mlx.mlx_lm import load_prompt_cache_file
from kvpool.mlx.slabs import SlabStorage, make_slab_storage
from kvpool.models import RECIPES, ModelRecipe, build_model, load_model
from kvpool.persist import export_prompt_cache, load_cache, model_fingerprint, save_cache
from kvpool.store import AgentCacheStore

FP = "sha256:" + "12" * 32

# head_dim 64: group sizes 64 and 32 divide it (the tiny recipes' 16 does not).
QUANT_LLAMA: ModelRecipe = dataclasses.replace(
    RECIPES["demo"], name="quant-llama", num_hidden_layers=2
)
QUANT_SWA: ModelRecipe = dataclasses.replace(
    RECIPES["tiny-swa"], name="quant-swa", head_dim=64, sliding_window=64
)


def _load(tmp_path_factory: pytest.TempPathFactory, recipe: ModelRecipe) -> LoadedModel:
    path = build_model(recipe, tmp_path_factory.mktemp("models") / recipe.name)
    model, tokenizer = load_model(path)
    return model, tokenizer, Path(path)


@pytest.fixture(scope="module")
def llama64(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return _load(tmp_path_factory, QUANT_LLAMA)


@pytest.fixture(scope="module")
def swa64(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return _load(tmp_path_factory, QUANT_SWA)


def random_kvs(spec: ModelCacheSpec, n: int, seed: int = 0) -> list[LayerKV]:
    rng = np.random.default_rng(seed)
    dtype = {"float32": np.float32, "float16": np.float16}[spec.dtype]
    return [
        LayerKV(
            i,
            0,
            rng.standard_normal((s.n_kv_heads, n, s.k_head_dim), dtype=np.float32).astype(dtype),
            rng.standard_normal((s.n_kv_heads, n, s.v_head_dim), dtype=np.float32).astype(dtype),
        )
        for i, s in enumerate(spec.layers)
    ]


def run_turn(
    engine: BlockPoolBatchEngine,
    requests: dict[str, tuple[list[int], CacheHandle | None]],
    max_tokens: int,
) -> dict[str, CompletedGeneration]:
    for agent, (prompt, cache) in requests.items():
        engine.submit(agent, prompt, cache, max_tokens)
    done = {c.agent_id: c for c in engine.drain()}
    assert sorted(done) == sorted(requests)
    for c in done.values():
        assert c.error is None, c.error
    return done


# --------------------------------------------------------------------------- bytes


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_pool_values_are_mx_dequantize_of_mx_quantize(bits: int, dtype: str) -> None:
    spec = ModelCacheSpec.uniform(2, 2, 96, dtype=dtype, block_tokens=16).with_format(bits, 32)
    pool = BlockPool(spec, num_blocks=8)
    kvs = random_kvs(spec, 40)
    handle = pool.write_cache("a", tuple(range(40)), kvs)
    for got, put in zip(pool.read_layers(handle, [0, 1], 0, 40), kvs, strict=True):
        for out, x in ((got.keys, put.keys), (got.values, put.values)):
            want = mx.dequantize(*mx.quantize(mx.array(x), 32, bits), group_size=32, bits=bits)
            assert np.array_equal(out.view(np.uint8), np.asarray(want).view(np.uint8))
            assert not np.array_equal(out, x)  # negative control: it did quantize


def test_a_4bit_pool_really_holds_4bit_bytes() -> None:
    """A 4-bit pool of a 96 MiB budget: storage nbytes and the process's RSS after filling
    every block (in a fresh process), vs the dense bytes the same blocks would take."""
    script = r"""
import json, resource, sys
import mlx.core as mx
import numpy as np
from kvpool import BlockPool, ModelCacheSpec
from kvpool.cache.storage import LayerKV

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

bits = None if sys.argv[1] == "dense" else int(sys.argv[1])
spec = ModelCacheSpec.uniform(4, 8, 128, dtype="float16").with_format(bits)
before = rss()
pool = BlockPool(spec, max_bytes=96 << 20)
n = pool.num_blocks * spec.block_tokens
kvs = [LayerKV(i, 0, *(np.ones((8, n, 128), np.float16) for _ in "kv")) for i in range(4)]
handle = pool.write_cache("a", tuple(range(n)), kvs)
del kvs
mx.clear_cache()  # the scatters' dense temporaries, kept in MLX's buffer cache
print(json.dumps({"blocks": pool.num_blocks, "nbytes": pool.storage.nbytes,
                  "bytes_per_block": spec.bytes_per_block, "rss": rss() - before}))
"""
    out = {}
    for bits in ("dense", "4"):
        proc = subprocess.run(
            [sys.executable, "-c", script, bits], capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr
        out[bits] = json.loads(proc.stdout.strip().splitlines()[-1])
    q4, dense = out["4"], out["dense"]
    assert q4["nbytes"] == q4["blocks"] * q4["bytes_per_block"]
    assert q4["bytes_per_block"] * 256 == dense["bytes_per_block"] * 72  # 72 of 256 bytes a row
    assert q4["blocks"] >= 3.4 * dense["blocks"]
    dense_equivalent = q4["blocks"] * dense["bytes_per_block"]  # the same tokens, dense
    assert q4["rss"] >= 0.9 * q4["nbytes"]  # the slabs are resident...
    assert q4["rss"] < q4["nbytes"] + 48 * 2**20  # ...and nothing like a dense copy of them
    assert q4["rss"] < dense_equivalent / 2
    assert dense["rss"] >= 0.9 * dense["nbytes"]  # negative control: RSS does see a pool


# --------------------------------------------------------------------------- bad input


def test_bad_formats_raise_before_anything_is_allocated(tiny_model: LoadedModel) -> None:
    calls: list[object] = []

    def storage(spec: ModelCacheSpec, blocks: tuple[int, ...]) -> SlabStorage:
        calls.append(spec)
        return make_slab_storage(spec, blocks)

    with pytest.raises(InvalidBlockFormatError, match=r"head dim 16 is not a multiple .* 64"):
        BlockPool(ModelCacheSpec.from_model(tiny_model[0]).with_format(4), num_blocks=4,
                  storage=storage)  # fmt: skip
    with pytest.raises(InvalidBlockFormatError, match=r"bits must be one of \[4, 8\].*got 3"):
        ModelCacheSpec.uniform(2, 2, 64).with_format(3)
    with pytest.raises(InvalidBlockFormatError, match=r"group size must be one of .* got 48"):
        ModelCacheSpec.uniform(2, 2, 96).with_format(8, 48)
    with pytest.raises(InvalidBlockFormatError, match=r"head dim 96 is not a multiple .* 64"):
        ModelCacheSpec.uniform(2, 2, 96).with_format(8)
    assert calls == []
    BlockPool(ModelCacheSpec.uniform(2, 2, 96).with_format(8, 32), num_blocks=2, storage=storage)
    assert len(calls) == 1  # negative control: a good format does allocate


# --------------------------------------------------------------------------- disk


@pytest.mark.parametrize("bits", [8, 4])
def test_disk_round_trip_is_bit_exact_and_formats_must_match(bits: int, tmp_path: Path) -> None:
    dense_spec = ModelCacheSpec.uniform(2, 2, 64, dtype="float16", block_tokens=16)
    spec = dense_spec.with_format(bits)
    pool = BlockPool(spec, num_blocks=8)
    handle = pool.write_cache("a", tuple(range(1, 41)), random_kvs(spec, 40))
    path = tmp_path / "a.safetensors"
    size = save_cache(path, pool, handle, fingerprint=FP)

    dense = BlockPool(dense_spec, num_blocks=8)
    dense_handle = dense.write_cache("a", tuple(range(1, 41)), random_kvs(spec, 40))
    dense_size = save_cache(tmp_path / "dense.safetensors", dense, dense_handle, fingerprint=FP)
    assert dense_size > (3 if bits == 4 else 1.8) * (size - 4096)  # header aside

    again = BlockPool(spec, num_blocks=8)
    kernels.reset_scatter_stats()
    loaded = load_cache(path, again, fingerprint=FP)
    assert kernels.scatter_stats()["num_copied"] == 0
    for a, b in zip(pool.read_codes(handle, [0, 1], 0, 40),
                    again.read_codes(loaded, [0, 1], 0, 40), strict=True):  # fmt: skip
        for rows_a, rows_b in ((a.keys, b.keys), (a.values, b.values)):
            for part in ("codes", "scales", "biases"):
                assert np.array_equal(getattr(rows_a, part), getattr(rows_b, part)), part

    # Another format: refused before a block is taken, both ways (and q8 vs q4).
    other = dense_spec.with_format(4 if bits == 8 else 8)
    for target, source in ((dense, path), (BlockPool(other, num_blocks=8), path),
                           (again, tmp_path / "dense.safetensors")):  # fmt: skip
        free = target.num_free
        with pytest.raises(IncompatibleCacheError, match="block format"):
            load_cache(source, target, fingerprint=FP)
        assert target.num_free == free


def test_export_from_a_quantized_pool_is_dequantized_mlx_lm(tmp_path: Path) -> None:
    spec = ModelCacheSpec.uniform(2, 2, 64, dtype="float16", block_tokens=16).with_format(4)
    pool = BlockPool(spec, num_blocks=8)
    handle = pool.write_cache("a", tuple(range(1, 41)), random_kvs(spec, 40))
    export_prompt_cache(tmp_path / "p.safetensors", pool, handle)
    caches, _ = load_prompt_cache_file(str(tmp_path / "p.safetensors"))
    for cache, kv in zip(caches, pool.read_layers(handle, [0, 1], 0, 40), strict=True):
        assert cache.offset == 40
        assert np.array_equal(np.asarray(cache.keys[0, :, :40]), kv.keys)


# --------------------------------------------------------------------------- engine


def test_prefix_sharing_on_quantized_blocks_equals_resuming_them_from_disk(
    llama64: LoadedModel, tmp_path: Path
) -> None:
    """Agent b shares a's 4-bit prefix blocks; the same blocks saved and loaded into a fresh
    pool (codes bit for bit) resume to the same greedy tokens."""
    model, tokenizer, _ = llama64
    spec = ModelCacheSpec.from_model(model).with_format(4)
    rng = random.Random(3)
    system = words(rng, tokenizer, 520)
    tail = words(rng, tokenizer, 30)
    pool = BlockPool(spec, num_blocks=16)
    engine = BlockPoolBatchEngine(model, tokenizer, pool, spec)
    a = run_turn(engine, {"a": (system, None)}, 4)["a"]
    assert a.blocks is not None
    b = run_turn(engine, {"b": ([*system, *tail], None)}, 6)["b"]
    assert b.cached_tokens == 520  # two whole shared blocks and a read of the third
    assert pool.num_shared_blocks() >= 2
    save_cache(tmp_path / "a.safetensors", pool, a.blocks, fingerprint=FP)

    fresh_pool = BlockPool(spec, num_blocks=16)
    fresh = BlockPoolBatchEngine(model, tokenizer, fresh_pool, spec)
    loaded = load_cache(tmp_path / "a.safetensors", fresh_pool, fingerprint=FP)
    c = run_turn(fresh, {"c": ([*system, *tail], loaded)}, 6)["c"]
    assert c.cached_tokens == 520
    assert c.token_ids == b.token_ids

    dense_spec = ModelCacheSpec.from_model(model)
    dense_engine = BlockPoolBatchEngine(
        model, tokenizer, BlockPool(dense_spec, num_blocks=16), dense_spec
    )
    d = run_turn(dense_engine, {"d": ([*system, *tail], None)}, 6)["d"]
    print(f"\n4-bit shared {b.token_ids} vs dense {d.token_ids}")


def test_sliding_window_model_in_8bit_blocks_round_trips(
    swa64: LoadedModel, tmp_path: Path
) -> None:
    model, tokenizer, _ = swa64
    spec = ModelCacheSpec.from_model(model).with_format(8)
    assert len(spec.groups) == 2 and all(g.format.bits == 8 for g in spec.groups)
    pool = BlockPool(spec, num_blocks=32)
    engine = BlockPoolBatchEngine(model, tokenizer, pool, spec)
    rng = random.Random(4)
    first = run_turn(engine, {"a": (words(rng, tokenizer, 300), None)}, 5)["a"]
    assert first.blocks is not None
    save_cache(tmp_path / "a.safetensors", pool, first.blocks, fingerprint=FP)
    nxt = [*first.blocks.token_ids, *words(rng, tokenizer, 20)]
    hot = run_turn(engine, {"a": (nxt, first.blocks)}, 5)["a"]
    pool2 = BlockPool(spec, num_blocks=32)
    engine2 = BlockPoolBatchEngine(model, tokenizer, pool2, spec)
    cold = run_turn(engine2, {"a": (nxt, load_cache(tmp_path / "a.safetensors", pool2,
                                                    fingerprint=FP))}, 5)["a"]  # fmt: skip
    assert cold.cached_tokens == hot.cached_tokens == len(first.blocks.token_ids)
    assert cold.token_ids == hot.token_ids


def test_store_eviction_through_disk_keeps_quantized_turns_identical(
    llama64: LoadedModel, tmp_path: Path
) -> None:
    """6 agents x 3 turns through a 4-bit pool for 2: evicted caches come back from disk
    with the same codes, so every turn equals the run of a pool that never evicts."""
    model, tokenizer, _ = llama64
    spec = ModelCacheSpec.from_model(model, block_tokens=32).with_format(4)
    fingerprint = model_fingerprint(model)
    agents = [f"agent-{i}" for i in range(6)]

    def turns(
        num_blocks: int, directory: Path
    ) -> tuple[list[dict[str, list[int]]], AgentCacheStore]:
        pool = BlockPool(spec, num_blocks=num_blocks)
        engine = BlockPoolBatchEngine(model, tokenizer, pool, spec)
        store = AgentCacheStore(engine, directory, fingerprint=fingerprint)
        rng = random.Random(8)
        prompts = {a: words(rng, tokenizer, 100 + 9 * i) for i, a in enumerate(agents)}
        out = []
        for _ in range(3):
            done = store.run_turns(prompts, max_tokens=5)
            assert all(c.error is None for c in done.values())
            out.append({a: list(done[a].token_ids) for a in agents})
            for a in agents:
                blocks = done[a].blocks
                assert blocks is not None
                prompts[a] = [*blocks.token_ids, *words(rng, tokenizer, 15)]
        return out, store

    expected, unlimited = turns(96, tmp_path / "unlimited")
    assert unlimited.stats.num_evictions == 0
    got, store = turns(14, tmp_path / "tight")
    assert got == expected
    assert store.stats.num_evictions >= 6 and store.stats.num_cold_hits > 0
    store.pool.check_invariants()
    store.close()
    unlimited.close()
