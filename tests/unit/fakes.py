"""What the unit tests share: the small spec they run on and a deterministic prompt.

Every unit test runs the real engine, store and manager over ``kvpool.testing``'s fakes on
:data:`SPEC`: 2 layers, 2 KV heads x 8, float32, blocks of :data:`B` = 4 tokens (so short
prompts cross blocks), 1 KiB per block.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvpool import AgentCacheStore, BlockPool, BlockPoolBatchEngine, CompletedGeneration
from kvpool.cache.spec import AttentionKind, LayerSpec, ModelCacheSpec, StateSpec
from kvpool.testing import FakeBatchGenerator, FakeModel, FakeStorage, FakeTokenizer

B = 4  # tokens per block
SPEC = ModelCacheSpec.uniform(2, 2, 8, dtype="float32", block_tokens=B)
HYBRID = ModelCacheSpec(  # a global layer and two recurrent ones (conv and SSM-like states)
    (
        LayerSpec(AttentionKind.GLOBAL, 2, 8, 8),
        LayerSpec.recurrent((StateSpec((2, 8), "float32"), StateSpec((2, 4, 4), "float32"))),
        LayerSpec.recurrent((StateSpec((2, 8), "float32"), StateSpec((2, 4, 4), "float32"))),
    ),
    "float32",
    B,
)


def prompt_of(n: int, seed: int = 1) -> list[int]:
    """``n`` token ids in [1, 997], the same for the same ``seed``; seeds differ early."""
    return [1 + (seed * 7919 + i * 104729) % 997 for i in range(n)]


def fake_engine(spec: ModelCacheSpec = SPEC, num_blocks: int = 64) -> BlockPoolBatchEngine:
    """The real engine over a fresh pool of ``num_blocks`` fake blocks, a fake model,
    tokenizer and batch generator (nothing carried over from another engine)."""
    pool = BlockPool(spec, num_blocks=num_blocks, storage=FakeStorage)
    return BlockPoolBatchEngine(
        FakeModel(spec), FakeTokenizer(), pool, spec, batch_gen_factory=FakeBatchGenerator
    )


def run_one(
    store: AgentCacheStore, agent: str, prompt: Sequence[int], max_tokens: int = 3, salt: str = ""
) -> CompletedGeneration:
    """One request through ``store``, drained; it must succeed."""
    uid = store.submit(agent, list(prompt), max_tokens, cache_salt=salt)
    (done,) = store.drain()
    assert done.uid == uid and done.error is None, done.error
    return done
