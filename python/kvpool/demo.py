"""The ``kvpool demo`` workload: many agents, many turns, cached vs. re-prefilled.

Every agent holds a conversation that grows turn after turn: its prompt for turn ``t + 1`` is
its prompt for turn ``t``, then the tokens it generated, then new user text, all as token ids
so each prompt extends the previous one exactly::

    turn 1:  [system | agent's task | assistant header]
    turn 2:  [   prompt of turn 1   | completion 1 | end, user text, assistant header]
    turn 3:  [          prompt of turn 2          | completion 2 | end, user text, header]

All agents of a turn are submitted together and generate in one batch. The workload runs
twice through one :class:`~kvpool.engine.BlockPoolBatchEngine`:

* ``cached``: each agent passes the blocks of its previous turn, so only the new tokens are
  prefilled;
* ``re-prefill``: the very same prompts (the cached run's, token for token) with no cache, so
  every turn prefills the whole context.

Greedy decoding on identical prompts must generate identical tokens in both runs; the result
counts the generations that differ. :func:`run_demo` returns a :class:`DemoResult`, plain data
that ``kvpool demo --json`` dumps as it is.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from kvpool.blas import blas_info
from kvpool.blocks import CompletedGeneration, TokenEvent
from kvpool.cache.spec import ModelCacheSpec
from kvpool.cache.tables import CacheHandle
from kvpool.engine import BlockPoolBatchEngine
from kvpool.errors import InvalidRequestError, PoolExhaustedError
from kvpool.models import MANIFEST_NAME, locate_and_load
from kvpool.pool import BlockPool, physical_memory_bytes

__all__ = [
    "CACHED",
    "REPREFILL",
    "DemoConfig",
    "DemoResult",
    "GenerationMismatch",
    "ModelInfo",
    "PoolInfo",
    "Progress",
    "RunResult",
    "TurnRecord",
    "blocks_needed",
    "compare_outputs",
    "resolve_and_load",
    "run_demo",
]

CACHED = "cached"
REPREFILL = "re-prefill"
MIB = 1 << 20

ProgressCallback = Callable[["Progress"], None]
Outputs = dict[tuple[int, str], tuple[int, ...]]  # (turn, agent_id) -> generated tokens
Prompts = list[dict[str, tuple[int, ...]]]  # per turn: agent_id -> prompt


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class DemoConfig:
    """What to run. ``pool_mb`` None sizes the pool for the workload (see :func:`blocks_needed`)."""

    model: str = "demo"  # a recipe name (kvpool.models.RECIPES) or a model directory
    num_agents: int = 4
    num_turns: int = 4
    max_tokens: int = 32  # generated tokens per turn, at most
    pool_mb: float | None = None  # MiB of K/V the pool holds
    seed: int = 0  # picks the user text; the model's weights are fixed by its recipe
    kv_bits: int | None = None  # blocks at rest: None dense, 8 or 4 affine-quantized
    kv_group_size: int = 64

    def __post_init__(self) -> None:
        for name in ("num_agents", "num_turns", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRequestError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InvalidRequestError(f"seed must be an int >= 0, got {self.seed!r}")
        if self.pool_mb is not None and not (math.isfinite(self.pool_mb) and self.pool_mb > 0):
            raise InvalidRequestError(f"pool_mb must be a number > 0, got {self.pool_mb!r}")
        if not self.model:
            raise InvalidRequestError("model must name a recipe or a directory")


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a run is, sent to the progress callback after every engine step."""

    run: str  # CACHED, REPREFILL or "warm-up"
    turn: int  # 1-based
    num_turns: int
    num_done: int  # agents of this turn that finished
    num_agents: int
    num_generated: int  # tokens generated in this turn so far, all agents


@dataclass(frozen=True, slots=True)
class TurnRecord:
    """One agent's turn in one run."""

    turn: int  # 1-based
    agent_id: str
    prompt_tokens: int
    cached_tokens: int  # prompt tokens taken from the agent's cache (0 in the re-prefill run)
    prefilled_tokens: int  # prompt_tokens - cached_tokens
    generated_tokens: int
    finish_reason: str  # "length" or "stop"
    ttft_ms: float | None  # submit -> first token; the whole batch's prefill is inside it
    decode_tokens_per_s: float | None
    elapsed_ms: float


@dataclass(frozen=True, slots=True)
class RunResult:
    """One pass over the workload. ``records`` are ordered by turn, then agent."""

    name: str
    total_s: float  # wall time of all turns
    mean_ttft_ms: float | None
    prompt_tokens: int  # sums over every turn of every agent
    cached_tokens: int
    prefilled_tokens: int
    generated_tokens: int
    records: tuple[TurnRecord, ...]

    @classmethod
    def from_records(cls, name: str, total_s: float, records: Sequence[TurnRecord]) -> RunResult:
        ttfts = [r.ttft_ms for r in records if r.ttft_ms is not None]
        return cls(
            name=name,
            total_s=total_s,
            mean_ttft_ms=sum(ttfts) / len(ttfts) if ttfts else None,
            prompt_tokens=sum(r.prompt_tokens for r in records),
            cached_tokens=sum(r.cached_tokens for r in records),
            prefilled_tokens=sum(r.prefilled_tokens for r in records),
            generated_tokens=sum(r.generated_tokens for r in records),
            records=tuple(records),
        )

    def record(self, turn: int, agent_id: str) -> TurnRecord:
        return next(r for r in self.records if r.turn == turn and r.agent_id == agent_id)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """The model that ran: its config and the cache geometry the pool stores."""

    name: str  # as given (recipe name or directory)
    path: str
    model_type: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    num_params: int
    cache_dtype: str
    block_tokens: int
    bytes_per_block: int  # K and V of every layer
    cache_spec: str  # ModelCacheSpec.describe()
    random_weights: bool  # built by kvpool.models from a recipe: text is not meaningful


@dataclass(frozen=True, slots=True)
class PoolInfo:
    """The pool, sized before the runs; usage measured during and after the cached run."""

    num_blocks: int
    bytes_total: int
    bytes_per_block: int
    num_blocks_needed: int  # the workload's worst case (blocks_needed)
    peak_used: int  # most blocks in use at once during the cached run
    num_used: int  # after the cached run: the agents' caches
    num_free: int
    bytes_used: int


@dataclass(frozen=True, slots=True)
class GenerationMismatch:
    """A turn whose generated tokens differ between the two runs."""

    turn: int
    agent_id: str
    first_difference: int  # index of the first differing generated token
    cached_tokens: int  # generated tokens in each run
    reprefill_tokens: int


@dataclass(frozen=True, slots=True)
class DemoResult:
    """Everything ``kvpool demo`` reports."""

    config: DemoConfig
    model: ModelInfo
    pool: PoolInfo
    cached: RunResult
    reprefill: RunResult
    num_compared: int  # generations compared (agents x turns)
    mismatches: tuple[GenerationMismatch, ...]
    speedup_total: float  # re-prefill total time / cached total time
    speedup_ttft: float | None  # re-prefill mean TTFT / cached mean TTFT
    sample_text: str  # the last completion of the first agent (cached run)
    sample_question: str  # what the user asked the first agent in that turn
    blas: str  # which BLAS MLX's float32 matmuls ran on (kvpool.blas.blas_info)

    @property
    def outputs_identical(self) -> bool:
        return not self.mismatches

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data; ``outputs_identical`` included."""
        data = dataclasses.asdict(self)
        data["outputs_identical"] = self.outputs_identical
        return data

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


# --------------------------------------------------------------------------- the workload

_SYSTEM_PROMPT = (
    "You are one of several planning agents working for a city water department. The city "
    "grew faster than its pipes. In hot, dry summers the pressure in some neighborhoods drops "
    "so low that upper floors of tall buildings get no water in the evening. Answer in short, "
    "concrete steps, name the data you would need, and say what you would check first."
)

_AGENT_ROLES = (
    "You measure flow and pressure at points in the network and look for failing valves.",
    "You plan repair work so that as few homes as possible lose water at any one time.",
    "You talk to residents and building managers and collect their reports.",
    "You estimate costs and compare replacing old pipes with adding new pumps.",
    "You keep the maps of the network up to date and check them against the ground.",
    "You forecast demand for the next five summers from weather and building permits.",
)

_FACTS = (
    "The oldest pipes in the north district were laid more than ninety years ago.",
    "Pressure falls most between six and nine in the evening, when people come home.",
    "A small number of old valves seem to cause most of the pressure loss.",
    "Three new apartment towers opened near the river last spring.",
    "The main pump station runs at full power on most summer afternoons.",
    "Some readings from the east side were taken with a gauge that may be broken.",
    "The budget for this year allows two large repairs or many small ones.",
    "Residents on the top floors have started to store water in buckets.",
    "A storm last winter flooded the valve chambers under the market square.",
    "The night crew can close one street at a time without stopping traffic.",
    "Older maps show a pipe under the park that newer maps do not show.",
    "The school on the hill reports low pressure even in the morning.",
)

_QUESTIONS = (
    "What would you do first, and why?",
    "Which measurement would change your plan the most?",
    "How would you explain this to the people on the top floors?",
    "What could go wrong with that plan?",
    "Which part of the network would you look at next?",
    "How long would that take, and who would need to help?",
)


@dataclass(frozen=True, slots=True)
class AgentScript:
    """One agent's fixed text, as token ids.

    ``opening`` is the whole prompt of turn 1; ``followups[t]`` is appended after the agent's
    turn ``t + 1`` completion (it closes the assistant message, adds a user message and opens
    the next assistant message).
    """

    agent_id: str
    opening: tuple[int, ...]
    followups: tuple[tuple[int, ...], ...]
    questions: tuple[str, ...] = ()  # the user's text of each turn (the end of turn 1's)


def build_scripts(tokenizer: Any, num_agents: int, num_turns: int, seed: int) -> list[AgentScript]:
    """The agents' text for ``num_turns`` turns, drawn from ``seed``; ChatML-formatted."""

    def encode(text: str) -> tuple[int, ...]:
        return tuple(int(t) for t in tokenizer.encode(text))

    system = f"<|im_start|>system\n{_SYSTEM_PROMPT}<|im_end|>\n"
    scripts = []
    for i in range(num_agents):
        rng = random.Random(seed * 100_003 + i)
        role = _AGENT_ROLES[i % len(_AGENT_ROLES)]
        facts = " ".join(rng.sample(_FACTS, 5))
        # One draw after another in a fixed order: the text is a pure function of the seed.
        asks = [f"{facts} {rng.choice(_QUESTIONS)}"]
        asks += [f"{rng.choice(_FACTS)} {rng.choice(_QUESTIONS)}" for _ in range(num_turns - 1)]
        opening = (
            f"{system}<|im_start|>user\nYou are agent {i}. {role} Here is what we know so far. "
            f"{asks[0]}<|im_end|>\n<|im_start|>assistant\n"
        )
        followups = tuple(
            encode(f"<|im_end|>\n<|im_start|>user\n{ask}<|im_end|>\n<|im_start|>assistant\n")
            for ask in asks[1:]
        )
        scripts.append(AgentScript(f"agent-{i}", encode(opening), followups, tuple(asks)))
    return scripts


def blocks_needed(
    spec: ModelCacheSpec, scripts: Sequence[AgentScript], max_tokens: int
) -> tuple[int, int]:
    """``(one agent's worst case, all agents' worst case)`` in blocks, for the cached run.

    During turn ``t`` an agent holds its previous cache (at most ``P[t-1] + max_tokens``
    positions) and the engine's lease for the new turn (``P[t] + max_tokens`` positions),
    where ``P[t]``, the prompt length of turn ``t``, is at most the previous prompt plus
    ``max_tokens`` plus the follow-up text. The bound ignores the blocks the lease shares
    with the previous cache, so it is an overestimate by at most that many blocks.
    """
    per_agent = []
    for script in scripts:
        prompt = len(script.opening)
        peak = spec.blocks_for(prompt + max_tokens)
        for followup in script.followups:
            previous = prompt
            prompt += max_tokens + len(followup)
            peak = max(
                peak, spec.blocks_for(previous + max_tokens) + spec.blocks_for(prompt + max_tokens)
            )
        per_agent.append(peak)
    return max(per_agent), sum(per_agent)


# --------------------------------------------------------------------------- running


def run_demo(config: DemoConfig, progress: ProgressCallback | None = None) -> DemoResult:
    """Load the model, size the pool, run the workload cached then re-prefilled, compare.

    Raises KvpoolError subclasses for bad input: ModelNotFoundError for a model that cannot be
    loaded, PoolExhaustedError for a ``pool_mb`` too small for the workload, GenerationError if
    a generation fails.
    """
    path, model, tokenizer = resolve_and_load(config.model)
    spec = ModelCacheSpec.from_model(model).with_format(config.kv_bits, config.kv_group_size)
    if config.pool_mb is None:  # a lower bound first: tokenizing every agent's text takes time
        at_least = config.num_agents * spec.blocks_for(config.num_turns * config.max_tokens + 1)
        _check_fits_memory(config, spec, at_least)
    scripts = build_scripts(tokenizer, config.num_agents, config.num_turns, config.seed)
    one_agent, all_agents = blocks_needed(spec, scripts, config.max_tokens)
    pool = BlockPool(spec, num_blocks=_pool_blocks(config, spec, one_agent, all_agents))
    engine = BlockPoolBatchEngine(model, tokenizer, pool, spec)
    try:
        _warm_up(engine, scripts[0], progress)
        cached, prompts, outputs, peak, caches = _run_cached(engine, scripts, config, progress)
        usage = pool.usage()
        for blocks in caches:
            pool.release(blocks)
    finally:
        engine.close()
    # The baseline must not find the cached run's blocks: an engine that shares none.
    baseline = BlockPoolBatchEngine(model, tokenizer, pool, spec, prefix_sharing=False)
    try:
        reprefill, baseline_outputs = _run_reprefill(baseline, prompts, config, progress)
    finally:
        baseline.close()

    mismatches = tuple(compare_outputs(outputs, baseline_outputs))
    last = cached.record(config.num_turns, scripts[0].agent_id)
    sample = outputs[(last.turn, last.agent_id)]
    return DemoResult(
        config=config,
        model=_model_info(config.model, path, model, spec),
        pool=PoolInfo(
            num_blocks=pool.num_blocks,
            bytes_total=pool.bytes_total,
            bytes_per_block=spec.bytes_per_block,
            num_blocks_needed=all_agents,
            peak_used=peak,
            num_used=usage.num_used,
            num_free=usage.num_free,
            bytes_used=usage.bytes_used,
        ),
        cached=cached,
        reprefill=reprefill,
        num_compared=len(outputs),
        mismatches=mismatches,
        speedup_total=reprefill.total_s / cached.total_s,
        speedup_ttft=(
            reprefill.mean_ttft_ms / cached.mean_ttft_ms
            if reprefill.mean_ttft_ms is not None and cached.mean_ttft_ms
            else None
        ),
        sample_text=tokenizer.decode(list(sample)),
        sample_question=scripts[0].questions[-1],
        blas=str(blas_info()["blas"]),
    )


def resolve_and_load(name: str) -> tuple[Path, Any, Any]:
    """``(directory, model, tokenizer)`` of a model reference (``models.locate_and_load``).

    Every loading failure is a ModelNotFoundError, mlx-lm's own errors included.
    """
    return locate_and_load(name)


def _pool_blocks(config: DemoConfig, spec: ModelCacheSpec, one_agent: int, all_agents: int) -> int:
    """The pool's size in blocks: the workload's worst case, or ``pool_mb`` if it holds that."""
    if config.pool_mb is None:
        _check_fits_memory(config, spec, all_agents)
        return all_agents
    num_blocks = int(config.pool_mb * MIB) // spec.bytes_per_block
    enough_mb = math.ceil(all_agents * spec.bytes_per_block / MIB)
    if num_blocks < all_agents:
        if num_blocks < one_agent:
            who, need = "one agent needs", one_agent
        else:
            who, need = f"{config.num_agents} agents at once need", all_agents
        raise PoolExhaustedError(
            f"a pool of {config.pool_mb:g} MiB holds {num_blocks} "
            f"block{'' if num_blocks == 1 else 's'} of {spec.bytes_per_block / MIB:.2f} MiB; "
            f"{who} up to {need} blocks: give the pool {enough_mb} MiB or more (--pool-mb)",
            needed=need,
            free=num_blocks,
            capacity=num_blocks,
        )
    memory = _physical_memory()
    if memory is not None and num_blocks * spec.bytes_per_block > memory:
        raise InvalidRequestError(
            f"a pool of {config.pool_mb:g} MiB is more than this machine's memory "
            f"({memory // MIB} MiB); the workload needs {enough_mb} MiB"
        )
    return num_blocks


def _check_fits_memory(config: DemoConfig, spec: ModelCacheSpec, num_blocks: int) -> None:
    """Raise InvalidRequestError if the workload's pool of ``num_blocks`` exceeds the memory."""
    memory = _physical_memory()
    needed = num_blocks * spec.bytes_per_block
    if memory is None or needed <= memory:
        return
    turns = f"{config.num_turns} turn{'' if config.num_turns == 1 else 's'}"
    raise InvalidRequestError(
        f"{config.num_agents} agents x {turns} of up to {config.max_tokens} new tokens need a "
        f"pool of {num_blocks:,} blocks of {spec.bytes_per_block / MIB:.2f} MiB "
        f"({needed // MIB:,} MiB) or more, more than this machine's memory "
        f"({memory // MIB:,} MiB): use fewer agents, turns or --max-tokens"
    )


def _physical_memory() -> int | None:
    return physical_memory_bytes()


def _model_info(name: str, path: Path, model: Any, spec: ModelCacheSpec) -> ModelInfo:
    from mlx.utils import tree_flatten

    config = json.loads((path / "config.json").read_text())
    hidden = int(config.get("hidden_size", 0))
    heads = int(config.get("num_attention_heads", 0))
    # the first layer with K/V (a hybrid's first layers may be recurrent: no heads)
    layer = next((x for x in spec.layers if x.n_kv_heads), spec.layers[0])
    leaves = cast(list[tuple[str, Any]], tree_flatten(model.parameters()))
    return ModelInfo(
        name=name,
        path=str(path),
        model_type=str(config.get("model_type", "?")),
        num_layers=spec.n_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=layer.n_kv_heads,
        head_dim=layer.k_head_dim,
        vocab_size=int(config.get("vocab_size", 0)),
        num_params=sum(int(v.size) for _, v in leaves),
        cache_dtype=spec.dtype,
        block_tokens=spec.block_tokens,
        bytes_per_block=spec.bytes_per_block,
        cache_spec=spec.describe(),
        random_weights=(path / MANIFEST_NAME).is_file(),
    )


class _Turn:
    """Submits one turn of every agent at once and steps the engine until all finish."""

    def __init__(
        self,
        engine: BlockPoolBatchEngine,
        run: str,
        turn: int,
        num_turns: int,
        progress: ProgressCallback | None,
        cache_salt: str = "",
    ) -> None:
        self.engine = engine
        self.run, self.turn, self.num_turns = run, turn, num_turns
        self.cache_salt = cache_salt
        self.progress = progress
        self.num_generated = 0
        self.peak_used = 0

    def _count(self, event: TokenEvent) -> None:
        self.num_generated += 1

    def __call__(
        self,
        prompts: dict[str, tuple[int, ...]],
        caches: dict[str, CacheHandle],
        max_tokens: int,
    ) -> dict[str, CompletedGeneration]:
        on_token = self._count if self.progress is not None else None
        for agent_id, prompt in prompts.items():
            self.engine.submit(
                agent_id,
                prompt,
                caches.get(agent_id),
                max_tokens,
                on_token=on_token,
                cache_salt=self.cache_salt,
            )
        done: dict[str, CompletedGeneration] = {}
        while self.engine.has_work:
            for completion in self.engine.step():
                if completion.error is not None:
                    raise completion.error
                done[completion.agent_id] = completion
            self.peak_used = max(self.peak_used, self.engine.pool.num_used)
            if self.progress is not None:
                self.progress(
                    Progress(
                        run=self.run,
                        turn=self.turn,
                        num_turns=self.num_turns,
                        num_done=len(done),
                        num_agents=len(prompts),
                        num_generated=self.num_generated,
                    )
                )
        return done


def _warm_up(
    engine: BlockPoolBatchEngine, script: AgentScript, progress: ProgressCallback | None
) -> None:
    """Two short turns (the second from a cache) so neither timed run pays first-call costs.

    Under a salt of its own: the timed runs must not find its blocks.
    """
    prompt = script.opening[:32]
    salt = "kvpool-demo-warm-up"
    first = _Turn(engine, "warm-up", 1, 2, progress, salt)({"warm-up": prompt}, {}, 2)["warm-up"]
    assert first.blocks is not None
    prompt = prompt + first.token_ids + script.opening[32:48]
    second = _Turn(engine, "warm-up", 2, 2, progress, salt)(
        {"warm-up": prompt}, {"warm-up": first.blocks}, 2
    )["warm-up"]
    assert second.blocks is not None
    engine.pool.release(second.blocks)


def _record(turn: int, completion: CompletedGeneration) -> TurnRecord:
    tok_s = completion.decode_tokens_per_s
    return TurnRecord(
        turn=turn,
        agent_id=completion.agent_id,
        prompt_tokens=completion.prompt_tokens,
        cached_tokens=completion.cached_tokens,
        prefilled_tokens=completion.prefilled_tokens,
        generated_tokens=completion.token_count,
        finish_reason=completion.finish_reason,
        ttft_ms=None if completion.ttft_s is None else completion.ttft_s * 1e3,
        decode_tokens_per_s=tok_s,
        elapsed_ms=completion.elapsed_s * 1e3,
    )


def _run_cached(
    engine: BlockPoolBatchEngine,
    scripts: Sequence[AgentScript],
    config: DemoConfig,
    progress: ProgressCallback | None,
) -> tuple[RunResult, Prompts, Outputs, int, list[CacheHandle]]:
    """The cached run; also returns its prompts, outputs, peak block use and final caches."""
    contexts = {s.agent_id: s.opening for s in scripts}
    caches: dict[str, CacheHandle] = {}
    prompts: Prompts = []
    outputs: Outputs = {}
    records: list[TurnRecord] = []
    peak = 0
    start = time.perf_counter()
    for t in range(1, config.num_turns + 1):
        turn = _Turn(engine, CACHED, t, config.num_turns, progress)
        prompts.append(dict(contexts))
        done = turn(contexts, caches, config.max_tokens)
        peak = max(peak, turn.peak_used)
        for script in scripts:
            completion = done[script.agent_id]
            assert completion.blocks is not None
            caches[script.agent_id] = completion.blocks
            outputs[(t, script.agent_id)] = completion.token_ids
            records.append(_record(t, completion))
            if t < config.num_turns:
                contexts[script.agent_id] = (
                    contexts[script.agent_id] + completion.token_ids + script.followups[t - 1]
                )
    total = time.perf_counter() - start
    result = RunResult.from_records(CACHED, total, records)
    return result, prompts, outputs, peak, [caches[s.agent_id] for s in scripts]


def _run_reprefill(
    engine: BlockPoolBatchEngine,
    prompts: Prompts,
    config: DemoConfig,
    progress: ProgressCallback | None,
) -> tuple[RunResult, Outputs]:
    """The cached run's prompts again, no cache passed; each turn's blocks freed at once."""
    outputs: Outputs = {}
    records: list[TurnRecord] = []
    start = time.perf_counter()
    for t, turn_prompts in enumerate(prompts, start=1):
        done = _Turn(engine, REPREFILL, t, config.num_turns, progress)(
            turn_prompts, {}, config.max_tokens
        )
        for agent_id in turn_prompts:
            completion = done[agent_id]
            assert completion.blocks is not None
            engine.pool.release(completion.blocks)
            outputs[(t, agent_id)] = completion.token_ids
            records.append(_record(t, completion))
    total = time.perf_counter() - start
    return RunResult.from_records(REPREFILL, total, records), outputs


def compare_outputs(cached: Outputs, reprefill: Outputs) -> list[GenerationMismatch]:
    """The generations of ``cached`` that differ from ``reprefill``'s (same keys)."""
    mismatches = []
    for key, a in cached.items():
        b = reprefill[key]
        if a != b:
            diffs = (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
            first = next(diffs, min(len(a), len(b)))
            mismatches.append(GenerationMismatch(key[0], key[1], first, len(a), len(b)))
    return mismatches
