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
from typing import Any

from kvpool.benchmarks.measure import GIB, median, mlx_cache_limit, ratio, summary_ms, target
from kvpool.benchmarks.turns import (
    TurnRequest,
    TurnResult,
    fill_agent_cache,
    load_recipe,
    random_tokens,
    run_kvpool_turn,
)
from kvpool.engine import BlockPoolBatchEngine
from kvpool.pool import BlockPool
from kvpool.spec import ModelCacheSpec

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


def run(quick: bool) -> dict[str, Any]:
    reps = QUICK_REPS if quick else REPS
    lengths = (QUICK_HISTORY, QUICK_NEW_PROMPT) if quick else (HISTORY, NEW_PROMPT)
    model, tokenizer = load_recipe(MODEL)
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
    return {
        "bench": "mixed_prefill",
        "quick": quick,
        "config": {
            "model": MODEL,
            "resumes": RESUMES,
            "history_tokens": lengths[0],
            "resume_new_tokens": RESUME_NEW,
            "new_prompt_tokens": lengths[1],
            "max_tokens": MAX_TOKENS,
            "reps": reps,
        },
        "resume_ttft": {w: summary_ms(v) for w, v in resume_ttft.items()},
        "new_agent_ttft": {w: summary_ms(v) for w, v in new_ttft.items()},
        "total": {w: summary_ms(v) for w, v in total.items()},
        "resume_ttft_x_alone": {"waves_off": off_x, "waves_on": on_x},
        "total_waves_on_x_off": total_x,
        "resume_tokens_equal": tokens_equal,
        "new_agent_tokens_equal": new_tokens_equal,
        "targets": [
            target(
                f"resumes' TTFT with a new {lengths[1]}-token agent vs without it (prefill waves)",
                f"<= {TARGET_TTFT_X}x",
                on_x,
                None if on_x is None else on_x <= TARGET_TTFT_X,
            ),
            target(
                "turn total time, prefill waves vs without them",
                "<= 1.0x",
                total_x,
                None if total_x is None else total_x <= 1.0,
            ),
            target("greedy tokens equal across the ways", "equal", str(tokens_equal), tokens_equal),
        ],
    }
