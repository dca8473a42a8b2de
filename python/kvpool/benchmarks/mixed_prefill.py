"""Mixed prefill: one new agent with a long prompt arrives in the same step as short resumes.

Seven agents resume (``HISTORY`` tokens in the pool, ``RESUME_NEW`` new tokens each) and one
new agent sends a ``NEW_PROMPT``-token prompt, all submitted in one step (the new agent
first). mlx-lm's ``BatchGenerator`` pads a prefill batch to its longest row, so without
scheduling every resume row costs as much as the long prompt, and the resumes' first tokens
wait for the whole batch. The engine's prefill waves (``prefill_waves=True``, the default)
insert the short resumes first and the long prompt once they have their first tokens.

Three ways, each in its own pool, rotated within every repetition so each sees the same
machine load:

* ``alone``: the seven resumes without the new agent (the TTFT to compare with);
* ``waves_off``: all eight, ``prefill_waves=False`` (what the engine did before);
* ``waves_on``: all eight, prefill waves.

Reported: the resumes' mean time to first token (TTFT) and the turn's total time per way,
and the ratios. Targets: with waves, the resumes' TTFT at most 1.3x of ``alone``, and the
turn's total no worse than ``waves_off``. Greedy tokens of every agent must be equal across
the ways (the resumes' caches are the same random K/V in each pool).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from kvpool.benchmarks.measure import GIB, Summary, at_most, median, mlx_cache_limit, ratio
from kvpool.benchmarks.records import BenchRecord, Section, Target
from kvpool.benchmarks.tables import table, times
from kvpool.benchmarks.turns import (
    TurnRequest,
    TurnResult,
    fill_agent_cache,
    load_recipe,
    random_tokens,
    run_kvpool_turn,
)
from kvpool.cache.spec import ModelCacheSpec
from kvpool.engine import BlockPoolBatchEngine
from kvpool.pool import BlockPool

MODEL = "demo"
RESUMES = 7
HISTORY = 1024
RESUME_NEW = 64
NEW_PROMPT = 2048
QUICK_HISTORY, QUICK_NEW_PROMPT = 512, 1024  # --quick: the same shape, half the lengths
MAX_TOKENS = 8
REPS, QUICK_REPS = 3, 1
WAYS = ("alone", "waves_off", "waves_on")
CACHE_LIMIT = 2 * GIB
TARGET_TTFT_X = 1.3
TARGET_TOTAL_X = 1.0


def _turn(
    engine: BlockPoolBatchEngine,
    rng: random.Random,
    seed: int,
    with_new: bool,
    lengths: tuple[int, int],
) -> TurnResult:
    """One turn of the resumes (and the new agent), from fresh caches; frees them after."""
    pool = engine.pool
    history_tokens, new_tokens = lengths
    new_prompt = random_tokens(rng, new_tokens)  # drawn either way: the same resumes follow
    requests = [TurnRequest("new", new_prompt, MAX_TOKENS)] if with_new else []
    for i in range(RESUMES):
        history = random_tokens(rng, history_tokens)
        cache = fill_agent_cache(pool, f"r{i}", history, seed=seed + i)
        prompt = (*history, *random_tokens(rng, RESUME_NEW))
        requests.append(TurnRequest(f"r{i}", prompt, MAX_TOKENS, cache))
    try:
        result = run_kvpool_turn(engine, requests)
    finally:
        for r in requests:
            if r.cache is not None and pool.is_live(r.cache):
                pool.release(r.cache)
    for c in result.completions.values():
        assert c.blocks is not None
        pool.release(c.blocks)
    return result


def run(quick: bool, model_ref: str | None = None) -> MixedPrefillRecord:
    """The record; ``model_ref``: any model reference (default: ``MODEL``, as in the
    committed record)."""
    name = model_ref or MODEL
    reps = QUICK_REPS if quick else REPS
    lengths = (QUICK_HISTORY, QUICK_NEW_PROMPT) if quick else (HISTORY, NEW_PROMPT)
    model, tokenizer = load_recipe(name)
    spec = ModelCacheSpec.from_model(model)
    blocks = RESUMES * spec.blocks_for(lengths[0] + RESUME_NEW + MAX_TOKENS) + spec.blocks_for(
        lengths[1] + MAX_TOKENS
    )
    engines = {
        way: BlockPoolBatchEngine(
            model,
            tokenizer,
            BlockPool(spec, num_blocks=2 * blocks + 8),
            spec,
            prefill_waves=way != "waves_off",
        )
        for way in WAYS
    }
    resume_ttft: dict[str, list[float]] = {w: [] for w in WAYS}
    new_ttft: dict[str, list[float]] = {w: [] for w in WAYS if w != "alone"}
    total: dict[str, list[float]] = {w: [] for w in WAYS}
    tokens_equal = True
    new_tokens_equal = True
    with mlx_cache_limit(CACHE_LIMIT):
        try:
            # Warm-up: first calls and allocations, short prompts.
            for engine in engines.values():
                run_kvpool_turn(engine, [TurnRequest("warm", tuple(range(1, 40)), 2)])
            for rep in range(reps):
                order = WAYS[rep % 3 :] + WAYS[: rep % 3]
                tokens: dict[str, dict[str, tuple[int, ...]]] = {}
                for way in order:
                    # The same prompts and caches in every way of this repetition.
                    result = _turn(
                        engines[way], random.Random(1000 + rep), 17 * rep, way != "alone", lengths
                    )
                    agents = [f"r{i}" for i in range(RESUMES)]
                    resume_ttft[way].append(sum(result.ttft_s[a] for a in agents) / RESUMES)
                    total[way].append(result.total_s)
                    if way != "alone":
                        new_ttft[way].append(result.ttft_s["new"])
                    tokens[way] = result.tokens
                resumes = [f"r{i}" for i in range(RESUMES)]
                for way in ("waves_off", "waves_on"):
                    tokens_equal &= all(tokens[way][a] == tokens["alone"][a] for a in resumes)
                new_tokens_equal &= tokens["waves_on"]["new"] == tokens["waves_off"]["new"]
        finally:
            for engine in engines.values():
                engine.close()
    ttft = {w: median(v) for w, v in resume_ttft.items()}
    tot = {w: median(v) for w, v in total.items()}
    on_x = ratio(ttft["waves_on"], ttft["alone"])
    off_x = ratio(ttft["waves_off"], ttft["alone"])
    total_x = ratio(tot["waves_on"], tot["waves_off"])
    return MixedPrefillRecord(
        targets=(
            at_most(
                f"resumes' TTFT with a new {lengths[1]}-token agent vs without it (prefill waves)",
                TARGET_TTFT_X,
                on_x,
            ),
            Target(
                "turn total time, prefill waves vs without them",
                f"<= {TARGET_TOTAL_X:.1f}x",
                total_x,
                None if total_x is None else total_x <= TARGET_TOTAL_X,
            ),
            Target("greedy tokens equal across the ways", "equal", str(tokens_equal), tokens_equal),
        ),
        config=MixedPrefillConfig(
            model=name,
            resumes=RESUMES,
            history_tokens=lengths[0],
            resume_new_tokens=RESUME_NEW,
            new_prompt_tokens=lengths[1],
            max_tokens=MAX_TOKENS,
            reps=reps,
        ),
        resume_ttft={w: Summary.of(v) for w, v in resume_ttft.items()},
        new_agent_ttft={w: Summary.of(v) for w, v in new_ttft.items()},
        total={w: Summary.of(v) for w, v in total.items()},
        resume_ttft_x_alone=WavesRatios(waves_off=off_x, waves_on=on_x),
        total_waves_on_x_off=total_x,
        resume_tokens_equal=tokens_equal,
        new_agent_tokens_equal=new_tokens_equal,
    )


@dataclass(frozen=True, slots=True)
class MixedPrefillConfig:
    model: str
    resumes: int
    history_tokens: int
    resume_new_tokens: int
    new_prompt_tokens: int
    max_tokens: int
    reps: int


@dataclass(frozen=True, slots=True)
class WavesRatios:
    """The resumes' mean TTFT with the new agent / without it (``alone``), per way."""

    waves_off: float | None
    waves_on: float | None


@dataclass(frozen=True, slots=True)
class MixedPrefillRecord(BenchRecord):
    """Per way (``WAYS``; the new agent's TTFT: not in ``alone``): summaries over the
    repetitions of the resumes' mean TTFT and of the turn's total time."""

    config: MixedPrefillConfig
    resume_ttft: dict[str, Summary]
    new_agent_ttft: dict[str, Summary]
    total: dict[str, Summary]
    resume_ttft_x_alone: WavesRatios
    total_waves_on_x_off: float | None  # turn total with prefill waves / without
    resume_tokens_equal: bool  # every resume's greedy tokens equal in the three ways
    new_agent_tokens_equal: bool  # the new agent's, waves on vs off


RECORD = MixedPrefillRecord


# --------------------------------------------------------------------------- report


def render_section(r: MixedPrefillRecord) -> list[str]:
    c, x = r.config, r.resume_ttft_x_alone
    rows = [
        (
            way,
            f"{r.resume_ttft[way].p50_ms:.1f} ({r.resume_ttft[way].n})",
            "-" if way not in r.new_agent_ttft else f"{r.new_agent_ttft[way].p50_ms:.1f}",
            f"{r.total[way].p50_ms:.1f}",
        )
        for way in r.resume_ttft
    ]
    return [
        f"Model {c.model}: {c.resumes} resumes ({c.history_tokens} tokens of history, "
        f"{c.resume_new_tokens} new each) and a new {c.new_prompt_tokens}-token agent in the "
        f"same step, {c.max_tokens} tokens generated, p50 over {c.reps} repetition(s) in ms.",
        "",
        *table(("way", "resumes' mean TTFT (reps)", "new agent TTFT", "turn total"), rows),
        "",
        f"Resumes' TTFT with the new agent: {times(x.waves_on)} of without it with prefill "
        f"waves, {times(x.waves_off)} without; turn total with waves / without "
        f"{times(r.total_waves_on_x_off)}; resumes' tokens equal: {r.resume_tokens_equal}, "
        f"new agent's: {r.new_agent_tokens_equal}.",
    ]


def plot(figure: Any, r: MixedPrefillRecord) -> None:
    ax = figure.add_subplot(1, 1, 1)
    ways = list(r.resume_ttft)
    xs = list(range(len(ways)))
    width = 0.4
    ax.bar(
        [x - width / 2 for x in xs],
        [r.resume_ttft[w].p50_ms for w in ways],
        width,
        label="resumes' mean TTFT",
    )
    ax.bar(
        [x + width / 2 for x in xs], [r.total[w].p50_ms for w in ways], width, label="turn total"
    )
    ax.set_xticks(xs, ways)
    ax.set_ylabel("ms (median)")
    ax.set_title(
        f"mixed prefill: {r.config.resumes} resumes + a new "
        f"{r.config.new_prompt_tokens}-token agent"
    )
    ax.legend()


SECTION = Section(RECORD, render_section, plot)
