"""The quantized kernels (``kvpool.mlx.kernels.gather_dequantized`` / ``scatter_quantized``)
against MLX's own ``mx.quantize`` / ``mx.dequantize``, compared bit for bit.

A quantized slab is MLX's affine format of a dense slab [num_blocks, heads, block_tokens,
head_dim]: codes [..., head_dim * bits / 32] uint32, scales and biases
[..., head_dim / group_size] in the cache dtype. Position p lives in block
``table[p // block_tokens]``, slot ``p % block_tokens``.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

import mlx.core as mx
import numpy as np
import pytest

from kvpool.errors import InvalidRequestError, KvpoolError
from kvpool.mlx import kernels

DTYPES = [mx.float16, mx.bfloat16, mx.float32]
# (bits, group_size, head_dim): every bit width x group size, and odd head dims (96 and
# 160 are not powers of two; group 32 divides them, 64 does not).
FORMATS = [
    (bits, group_size, head_dim)
    for bits in (4, 8)
    for group_size, head_dims in ((32, (96, 160, 128)), (64, (64, 128)))
    for head_dim in head_dims
]
Slab = tuple[mx.array, mx.array, mx.array]


@pytest.fixture(autouse=True)
def _fresh_kernel_state() -> Iterator[None]:
    kernels.set_strict_in_place(False)
    kernels.reset_scatter_stats()
    yield
    kernels.set_strict_in_place(False)
    kernels.reset_scatter_stats()


def bits_of(a: mx.array) -> np.ndarray:
    """The raw bits of an array of 2- or 4-byte elements (so -0.0 != 0.0 and NaN
    payloads count)."""
    return np.array(a.view(mx.uint16 if a.itemsize == 2 else mx.uint32))


def data_ptr(a: mx.array) -> int:
    """Address of a's first element (evaluates a; holds no reference after)."""
    view = ctypes.c_char.from_buffer(a)  # type: ignore[arg-type]  # mx.array is a buffer
    ptr = ctypes.addressof(view)
    del view
    return ptr


def random_dense(
    rng: np.random.Generator, shape: tuple[int, ...], dtype: mx.Dtype, scale: float = 2.0
) -> mx.array:
    a = mx.array((rng.standard_normal(shape) * scale).astype(np.float32)).astype(dtype)
    mx.eval(a)
    return a


def quantize(dense: mx.array, bits: int, group_size: int) -> Slab:
    codes, scales, biases = mx.quantize(dense, group_size, bits)
    mx.eval(codes, scales, biases)
    return codes, scales, biases


def ref_gather(
    dense: np.ndarray, table: list[int], start: int, stop: int, capacity: int
) -> np.ndarray:
    """Gather of a [num_blocks, heads, block_tokens, n] numpy array (any dtype)."""
    _, heads, block_tokens, n = dense.shape
    out = np.zeros((1, heads, capacity, n), dense.dtype)
    for p in range(start, stop):
        out[0, :, p - start] = dense[table[p // block_tokens], :, p % block_tokens]
    return out


def dequantized_bits(slab: Slab, bits: int, group_size: int) -> np.ndarray:
    """MLX's dequantization of a whole slab, as raw bits."""
    return bits_of(mx.dequantize(*slab, group_size=group_size, bits=bits))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("bits", "group_size", "head_dim"), FORMATS)
def test_gather_equals_mlx_dequantize_bit_for_bit(
    dtype: mx.Dtype, bits: int, group_size: int, head_dim: int
) -> None:
    rng = np.random.default_rng(bits * 1000 + group_size * 10 + head_dim)
    num_blocks, heads, block_tokens = 7, 3, 16
    slab = quantize(
        random_dense(rng, (num_blocks, heads, block_tokens, head_dim), dtype), bits, group_size
    )
    expect_all = dequantized_bits(slab, bits, group_size)
    # A random table; entry 0 is a placeholder that [start, stop) never reads.
    table = [-1] + [int(b) for b in rng.permutation(num_blocks)[:5]]
    start, stop, capacity = 21, 90, 100  # starts mid-block, ends in a partial block
    (out,) = kernels.gather_dequantized(
        [slab], table, start, stop, capacity, bits=bits, group_size=group_size
    )
    assert out.shape == (1, heads, capacity, head_dim)
    assert out.dtype == dtype
    got = bits_of(out)
    np.testing.assert_array_equal(got, ref_gather(expect_all, table, start, stop, capacity))
    assert not got[:, :, stop - start :].any()  # headroom: +0.0 everywhere


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_negative_control_single_rounding_differs(dtype: mx.Dtype) -> None:
    """The bit comparison is sharp: scale * q + bias rounded once (as a fused
    multiply-add would) differs from MLX's two roundings somewhere, and the kernel
    matches MLX's, not that one."""
    rng = np.random.default_rng(5)
    slab = quantize(random_dense(rng, (4, 2, 64, 128), dtype), 8, 64)
    codes, scales, biases = slab
    q = mx.dequantize(
        codes, mx.ones_like(scales), mx.zeros_like(biases), group_size=64, bits=8
    ).astype(mx.float32)
    s = mx.repeat(scales.astype(mx.float32), 64, axis=-1)
    b = mx.repeat(biases.astype(mx.float32), 64, axis=-1)
    once = (q * s + b).astype(dtype)  # the product is exact in float32 for 16-bit types
    (out,) = kernels.gather_dequantized([slab], [0, 1, 2, 3], 0, 256, 256, bits=8)
    expect = ref_gather(dequantized_bits(slab, 8, 64), [0, 1, 2, 3], 0, 256, 256)
    np.testing.assert_array_equal(bits_of(out), expect)
    if dtype != mx.float32:
        single = ref_gather(bits_of(once), [0, 1, 2, 3], 0, 256, 256)
        assert (single != expect).sum() > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [4, 8])
def test_special_values_match_mlx(dtype: mx.Dtype, bits: int) -> None:
    """Random codes and random bit patterns as scales and biases: subnormals, overflow
    to inf, inf and NaN. Every non-NaN result matches MLX bit for bit; NaN where MLX has
    NaN (the sign of a NaN made from two NaNs is not specified)."""
    rng = np.random.default_rng(bits)
    num_blocks, heads, block_tokens, head_dim, group_size = 3, 2, 32, 128, 32
    width, utype = (32, np.uint32) if dtype == mx.float32 else (16, np.uint16)
    codes = mx.array(
        rng.integers(0, 2**32, (num_blocks, heads, block_tokens, head_dim * bits // 32)),
        dtype=mx.uint32,
    )
    raw = rng.integers(0, 2**width, (2, num_blocks, heads, block_tokens, head_dim // group_size))
    scales = mx.array(raw[0].astype(utype)).view(dtype)
    biases = mx.array(raw[1].astype(utype)).view(dtype)
    slab = (codes, scales, biases)
    table = [2, 0, 1]
    (out,) = kernels.gather_dequantized([slab], table, 0, 96, 96, bits=bits, group_size=group_size)
    expect = ref_gather(dequantized_bits(slab, bits, group_size), table, 0, 96, 96)
    got = bits_of(out)
    ref_values = mx.dequantize(*slab, group_size=group_size, bits=bits).astype(mx.float32)
    nan = ref_gather(np.isnan(np.array(ref_values)), table, 0, 96, 96)
    got_nan = np.isnan(np.array(out.astype(mx.float32)))
    assert 0 < nan.sum() < nan.size // 2  # the data do hold NaNs, infs and finite values
    np.testing.assert_array_equal(got_nan, nan)
    np.testing.assert_array_equal(got[~nan], expect[~nan])


def test_multi_slab_gather_mixes_heads_head_dims_and_dtypes() -> None:
    rng = np.random.default_rng(11)
    shapes = [
        ((5, 2, 8, 96), mx.float16),
        ((5, 1, 8, 160), mx.float32),
        ((5, 4, 8, 64), mx.bfloat16),
    ]
    slabs = [quantize(random_dense(rng, shape, dtype), 4, 32) for shape, dtype in shapes]
    table = [3, 1, 4, 0]
    outs = kernels.gather_dequantized(slabs, table, 5, 29, 32, bits=4, group_size=32)
    assert len(outs) == len(slabs)
    for out, slab, (shape, dtype) in zip(outs, slabs, shapes, strict=True):
        assert (out.shape, out.dtype) == ((1, shape[1], 32, shape[3]), dtype)
        np.testing.assert_array_equal(
            bits_of(out), ref_gather(dequantized_bits(slab, 4, 32), table, 5, 29, 32)
        )


def test_gather_reads_strided_quantized_slabs() -> None:
    """Slabs that are views (every other block; scales through a transpose) are read
    through their strides."""
    rng = np.random.default_rng(12)
    codes, scales, biases = quantize(random_dense(rng, (8, 2, 16, 128), mx.float16), 8, 32)
    view = (codes[::2], mx.swapaxes(mx.swapaxes(scales, 2, 3)[::2], 2, 3), biases[::2])
    (out,) = kernels.gather_dequantized([view], [3, 1], 3, 30, 30, bits=8, group_size=32)
    dense = mx.contiguous(mx.dequantize(codes, scales, biases, group_size=32, bits=8)[::2])
    np.testing.assert_array_equal(bits_of(out), ref_gather(bits_of(dense), [3, 1], 3, 30, 30))


def test_empty_range_is_all_headroom() -> None:
    slab = quantize(mx.ones((2, 1, 4, 64)), 8, 64)
    (out,) = kernels.gather_dequantized([slab], [], 6, 6, 5, bits=8)
    assert out.shape == (1, 1, 5, 64)
    assert not bits_of(out).any()


def empty_slab(
    num_blocks: int,
    heads: int,
    block_tokens: int,
    head_dim: int,
    dtype: mx.Dtype,
    bits: int,
    group_size: int,
) -> Slab:
    codes_shape, scales_shape = kernels.quantized_shapes(
        num_blocks, heads, block_tokens, head_dim, bits=bits, group_size=group_size
    )
    slab = (
        mx.zeros(codes_shape, mx.uint32),
        mx.zeros(scales_shape, dtype),
        mx.zeros(scales_shape, dtype),
    )
    mx.eval(*slab)
    return slab


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("bits", "group_size", "head_dim"), [(4, 32, 96), (8, 64, 128), (4, 64, 128), (8, 32, 160)]
)
def test_scatter_quantized_writes_mx_quantize_in_place(
    dtype: mx.Dtype, bits: int, group_size: int, head_dim: int
) -> None:
    rng = np.random.default_rng(head_dim + bits)
    num_blocks, heads, block_tokens = 6, 2, 256
    slab = empty_slab(num_blocks, heads, block_tokens, head_dim, dtype, bits, group_size)
    before_ptrs = [data_ptr(a) for a in slab]
    before = [bits_of(a) for a in slab]
    table = [4, 1, 3]
    start, n = 300, 400  # mid-block start (not a multiple of 256), ends in block 3
    src = random_dense(rng, (1, heads, n, head_dim), dtype)

    slab = kernels.scatter_quantized(slab, src, table, start, bits=bits, group_size=group_size)
    mx.eval(*slab)

    assert [data_ptr(a) for a in slab] == before_ptrs
    assert kernels.scatter_stats() == {"num_in_place": 3, "num_copied": 0}
    # Each array holds mx.quantize's output at exactly the written positions.
    for part, want, old in zip(slab, mx.quantize(src, group_size, bits), before, strict=True):
        got, want_np, expect = bits_of(part), bits_of(want), old.copy()
        for t in range(n):
            p = start + t
            expect[table[p // block_tokens], :, p % block_tokens] = want_np[0, :, t]
        np.testing.assert_array_equal(got, expect)  # other slots untouched
    # And the gather returns dequantize(quantize(src)), with zero headroom.
    (out,) = kernels.gather_dequantized(
        [slab], table, start, start + n, n + 7, bits=bits, group_size=group_size
    )
    reference = mx.dequantize(*mx.quantize(src, group_size, bits), group_size=group_size, bits=bits)
    np.testing.assert_array_equal(bits_of(out)[:, :, :n], bits_of(reference))
    assert not bits_of(out)[:, :, n:].any()


def test_turns_append_in_place_and_gather_back() -> None:
    """Five turns of appends (chunk lengths not block-aligned) into one slab, in place
    each time; one gather returns every turn's dequantized rows in order."""
    rng = np.random.default_rng(21)
    bits, group_size = 4, 64
    slab = empty_slab(12, 2, 16, 128, mx.bfloat16, bits, group_size)
    ptrs = [data_ptr(a) for a in slab]
    table = [int(b) for b in rng.permutation(12)]
    chunks, pos = [], 0
    for length in (5, 16, 1, 30, 37):
        src = random_dense(rng, (1, 2, length, 128), mx.bfloat16)
        slab = kernels.scatter_quantized(slab, src, table, pos, bits=bits, group_size=group_size)
        mx.eval(*slab)
        chunks.append(
            mx.dequantize(*mx.quantize(src, group_size, bits), group_size=group_size, bits=bits)
        )
        pos += length
    assert [data_ptr(a) for a in slab] == ptrs
    assert kernels.scatter_stats() == {"num_in_place": 15, "num_copied": 0}
    (out,) = kernels.gather_dequantized(
        [slab], table, 0, pos, pos, bits=bits, group_size=group_size
    )
    np.testing.assert_array_equal(bits_of(out), bits_of(mx.concatenate(chunks, axis=2)))


def test_scatter_quantized_of_a_strided_src() -> None:
    rng = np.random.default_rng(22)
    cache = random_dense(rng, (1, 2, 50, 96), mx.float16)
    src = cache[:, :, 7:40]  # a slice of a bigger cache
    slab = empty_slab(4, 2, 16, 96, mx.float16, 8, 32)
    slab = kernels.scatter_quantized(slab, src, [2, 0, 3], 9, bits=8, group_size=32)
    (out,) = kernels.gather_dequantized([slab], [2, 0, 3], 9, 42, 33, bits=8, group_size=32)
    reference = mx.dequantize(*mx.quantize(mx.contiguous(src), 32, 8), group_size=32, bits=8)
    np.testing.assert_array_equal(bits_of(out), bits_of(reference))


def test_scatter_quantized_copies_a_shared_slab_and_strict_mode_refuses() -> None:
    slab = empty_slab(4, 1, 8, 64, mx.float16, 8, 64)
    old = slab  # a second reference: no array can be donated
    old_ptrs = [data_ptr(a) for a in old]
    src = mx.arange(3 * 64, dtype=mx.float16).reshape(1, 1, 3, 64)
    new = kernels.scatter_quantized(slab, src, [2], 1, bits=8)
    mx.eval(*new)
    assert kernels.scatter_stats() == {"num_in_place": 0, "num_copied": 3}
    assert [data_ptr(a) for a in old] == old_ptrs
    assert not np.array(old[0]).any()  # the old codes are unchanged
    assert np.array(new[0]).any()

    kernels.set_strict_in_place(True)
    failed = kernels.scatter_quantized(new, src, [2], 1, bits=8)
    with pytest.raises(RuntimeError, match=r"strict in-place mode"):
        mx.eval(*failed)


def test_plain_scatter_takes_uint32_slabs() -> None:
    slab = mx.zeros((3, 2, 4, 5), mx.uint32)
    src = mx.arange(2 * 3 * 5, dtype=mx.uint32).reshape(1, 2, 3, 5) + 1
    slab = kernels.scatter(slab, src, [2, 0], 2)
    got = np.array(slab)
    assert (got[2, :, 2:4] == np.array(src)[0, :, 0:2]).all()
    assert (got[0, :, 0] == np.array(src)[0, :, 2]).all()
    assert got.sum() == np.array(src).sum()


def test_quantized_shapes_and_capacity() -> None:
    assert kernels.quantized_shapes(64, 8, 256, 128, bits=8) == ((64, 8, 256, 32), (64, 8, 256, 2))
    assert kernels.quantized_shapes(2, 1, 4, 96, bits=4, group_size=32) == (
        (2, 1, 4, 12),
        (2, 1, 4, 3),
    )


@pytest.mark.parametrize(
    ("head_dim", "bits", "group_size", "message"),
    [
        (100, 4, 32, r"head_dim 100 is not a positive multiple of group_size 32"),
        (96, 8, 64, r"head_dim 96 is not a positive multiple of group_size 64"),
        (128, 3, 64, r"bits must be 4 or 8; got 3"),
        (128, 2, 64, r"bits must be 4 or 8; got 2"),
        (128, 4, 128, r"group_size must be 32 or 64; got 128"),
        (0, 4, 32, r"head_dim 0 is not a positive multiple"),
    ],
)
def test_unsupported_quantization_is_a_clear_error(
    head_dim: int, bits: int, group_size: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        kernels.quantized_shapes(4, 2, 16, head_dim, bits=bits, group_size=group_size)
    with pytest.raises(InvalidRequestError, match=message) as info:
        kernels.check_quantization(head_dim, bits, group_size)
    assert isinstance(info.value, KvpoolError)


Q = quantize(mx.zeros((4, 2, 4, 64)), 8, 32)  # codes (4, 2, 4, 16), scales (4, 2, 4, 2)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: kernels.gather_dequantized([], [0], 0, 1, 1, bits=8), r"need at least one slab"),
        (
            lambda: kernels.gather_dequantized([Q], [0], 0, 1, 1, bits=5, group_size=32),
            r"\[kvpool::gather_dequantized\] bits must be 4 or 8; got 5",
        ),
        (
            lambda: kernels.gather_dequantized([Q], [0], 0, 1, 1, bits=8, group_size=64),
            r"head_dim 64 at 8 bits, so scales and biases must have shape \(4, 2, 4, 1\) for "
            r"group_size 64; got \(4, 2, 4, 2\)",
        ),
        (
            lambda: kernels.gather_dequantized([Q], [0], 0, 1, 1, bits=4, group_size=32),
            r"head_dim 128 at 4 bits, so scales and biases must have shape \(4, 2, 4, 4\)",
        ),
        (
            lambda: kernels.gather_dequantized(
                [(Q[0].astype(mx.int32), Q[1], Q[2])], [0], 0, 1, 1, bits=8, group_size=32
            ),
            r"slab 0 codes must be uint32; got int32",
        ),
        (
            lambda: kernels.gather_dequantized(
                [(Q[0], Q[1], Q[2].astype(mx.float16))], [0], 0, 1, 1, bits=8, group_size=32
            ),
            r"scales and biases must share one dtype .* got float32 and float16",
        ),
        (
            lambda: kernels.gather_dequantized(
                [(Q[0][0], Q[1], Q[2])], [0], 0, 1, 1, bits=8, group_size=32
            ),
            r"slab 0 codes must be 4-D .* got shape \(2, 4, 16\)",
        ),
        (
            lambda: kernels.gather_dequantized(
                [Q, quantize(mx.zeros((5, 2, 4, 64)), 8, 32)], [0], 0, 1, 1, bits=8, group_size=32
            ),
            r"slab 1 codes got shape \(5, 2, 4, 16\)",
        ),
        (
            lambda: kernels.gather_dequantized([Q], [0, 4], 0, 6, 6, bits=8, group_size=32),
            r"block_table\[1\] = 4 is out of range for a slab of 4 blocks",
        ),
        (
            lambda: kernels.gather_dequantized([Q], [0, 1], 1, 6, 4, bits=8, group_size=32),
            r"stop - start = 5 positions .* got 4",
        ),
        (
            lambda: kernels.scatter_quantized(
                Q, mx.zeros((1, 2, 3, 64)), [0], 0, bits=8, group_size=64
            ),
            r"\[kvpool::scatter_quantized\] slab codes \(4, 2, 4, 16\) hold head_dim 64",
        ),
        (
            lambda: kernels.scatter_quantized(
                Q, mx.zeros((1, 2, 3, 96)), [0], 0, bits=8, group_size=32
            ),
            r"src must be \[1, 2, T, 64\] .* got shape \(1, 2, 3, 96\)",
        ),
        (
            lambda: kernels.scatter_quantized(
                Q, mx.zeros((1, 2, 3, 64), mx.float16), [0], 0, bits=8, group_size=32
            ),
            r"src dtype float16 differs from the slab's float32 scales and biases",
        ),
        (
            lambda: kernels.scatter_quantized(
                Q, mx.zeros((1, 2, 6, 64)), [1, 1], 0, bits=8, group_size=32
            ),
            r"block 1 appears twice",
        ),
        (
            lambda: kernels.scatter_quantized(
                Q, mx.zeros((1, 2, 6, 64)), [1], 0, bits=8, group_size=32
            ),
            r"positions \[0, 6\) need 2 block table entries",
        ),
        (
            lambda: kernels.scatter_quantized(
                Q, mx.zeros((1, 2, 2, 64)), [7], 0, bits=8, group_size=32
            ),
            r"block_table\[0\] = 7 is out of range",
        ),
    ],
)
def test_bad_arguments_raise_value_error(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]
    assert (mx.ones(3) + 1).tolist() == [2.0, 2.0, 2.0]


def test_compiled_function_keeps_gathers_of_other_bit_widths_apart() -> None:
    x = random_dense(np.random.default_rng(30), (3, 2, 8, 64), mx.float32)
    q8, q4 = quantize(x, 8, 64), quantize(x, 4, 64)

    def fn(*parts: mx.array) -> mx.array:
        (a,) = kernels.gather_dequantized([parts[:3]], [1, 0], 1, 12, 12, bits=8)  # type: ignore[list-item]
        (b,) = kernels.gather_dequantized([parts[3:]], [1, 0], 1, 12, 12, bits=4)  # type: ignore[list-item]
        return a - b

    eager = fn(*q8, *q4)
    assert mx.any(eager != 0).item()  # 8-bit and 4-bit values differ: a merge would show
    np.testing.assert_array_equal(bits_of(mx.compile(fn)(*q8, *q4)), bits_of(eager))
