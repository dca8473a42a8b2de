"""The C++ gather/scatter kernels (``kvpool._kernels``) against a numpy reference.

Slab layout [num_blocks, n_kv_heads, block_tokens, head_dim]; position p lives
in block ``table[p // block_tokens]``, slot ``p % block_tokens``.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
from collections.abc import Iterator

import mlx.core as mx
import numpy as np
import pytest

from kvpool import _kernels

DTYPES = [mx.float32, mx.float16, mx.bfloat16]


@pytest.fixture(autouse=True)
def _fresh_kernel_state() -> Iterator[None]:
    _kernels.set_strict_in_place(False)
    _kernels.reset_scatter_stats()
    yield
    _kernels.set_strict_in_place(False)
    _kernels.reset_scatter_stats()


def data_ptr(a: mx.array) -> int:
    """Address of a's first element (evaluates a; holds no reference after).

    ``np.asarray(a)`` is also a zero-copy view on mlx 0.32.4, but it rejects
    bfloat16; ctypes reads the buffer protocol for every dtype.
    """
    view = ctypes.c_char.from_buffer(a)  # type: ignore[arg-type]  # mx.array is a buffer
    ptr = ctypes.addressof(view)
    del view
    return ptr


def to_np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def random_slab(rng: np.random.Generator, shape: tuple[int, ...], dtype: mx.Dtype) -> mx.array:
    # Small integers are exact in every dtype, so comparisons can be exact.
    a = mx.array(rng.integers(-100, 100, size=shape).astype(np.float32)).astype(dtype)
    mx.eval(a)
    return a


def ref_gather(
    slab: np.ndarray, table: list[int], start: int, stop: int, capacity: int
) -> np.ndarray:
    _, heads, block_tokens, head_dim = slab.shape
    out = np.zeros((1, heads, capacity, head_dim), slab.dtype)
    for p in range(start, stop):
        out[0, :, p - start] = slab[table[p // block_tokens], :, p % block_tokens]
    return out


def ref_scatter(slab: np.ndarray, src: np.ndarray, table: list[int], start: int) -> np.ndarray:
    out = slab.copy()
    block_tokens = slab.shape[2]
    for t in range(src.shape[2]):
        p = start + t
        out[table[p // block_tokens], :, p % block_tokens] = src[0, :, t]
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", range(4))
def test_roundtrip_matches_numpy(dtype: mx.Dtype, seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_blocks, heads, block_tokens, head_dim = 9, 3, 8, 5
    slab = random_slab(rng, (num_blocks, heads, block_tokens, head_dim), dtype)
    expect = to_np(slab)
    table = [int(b) for b in rng.permutation(num_blocks)[:5]]
    start = int(rng.integers(0, 20))
    stop = int(rng.integers(start + 1, 5 * block_tokens + 1))
    src = random_slab(rng, (1, heads, stop - start, head_dim), dtype)

    slab = _kernels.scatter(slab, src, table, start)
    expect = ref_scatter(expect, to_np(src), table, start)
    np.testing.assert_array_equal(to_np(slab), expect)

    capacity = stop - start + int(rng.integers(0, 7))
    (out,) = _kernels.gather([slab], table, start, stop, capacity)
    assert out.shape == (1, heads, capacity, head_dim)
    assert out.dtype == dtype
    np.testing.assert_array_equal(to_np(out), ref_gather(expect, table, start, stop, capacity))
    np.testing.assert_array_equal(to_np(out)[:, :, : stop - start], to_np(src))


@pytest.mark.parametrize(("start", "stop"), [(0, 1), (0, 8), (3, 8), (7, 9), (5, 40), (16, 33)])
def test_gather_any_range(start: int, stop: int) -> None:
    rng = np.random.default_rng(start * 100 + stop)
    slab = random_slab(rng, (6, 2, 8, 4), mx.float16)
    table = [5, 0, 3, 1, 4]
    (out,) = _kernels.gather([slab], table, start, stop, stop - start + 3)
    np.testing.assert_array_equal(
        to_np(out), ref_gather(to_np(slab), table, start, stop, stop - start + 3)
    )


def test_gather_many_slabs_of_mixed_geometry() -> None:
    rng = np.random.default_rng(7)
    slabs = [
        random_slab(rng, (5, 2, 4, 3), mx.float32),
        random_slab(rng, (5, 1, 4, 8), mx.float16),
        random_slab(rng, (5, 4, 4, 2), mx.bfloat16),
    ]
    # Entries before the range are never read: placeholders are fine there.
    table = [-1, 99, 3, 1, 2]
    outs = _kernels.gather(slabs, table, 9, 19, 12)
    assert [o.shape for o in outs] == [(1, 2, 12, 3), (1, 1, 12, 8), (1, 4, 12, 2)]
    for slab, out in zip(slabs, outs, strict=True):
        assert out.dtype == slab.dtype
        np.testing.assert_array_equal(to_np(out), ref_gather(to_np(slab), table, 9, 19, 12))


def test_headroom_is_zero_in_reused_buffers() -> None:
    slab = mx.full((4, 2, 8, 16), 3.0, dtype=mx.float32)
    shape = (1, 2, 64, 16)
    # Leave dirty buffers of the output's size in MLX's cache first.
    for _ in range(4):
        junk = mx.full(shape, 7.0)
        mx.eval(junk)
        del junk
    (out,) = _kernels.gather([slab], [2, 0], 0, 13, 64)
    got = to_np(out)
    assert (got[:, :, :13] == 3.0).all()
    assert (got[:, :, 13:] == 0.0).all()


def test_gather_empty_range_is_all_headroom() -> None:
    slab = mx.ones((3, 2, 4, 3))
    (out,) = _kernels.gather([slab], [], 6, 6, 5)
    np.testing.assert_array_equal(to_np(out), np.zeros((1, 2, 5, 3), np.float32))


def test_scatter_from_slice_of_bigger_cache() -> None:
    rng = np.random.default_rng(11)
    cache = random_slab(rng, (1, 2, 40, 6), mx.bfloat16)
    src = cache[:, :, 9:30, :]  # A strided view, as a cache's keys[..., :T, :]
    slab = mx.zeros((5, 2, 8, 6), dtype=mx.bfloat16)
    expect = ref_scatter(to_np(slab), to_np(src), [4, 1, 0, 2], 5)
    slab = _kernels.scatter(slab, src, [4, 1, 0, 2], 5)
    np.testing.assert_array_equal(to_np(slab), expect)


def test_scatter_from_transposed_src() -> None:
    rng = np.random.default_rng(12)
    src = random_slab(rng, (1, 2, 3, 10), mx.float32).transpose(0, 1, 3, 2)
    slab = mx.zeros((3, 2, 4, 3))
    expect = ref_scatter(to_np(slab), to_np(src), [2, 0, 1], 1)
    slab = _kernels.scatter(slab, src, [2, 0, 1], 1)
    np.testing.assert_array_equal(to_np(slab), expect)


def test_scatter_of_nothing_returns_the_slab() -> None:
    slab = mx.ones((3, 2, 4, 3))
    out = _kernels.scatter(slab, mx.zeros((1, 2, 0, 3)), [], 0)
    assert data_ptr(out) == data_ptr(slab)
    assert _kernels.scatter_stats() == {"num_in_place": 0, "num_copied": 0}


def test_scatter_writes_in_place_when_slab_has_one_reference() -> None:
    slab = mx.zeros((16, 4, 8, 32), dtype=mx.float16)
    mx.eval(slab)
    before = data_ptr(slab)
    src = mx.ones((1, 4, 20, 32), dtype=mx.float16)
    for turn in range(5):
        slab = _kernels.scatter(slab, src, [turn, turn + 5, turn + 10], turn)
        mx.eval(slab)
        assert data_ptr(slab) == before
    assert _kernels.scatter_stats() == {"num_in_place": 5, "num_copied": 0}
    assert float(slab.astype(mx.float32).sum()) > 0


def test_scatter_copies_when_another_name_holds_the_slab() -> None:
    slab = mx.zeros((6, 2, 4, 3))
    mx.eval(slab)
    before = data_ptr(slab)
    old = slab
    slab = _kernels.scatter(slab, mx.ones((1, 2, 4, 3)), [3], 0)
    mx.eval(slab)
    assert data_ptr(slab) != before
    assert data_ptr(old) == before
    assert float(old.sum()) == 0.0  # The old slab was not written.
    assert float(slab.sum()) == 2 * 4 * 3
    assert _kernels.scatter_stats() == {"num_in_place": 0, "num_copied": 1}


def test_scatter_copies_while_an_unevaluated_gather_reads_the_slab() -> None:
    slab = mx.zeros((6, 2, 4, 3))
    mx.eval(slab)
    (pending,) = _kernels.gather([slab], [3], 0, 4, 4)
    slab = _kernels.scatter(slab, mx.ones((1, 2, 4, 3)), [3], 0)
    mx.eval(slab)
    assert float(pending.sum()) == 0.0  # The gather still sees the old data.
    assert _kernels.scatter_stats() == {"num_in_place": 0, "num_copied": 1}


def test_scatter_after_async_gather_never_changes_what_the_gather_read() -> None:
    # 16 MiB per copy, so the gather may still run when the scatter evaluates.
    table = list(range(64))
    ones = mx.ones((1, 8, 64 * 16, 128), mx.float16)
    zeros = mx.zeros((1, 8, 64 * 16, 128), mx.float16)
    slab = mx.zeros((64, 8, 16, 128), dtype=mx.float16)
    mx.eval(slab, ones, zeros)
    for _ in range(10):
        (pending,) = _kernels.gather([slab], table, 0, 64 * 16, 64 * 16)
        mx.async_eval(pending)
        slab = _kernels.scatter(slab, ones, table, 0)
        mx.eval(slab)
        assert float(pending.astype(mx.float32).sum()) == 0.0
        assert float(slab.astype(mx.float32).sum()) == ones.size
        slab = _kernels.scatter(slab, zeros, table, 0)
    stats = _kernels.scatter_stats()
    assert stats["num_in_place"] + stats["num_copied"] == 19  # The last one is pending.


def test_strict_mode_raises_at_eval_and_mlx_stays_healthy() -> None:
    slab = mx.zeros((6, 2, 4, 3))
    mx.eval(slab)
    before = data_ptr(slab)
    _kernels.set_strict_in_place(True)
    old = slab
    failed = _kernels.scatter(slab, mx.ones((1, 2, 4, 3)), [3], 0)
    with pytest.raises(RuntimeError, match=r"\[kvpool::scatter\] strict in-place mode"):
        mx.eval(failed)
    with pytest.raises(RuntimeError, match="not donatable"):
        mx.eval(failed)
    assert (mx.arange(4) * 2).tolist() == [0, 2, 4, 6]
    del old, failed  # Both still referenced the slab.
    slab = _kernels.scatter(slab, mx.ones((1, 2, 4, 3)), [3], 0)
    mx.eval(slab)
    assert data_ptr(slab) == before
    assert _kernels.scatter_stats() == {"num_in_place": 1, "num_copied": 0}


SLAB = (4, 2, 4, 3)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: _kernels.gather([], [0], 0, 1, 1), r"need at least one slab"),
        (lambda: _kernels.gather([mx.zeros((4, 2, 4))], [0], 0, 1, 1), r"got shape \(4, 2, 4\)"),
        (
            lambda: _kernels.gather([mx.zeros(SLAB, dtype=mx.int32)], [0], 0, 1, 1),
            r"float32, float16 or bfloat16; got int32",
        ),
        (
            lambda: _kernels.gather([mx.zeros(SLAB), mx.zeros((5, 2, 4, 3))], [0], 0, 1, 1),
            r"slab 1 got shape \(5, 2, 4, 3\)",
        ),
        (
            lambda: _kernels.gather([mx.zeros(SLAB)], [0, 4], 0, 6, 6),
            r"block_table\[1\] = 4 is out of range for a slab of 4 blocks",
        ),
        (lambda: _kernels.gather([mx.zeros(SLAB)], [0], 3, 2, 2), r"got start 3, stop 2"),
        (
            lambda: _kernels.gather([mx.zeros(SLAB)], [0, 1], 1, 6, 4),
            r"stop - start = 5 positions .* got 4",
        ),
        (
            lambda: _kernels.gather([mx.zeros(SLAB)], [0], 0, 5, 5),
            r"need 2 block table entries of 4 tokens; got 1",
        ),
        (
            lambda: _kernels.scatter(mx.zeros(SLAB), mx.zeros((1, 3, 2, 3)), [0], 0),
            r"\[kvpool::scatter\] src must be \[1, 2, T, 3\] .* got shape \(1, 3, 2, 3\)",
        ),
        (
            lambda: _kernels.scatter(
                mx.zeros(SLAB), mx.zeros((1, 2, 2, 3), dtype=mx.float16), [0], 0
            ),
            r"src dtype float16 differs from the slab's float32",
        ),
        (
            lambda: _kernels.scatter(mx.zeros(SLAB), mx.zeros((1, 2, 2, 3)), [-2], 0),
            r"block_table\[0\] = -2 is out of range",
        ),
        (
            lambda: _kernels.scatter(mx.zeros(SLAB), mx.zeros((1, 2, 6, 3)), [1, 1], 0),
            r"block 1 appears twice",
        ),
        (
            lambda: _kernels.scatter(mx.zeros(SLAB), mx.zeros((1, 2, 6, 3)), [1], 0),
            r"positions \[0, 6\) need 2 block table entries",
        ),
    ],
)
def test_bad_arguments_raise_value_error(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]
    assert (mx.ones(3) + 1).tolist() == [2.0, 2.0, 2.0]


def test_explicit_cpu_stream_is_accepted() -> None:
    slab = mx.ones((2, 1, 4, 2))
    (out,) = _kernels.gather([slab], [1], 0, 3, 4, stream=mx.cpu)
    assert out.tolist()[0][0] == [[1, 1], [1, 1], [1, 1], [0, 0]]


@pytest.mark.parametrize("mlx_first", [True, False], ids=["mlx-first", "kernels-first"])
def test_import_with_or_without_mlx_first(mlx_first: bool) -> None:
    script = "\n".join(
        [
            "import mlx.core as mx" if mlx_first else "",
            "import kvpool._kernels as k",
            "import mlx.core as mx",
            "(out,) = k.gather([mx.ones((2, 1, 4, 2))], [1], 0, 3, 4)",
            "print(out.sum().item())",
        ]
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "6.0"


def test_compiled_function_keeps_distinct_gathers_apart() -> None:
    slab = mx.arange(2 * 1 * 4 * 2, dtype=mx.float32).reshape(2, 1, 4, 2)

    def fn(s: mx.array) -> mx.array:
        (a,) = _kernels.gather([s], [1, 0], 1, 6, 6)
        (b,) = _kernels.gather([s], [1, 0], 1, 6, 6)  # Equivalent to a: may merge.
        (c,) = _kernels.gather([s], [0, 1], 1, 6, 6)  # Must not merge with a.
        return a + b - c

    expect = to_np(fn(slab))
    np.testing.assert_array_equal(to_np(mx.compile(fn)(slab)), expect)
    np.testing.assert_array_equal(
        expect[0, 0, :5],
        2 * ref_gather(to_np(slab), [1, 0], 1, 6, 5)[0, 0]
        - ref_gather(to_np(slab), [0, 1], 1, 6, 5)[0, 0],
    )
