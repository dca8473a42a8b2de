"""The portable slab kernels (MLX operations, any device) against the C++ kernels, bit for bit.

The GPU path of kvpool is :class:`PortableKernels` (plus a CUDA gather checked against it on
the GPU by ``bench/gpu/device_check.py``). Here it runs on the CPU device, where the C++
kernels are the reference: every dtype and head dim the kernels take, dense and quantized,
through the kernel API, the storage API and the engine.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from helpers import LoadedModel, Reference, words
from test_engine_mlx import run_turns

from kvpool import BlockPool, ModelCacheSpec
from kvpool.cache.spec import AttentionKind, LayerSpec
from kvpool.cache.storage import LayerKV
from kvpool.errors import InvalidRequestError
from kvpool.mlx.mlx_lm import kv_cache
from kvpool.mlx.slab_kernels import (
    KERNELS_ENV,
    ExtensionKernels,
    PortableKernels,
    default_kernels,
    device_report,
)
from kvpool.mlx.slabs import DenseSlabStorage, QuantizedSlabStorage, make_slab_storage

CPP, PORTABLE = ExtensionKernels(), PortableKernels()
DTYPES = [mx.float32, mx.float16, mx.bfloat16]
BLOCKS, HEADS, TOKENS = 6, 2, 16
TABLE = [3, 0, 5, 1, 4]  # positions 0..79


def random_slab(rng: np.random.Generator, dim: int, dtype: mx.Dtype) -> mx.array:
    return mx.array(rng.standard_normal((BLOCKS, HEADS, TOKENS, dim)).astype(np.float32)).astype(
        dtype
    )


def with_zero_block(slab: mx.array) -> mx.array:
    """The portable layout: the same blocks and one zero block past them."""
    return mx.concatenate([slab, mx.zeros((1, *slab.shape[1:]), slab.dtype)])


def equal(a: mx.array, b: mx.array) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(mx.array_equal(a, b).item())


RANGES = [(0, 80, 96), (5, 77, 72), (16, 48, 32), (9, 9, 4), (0, 1, 256), (31, 33, 40)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 80, 128])
def test_gather_equals_the_cpp_kernel(dtype: mx.Dtype, dim: int) -> None:
    rng = np.random.default_rng(dim)
    slabs = [random_slab(rng, dim, dtype) for _ in range(3)]
    for start, stop, capacity in RANGES:
        want = CPP.gather(slabs, TABLE, start, stop, capacity)
        got = PORTABLE.gather([with_zero_block(s) for s in slabs], TABLE, start, stop, capacity)
        assert all(equal(w, g) for w, g in zip(want, got, strict=True)), (start, stop)


# (first, rows): inside one block, from a block edge, whole blocks only, both ends partial,
# across one block edge without a whole block
SCATTERS = [(3, 7), (16, 9), (16, 32), (7, 50), (0, 80), (79, 1), (12, 10)]
# scattered ids (whole blocks by one block-indexed update), consecutive ids (slice updates)
SCATTER_TABLES = [TABLE, [1, 2, 3, 4, 5], [0, 2, 3, 4, 1]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("table", SCATTER_TABLES)
def test_scatter_equals_the_cpp_kernel(dtype: mx.Dtype, dim: int, table: list[int]) -> None:
    rng = np.random.default_rng(dim + 1)
    for first, n in SCATTERS:
        base = random_slab(rng, dim, dtype)
        rows = mx.array(rng.standard_normal((1, HEADS, n, dim)).astype(np.float32)).astype(dtype)
        want = CPP.scatter(mx.array(base), rows, table, first)
        got = PORTABLE.scatter(with_zero_block(base), rows, table, first)
        mx.eval(want, got)
        assert equal(want, got[:BLOCKS]), (first, n)
        assert not bool(mx.any(got[BLOCKS]).item()), "the zero block was written"


def test_scatter_of_strided_rows_and_a_sliced_cache() -> None:
    """Rows cut out of a cache with headroom (as a store passes them) are not contiguous."""
    rng = np.random.default_rng(5)
    base = random_slab(rng, 64, mx.float16)
    cache = mx.array(rng.standard_normal((1, HEADS, 96, 64)).astype(np.float16))
    rows = cache[:, :, 10:70, :]
    want = CPP.scatter(mx.array(base), rows, TABLE, 10)
    got = PORTABLE.scatter(with_zero_block(base), rows, TABLE, 10)
    assert equal(want, got[:BLOCKS])


def quantized(slab: mx.array, bits: int, group_size: int) -> tuple[mx.array, ...]:
    codes, scales, biases = mx.quantize(slab, group_size=group_size, bits=bits)
    return codes, scales, biases


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("dim", "bits", "group_size"), [(64, 4, 32), (64, 8, 64), (128, 4, 64)])
def test_quantized_kernels_equal_the_cpp_kernels(
    dtype: mx.Dtype, dim: int, bits: int, group_size: int
) -> None:
    rng = np.random.default_rng(bits * dim)
    q = quantized(random_slab(rng, dim, dtype), bits, group_size)
    qz = tuple(with_zero_block(a) for a in q)
    kw = {"bits": bits, "group_size": group_size}
    for start, stop, capacity in RANGES:
        (want,) = CPP.gather_dequantized([q], TABLE, start, stop, capacity, **kw)  # type: ignore[list-item]
        (got,) = PORTABLE.gather_dequantized([qz], TABLE, start, stop, capacity, **kw)  # type: ignore[list-item]
        assert equal(want, got), (start, stop)
        # the blocks as they are at rest (persistence reads them so), uint32 codes included
        at_rest_cpp = CPP.gather(q, TABLE, start, stop, capacity)
        at_rest = PORTABLE.gather(qz, TABLE, start, stop, capacity)
        for w, g in zip(at_rest_cpp, at_rest, strict=True):
            assert equal(w, g)
    for first, n in SCATTERS:
        rows = mx.array(rng.standard_normal((1, HEADS, n, dim)).astype(np.float32)).astype(dtype)
        want_q = CPP.scatter_quantized(tuple(mx.array(a) for a in q), rows, TABLE, first, **kw)  # type: ignore[arg-type]
        got_q = PORTABLE.scatter_quantized(tuple(mx.array(a) for a in qz), rows, TABLE, first, **kw)  # type: ignore[arg-type]
        mx.eval(want_q, got_q)
        assert all(equal(w, g[:BLOCKS]) for w, g in zip(want_q, got_q, strict=True)), first


def test_bad_tables_are_refused_with_the_numbers() -> None:
    slab = with_zero_block(random_slab(np.random.default_rng(0), 64, mx.float32))
    rows = mx.zeros((1, HEADS, 8, 64))
    with pytest.raises(ValueError, match=r"\[kvpool::gather\] block id 6 out of range .* 6 blocks"):
        PORTABLE.gather([slab], [0, 6], 0, 20, 20)
    with pytest.raises(ValueError, match=r"\[kvpool::scatter\] block id -1 out of range"):
        PORTABLE.scatter(slab, rows, [2, -1], 12)
    with pytest.raises(ValueError, match=r"positions up to 40 need 3 table entries. Received 2"):
        PORTABLE.gather([slab], [0, 1], 0, 40, 40)
    with pytest.raises(ValueError, match=r"rows must be \[1, 2, T, 64\]"):
        PORTABLE.scatter(slab, mx.zeros((1, 3, 8, 64)), [0], 0)


# ----------------------------------------------------------------------------- in place


def peak_over_active(fn: Any) -> int:
    mx.synchronize()
    mx.reset_peak_memory()
    active = mx.get_active_memory()
    mx.eval(fn())
    return int(mx.get_peak_memory() - active)


def test_scatter_writes_in_place_and_a_held_slab_is_copied() -> None:
    """MLX donates the slab to the scatter when the caller holds its only reference; the
    negative control keeps a second reference, and MLX must copy the whole slab."""
    rows = mx.ones((1, 8, 700, 128), dtype=mx.float16)
    slab = mx.zeros((257, 8, 256, 128), dtype=mx.float16)  # 128 MiB, zero block included
    mx.eval(rows, slab)
    state = {"slab": slab}
    del slab

    def rebind(first: int) -> mx.array:
        state["slab"] = PORTABLE.scatter(state["slab"], rows, [4, 9, 2], first)
        return state["slab"]

    # from 0: blocks 4 and 9 whole (one block-indexed update); from 5: slice updates only
    for first in (0, 5):
        assert peak_over_active(functools.partial(rebind, first)) < 8 << 20, first
    held = state["slab"]
    assert bool(mx.all(held[4, :, 5:] == 1).item()) and bool(mx.all(held[2, :, :170] == 1).item())
    # a view shares the slab's buffer (mx.array(held) would not: it copies on its own)
    view = held.reshape(held.shape)
    mx.eval(view)
    twos = mx.full(rows.shape, 2, dtype=rows.dtype)
    copy_peak = peak_over_active(lambda: PORTABLE.scatter(held, twos, [4, 9, 2], 5))
    assert copy_peak >= held.nbytes
    assert bool(mx.all(held[9] == 2).item()), "the scatter wrote its own copy"
    assert bool(mx.all(view[9] == 1).item()), "the view saw a write into a shared buffer"


# ----------------------------------------------------------------------------- storage


def storages(spec: ModelCacheSpec, blocks: Sequence[int]) -> tuple[Any, Any]:
    return (make_slab_storage(spec, blocks, CPP), make_slab_storage(spec, blocks, PORTABLE))


@pytest.mark.parametrize("kv_bits", [None, 8, 4])
def test_storage_round_trips_equal_the_cpp_storage(kv_bits: int | None) -> None:
    """store / load / read_layers / write_layers (and the codes of quantized blocks) give the
    same bits through both kernels, on a model with a sliding-window group."""
    sliding = LayerSpec(AttentionKind.SLIDING, 2, 64, 64, window=24)
    full = LayerSpec(AttentionKind.GLOBAL, 2, 64, 64)
    spec = ModelCacheSpec((sliding, full, sliding, full), "bfloat16", 16)
    if kv_bits is not None:
        spec = spec.with_format(kv_bits, group_size=32)
    cpp, portable = storages(spec, (8,) * len(spec.groups))
    assert isinstance(portable, QuantizedSlabStorage if kv_bits else DenseSlabStorage)
    assert portable.kernels is PORTABLE and portable.device == mx.default_device()
    rng = np.random.default_rng(9)
    n = 50

    def rows() -> mx.array:
        return mx.array(rng.standard_normal((1, 2, 64, 64)).astype(np.float32)).astype(mx.bfloat16)

    caches = [kv_cache(rows(), rows(), n) for _ in range(4)]
    tables = [[2, 5, 0, 7]] * len(spec.groups)
    assert cpp.store(caches, tables, 0) == portable.store(caches, tables, 0)
    for a, b in zip(cpp.load(tables, n), portable.load(tables, n), strict=True):
        assert equal(a.keys, b.keys) and equal(a.values, b.values) and a.offset == b.offset
    for a, b in zip(cpp.read_layers(tables, [0, 1, 3], 3, 41),
                    portable.read_layers(tables, [0, 1, 3], 3, 41), strict=True):  # fmt: skip
        assert np.array_equal(a.keys, b.keys) and np.array_equal(a.values, b.values)
    kv = LayerKV(2, 20, *(rng.integers(0, 2**15, (2, 12, 64)).astype(np.uint16)
                          for _ in range(2)))  # fmt: skip
    cpp.write_layers(tables, [kv])
    portable.write_layers(tables, [kv])
    (a,), (b,) = cpp.read_layers(tables, [2], 0, n), portable.read_layers(tables, [2], 0, n)
    assert np.array_equal(a.keys, b.keys)
    if kv_bits is None:
        with pytest.raises(InvalidRequestError, match="dense"):
            portable.read_codes(tables, [0], 0, 16)
        return
    codes_a = cpp.read_codes(tables, [0, 1], 0, 40)
    codes_b = portable.read_codes(tables, [0, 1], 0, 40)
    for x, y in zip(codes_a, codes_b, strict=True):
        for field in ("codes", "scales", "biases"):
            assert np.array_equal(getattr(x.keys, field), getattr(y.keys, field))
    portable.write_codes([[1, 3, 4, 6]] * len(spec.groups), codes_a)
    again = portable.read_codes([[1, 3, 4, 6]] * len(spec.groups), [0, 1], 0, 40)
    assert np.array_equal(again[1].values.codes, codes_a[1].values.codes)


def test_a_pool_allocates_its_slabs_on_the_default_device_with_the_default_kernels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = ModelCacheSpec.uniform(2, 2, 64, block_tokens=16)
    pool = BlockPool(spec, num_blocks=4)
    assert pool.storage.kernels.name == "cpu-extension"  # type: ignore[attr-defined]
    assert device_report()["slab_kernels"] == "cpu-extension"
    monkeypatch.setenv(KERNELS_ENV, "mlx-portable")
    pool = BlockPool(spec, num_blocks=4)
    storage: Any = pool.storage
    assert storage.kernels.name == "mlx-portable"
    assert storage.k[0].shape[0] == 5  # the zero block
    assert storage.nbytes == 2 * 2 * 5 * 2 * 16 * 64 * 2  # layers, K/V, blocks, heads, float16
    monkeypatch.setenv(KERNELS_ENV, "metal-magic")
    with pytest.raises(InvalidRequestError, match="names no slab kernels; choose one of"):
        default_kernels()
    monkeypatch.setenv(KERNELS_ENV, "cpu-extension")
    with pytest.raises(InvalidRequestError, match="CPU only"):
        default_kernels(mx.Device(mx.gpu))


# ----------------------------------------------------------------------------- engine


@pytest.fixture
def portable_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KERNELS_ENV, "mlx-portable")


@pytest.mark.usefixtures("portable_kernels")
def test_engine_turns_on_portable_kernels_equal_fresh_runs(
    tiny_model: LoadedModel, reference_generate: Reference
) -> None:
    turns = run_turns(tiny_model, reference_generate, {"a": 300, "b": 140}, [3, 150, 300], 10)
    assert all(c.cached_tokens > 0 for c in turns[-1].values())


@pytest.mark.usefixtures("portable_kernels")
def test_sliding_window_engine_on_portable_kernels(
    tiny_swa_model: LoadedModel, reference_generate: Reference
) -> None:
    turns = run_turns(tiny_swa_model, reference_generate, {"a": 200, "b": 330}, [3, 70], 8)
    assert all(c.cached_tokens > 0 for c in turns[-1].values())


# ----------------------------------------------------------------------------- what equality means


@functools.cache
def _bf16_model(loaded_path: str) -> Any:
    from kvpool.models import load_model

    model, _ = load_model(loaded_path)
    model.set_dtype(mx.bfloat16)
    return model


@pytest.mark.parametrize("kernels", [CPP, PORTABLE], ids=lambda k: k.name)
def test_a_resumed_bf16_turn_equals_the_same_chunks_prefilled_bit_for_bit(
    tiny_model: LoadedModel, kernels: Any
) -> None:
    """kvpool's promise (README, "What equal means"): the logits of a turn resumed from the
    pool equal, bit for bit, those of mlx-lm prefilling the same chunks (the cached context,
    then the new tokens) into a fresh cache. A one-shot re-prefill sums in another order and
    may differ in the last bits of bf16 (on an H200: max |delta logit| 0.05 at 8K).
    Negative control: one corrupted cached block changes the logits."""
    from mlx_lm.models.cache import make_prompt_cache

    model = _bf16_model(str(tiny_model[2]))
    rng = random.Random(4)
    context, new = words(rng, tiny_model[1], 300), words(rng, tiny_model[1], 40)

    def prefill(chunks: list[list[int]], cache: list[Any] | None = None) -> tuple[Any, mx.array]:
        cache = cache if cache is not None else make_prompt_cache(model)
        logits = None
        for chunk in chunks:
            logits = model(mx.array(chunk)[None], cache=cache)
            mx.eval(logits)
        assert logits is not None
        return cache, logits[0, -1]

    turn1, _ = prefill([context])
    spec = ModelCacheSpec.from_model(model)
    storage = make_slab_storage(spec, (4,), kernels)
    tables = [[2, 0]]
    storage.store(turn1, tables, 0)
    _, resumed = prefill([new], storage.load(tables, len(context)))
    _, same_chunks = prefill([context, new])
    assert resumed.dtype == mx.bfloat16
    assert equal(resumed, same_chunks)
    storage.write_layers(tables, [LayerKV(0, 0, *(np.zeros((2, 256, 16), np.uint16),) * 2)])
    _, corrupted = prefill([new], storage.load(tables, len(context)))
    assert not equal(corrupted, same_chunks)
