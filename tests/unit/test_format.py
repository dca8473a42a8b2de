"""BlockFormat, quantized specs and pools on FakeStorage, and cache files v1/v2 (no MLX)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from kvpool import (
    BlockFormat,
    BlockPool,
    IncompatibleCacheError,
    InvalidBlockFormatError,
    InvalidRequestError,
)
from kvpool.cache.manager import PoolFull
from kvpool.cache.spec import AttentionKind, LayerSpec, ModelCacheSpec
from kvpool.cache.storage import LayerCodes, LayerKV, QuantizedRows
from kvpool.cache.tables import CacheHandle
from kvpool.persist import load_cache, read_cache_info, save_cache, verify_cache
from kvpool.testing import FakeStorage

FIXTURE = Path(__file__).parents[1] / "fixtures" / "v1_agent.kvcache.safetensors"
V1_FINGERPRINT = "sha256:" + "cd" * 32  # tests/fixtures/make_v1_cache.py
FP = "sha256:" + "ab" * 32


def test_formats_validate_with_the_numbers() -> None:
    with pytest.raises(InvalidBlockFormatError, match=r"bits must be one of \[4, 8\].*got 3"):
        BlockFormat("float16", 3)
    with pytest.raises(InvalidBlockFormatError, match=r"group size must be .*\[32, 64\], got 16"):
        BlockFormat("float16", 4, 16)
    with pytest.raises(InvalidBlockFormatError, match="dtype must be one of"):
        BlockFormat("int8")
    with pytest.raises(InvalidBlockFormatError, match="got True"):
        BlockFormat("float16", True)  # type: ignore[arg-type]
    assert BlockFormat.affine("bfloat16", 8).name == "q8g64-bfloat16"
    assert BlockFormat.dense("float32").name == "float32"


@pytest.mark.parametrize(
    ("fmt", "row"),
    [
        (BlockFormat("float16"), 256),
        (BlockFormat("float16", 8), 128 + 4 + 4),
        (BlockFormat("float16", 4), 64 + 4 + 4),
        (BlockFormat("float16", 4, 32), 64 + 8 + 8),
        (BlockFormat("float32"), 512),
        (BlockFormat("float32", 8), 128 + 8 + 8),
        (BlockFormat("float32", 4), 64 + 8 + 8),
    ],
)
def test_bytes_at_rest_per_row_of_128(fmt: BlockFormat, row: int) -> None:
    assert fmt.row_bytes(128) == row


def test_a_spec_carries_its_format_into_every_group_and_its_byte_counts() -> None:
    layers = (
        LayerSpec(AttentionKind.GLOBAL, 8, 128, 128),
        LayerSpec(AttentionKind.SLIDING, 8, 128, 128, window=512),
    )
    dense = ModelCacheSpec(layers, "float16")
    q4 = dense.with_format(4)
    assert q4 != dense and q4.with_format(None) == dense
    assert [g.format for g in q4.groups] == [BlockFormat("float16", 4)] * 2
    assert q4.group_bytes_per_block(0) == 8 * 2 * 72 * 256
    assert dense.bytes_per_block == 2 * 8 * 2 * 256 * 256
    assert q4.bytes_per_token * 256 == q4.bytes_per_block
    assert "q4g64-float16" in q4.describe()


def test_a_head_dim_the_group_size_does_not_divide_is_refused_before_any_pool() -> None:
    calls: list[object] = []

    def storage(spec: ModelCacheSpec, blocks: tuple[int, ...]) -> FakeStorage:
        calls.append(blocks)
        return FakeStorage(spec, blocks)

    layers = (LayerSpec(AttentionKind.GLOBAL, 2, 64, 80),)  # v head dim 80
    with pytest.raises(InvalidBlockFormatError, match=r"layer 0: v head dim 80 .* group size 64"):
        BlockPool(ModelCacheSpec(layers, "float16", 16, 8), num_blocks=4, storage=storage)
    with pytest.raises(InvalidBlockFormatError, match=r"v head dim 80 .* group size 32"):
        ModelCacheSpec(layers, "float16", 16, 4, 32)  # 80 % 32 != 0 either
    assert calls == []
    BlockPool(ModelCacheSpec((LayerSpec(AttentionKind.GLOBAL, 2, 64, 96),), "float16", 16, 4, 32),
              num_blocks=4, storage=storage)  # fmt: skip
    assert len(calls) == 1  # negative control


def test_a_budget_holds_more_quantized_blocks() -> None:
    dense = ModelCacheSpec.uniform(4, 8, 128, block_tokens=256)
    budget = 64 << 20
    counts = {
        bits: BlockPool(dense.with_format(bits), max_bytes=budget, storage=FakeStorage)
        for bits in (None, 8, 4)
    }
    assert counts[None].num_blocks == budget // dense.bytes_per_block == 16
    assert counts[8].num_blocks == budget // dense.with_format(8).bytes_per_block == 30
    assert counts[4].num_blocks == 56
    for pool in counts.values():
        assert pool.storage.nbytes <= budget
        assert pool.storage.nbytes == pool.num_blocks * pool.spec.bytes_per_block


# --------------------------------------------------------------------------- fake codes


def small_spec(bits: int | None) -> ModelCacheSpec:
    layers = (
        LayerSpec(AttentionKind.GLOBAL, 2, 64, 64),
        LayerSpec(AttentionKind.SLIDING, 1, 64, 32, window=6),
    )
    return ModelCacheSpec(layers, "float16", 4, bits, 32)


def fill(pool: BlockPool, tokens: tuple[int, ...], agent: str = "a") -> CacheHandle:
    storage = pool.storage
    assert isinstance(storage, FakeStorage)
    kvs = [LayerKV(i, 0, *storage._encode(i, tokens)) for i in range(pool.spec.n_layers)]
    return pool.write_cache(agent, tokens, kvs)


def test_fake_codes_round_trip_and_dense_pools_refuse_them() -> None:
    pool = BlockPool(small_spec(4), num_blocks=8, storage=FakeStorage)
    handle = fill(pool, tuple(range(100, 111)))
    codes = pool.read_codes(handle, [0], 0, 11)
    window = pool.read_codes(handle, [1], 8, 11)  # the sliding layer holds the last positions
    assert codes[0].keys.codes.shape == (2, 11, 64 * 4 // 32)
    assert window[0].values.scales.shape == (1, 3, 1)
    assert window[0].values.scales.dtype == np.float16
    assert codes[0].keys.codes[1, 3, 5] == 103 and codes[0].values.codes[0, 3, 0] == ~np.uint32(103)
    other = BlockPool(small_spec(4), num_blocks=8, storage=FakeStorage)
    write = other.write_from_host("a", handle.token_ids)
    assert not isinstance(write, PoolFull)
    write.write([*codes, *window])
    copy = write.commit([0, 8])
    assert other.read_layers(copy, [0], 0, 11)[0].keys.tobytes() == (
        pool.read_layers(handle, [0], 0, 11)[0].keys.tobytes()
    )
    bad = codes[0].keys.codes.copy()
    bad[0, 0, 0] += 1
    keys = codes[0].keys
    tampered = LayerCodes(0, 0, QuantizedRows(bad, keys.scales, keys.biases), codes[0].values)
    again = other.write_from_host("b", (7, *handle.token_ids[1:]))
    assert not isinstance(again, PoolFull)
    with pytest.raises(AssertionError, match="not fake codes"), again:
        again.write([tampered])  # negative control: the fake checks codes
    dense = BlockPool(small_spec(None), num_blocks=8, storage=FakeStorage)
    with pytest.raises(InvalidRequestError, match="dense"):
        dense.read_codes(fill(dense, (1, 2, 3)), [0], 0, 3)


# --------------------------------------------------------------------------- files


def header(path: Path) -> dict[str, object]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])  # type: ignore[no-any-return]


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_files_hold_codes_and_load_bit_exact(bits: int, tmp_path: Path) -> None:
    tokens = tuple(range(100, 111))
    pool = BlockPool(small_spec(bits), num_blocks=8, storage=FakeStorage)
    handle = fill(pool, tokens)
    path = tmp_path / "a.safetensors"
    size = save_cache(path, pool, handle, fingerprint=FP)
    h = header(path)
    meta = h["__metadata__"]
    assert isinstance(meta, dict) and meta["format_version"] == "2"  # no recurrent layer: v2
    assert json.loads(meta["spec"])["kv_bits"] == bits
    names = sorted(k for k in h if k != "__metadata__")
    assert "layers.0.keys.codes" in names and "layers.0.keys" not in names
    assert h["layers.0.keys.codes"] == {
        "dtype": "U32", "shape": [2, 11, 64 * bits // 32],
        "data_offsets": h["layers.0.keys.codes"]["data_offsets"],  # type: ignore[index]
    }  # fmt: skip
    info = verify_cache(path)
    assert info.spec == pool.spec and info.file_bytes == size
    again = BlockPool(small_spec(bits), num_blocks=8, storage=FakeStorage)
    loaded = load_cache(path, again, fingerprint=FP)
    assert loaded.token_ids == tokens
    a, b = pool.read_codes(handle, [0], 0, 11), again.read_codes(loaded, [0], 0, 11)
    assert a[0].keys.codes.tobytes() == b[0].keys.codes.tobytes()


def test_safetensors_reads_a_quantized_file(tmp_path: Path) -> None:
    """The reference safetensors reader (the library, numpy flavour) reads our v2 files."""
    from safetensors.numpy import load_file

    pool = BlockPool(small_spec(4), num_blocks=8, storage=FakeStorage)
    handle = fill(pool, tuple(range(100, 111)))
    save_cache(tmp_path / "a.safetensors", pool, handle, fingerprint=FP)
    arrays = load_file(str(tmp_path / "a.safetensors"))
    codes = pool.read_codes(handle, [0], 0, 11)[0]
    assert np.array_equal(arrays["layers.0.keys.codes"], codes.keys.codes)
    assert arrays["layers.0.keys.scales"].dtype == np.float16
    assert arrays["token_ids"].tolist() == list(range(100, 111))


def test_a_version_1_file_written_by_the_old_writer_still_loads(tmp_path: Path) -> None:
    path = tmp_path / FIXTURE.name
    shutil.copy(FIXTURE, path)
    info = read_cache_info(path)
    assert info.format_version == 1 and info.spec.kv_bits is None
    spec = ModelCacheSpec(
        (LayerSpec(AttentionKind.GLOBAL, 2, 4, 4), LayerSpec(AttentionKind.SLIDING, 1, 4, 4, 6)),
        "float16",
        4,
    )
    pool = BlockPool(spec, num_blocks=16, storage=FakeStorage)
    handle = load_cache(path, pool, fingerprint=V1_FINGERPRINT)
    assert handle.token_ids == tuple(range(100, 111))
    storage = pool.storage
    assert isinstance(storage, FakeStorage)
    (kv,) = pool.read_layers(handle, [0], 0, 11)
    assert storage._decode(kv) == list(range(100, 111))


def test_files_of_another_format_are_refused_before_a_block_is_taken(tmp_path: Path) -> None:
    v1 = tmp_path / FIXTURE.name
    shutil.copy(FIXTURE, v1)
    v1_spec = read_cache_info(v1).spec
    quantized = BlockPool(
        ModelCacheSpec((LayerSpec(AttentionKind.GLOBAL, 2, 32, 32),), "float16", 4, 4, 32),
        num_blocks=8,
        storage=FakeStorage,
    )
    q4 = BlockPool(small_spec(4), num_blocks=8, storage=FakeStorage)
    q8 = BlockPool(small_spec(8), num_blocks=8, storage=FakeStorage)
    dense = BlockPool(small_spec(None), num_blocks=8, storage=FakeStorage)
    save_cache(tmp_path / "q4.safetensors", q4, fill(q4, tuple(range(9))), fingerprint=FP)
    save_cache(tmp_path / "d.safetensors", dense, fill(dense, tuple(range(9))), fingerprint=FP)
    cases = [
        (tmp_path / "q4.safetensors", dense, "block format q4g32-float16 vs float16"),
        (tmp_path / "q4.safetensors", q8, "block format q4g32-float16 vs q8g32-float16"),
        (tmp_path / "d.safetensors", q4, "block format float16 vs q4g32-float16"),
    ]
    for path, pool, message in cases:
        free, storage = pool.num_free, pool.storage
        assert isinstance(storage, FakeStorage)
        writes = storage.num_stores
        with pytest.raises(IncompatibleCacheError, match=message):
            load_cache(path, pool, fingerprint=FP)
        assert pool.num_free == free and storage.num_stores == writes
    assert v1_spec.kv_bits is None and quantized.spec.kv_bits == 4
