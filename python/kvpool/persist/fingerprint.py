"""model_fingerprint: a stable id of a model's weights (saved with every cache file)."""

from __future__ import annotations

import hashlib
from typing import Any, cast

import numpy as np

_FINGERPRINT_SAMPLES = 1024  # elements sampled from each parameter


def model_fingerprint(model: Any) -> str:
    """A stable id of a model's weights: ``"sha256:<64 hex>"``.

    sha256 over the model class, then, for every parameter in name order, its name, dtype,
    shape and the bits of ``_FINGERPRINT_SAMPLES`` elements at evenly spaced positions. Two
    random models of the same geometry differ; reading it costs a few thousand elements
    per parameter, whatever the model's size. The cache layout (block size, dtype,
    geometry) is checked separately, against the spec saved with each cache.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    flat_params = cast("list[tuple[str, mx.array]]", tree_flatten(model.parameters()))
    params = sorted(flat_params, key=lambda item: item[0])
    samples = []
    for _, p in params:
        flat = p.reshape(-1)
        n = min(flat.size, _FINGERPRINT_SAMPLES)
        if n == 0:
            samples.append(flat)
            continue
        idx = np.linspace(0, flat.size - 1, num=n).round().astype(np.int64)
        samples.append(mx.take(flat, mx.array(idx)).view(mx.uint8))
    mx.eval(samples)
    digest = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}\n".encode())
    for (name, p), sample in zip(params, samples, strict=True):
        digest.update(f"{name}|{p.dtype}|{tuple(p.shape)}\n".encode())
        digest.update(np.asarray(sample).tobytes())
    return f"sha256:{digest.hexdigest()}"
