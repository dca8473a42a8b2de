"""Plain mlx-lm references for the integration tests: what kvpool must reproduce."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kvpool import BlockPool, BlockPoolBatchEngine, ModelCacheSpec


def reference_generate(
    model: Any,
    prompts: list[list[int]],
    max_tokens: int,
    *,
    stop_tokens: Sequence[int] = (),
) -> list[list[int]]:
    """Greedy tokens per prompt from a fresh mlx-lm ``BatchGenerator``, with no injected cache.

    Every prompt is inserted at once (left-padded into one batch). A sequence ends when
    mlx-lm reports a ``finish_reason``: ``"length"`` after ``max_tokens`` tokens, or
    ``"stop"`` on one of ``stop_tokens`` (which is kept, as mlx-lm emits it).
    """
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(
        model,
        max_tokens=max_tokens,
        stop_tokens=[[token] for token in stop_tokens] or None,
    )
    try:
        uids = gen.insert([list(p) for p in prompts], max_tokens=[max_tokens] * len(prompts))
        uid_to_tokens: dict[int, list[int]] = {uid: [] for uid in uids}
        running = set(uids)
        while running:
            _, generation_responses = gen.next()
            for response in generation_responses:
                uid_to_tokens[response.uid].append(int(response.token))
                if response.finish_reason is not None:
                    running.discard(response.uid)
    finally:
        gen.close()
    return [uid_to_tokens[uid] for uid in uids]


# (model, tokenizer, model directory), as the conftest fixtures return it
LoadedModel = tuple[Any, Any, Path]
Reference = Callable[..., list[list[int]]]

_WORDS = [
    "the", "agent", "cache", "block", "pool", "reads", "writes", "token", "model", "disk",
    "quickly", "again", "while", "every", "turn", "context", "grows", "memory",
]  # fmt: skip


def words(rng: random.Random, tokenizer: Any, n_tokens: int) -> list[int]:
    """Exactly ``n_tokens`` token ids of random English-ish text."""
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids.extend(tokenizer.encode(" " + " ".join(rng.choices(_WORDS, k=8)) + "."))
    return ids[:n_tokens]


def make_engine(
    loaded: LoadedModel, num_blocks: int, block_tokens: int = 256
) -> tuple[BlockPoolBatchEngine, BlockPool]:
    """An engine over a fresh MLX pool of ``num_blocks`` blocks for ``loaded``'s model."""
    model, tokenizer, _ = loaded
    spec = ModelCacheSpec.from_model(model, block_tokens=block_tokens)
    pool = BlockPool(spec, num_blocks=num_blocks)
    return BlockPoolBatchEngine(model, tokenizer, pool, spec), pool


def fresh(
    reference: Reference, loaded: LoadedModel, prompt: list[int], max_tokens: int
) -> list[int]:
    """Greedy tokens of one prompt from a fresh BatchGenerator, stopping on EOS like the engine."""
    model, tokenizer, _ = loaded
    (out,) = reference(model, [prompt], max_tokens, stop_tokens=sorted(tokenizer.eos_token_ids))
    return out


def assert_one_line_error(captured: Any, expected: str) -> None:
    """A CLI refused bad input as it should: nothing on stdout, one line on stderr."""
    assert captured.out == ""
    assert expected in captured.err
    assert captured.err.count("\n") == 1, captured.err
