"""Plain mlx-lm references for the integration tests: what kvpool must reproduce."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


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
