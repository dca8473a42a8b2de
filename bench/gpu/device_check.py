"""The GPU device check: kvpool's figures on the model's device, one JSON record per figure.

    python bench/gpu/device_check.py SECTION [--quick]

Each section runs in its own process (``bench/gpu/run.sh`` loops over them with a timeout),
so one failure still returns the rest. Sections:

* ``env``       device, versions, the slab kernels kvpool picks, where its slabs live
* ``gather``    EXP-006: 48 layers x (K, V) x 32 blocks of [8, 256, 128] bf16 (1.5 GiB out),
                gather and scatter p50/p95 against a device copy of the same bytes; GPU result
                checked bit for bit against the C++ kernels on the CPU
* ``quant``     the same gather from 4-bit blocks (dequantized inside)
* ``scatter8``  end-of-turn store of 8 agents' 2K caches (Llama-3.1-8B geometry) into the pool
* ``store_ways`` the store of 8 agents' last 80 tokens three ways: kvpool's, one evaluation for
                all agents, one advanced-index scatter per slab (slabs checked equal)
* ``ttft``      resumed turn (64 new tokens) vs re-prefill at 2K / 8K / 32K on a
                Llama-3.1-8B-shaped bf16 model with random weights, greedy tokens compared, and
                the logits of resumed vs one-shot vs chunked re-prefill (max |delta|)
* ``decode``    decode tok/s at batch 1 / 8 / 32: kvpool engine vs plain BatchGenerator
* ``workload``  8 agents x 4 turns at 2K: kvpool vs mlx-lm's LRUPromptCache way vs re-prefill
* ``arrival``   8 agents arriving one by one on a shared 2K system prompt, 3 turns, same three ways
* ``persist``   save and load of one 8K agent to a file, against a gather of the same bytes
* ``resize``    one budget move between layer groups of a 4 GiB gemma3-shaped pool (both groups'
                slabs copied), against a device copy of the pool's bytes; kept blocks checked

``--quick`` shrinks every size so the script runs on a CPU in seconds (a smoke test: its
figures are not GPU figures).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np

QUICK = False


def emit(section: str, figure: str, **values: Any) -> None:
    """One JSON record on stdout."""
    record = {"section": section, "figure": figure, "device": str(mx.default_device()), **values}
    print(json.dumps(record, default=str), flush=True)


def timed(fn: Callable[[], Any], reps: int, warmup: int = 2) -> dict[str, float]:
    """p50/p95/min in ms of ``fn`` (evaluated and synchronized) over ``reps`` runs."""
    for _ in range(warmup):
        mx.eval(fn())
        mx.synchronize()
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        samples.append((time.perf_counter() - t) * 1e3)
    samples.sort()
    p95 = samples[min(len(samples) - 1, round(0.95 * (len(samples) - 1)))]
    return {
        "p50_ms": round(statistics.median(samples), 3),
        "p95_ms": round(p95, 3),
        "min_ms": round(samples[0], 3),
        "reps": reps,
    }


# ----------------------------------------------------------------------------- env


def section_env() -> None:
    from kvpool.mlx.slab_kernels import device_report

    emit(
        "env",
        "environment",
        python=platform.python_version(),
        mlx=getattr(mx, "__version__", "unknown"),  # not in the type stubs
        cuda=bool(getattr(mx, "cuda", None) and mx.cuda.is_available()),
        metal=mx.metal.is_available(),
        **device_report(),
    )


# ----------------------------------------------------------------------------- gather


def _exp006() -> tuple[int, int, int, int, int, int]:
    """(layers, slab_blocks, heads, block_tokens, head_dim, gathered_blocks)."""
    return (4, 8, 2, 16, 64, 4) if QUICK else (48, 64, 8, 256, 128, 32)


def _slabs(kernels: Any, dtype: Any, seed: int) -> tuple[list[mx.array], list[int]]:
    layers, blocks, heads, tokens, dim, gathered = _exp006()
    rng = np.random.default_rng(seed)
    extra = kernels.extra_blocks
    zero = mx.zeros((extra, heads, tokens, dim), dtype=dtype)  # the portable zero block
    slabs = [
        mx.concatenate(
            [
                mx.random.normal((blocks, heads, tokens, dim), key=mx.random.key(seed + i)).astype(
                    dtype
                ),
                zero,
            ]
        )
        for i in range(2 * layers)
    ]
    mx.eval(slabs)
    table = [int(b) for b in rng.choice(blocks, size=gathered, replace=False)]
    return slabs, table


def section_gather() -> None:
    from kvpool.mlx.slab_kernels import ExtensionKernels, PortableKernels

    layers, _, heads, tokens, dim, gathered = _exp006()
    n = gathered * tokens
    kernels = PortableKernels()
    slabs, table = _slabs(kernels, mx.bfloat16, 1)
    out_bytes = sum(s.nbytes // s.shape[0] * gathered for s in slabs)
    capacity = n + tokens  # headroom, as a load gives it

    def gather() -> list[mx.array]:
        return kernels.gather(slabs, table, 0, n, capacity)

    outs = gather()
    mx.eval(outs)
    copy_src = [mx.array(o) for o in outs]
    mx.eval(copy_src)
    reps = 5 if QUICK else 30
    g = timed(gather, reps)
    c = timed(lambda: [a * 1 for a in copy_src], reps)
    # bit for bit against the C++ kernels on the CPU, on the first layer's K
    with mx.stream(mx.cpu):
        host_slab = mx.array(np.asarray(slabs[0][:-1].view(mx.uint16))).view(mx.bfloat16)
        (ref,) = ExtensionKernels().gather([host_slab], table, 0, n, capacity)
        mx.eval(ref)
    equal = bool(
        np.array_equal(np.asarray(outs[0].view(mx.uint16)), np.asarray(ref.view(mx.uint16)))
    )
    emit(
        "gather",
        "EXP-006 gather",
        kernels=kernels.name,
        layers=layers,
        blocks=gathered,
        out_gib=round(out_bytes / 2**30, 3),
        gather=g,
        device_copy=c,
        gather_vs_copy_p95=round(g["p95_ms"] / c["p95_ms"], 2),
        gb_per_s=round(2 * out_bytes / (g["p50_ms"] / 1e3) / 1e9, 1),
        equal_to_cpp_kernel=equal,
        target_p95_ms=5.0,
        target_vs_copy=2.0,
    )

    if mx.cuda.is_available():
        _custom_gather(slabs, table, n, capacity, outs, c, reps)

    rows = [
        mx.random.normal((1, heads, n, dim), key=mx.random.key(7 + i)).astype(mx.bfloat16)
        for i in range(2)
    ]
    mx.eval(rows)
    state = {"slabs": slabs}

    def scatter() -> list[mx.array]:
        current = state["slabs"]
        state["slabs"] = []
        updated = [kernels.scatter(s, rows[i % 2], table, 0) for i, s in enumerate(current)]
        state["slabs"] = updated
        return updated

    mx.reset_peak_memory()
    active = mx.get_active_memory()
    s = timed(scatter, reps)
    peak_over = mx.get_peak_memory() - active
    # control: a scatter into a slab whose buffer a view still shares must copy it
    # (mx.array(slab) would not do: it is a copy itself)
    held = state["slabs"][0]
    alias = held.reshape(held.shape)
    mx.eval(alias)
    mx.reset_peak_memory()
    active = mx.get_active_memory()
    state["slabs"][0] = kernels.scatter(held, rows[0], table, 0)
    mx.eval(state["slabs"][0])
    control_over = mx.get_peak_memory() - active
    del held, alias
    emit(
        "gather",
        "EXP-006 scatter",
        kernels=kernels.name,
        scatter=s,
        device_copy=c,
        scatter_vs_copy_p95=round(s["p95_ms"] / c["p95_ms"], 2),
        peak_bytes_over_active=int(peak_over),
        one_slab_bytes=int(state["slabs"][0].nbytes),
        control_copy_peak_bytes=int(control_over),
        in_place=bool(peak_over < state["slabs"][0].nbytes <= control_over),
    )


def _custom_gather(
    slabs: list[mx.array],
    table: list[int],
    n: int,
    capacity: int,
    portable_outs: list[mx.array],
    device_copy: dict[str, float],
    reps: int,
) -> None:
    """The run-time compiled CUDA gather, checked bit for bit against the portable one."""
    from kvpool.mlx.slab_kernels import CudaGatherKernels

    try:
        kernels = CudaGatherKernels()
        outs = kernels.gather(slabs, table, 0, n, capacity)
        mx.eval(outs)
        equal = all(
            bool(mx.array_equal(a, b).item()) for a, b in zip(outs, portable_outs, strict=True)
        )
        g = timed(lambda: kernels.gather(slabs, table, 0, n, capacity), reps)
        emit(
            "gather",
            "EXP-006 gather, custom CUDA kernel",
            kernels=kernels.name,
            gather=g,
            device_copy=device_copy,
            gather_vs_copy_p95=round(g["p95_ms"] / device_copy["p95_ms"], 2),
            equal_to_portable=equal,
        )
    except Exception as exc:
        emit("gather", "EXP-006 gather, custom CUDA kernel", error=f"{type(exc).__name__}: {exc}")


def section_quant() -> None:
    from kvpool.mlx.slab_kernels import CudaGatherKernels, PortableKernels

    _, _, _, tokens, _, gathered = _exp006()
    n = gathered * tokens
    portable = PortableKernels()
    candidates: list[Any] = [portable]
    if mx.cuda.is_available():
        candidates.append(CudaGatherKernels())
    slabs, table = _slabs(portable, mx.bfloat16, 2)
    reps = 5 if QUICK else 20
    dense = timed(lambda: portable.gather(slabs, table, 0, n, n + tokens), reps)
    for bits in (8, 4):
        q = [mx.quantize(s, group_size=64, bits=bits) for s in slabs]
        mx.eval(q)
        qs = [(a, b, c) for a, b, c in q]
        reference = portable.gather_dequantized(
            qs, table, 0, n, n + tokens, bits=bits, group_size=64
        )
        mx.eval(reference)
        for kernels in candidates:

            def gather(kernels: Any = kernels, qs: Any = qs, bits: int = bits) -> Any:
                return kernels.gather_dequantized(
                    qs, table, 0, n, n + tokens, bits=bits, group_size=64
                )

            out = gather()
            mx.eval(out)
            equal = all(
                bool(mx.array_equal(a, b).item()) for a, b in zip(out, reference, strict=True)
            )
            t = timed(gather, reps)
            emit(
                "quant",
                f"{bits}-bit gather",
                kernels=kernels.name,
                gather=t,
                dense_gather_portable=dense,
                vs_dense_p50=round(t["p50_ms"] / dense["p50_ms"], 2),
                equal_to_portable=equal,
            )
            del out
        del q, qs, reference


# ----------------------------------------------------------------------------- models


def llama_8b() -> Any:
    """A Llama-3.1-8B-shaped bf16 model with random weights, built on the default device."""
    from mlx_lm.models import llama

    if QUICK:
        args = llama.ModelArgs(
            model_type="llama", hidden_size=256, num_hidden_layers=2, intermediate_size=512,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=512,
            rope_theta=500000.0,
        )  # fmt: skip
    else:
        args = llama.ModelArgs(
            model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
            num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, vocab_size=128256,
            rope_theta=500000.0, max_position_embeddings=131072,
        )  # fmt: skip
    model = llama.Model(args)
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    return model


def tokenizer() -> Any:
    from kvpool.models import load_model

    return load_model("demo")[1]


def tokens(rng: np.random.Generator, n: int) -> list[int]:
    return [int(t) for t in rng.integers(100, 500 if QUICK else 120000, size=n)]


def engine_for(model: Any, tok: Any, max_bytes: int, **kwargs: Any) -> Any:
    from kvpool import BlockPool, BlockPoolBatchEngine, ModelCacheSpec

    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, max_bytes=max_bytes)
    return BlockPoolBatchEngine(model, tok, pool, spec, **kwargs)


def first_token_kvpool(engine: Any, agent: str, prompt: list[int], cache: Any, n: int) -> Any:
    """(ttft_s, completion) of one request through the engine."""
    first: list[float] = []
    t0 = time.perf_counter()
    engine.submit(agent, prompt, cache, n, on_token=lambda e: first.append(time.perf_counter()))
    done = engine.drain()
    return first[0] - t0, done[0]


def first_token_plain(generator: Any, prompt: list[int], n: int) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    (uid,) = generator.insert([prompt], max_tokens=[n])
    out: list[int] = []
    ttft = None
    while True:
        _, responses = generator.next()
        for r in responses:
            if r.uid != uid:
                continue
            if ttft is None:
                ttft = time.perf_counter() - t0
            out.append(int(r.token))
            if r.finish_reason is not None:
                assert ttft is not None
                return ttft, out


def section_ttft() -> None:
    from kvpool.benchmarks.turns import plain_generator

    model = llama_8b()
    tok = tokenizer()
    rng = np.random.default_rng(0)
    contexts: tuple[int, ...] = (256, 512, 1024) if QUICK else (2048, 8192, 32768)
    if os.environ.get("TTFT_CONTEXTS"):  # e.g. "2048,8192" for a shorter run
        contexts = tuple(int(c) for c in os.environ["TTFT_CONTEXTS"].split(","))
    new_tokens, gen = (16, 4) if QUICK else (64, 8)
    engine = engine_for(model, tok, (1 if QUICK else 24) * 2**30)
    plain = plain_generator(model, tok)
    # warm the kernels (run-time compiled on CUDA)
    w = tokens(rng, 300)
    _, d = first_token_kvpool(engine, "warm", w, None, 2)
    _, d2 = first_token_kvpool(engine, "warm", [*w, *d.token_ids, *tokens(rng, 40)], d.blocks, 2)
    engine.pool.release(d2.blocks)
    first_token_plain(plain, w, 2)
    for n in contexts:
        context = tokens(rng, n)
        reps = 2 if QUICK or n > 8192 else 3
        resumed, reprefill, equal = [], [], []
        for rep in range(reps):
            _, turn1 = first_token_kvpool(engine, f"a{n}-{rep}", context, None, 1)
            prompt = [*context, *turn1.token_ids, *tokens(rng, new_tokens)]
            t_plain, plain_tokens = first_token_plain(plain, prompt, gen)
            t_pool, turn2 = first_token_kvpool(engine, f"a{n}-{rep}", prompt, turn1.blocks, gen)
            assert turn2.cached_tokens >= n, (turn2.cached_tokens, n)
            resumed.append(t_pool * 1e3)
            reprefill.append(t_plain * 1e3)
            equal.append(sum(a == b for a, b in zip(turn2.token_ids, plain_tokens, strict=False)))
            engine.pool.release(turn2.blocks)
        p_pool, p_plain = statistics.median(resumed), statistics.median(reprefill)
        emit(
            "ttft",
            f"resumed turn TTFT at {n}",
            context=n,
            new_tokens=new_tokens + 1,
            resumed_ms=[round(x, 1) for x in resumed],
            reprefill_ms=[round(x, 1) for x in reprefill],
            speedup_p50=round(p_plain / p_pool, 2),
            greedy_tokens_equal=equal,
            of_tokens=gen,
        )
    engine.close()
    plain.close()
    _logit_divergence(model, rng, contexts[1] if len(contexts) > 1 else contexts[0])


def _logit_divergence(model: Any, rng: np.random.Generator, n: int) -> None:
    """Last-position logits of a resumed turn vs a one-shot and a chunked re-prefill."""
    from mlx_lm.models.cache import make_prompt_cache

    from kvpool import BlockPool, ModelCacheSpec

    context = tokens(rng, n)
    new = tokens(rng, 64)
    step = 128 if QUICK else 2048  # BatchGenerator's prefill step

    def prefill(chunks: list[list[int]]) -> tuple[list[Any], mx.array]:
        cache = make_prompt_cache(model)
        logits = None
        for c in chunks:
            logits = model(mx.array(c)[None], cache=cache)
            mx.eval(logits, [x.state for x in cache])
        assert logits is not None
        return cache, logits[0, -1].astype(mx.float32)

    chunked = [context[i : i + step] for i in range(0, n, step)]
    turn1_cache, _ = prefill(chunked)
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, num_blocks=spec.blocks_for(n + 64) + 2)
    tables = [list(range(spec.blocks_for(n)))]
    pool.storage.store(turn1_cache, tables, 0)
    resumed_cache = pool.storage.load(tables, n)
    resumed = model(mx.array(new)[None], cache=resumed_cache)[0, -1].astype(mx.float32)
    _, chunked_then_new = prefill([*chunked, new])
    _, one_shot = prefill([[*context, *new]])
    _, chunked_whole = prefill(
        [[*context, *new][i : i + step] for i in range(0, n + len(new), step)]
    )

    def top(logits: mx.array) -> int:
        return int(np.asarray(mx.argmax(logits)))

    def delta(a: mx.array, b: mx.array) -> float:
        return round(float(np.asarray(mx.max(mx.abs(a - b)))), 5)

    emit(
        "ttft",
        f"logits at {n}: max |delta|",
        context=n,
        resumed_vs_turn1_chunks_then_new=delta(resumed, chunked_then_new),
        resumed_vs_one_shot=delta(resumed, one_shot),
        resumed_vs_reprefill_chunked_by_step=delta(resumed, chunked_whole),
        one_shot_vs_reprefill_chunked_by_step=delta(one_shot, chunked_whole),
        argmax_equal={
            "resumed/one_shot": top(resumed) == top(one_shot),
            "resumed/chunked_then_new": top(resumed) == top(chunked_then_new),
        },
    )


# ----------------------------------------------------------------------------- scatter8


def _eight_agents() -> tuple[Any, Any, list[list[Any]], list[list[list[int]]], int]:
    """A Llama-3.1-8B-geometry bf16 pool with room for 8 agents' 2K caches (dense slabs),
    the agents' mlx-lm caches (random rows, evaluated) and their block tables."""
    from kvpool import BlockPool, ModelCacheSpec
    from kvpool.mlx.mlx_lm import kv_cache
    from kvpool.mlx.slabs import DenseSlabStorage

    layers, heads, dim = (2, 2, 64) if QUICK else (32, 8, 128)
    n, agents = (300, 8) if QUICK else (2048, 8)
    spec = ModelCacheSpec.uniform(layers, heads, dim, dtype="bfloat16")
    blocks = spec.blocks_for(n)
    pool = BlockPool(spec, num_blocks=agents * blocks + 1)
    assert isinstance(pool.storage, DenseSlabStorage)
    caps = ((n // 256) + 1) * 256
    caches = [
        [
            kv_cache(
                mx.random.normal((1, heads, caps, dim), key=mx.random.key(a * 100 + i)).astype(
                    mx.bfloat16
                ),
                mx.random.normal((1, heads, caps, dim), key=mx.random.key(a * 100 + i + 50)).astype(
                    mx.bfloat16
                ),
                n,
            )
            for i in range(layers)
        ]
        for a in range(agents)
    ]
    mx.eval([[c.keys, c.values] for cs in caches for c in cs])
    tables = [[list(range(a * blocks, (a + 1) * blocks))] for a in range(agents)]
    return pool, pool.storage, caches, tables, n


def section_scatter8() -> None:
    from kvpool.mlx.slabs import DenseSlabStorage

    pool, _, caches, tables, n = _eight_agents()
    agents, layers = len(caches), len(caches[0])

    def store_all() -> list[mx.array]:
        for a in range(agents):
            pool.storage.store(caches[a], tables[a], 0)
        return []

    t = timed(store_all, 3 if QUICK else 10)

    def store_turn() -> list[mx.array]:
        for a in range(agents):
            pool.storage.store(caches[a], tables[a], n - 80)
        return []

    store_turn()  # once before the baseline: what a first store frees is not counted
    mx.synchronize()
    mx.reset_peak_memory()
    active = mx.get_active_memory()
    turn = timed(store_turn, 3 if QUICK else 10)
    # in place: the stores allocate far less than one layer's slab (peak 0: nothing at all)
    peak_over = max(0, mx.get_peak_memory() - active)
    one_slab = pool.storage.nbytes // (2 * layers)
    # control: while a view shares layer 0's K slab's buffer, a store must copy that slab
    storage = pool.storage
    assert isinstance(storage, DenseSlabStorage)
    alias = storage.k[0].reshape(storage.k[0].shape)
    mx.eval(alias)
    mx.reset_peak_memory()
    active = mx.get_active_memory()
    store_turn()
    mx.synchronize()
    control_over = max(0, mx.get_peak_memory() - active)
    del alias
    back = pool.storage.load(tables[3], n)
    equal = bool(mx.array_equal(back[0].keys[..., :n, :], caches[3][0].keys[..., :n, :]).item())
    emit(
        "scatter8",
        "end-of-turn store, 8 agents",
        agents=agents,
        tokens_each=n,
        store=t,
        store_last_80_tokens_each=turn,
        kernels=storage.kernels.name,
        round_trip_equal=equal,
        last_80_peak_bytes_over_active=int(peak_over),
        one_slab_bytes=int(one_slab),
        last_80_control_copy_peak_bytes=int(control_over),
        last_80_in_place=bool(peak_over < one_slab <= control_over),
        target_ms=10.0,
    )


# ----------------------------------------------------------------------------- store_ways


def section_store_ways() -> None:
    """Three ways to store 8 agents' last 80 tokens (what `scatter8`'s ``last_80`` times),
    to choose the next change to the end-of-turn store from figures: kvpool's (per agent:
    a slice update per layer's K and V slab, then one evaluation), the same slice updates
    of every agent under one evaluation (what storing at the end of the engine's step
    would give), and one advanced-index scatter of every agent's rows per slab (their
    rows concatenated; the index arrays shared by every slab). Each way's slabs are
    checked equal to kvpool's, and its peak memory over what was allocated before tells
    whether it wrote in place."""
    pool, storage, caches, tables, n = _eight_agents()
    agents, layers = len(caches), len(caches[0])
    first, size = n - 80, pool.spec.block_tokens

    def per_agent() -> list[mx.array]:
        for a in range(agents):
            storage.store(caches[a], tables[a], first)
        return []

    def one_eval() -> list[mx.array]:
        for a in range(agents):
            for i, c in enumerate(caches[a]):
                rows = slice(first, n)
                keys, values = c.keys[:, :, rows, :], c.values[:, :, rows, :]
                storage._scatter(i, keys, values, tables[a][0], first)
        return [*storage.k, *storage.v]

    positions = range(first, n)
    block_ids = mx.array([tables[a][0][p // size] for a in range(agents) for p in positions])
    slots = mx.array([p % size for _ in range(agents) for p in positions])
    heads, dim = storage.k[0].shape[1], storage.k[0].shape[3]
    index = (
        block_ids[:, None, None],
        mx.arange(heads)[None, :, None],
        slots[:, None, None],
        mx.arange(dim)[None, None, :],
    )

    def batched() -> list[mx.array]:
        for i in range(layers):
            for slabs, part in ((storage.k, "keys"), (storage.v, "values")):
                rows = [getattr(caches[a][i], part)[0, :, first:n, :] for a in range(agents)]
                slabs[i][index] = mx.concatenate(rows, axis=1).transpose(1, 0, 2)
        return [*storage.k, *storage.v]

    reps = 3 if QUICK else 10
    figures: dict[str, Any] = {}
    reference: list[mx.array] = []
    for name, way in (("per_agent", per_agent), ("one_eval", one_eval), ("batched", batched)):
        for slabs in (storage.k, storage.v):  # zero the rows: each way writes them anew
            for i in range(layers):
                slabs[i] = mx.zeros_like(slabs[i])
        mx.eval(storage.k, storage.v)
        mx.synchronize()
        mx.reset_peak_memory()
        active = mx.get_active_memory()
        figures[name] = timed(way, reps)
        # in place: far less than one slab (``scatter8`` has the control that tells)
        figures[f"{name}_peak_bytes_over_active"] = max(0, mx.get_peak_memory() - active)
        snapshot = [mx.array(a) for a in (*storage.k, *storage.v)]
        mx.eval(snapshot)
        if not reference:
            reference = snapshot
        figures[f"{name}_equal"] = all(
            bool(mx.array_equal(x, y).item()) for x, y in zip(snapshot, reference, strict=True)
        )
        del snapshot
    emit(
        "store_ways",
        "end-of-turn store of 8 agents x last 80 tokens, three ways",
        agents=agents,
        tokens_each=n,
        slabs=2 * layers,
        one_slab_bytes=int(storage.k[0].nbytes),
        kernels=storage.kernels.name,
        **figures,
        target_ms=10.0,
    )


# ----------------------------------------------------------------------------- decode


def section_decode() -> None:
    """Decode rate after every sequence of the batch has its first token (prefill excluded)."""
    from kvpool.benchmarks.turns import plain_generator

    model = llama_8b()
    tok = tokenizer()
    rng = np.random.default_rng(3)
    steps = 8 if QUICK else 64
    engine = engine_for(model, tok, (1 if QUICK else 16) * 2**30)
    plain = plain_generator(model, tok)

    def run_kvpool(prompts: list[list[int]]) -> list[tuple[str, float]]:
        events: list[tuple[str, float]] = []
        for i, p in enumerate(prompts):
            engine.submit(
                f"d{i}", p, None, steps,
                on_token=lambda e: events.append((e.agent_id, time.perf_counter())),
            )  # fmt: skip
        for d in engine.drain():
            engine.pool.release(d.blocks)
        return events

    def run_plain(prompts: list[list[int]]) -> list[tuple[str, float]]:
        events: list[tuple[str, float]] = []
        left = set(plain.insert(prompts, max_tokens=[steps] * len(prompts)))
        while left:
            _, responses = plain.next()
            now = time.perf_counter()
            for r in responses:
                events.append((str(r.uid), now))
                if r.finish_reason is not None:
                    left.discard(r.uid)
        return events

    def decode_rate(events: list[tuple[str, float]], batch: int) -> float:
        """Tokens/s while the whole batch decodes: after every sequence has its first token,
        until the first one finishes (prefill waves and the ragged tail excluded)."""
        firsts: dict[str, float] = {}
        lasts: dict[str, float] = {}
        for agent, t in events:
            firsts.setdefault(agent, t)
            lasts[agent] = t
        t1, t2 = max(firsts.values()), min(lasts.values())
        inside = [t for _, t in events if t1 < t <= t2]
        return len(inside) / (t2 - t1) if inside and t2 > t1 else float("nan")

    for batch in (1, 8, 32):
        prompts = [tokens(rng, 64) for _ in range(batch)]
        rates: dict[str, list[float]] = {"kvpool": [], "plain": []}
        for way in ("plain", "kvpool") * 3:
            run = run_kvpool if way == "kvpool" else run_plain
            rates[way].append(decode_rate(run(prompts), batch))
        kv, pl = statistics.median(rates["kvpool"][1:]), statistics.median(rates["plain"][1:])
        emit(
            "decode",
            f"decode batch {batch}",
            batch=batch,
            steps=steps,
            kvpool_tok_s=round(kv, 1),
            plain_tok_s=round(pl, 1),
            ratio=round(kv / pl, 3),
            target_ratio=0.97,
        )
    engine.close()
    plain.close()


# ----------------------------------------------------------------------------- workload


def section_workload() -> None:
    from kvpool.benchmarks import workload
    from kvpool.benchmarks.measure import mlx_cache_limit

    model = llama_8b()
    tok = tokenizer()
    shape = (
        workload.Shape(turns=2, system_tokens=64, task_tokens=64, user_tokens=16, max_tokens=4)
        if QUICK
        else workload.Shape(
            turns=4, system_tokens=1024, task_tokens=1024, user_tokens=64, max_tokens=16
        )
    )
    with mlx_cache_limit(4 * 2**30 if QUICK else 64 * 2**30):
        r = workload._run_agents(model, tok, 8, shape)
    emit(
        "workload",
        "8 agents x 4 turns at 2K, three ways",
        agents=r.agents,
        turns=r.turns,
        total_s={w: round(t.total_s, 3) for w, t in r.ways.items()},
        kvpool_vs_lru_total=r.kvpool_vs_lru_total,
        kvpool_vs_plain_total=r.kvpool_vs_plain_total,
        agent_turns_unequal=r.agent_turns_unequal,
        per_turn_s=[row.total_s for row in r.per_turn],
        prefilled_tokens={w: t.prefilled_tokens for w, t in r.ways.items()},
        parts_s={w: t.parts_s for w, t in r.ways.items()},
        of_agent_turns=r.agent_turns,
        target_vs_lru=0.8,
    )


def section_arrival() -> None:
    from kvpool.benchmarks import workload
    from kvpool.benchmarks.measure import mlx_cache_limit

    model = llama_8b()
    tok = tokenizer()
    shape = (
        workload.Shape(turns=2, system_tokens=64, task_tokens=16, user_tokens=16, max_tokens=4)
        if QUICK
        else workload.Shape(
            turns=3, system_tokens=2048, task_tokens=64, user_tokens=64, max_tokens=16
        )
    )
    with mlx_cache_limit(4 * 2**30 if QUICK else 64 * 2**30):
        r = workload._run_agents(model, tok, 8, shape, one_by_one=True)
    emit(
        "arrival",
        "8 agents one by one on a shared 2K system prompt x 3 turns, three ways",
        agents=r.agents,
        turns=r.turns,
        total_s={w: round(t.total_s, 3) for w, t in r.ways.items()},
        mean_ttft_ms={w: t.mean_ttft_ms for w, t in r.ways.items()},
        kvpool_vs_lru_total=r.kvpool_vs_lru_total,
        kvpool_vs_plain_total=r.kvpool_vs_plain_total,
        agent_turns_unequal=r.agent_turns_unequal,
        per_turn_s=[row.total_s for row in r.per_turn],
        prefilled_tokens={w: t.prefilled_tokens for w, t in r.ways.items()},
        parts_s={w: t.parts_s for w, t in r.ways.items()},
        of_agent_turns=r.agent_turns,
        target_vs_lru=0.8,
    )


def section_persist() -> None:
    """What a save and a load of one agent cost where the slabs live (host copies included)."""
    import tempfile
    from pathlib import Path

    from kvpool import BlockPool, ModelCacheSpec
    from kvpool.cache.sequence import SequenceCache
    from kvpool.mlx.mlx_lm import kv_cache
    from kvpool.persist import load_cache, save_cache

    layers, heads, dim = (2, 2, 64) if QUICK else (32, 8, 128)
    n = 600 if QUICK else 8192
    spec = ModelCacheSpec.uniform(layers, heads, dim, dtype="bfloat16")
    blocks = spec.blocks_for(n) + 1
    source, target = (BlockPool(spec, num_blocks=blocks) for _ in range(2))
    tokens = list(range(1, n + 1))
    seq = source.open_sequence("agent", tokens, 0)
    assert isinstance(seq, SequenceCache)
    seq.read()

    def rows(i: int) -> mx.array:
        return mx.random.normal((1, heads, n, dim), key=mx.random.key(i)).astype(mx.bfloat16)

    handle = seq.close([kv_cache(rows(2 * i), rows(2 * i + 1), n) for i in range(layers)], tokens)
    fp = "sha256:" + "ab" * 32
    nbytes = 2 * layers * heads * n * dim * 2
    reps = 2 if QUICK else 3
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "agent.kvcache"
        save_ms, load_ms = [], []
        for _ in range(reps):
            t = time.perf_counter()
            size = save_cache(path, source, handle, fingerprint=fp)
            save_ms.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            loaded = load_cache(path, target, fingerprint=fp)
            mx.synchronize()
            load_ms.append((time.perf_counter() - t) * 1e3)
            target.release(loaded)
    gather = timed(
        lambda: [c.keys for c in source.storage.load([handle.tables[0].block_ids], n)], reps
    )
    emit(
        "persist",
        f"save and load of one agent ({n} tokens)",
        kv_bytes=nbytes,
        file_bytes=size,
        save_ms=[round(x, 1) for x in save_ms],
        load_ms=[round(x, 1) for x in load_ms],
        save_gb_per_s=round(nbytes / (statistics.median(save_ms) / 1e3) / 1e9, 2),
        load_gb_per_s=round(nbytes / (statistics.median(load_ms) / 1e3) / 1e9, 2),
        gather_same_bytes=gather,
        note="save: gather on the device, copy to host 64 MiB at a time, hash, write, fsync",
    )


def section_resize() -> None:
    """One budget move between layer groups where the slabs live, vs a copy of the same bytes.

    A gemma3-shaped pool (5 of 6 layers slide over 1K) gives a quarter of its global group's
    blocks to the sliding group; the slabs of both groups are copied once (kvpool.pool's
    resize). Kept blocks are checked bit for bit.
    """
    from kvpool import AttentionKind, BlockPool, LayerSpec, ModelCacheSpec

    heads, dim, budget = (2, 64, 16 << 20) if QUICK else (8, 128, 4 << 30)
    spec = ModelCacheSpec(
        tuple(
            LayerSpec(AttentionKind.GLOBAL, heads, dim, dim)
            if i % 6 == 5
            else LayerSpec(AttentionKind.SLIDING, heads, dim, dim, window=1024)
            for i in range(12 if QUICK else 48)
        ),
        "bfloat16",
    )
    pool = BlockPool(spec, max_bytes=budget)
    storage: Any = pool.storage
    sliding, full = pool.blocks_per_group
    layer = next(i for i, x in enumerate(spec.layers) if x.kind is AttentionKind.GLOBAL)
    probe = [0, full // 2]
    storage.k[layer] = mx.random.normal(storage.k[layer].shape).astype(mx.bfloat16)
    mx.eval(storage.k[layer])
    before = mx.take(storage.k[layer], mx.array(probe), axis=0)
    moved = full // 4
    gained = moved * spec.group_bytes_per_block(1) // spec.group_bytes_per_block(0)
    storage.resize((sliding + gained, full - moved))
    t = time.perf_counter()
    storage._sync()
    mx.synchronize()
    resize_ms = (time.perf_counter() - t) * 1e3
    after = mx.take(storage.k[layer], mx.array(probe), axis=0)
    pool_bytes = pool.bytes_total
    x = mx.zeros((pool_bytes // 2,), mx.bfloat16)
    mx.eval(x)
    copy = timed(lambda: x + 0, 3)
    emit(
        "resize",
        "one budget move between layer groups (both groups' slabs copied)",
        pool_bytes=pool_bytes,
        blocks_before=[sliding, full],
        blocks_after=list(storage.blocks_per_group),
        resize_ms=round(resize_ms, 1),
        copy_of_pool_bytes=copy,
        ratio_to_copy=round(resize_ms / copy["p50_ms"], 2) if copy["p50_ms"] else None,
        kept_blocks_equal=bool(mx.array_equal(before, after).item()),
    )


SECTIONS: dict[str, Callable[[], None]] = {
    "env": section_env,
    "gather": section_gather,
    "quant": section_quant,
    "scatter8": section_scatter8,
    "store_ways": section_store_ways,
    "ttft": section_ttft,
    "decode": section_decode,
    "workload": section_workload,
    "arrival": section_arrival,
    "persist": section_persist,
    "resize": section_resize,
}


def main() -> int:
    global QUICK
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=sorted(SECTIONS))
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke test)")
    args = parser.parse_args()
    QUICK = args.quick
    t0 = time.perf_counter()
    try:
        SECTIONS[args.section]()
    except Exception as exc:
        emit(args.section, "error", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        print(
            json.dumps({"section": args.section, "wall_s": round(time.perf_counter() - t0, 1)}),
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
