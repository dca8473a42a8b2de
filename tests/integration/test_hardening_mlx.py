"""Hardening (issue 11) on real mlx-lm: a callback or a bad sampling request loses no other
agent's tokens, size limits and odd files are clear kvpool errors, the store refuses a
second thread, and the CLI exits 2 with one line for a workload that cannot fit."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import LoadedModel, Reference, fresh, make_engine, words

from kvpool import (
    BlockPool,
    CacheCorruptionError,
    InvalidRequestError,
    ModelCacheSpec,
    SamplingParams,
    TokenEvent,
)
from kvpool.persist import import_prompt_cache, model_fingerprint
from kvpool.store import AgentCacheStore


def contexts(loaded: LoadedModel, lengths: dict[str, int]) -> dict[str, list[int]]:
    rng = random.Random(11)
    return {agent: words(rng, loaded[1], n) for agent, n in lengths.items()}


def test_a_raising_callback_and_a_self_cancel_leave_the_other_agents_exact(
    tiny_model: LoadedModel, reference_generate: Reference
) -> None:
    engine, pool = make_engine(tiny_model, 16)
    prompts = contexts(tiny_model, {"bad": 40, "quitter": 50, "good-1": 60, "good-2": 30})
    uids: dict[str, int] = {}

    def explode(event: TokenEvent) -> None:
        if event.index == 2:
            raise RuntimeError("callback bug")

    def quit_on_last(event: TokenEvent) -> None:
        if event.index == 5:  # its last token (max_tokens=6)
            assert engine.cancel(uids["quitter"])

    uids["bad"] = engine.submit("bad", prompts["bad"], max_tokens=8, on_token=explode)
    uids["quitter"] = engine.submit("quitter", prompts["quitter"], None, 6, on_token=quit_on_last)
    for agent in ("good-1", "good-2"):
        engine.submit(agent, prompts[agent], max_tokens=8, on_token=lambda e: None)
    done = {c.agent_id: c for c in engine.drain()}
    assert sorted(done) == ["bad", "good-1", "good-2"]
    assert done["bad"].finish_reason == "error" and done["bad"].blocks is None
    for agent in ("good-1", "good-2"):
        assert done[agent].error is None
        assert list(done[agent].token_ids) == fresh(
            reference_generate, tiny_model, prompts[agent], 8
        )
    held = sum(len(done[a].blocks.block_ids) for a in ("good-1", "good-2"))  # type: ignore[union-attr]
    assert pool.num_used == held and pool.num_handles == 2
    pool.check_invariants()


def test_bad_sampling_is_refused_at_submit_and_numpy_top_k_samples_in_the_batch(
    tiny_model: LoadedModel, reference_generate: Reference
) -> None:
    model, _, _ = tiny_model
    vocab = int(model.args.vocab_size)
    engine, pool = make_engine(tiny_model, 16)
    prompts = contexts(tiny_model, {"greedy-1": 40, "greedy-2": 70, "sampled": 50})
    engine.submit("greedy-1", prompts["greedy-1"], max_tokens=8)
    for bad in (vocab, vocab + 1):  # passed SamplingParams, then failed the batch step
        with pytest.raises(InvalidRequestError, match=f"top_k {bad}"):
            engine.submit("x", prompts["sampled"], sampling=SamplingParams(1.0, top_k=bad))
    with pytest.raises(InvalidRequestError, match="sampling must be a SamplingParams"):
        engine.submit("x", prompts["sampled"], sampling="greedy")  # type: ignore[arg-type]
    # numpy numbers are normalised: mlx-lm's top-k sampler insists on a Python int
    params = SamplingParams(np.float32(0.8), top_k=np.int64(vocab - 1), min_p=np.float64(0.05))
    engine.submit("sampled", prompts["sampled"], max_tokens=8, sampling=params)
    engine.submit("greedy-2", prompts["greedy-2"], max_tokens=8)
    done = {c.agent_id: c for c in engine.drain()}
    assert sorted(done) == ["greedy-1", "greedy-2", "sampled"]
    assert all(c.error is None for c in done.values()), [c.error for c in done.values()]
    assert len(done["sampled"].token_ids) >= 1
    for agent in ("greedy-1", "greedy-2"):
        assert list(done[agent].token_ids) == fresh(
            reference_generate, tiny_model, prompts[agent], 8
        )
    assert pool.num_handles == 3


def test_a_pool_larger_than_the_machine_is_refused_before_mlx_allocates(
    tiny_model: LoadedModel,
) -> None:
    spec = ModelCacheSpec.from_model(tiny_model[0])
    with pytest.raises(InvalidRequestError, match="more than this machine's memory"):
        BlockPool(spec, num_blocks=10**9)  # segfaulted inside MLX
    with pytest.raises(InvalidRequestError, match="more than this machine's memory"):
        BlockPool(spec, max_bytes=2**45)


def test_import_prompt_cache_refuses_a_fifo_and_deep_metadata(
    tiny_model: LoadedModel, tmp_path: Path
) -> None:
    from mlx_lm.models.cache import make_prompt_cache, save_prompt_cache

    _, pool = make_engine(tiny_model, 4)
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    timer = threading.Timer(10, lambda: os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)))
    timer.start()  # unblocks a reader stuck on the FIFO (the old behaviour) after 10 s
    try:
        with pytest.raises(CacheCorruptionError, match="not a regular file but a FIFO"):
            import_prompt_cache(fifo, pool, agent_id="a", token_ids=[1, 2])
    finally:
        assert timer.is_alive(), "import_prompt_cache blocked on a FIFO"
        timer.cancel()

    import mlx.core as mx

    model = tiny_model[0]
    caches = make_prompt_cache(model)
    model(mx.array([[1, 2, 3]]), cache=caches)
    mx.eval([(c.keys, c.values) for c in caches])
    path = tmp_path / "deep.safetensors"
    deep = "[" * 100_000 + "]" * 100_000
    save_prompt_cache(str(path), caches, {"kvpool_agent_id": "a", "kvpool_token_ids": deep})
    with pytest.raises(CacheCorruptionError, match="kvpool_token_ids"):
        import_prompt_cache(path, pool)
    assert pool.num_used == 0


def test_the_store_refuses_a_second_thread_instead_of_crashing_mlx(
    tiny_model: LoadedModel, tmp_path: Path
) -> None:
    model = tiny_model[0]
    engine, pool = make_engine(tiny_model, 16)
    store = AgentCacheStore(engine, tmp_path, fingerprint=model_fingerprint(model))
    prompt = contexts(tiny_model, {"a": 40})["a"]
    store.submit("a", prompt, max_tokens=4)
    errors: list[BaseException] = []

    def worker() -> None:
        for call in (lambda: store.submit("b", prompt, max_tokens=4), store.drain, store.close):
            try:
                call()
            except BaseException as exc:
                errors.append(exc)

    thread = threading.Thread(target=worker, name="worker")
    thread.start()
    thread.join(120)
    assert not thread.is_alive()
    assert len(errors) == 3 and all(isinstance(e, InvalidRequestError) for e in errors), errors
    assert "not thread-safe" in str(errors[0])
    (done,) = store.drain()  # the owner thread is unaffected
    assert done.error is None and done.agent_id == "a"
    store.close()
    assert pool.num_used == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-tokens", "100000000"],
        ["--agents", "100000", "--turns", "1", "--max-tokens", "3000"],
    ],
    ids=["max-tokens", "agents"],
)
def test_demo_refuses_a_workload_larger_than_the_machine(
    argv: list[str], tmp_path: Path, tiny_model: LoadedModel
) -> None:
    """These segfaulted (rc 139) while MLX allocated the pool; now one line and exit 2."""
    env = {**os.environ, "KVPOOL_CACHE_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "kvpool.cli", "--no-fast-blas", "demo", "--model"]
    result = subprocess.run(
        [*command, str(tiny_model[2]), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "more than this machine's memory" in result.stderr
