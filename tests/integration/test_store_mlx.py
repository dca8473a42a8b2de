"""AgentCacheStore on real mlx-lm: a restart resumes from disk, a small pool evicts exactly."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import LoadedModel, Reference, words

from kvpool import (
    BlockPool,
    BlockPoolBatchEngine,
    CompletedGeneration,
    ModelCacheSpec,
)
from kvpool.mlx import kernels
from kvpool.persist import cache_path, model_fingerprint
from kvpool.store import AgentCacheStore, Tier


def make_store(
    loaded: LoadedModel, directory: Path, num_blocks: int, block_tokens: int = 256
) -> AgentCacheStore:
    model, tokenizer, _ = loaded
    spec = ModelCacheSpec.from_model(model, block_tokens=block_tokens)
    pool = BlockPool(spec, num_blocks=num_blocks)
    engine = BlockPoolBatchEngine(model, tokenizer, pool, spec)
    return AgentCacheStore(engine, directory, fingerprint=model_fingerprint(model))


# Process 1: turn 1 of every agent, then store.close() (caches to disk) and exit.
_TURN_ONE = r"""
import json, sys
from kvpool import BlockPool, BlockPoolBatchEngine, ModelCacheSpec
from kvpool.models import load_model
from kvpool.persist import model_fingerprint
from kvpool.store import AgentCacheStore

model_dir, cache_dir, job_path = sys.argv[1:4]
job = json.loads(open(job_path).read())
model, tokenizer = load_model(model_dir)
spec = ModelCacheSpec.from_model(model)
engine = BlockPoolBatchEngine(model, tokenizer, BlockPool(spec, num_blocks=32), spec)
store = AgentCacheStore(engine, cache_dir, fingerprint=model_fingerprint(model))
for agent, prompt in job["prompts"].items():
    store.submit(agent, prompt, max_tokens=job["max_tokens"])
done = store.drain()
store.close()
assert engine.pool.num_used == 0
print(json.dumps({c.agent_id: [c.error is None, list(c.blocks.token_ids)] for c in done}))
"""


@pytest.mark.parametrize("model_name", ["tiny_model", "tiny_swa_model"])
def test_a_second_process_resumes_from_disk(
    model_name: str, request: pytest.FixtureRequest, reference_generate: Reference, tmp_path: Path
) -> None:
    loaded: LoadedModel = request.getfixturevalue(model_name)
    _, tokenizer, model_dir = loaded
    rng = random.Random(21)
    prompts = {a: words(rng, tokenizer, n) for a, n in (("a", 300), ("b", 520), ("c", 90))}
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"prompts": prompts, "max_tokens": 7}))
    caches = tmp_path / "caches"
    env = {k: v for k, v in os.environ.items() if k != "KVPOOL_FAST_BLAS"}  # reference BLAS
    proc = subprocess.run(
        [sys.executable, "-c", _TURN_ONE, str(model_dir), str(caches), str(job)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    saved: dict[str, list[Any]] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(saved) == ["a", "b", "c"] and all(ok for ok, _ in saved.values())
    assert sorted(p.name for p in caches.iterdir()) == sorted(
        cache_path(caches, a).name for a in "abc"
    )

    # Process 2 (this one): a fresh pool, caches only on disk.
    store = make_store(loaded, caches, num_blocks=32)
    assert all(store.tier(a) is Tier.COLD for a in "abc")
    contexts = {a: [*ctx, *words(rng, tokenizer, 25)] for a, (_, ctx) in saved.items()}
    for agent, context in contexts.items():
        store.submit(agent, context, max_tokens=8)
    done = {c.agent_id: c for c in store.drain()}
    expected = reference_generate(
        loaded[0],
        [contexts[a] for a in "abc"],
        8,
        stop_tokens=sorted(tokenizer.eos_token_ids),
    )
    for agent, want in zip("abc", expected, strict=True):
        c = done[agent]
        assert c.error is None, c.error
        assert list(c.token_ids) == want, agent
        # no token of the saved context was prefilled again
        assert c.cached_tokens == len(saved[agent][1])
        assert c.prefilled_tokens == len(contexts[agent]) - len(saved[agent][1])
    stats = store.stats
    assert (stats.num_cold_hits, stats.num_hot_hits, stats.num_misses) == (3, 0, 0)
    assert stats.tokens_saved == sum(len(ctx) for _, ctx in saved.values())


def test_twelve_agents_through_a_pool_for_three(
    tiny_model: LoadedModel, reference_generate: Reference, tmp_path: Path
) -> None:
    """3 turns of 12 agents; 32-token blocks, the pool holds 3 final caches (8 blocks each)."""
    _, tokenizer, _ = tiny_model
    agents = [f"agent-{i:02d}" for i in range(12)]

    def turns(store: AgentCacheStore) -> list[dict[str, CompletedGeneration]]:
        rng = random.Random(5)
        prompts = {a: words(rng, tokenizer, 150 + 7 * i) for i, a in enumerate(agents)}
        out: list[dict[str, CompletedGeneration]] = []
        for _ in range(3):
            done = store.run_turns(prompts, max_tokens=6)
            assert sorted(done) == agents
            assert all(c.error is None for c in done.values())
            for a in agents:
                blocks = done[a].blocks
                assert blocks is not None
                prompts[a] = [*blocks.token_ids, *words(rng, tokenizer, 20)]
            out.append(done)
        return out

    unlimited = make_store(tiny_model, tmp_path / "unlimited", num_blocks=160, block_tokens=32)
    expected = turns(unlimited)
    assert unlimited.stats.num_evictions == 0

    store = make_store(tiny_model, tmp_path / "tight", num_blocks=24, block_tokens=32)
    start_free = store.pool.num_free
    kernels.reset_scatter_stats()
    got = turns(store)
    for turn, (want, have) in enumerate(zip(expected, got, strict=True)):
        for a in agents:
            assert have[a].token_ids == want[a].token_ids, f"turn {turn} agent {a}"
            assert have[a].cached_tokens == want[a].cached_tokens, f"turn {turn} agent {a}"
    # the unlimited run itself equals fresh runs (checked here on the last turn)
    last_prompts = []
    for a in agents:
        blocks = expected[-1][a].blocks
        assert blocks is not None
        last_prompts.append(list(blocks.token_ids[: expected[-1][a].prompt_tokens]))
    eos = sorted(tokenizer.eos_token_ids)
    fresh = reference_generate(tiny_model[0], last_prompts, 6, stop_tokens=eos)
    assert fresh == [list(expected[-1][a].token_ids) for a in agents]

    stats = store.stats
    assert stats.num_misses == 12 and stats.num_cold_hits + stats.num_hot_hits == 24
    assert stats.num_evictions >= 24 and stats.num_cold_hits > 0
    assert stats.tokens_saved == unlimited.stats.tokens_saved
    assert kernels.scatter_stats()["num_copied"] == 0  # loads wrote the slabs in place
    store.pool.check_invariants()
    store.close()
    assert store.pool.num_free == start_free and store.pool.num_handles == 0
    print(f"\npressure: {stats}")
