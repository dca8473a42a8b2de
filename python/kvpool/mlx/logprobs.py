"""The chosen token's log-probability and the top ``k`` of an MLX log-softmax row, computed
where the row lives (only ``k + 1`` values cross to the host)."""

from __future__ import annotations

import mlx.core as mx


def row_logprobs(row: mx.array, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """(``row[token]``, the ``k`` largest entries as (index, value), in no particular order)."""
    row = row.reshape(-1).astype(mx.float32)
    if not k:
        return float(row[token].item()), []  # type: ignore[arg-type]
    k = min(k, row.size)
    top = mx.argpartition(-row, kth=k - 1)[:k]
    values = mx.concatenate([row[token : token + 1], row[top]])
    mx.eval(top, values)
    ids: list[int] = top.tolist()  # type: ignore[assignment]
    chosen, *rest = values.tolist()  # type: ignore[misc]
    pairs = zip(ids, rest, strict=True)
    return float(chosen), [(int(i), float(v)) for i, v in pairs]  # type: ignore[arg-type]
