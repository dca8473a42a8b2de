"""A 4-bit pool's session through a real ``redis-server`` on real mlx-lm: resumed on a
second engine exactly as on the first, with nothing prefilled again, at about 4-bit size."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
from helpers import LoadedModel, words
from redis_process import RedisProcess

from kvpool import BlockPool, BlockPoolBatchEngine, CompletedGeneration, ModelCacheSpec
from kvpool.models import RECIPES, ModelRecipe, build_model, load_model
from kvpool.persist import model_fingerprint
from kvpool.store import AgentCacheStore
from kvpool.tier.codec import block_format_id, record_bytes
from kvpool.tier.redis import RedisTier

# head_dim 64: group size 64 divides it (the tiny recipes' 16 does not).
QUANT_LLAMA: ModelRecipe = dataclasses.replace(
    RECIPES["demo"], name="quant-llama", num_hidden_layers=2
)
BLOCK = 32


@pytest.fixture(scope="module")
def llama64(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = build_model(QUANT_LLAMA, tmp_path_factory.mktemp("models") / QUANT_LLAMA.name)
    model, tokenizer = load_model(path)
    return model, tokenizer, Path(path)


def make_store(loaded: LoadedModel, url: str, bits: int | None) -> AgentCacheStore:
    model, tokenizer, _ = loaded
    spec = ModelCacheSpec.from_model(model, block_tokens=BLOCK).with_format(bits)
    pool = BlockPool(spec, num_blocks=32)
    engine = BlockPoolBatchEngine(model, tokenizer, pool, spec)
    fp = model_fingerprint(model)
    return AgentCacheStore(
        engine, RedisTier.from_url(url, spec=spec, fingerprint=fp), fingerprint=fp
    )


def run(store: AgentCacheStore, agent: str, prompt: list[int]) -> CompletedGeneration:
    store.submit(agent, prompt, 6)
    (done,) = store.drain()
    assert done.error is None, done.error
    return done


def test_a_4bit_session_resumes_from_redis_on_another_engine_at_4bit_size(
    llama64: LoadedModel, tmp_path: Path
) -> None:
    rng = random.Random(7)
    tokenizer = llama64[1]
    prompt = words(rng, tokenizer, 150)  # four full blocks and a partial one
    extra = words(rng, tokenizer, 9)
    with RedisProcess(tmp_path / "redis") as server:
        a = make_store(llama64, server.url, 4)
        first = run(a, "s", prompt)
        assert a.flush() == 1
        handle = a.get("s")
        assert handle is not None
        context = list(handle.token_ids)  # what the pool holds of the session
        a.put_back("s")
        assert len(context) > 4 * BLOCK and context[: len(prompt)] == prompt
        turn2 = [*prompt, *first.token_ids, *extra]
        q4_sent = a.stats.tier.bytes_sent

        b = make_store(llama64, server.url, 4)  # a second engine: an empty pool
        from_redis = run(b, "s", turn2)
        assert b.stats.num_cold_hits == 1 and b.stats.tier.num_blocks_corrupt == 0
        assert from_redis.cached_tokens == len(context)  # 0 tokens of the context prefilled
        from_pool = run(a, "s", turn2)  # the same turn resumed from the first pool
        assert from_pool.cached_tokens == len(context)
        assert from_redis.token_ids == from_pool.token_ids
        # the full blocks B loaded are bit for bit A's (codes, scales, biases)
        full = (len(context) // BLOCK) * BLOCK
        ha, hb = a.get("s"), b.get("s")
        assert ha is not None and hb is not None
        layers = list(range(a.pool.spec.n_layers))
        for x, y in zip(
            a.pool.read_codes(ha, layers, 0, full),
            b.pool.read_codes(hb, layers, 0, full),
            strict=True,
        ):
            for rx, ry in ((x.keys, y.keys), (x.values, y.values)):
                for name in ("codes", "scales", "biases"):
                    assert getattr(rx, name).tobytes() == getattr(ry, name).tobytes()
        a.put_back("s")
        b.put_back("s")
        spec4 = a.pool.spec
        at_rest = sum(
            record_bytes(spec4, min(BLOCK, len(context) - j)) for j in range(0, len(context), BLOCK)
        )
        assert at_rest <= q4_sent <= at_rest + 4096  # the records and one small manifest

        dense = make_store(llama64, server.url, None)  # the same tokens, dense blocks
        run(dense, "s", prompt)
        assert dense.flush() == 1
        dense_sent = dense.stats.tier.bytes_sent
        keys = [k.decode() for k in server.client().keys("kvpool:blk:*")]
        fmt4, fmt16 = block_format_id(a.pool), block_format_id(dense.pool)
        assert fmt4 != fmt16 and {k.split(":")[3] for k in keys} == {fmt4, fmt16}
        assert dense.stats.tier.num_blocks_deduplicated == 0  # no block shared across formats
        ratio = q4_sent / dense_sent
        print(
            f"bytes sent for {len(context)} tokens ({spec4.dtype}): q4 {q4_sent}, "
            f"dense {dense_sent}, {ratio:.3f}x"
        )
        assert ratio < 0.35, (q4_sent, dense_sent)
        a.close()
        b.close()
        dense.close()
