"""Attention-only architectures (#23) on real mlx-lm: every resumed turn equals a fresh,
uncached mlx-lm run, on the tiny configurations of mlx-lm's own test suite
(:mod:`attention_configs`), two agents batched where mlx-lm batches the architecture exactly."""

from __future__ import annotations

import pytest
from attention_configs import ATTENTION_CONFIGS, build_attention
from helpers import LoadedModel, Reference
from test_hybrid_mlx import batches_inexactly, check_resumed_turns

from kvpool import AttentionKind

# mlx-lm 0.32.2's own BatchGenerator gives a left-padded row other tokens than the same
# prompt alone on these, or fails on a batch of two (checked below): their agents take turns
# one at a time.
INEXACT = {"afm7"}
FAILS = {"gpt_bigcode"}
UNBATCHABLE = INEXACT | FAILS


@pytest.mark.parametrize("name", sorted(ATTENTION_CONFIGS))
def test_resumed_turns_equal_fresh_runs(
    name: str, tiny_model: LoadedModel, reference_generate: Reference
) -> None:
    """2 agents x 3 turns, batched unless UNBATCHABLE; from turn 2 on the whole previous
    sequence comes from the pool; only full / sliding-window attention groups."""
    kinds = check_resumed_turns(
        build_attention(name),
        tiny_model[1],
        reference_generate,
        {"a": 40, "b": 23},
        batched=name not in UNBATCHABLE,
    )
    assert kinds <= {AttentionKind.GLOBAL, AttentionKind.SLIDING}


@pytest.mark.parametrize("name", sorted(INEXACT))
def test_mlx_lm_itself_batches_these_inexactly(name: str) -> None:
    """Why INEXACT agents go one at a time (when this fails, mlx-lm was fixed: batch them)."""
    assert batches_inexactly(build_attention(name))


@pytest.mark.parametrize("name", sorted(FAILS))
def test_mlx_lm_itself_fails_to_batch_these(name: str) -> None:
    """Why FAILS agents go one at a time: mlx-lm's BatchGenerator raises on a left-padded
    batch of two (gpt_bigcode: a length-1 conversion of the batch's offsets)."""
    with pytest.raises(ValueError, match="length-1"):
        batches_inexactly(build_attention(name))


def test_configs_are_the_attention_only_architectures_kvpool_supports() -> None:
    """Every configuration is of an architecture docs/COVERAGE.md's rule calls supported
    with an attention-only cache (KVCache / RotatingKVCache), under its own module name."""
    from test_coverage_table import coverage_rows

    rows = {a: (v, w) for a, v, w, _ in coverage_rows()}
    for name, config in ATTENTION_CONFIGS.items():
        assert config["model_type"] == name
        verdict, why = rows[name]
        assert verdict == "supported" and why.startswith("KVCache"), name
