"""Failures injected at every step of a request, with sharing on: all or nothing.

Each case fails one agent's request at one point (gather, insert, the shared-prefix publish,
the final write, the batch step). The failed request ends with ``finish_reason == "error"``,
the others generate exactly the reference tokens, the pool's records stay consistent, and
once every handle is released no block is held.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from test_engine import SPEC, prompt_of

from kvpool import (
    AttentionKind,
    BlockPool,
    BlockPoolBatchEngine,
    CompletedGeneration,
    GenerationError,
    LayerSpec,
    ModelCacheSpec,
)
from kvpool.cache.spec import StateSpec
from kvpool.testing import (
    FakeBatchGenerator,
    FakeModel,
    FakeStorage,
    FakeTokenizer,
    reference_tokens,
)


class FailingStorage(FakeStorage):
    """FakeStorage that raises once at the n-th call of one method."""

    fail_at: tuple[str, int] | None = None  # (method, call number from 1)

    def __init__(self, spec: Any, blocks_per_group: Sequence[int]) -> None:
        super().__init__(spec, blocks_per_group)
        self.calls: dict[str, int] = {}

    def _tick(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if FailingStorage.fail_at == (name, self.calls[name]):
            raise OSError(f"injected failure in {name} #{self.calls[name]}")

    def load(self, tables: Any, num_tokens: int) -> list[Any]:
        self._tick("load")
        return super().load(tables, num_tokens)

    def store(self, caches: Any, tables: Any, start: int) -> tuple[int, ...]:
        self._tick("store")
        return super().store(caches, tables, start)


# A hybrid: one full-attention layer, one recurrent (its state in a group of its own).
RECURRENT = ModelCacheSpec(
    (
        LayerSpec(AttentionKind.GLOBAL, 2, 8, 8),
        LayerSpec.recurrent((StateSpec((2, 8), "float32"),)),
    ),
    "float32",
    SPEC.block_tokens,
)


def make(
    spec: ModelCacheSpec = SPEC, **kwargs: Any
) -> tuple[BlockPoolBatchEngine, BlockPool, list[FakeBatchGenerator]]:
    pool = BlockPool(spec, num_blocks=64, storage=FailingStorage)
    gens: list[FakeBatchGenerator] = []

    def factory(model: FakeModel, **kw: object) -> FakeBatchGenerator:
        gen = FakeBatchGenerator(model, **kw)  # type: ignore[arg-type]
        gens.append(gen)
        return gen

    model = FakeModel(spec, vocab_size=1000)
    engine = BlockPoolBatchEngine(
        model, FakeTokenizer(1000), pool, spec, batch_gen_factory=factory, **kwargs
    )
    return engine, pool, gens


SYSTEM = prompt_of(16)  # 4 full blocks shared by every agent
PROMPTS = {f"agent-{i}": [*SYSTEM, *prompt_of(3 + i, seed=20 + i)] for i in range(3)}


@pytest.mark.parametrize("spec", [SPEC, RECURRENT], ids=["attention", "recurrent"])
@pytest.mark.parametrize(
    "fail_at",
    [
        None,  # control: everything succeeds
        ("store", 1),  # the leader's shared-prefix publish
        ("store", 2),  # the first final write
        ("store", 4),  # the last final write
        ("load", 1),  # a follower's gather of the published prefix
        ("load", 2),
    ],
)
def test_one_injected_failure_ends_one_request_and_leaks_nothing(
    fail_at: tuple[str, int] | None, spec: ModelCacheSpec
) -> None:
    engine, pool, _ = make(spec)
    model = engine.model
    FailingStorage.fail_at = fail_at
    try:
        # Turn 1: three agents together (a leader and two followers of the system prompt).
        for agent, prompt in PROMPTS.items():
            engine.submit(agent, prompt, max_tokens=3)
        done = {c.agent_id: c for c in engine.drain()}
    finally:
        FailingStorage.fail_at = None
    failed = [c for c in done.values() if c.error is not None]
    assert len(failed) == (0 if fail_at is None else 1)
    for c in failed:
        assert c.finish_reason == "error" and isinstance(c.error, OSError | GenerationError)
        assert c.blocks is None
    _check_exact(model, done, PROMPTS)
    pool.check_invariants()
    held = [c.blocks for c in done.values() if c.blocks is not None]
    assert pool.num_used == sum(
        len({b for h in held for b in h.tables[g].held}) for g in range(len(spec.groups))
    )
    # Turn 2 for everyone: the failed agent starts over, the others resume.
    contexts: dict[str, list[int]] = {}
    for agent, prompt in PROMPTS.items():
        c = done[agent]
        context = [*prompt, *c.token_ids, 5] if c.error is None else prompt
        engine.submit(agent, context, c.blocks, max_tokens=2)
        contexts[agent] = context
    second = {c.agent_id: c for c in engine.drain()}
    assert all(c.error is None for c in second.values())
    for agent, c in second.items():  # resumed (from the end state too) or started over
        assert list(c.token_ids) == reference_tokens(model, contexts[agent], 2), agent
        if done[agent].error is None:
            assert c.cached_tokens == done[agent].blocks.total_tokens
    for c in second.values():
        assert c.blocks is not None
        pool.release(c.blocks)
    assert pool.num_used == 0 and pool.num_handles == 0
    pool.check_invariants()


def test_a_batch_step_failure_with_followers_waiting_leaks_nothing() -> None:
    engine, pool, gens = make(prefill_step_size=4)  # the prefix takes 4 steps to prefill
    for agent, prompt in PROMPTS.items():
        engine.submit(agent, prompt, max_tokens=3)
    list(engine.step())  # the leader starts; the followers wait for its prefix
    assert len(engine._waiting) == 2
    gens[0].fail_next = RuntimeError("injected model failure")
    done = {c.agent_id: c for c in engine.drain()}
    assert done["agent-0"].finish_reason == "error"
    for agent in ("agent-1", "agent-2"):  # started on their own after the leader failed
        assert done[agent].error is None
        assert list(done[agent].token_ids) == reference_tokens(engine.model, PROMPTS[agent], 3)
    for c in done.values():
        if c.blocks is not None:
            pool.release(c.blocks)
    assert pool.num_used == 0
    pool.check_invariants()


def _check_exact(
    model: Any, done: dict[str, CompletedGeneration], prompts: dict[str, list[int]]
) -> None:
    for agent, c in done.items():
        if c.error is None:
            assert list(c.token_ids) == reference_tokens(model, prompts[agent], 3), agent


@pytest.mark.parametrize("fail_at", [("store", 1), ("store", 3), ("load", 2)])
def test_a_failed_state_snapshot_ends_one_request_and_leaks_nothing(
    fail_at: tuple[str, int],
) -> None:
    """A recurrent model with a state snapshot every block: the leader's prefill stops at
    every boundary of the system prompt. A failure at a snapshot (or a later read) ends one
    request; the others are exact; nothing is left held."""
    engine, pool, _ = make(RECURRENT, state_snapshot_blocks=1)
    model = engine.model
    FailingStorage.fail_at = fail_at
    try:
        for agent, prompt in PROMPTS.items():
            engine.submit(agent, prompt, max_tokens=3)
        done = {c.agent_id: c for c in engine.drain()}
    finally:
        FailingStorage.fail_at = None
    assert sum(c.error is not None for c in done.values()) == 1
    _check_exact(model, done, PROMPTS)
    pool.check_invariants()
    for c in done.values():
        if c.blocks is not None:
            pool.release(c.blocks)
    assert pool.num_used == 0 and pool.num_handles == 0
