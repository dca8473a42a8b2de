"""What the unit tests share: the small spec they run on and a deterministic prompt.

Every unit test runs the real engine, store and manager over ``kvpool.testing``'s fakes on
:data:`SPEC`: 2 layers, 2 KV heads x 8, float32, blocks of :data:`B` = 4 tokens (so short
prompts cross blocks), 1 KiB per block.
"""

from __future__ import annotations

from kvpool.cache.spec import ModelCacheSpec

B = 4  # tokens per block
SPEC = ModelCacheSpec.uniform(2, 2, 8, dtype="float32", block_tokens=B)


def prompt_of(n: int, seed: int = 1) -> list[int]:
    """``n`` token ids in [1, 997], the same for the same ``seed``; seeds differ early."""
    return [1 + (seed * 7919 + i * 104729) % 997 for i in range(n)]
