from __future__ import annotations

import pytest

from kvpool import AttentionKind, InvalidRequestError, LayerSpec, ModelCacheSpec


def test_uniform_spec_bytes_per_block() -> None:
    spec = ModelCacheSpec.uniform(48, 8, 128, dtype="float16")
    # 48 layers x (K + V) x 8 heads x 256 tokens x 128 dims x 2 bytes
    assert spec.bytes_per_block == 48 * 2 * 8 * 256 * 128 * 2
    assert spec.n_layers == 48
    assert spec.max_window is None
    assert spec.blocks_for(0) == 0
    assert spec.blocks_for(1) == 1
    assert spec.blocks_for(256) == 1
    assert spec.blocks_for(257) == 2


def test_groups_by_kind_and_window() -> None:
    g = LayerSpec(AttentionKind.GLOBAL, 2, 16, 16)
    s = LayerSpec(AttentionKind.SLIDING, 2, 16, 16, window=64)
    spec = ModelCacheSpec((s, s, g, s), "float32", 16)
    assert [(x.kind, x.window, x.layers) for x in spec.groups] == [
        (AttentionKind.SLIDING, 64, (0, 1, 3)),
        (AttentionKind.GLOBAL, None, (2,)),
    ]
    assert spec.max_window == 64


def test_k_and_v_head_dims_may_differ() -> None:
    layer = LayerSpec(AttentionKind.GLOBAL, 4, 192, 128)
    spec = ModelCacheSpec((layer,), "bfloat16", 256)
    assert spec.bytes_per_block == 4 * (192 + 128) * 256 * 2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": AttentionKind.GLOBAL, "n_kv_heads": 0, "k_head_dim": 8, "v_head_dim": 8},
        {"kind": AttentionKind.SLIDING, "n_kv_heads": 1, "k_head_dim": 8, "v_head_dim": 8},
        {
            "kind": AttentionKind.GLOBAL,
            "n_kv_heads": 1,
            "k_head_dim": 8,
            "v_head_dim": 8,
            "window": 4,
        },
        {
            "kind": AttentionKind.SLIDING,
            "n_kv_heads": 1,
            "k_head_dim": 8,
            "v_head_dim": 8,
            "window": 0,
        },
    ],
)
def test_bad_layer_specs_raise(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidRequestError):
        LayerSpec(**kwargs)  # type: ignore[arg-type]


def test_bad_specs_raise() -> None:
    with pytest.raises(InvalidRequestError, match="at least one layer"):
        ModelCacheSpec(())
    with pytest.raises(InvalidRequestError, match="dtype"):
        ModelCacheSpec.uniform(1, 1, 8, dtype="int8")
    with pytest.raises(InvalidRequestError, match="block_tokens"):
        ModelCacheSpec.uniform(1, 1, 8, block_tokens=0)
