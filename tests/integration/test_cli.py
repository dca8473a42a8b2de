"""`kvpool demo` and `kvpool info`: in-process through ``main`` and once through the console
script. Models are built from recipes into a per-module KVPOOL_CACHE_DIR."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import assert_one_line_error

from kvpool.cli import main
from kvpool.demo import GenerationMismatch, compare_outputs

SMALL = ["--model", "tiny", "--agents", "2", "--turns", "2", "--max-tokens", "4"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kvpool-cache")


@pytest.fixture(autouse=True)
def _model_cache(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVPOOL_CACHE_DIR", str(cache_dir))


def _run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, Any]:
    assert main(["--no-fast-blas", *argv]) == 0
    out = capsys.readouterr().out
    data: dict[str, Any] = json.loads(out)  # nothing but the JSON on stdout
    return data


def test_demo_json_reuses_the_cache_and_matches_reprefill(
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = _run_json(capsys, ["demo", *SMALL, "--json"])

    assert data["config"] == {
        "model": "tiny",
        "num_agents": 2,
        "num_turns": 2,
        "max_tokens": 4,
        "pool_mb": None,
        "seed": 0,
        "kv_bits": None,
        "kv_group_size": 64,
    }
    cached, reprefill = data["cached"], data["reprefill"]
    assert [(r["turn"], r["agent_id"]) for r in cached["records"]] == [
        (1, "agent-0"),
        (1, "agent-1"),
        (2, "agent-0"),
        (2, "agent-1"),
    ]
    first = {r["agent_id"]: r for r in cached["records"] if r["turn"] == 1}
    for r in cached["records"]:
        if r["turn"] == 1:
            assert r["cached_tokens"] == 0
        else:
            # Turn 2's prompt extends turn 1's prompt + completion, all of which is cached.
            prev = first[r["agent_id"]]
            assert r["cached_tokens"] == prev["prompt_tokens"] + prev["generated_tokens"] > 0
        assert r["prefilled_tokens"] == r["prompt_tokens"] - r["cached_tokens"]
    # The re-prefill run sees the same prompts and prefills all of them.
    for a, b in zip(cached["records"], reprefill["records"], strict=True):
        assert (b["turn"], b["agent_id"], b["prompt_tokens"]) == (
            a["turn"],
            a["agent_id"],
            a["prompt_tokens"],
        )
        assert (b["cached_tokens"], b["prefilled_tokens"]) == (0, b["prompt_tokens"])
    assert reprefill["cached_tokens"] == 0
    assert cached["prefilled_tokens"] < reprefill["prefilled_tokens"]

    assert data["outputs_identical"] is True
    assert data["mismatches"] == []
    assert data["num_compared"] == 4
    assert data["model"]["random_weights"] is True
    assert (data["model"]["num_layers"], data["model"]["num_kv_heads"]) == (2, 2)
    assert data["model"]["head_dim"] == 16
    pool = data["pool"]
    assert pool["num_used"] + pool["num_free"] == pool["num_blocks"]
    assert 0 < pool["num_used"] <= pool["peak_used"] <= pool["num_blocks"]
    assert pool["num_blocks"] == pool["num_blocks_needed"]  # default size: the worst case


def test_demo_table_and_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--no-fast-blas", "demo", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "outputs identical: yes (4/4 generations equal, 0 mismatches)" in out
    assert "RANDOM weights" in out
    for label in ("total time", "mean TTFT", "pool ", "model ", "speedup"):
        assert label in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("1 ", "2 "))]
    assert [(row[0], row[1]) for row in rows] == [
        ("1", "agent-0"),
        ("1", "agent-1"),
        ("2", "agent-0"),
        ("2", "agent-1"),
    ]


def test_seed_changes_the_prompts(capsys: pytest.CaptureFixture[str]) -> None:
    def prompts(seed: str) -> list[int]:
        data = _run_json(capsys, ["demo", *SMALL, "--turns", "1", "--seed", seed, "--json"])
        return [r["prompt_tokens"] for r in data["cached"]["records"]]

    assert prompts("1") == prompts("1")
    assert prompts("1") != prompts("2")


def test_info(capsys: pytest.CaptureFixture[str]) -> None:
    data = _run_json(capsys, ["info", "--model", "tiny", "--json"])
    assert data["kvpool"] == "0.1.0"
    assert data["model"] == "tiny"
    assert data["bytes_per_block"] == 2 * 2 * (16 + 16) * 256 * 4  # layers x heads x K+V x f32


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["demo", "--agents", "0"], "argument --agents: must be >= 1, got 0"),
        (["demo", "--turns", "-1"], "argument --turns: must be >= 1, got -1"),
        (["demo", "--max-tokens", "abc"], "argument --max-tokens: expected an integer, got 'abc'"),
        (["demo", "--pool-mb", "-5"], "argument --pool-mb: must be a number > 0"),
        (["demo", "--bogus"], "unrecognized arguments: --bogus"),
        ([], "the following arguments are required: COMMAND"),
        (["demo", "--model", "no-such-model"], "is neither a directory nor a recipe name"),
        # 0.1 MiB holds no block of the tiny model (0.125 MiB).
        (["demo", *SMALL, "--pool-mb", "0.1"], "holds 0 blocks of 0.12 MiB; one agent needs"),
        (["demo", *SMALL, "--agents", "8", "--pool-mb", "0.75"], "8 agents at once need"),
        (["demo", "--kv-bits", "3"], "argument --kv-bits: invalid choice: 3 (choose from 8, 4)"),
        (["demo", "--kv-group-size", "48"], "argument --kv-group-size: invalid choice: 48"),
        (
            ["serve", "--state-snapshot-blocks", "0"],
            "argument --state-snapshot-blocks: must be >= 1, got 0",
        ),
        # the tiny model's head dim 16 holds no group of 64 (or 32)
        (
            ["demo", *SMALL, "--kv-bits", "4"],
            "head dim 16 is not a multiple of the kv group size 64",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    assert main(["--no-fast-blas", *argv]) == 2
    captured = capsys.readouterr()
    assert_one_line_error(captured, expected)
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("content", ["missing", "empty", "garbage"])
def test_bad_model_directory_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: str
) -> None:
    model_dir = tmp_path / "model"
    if content != "missing":
        model_dir.mkdir()
    if content == "garbage":
        (model_dir / "config.json").write_text("{}")
        (model_dir / "model.safetensors").write_bytes(b"not safetensors")
    assert main(["--no-fast-blas", "demo", "--model", str(model_dir)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("kvpool demo: error: ")
    assert str(model_dir) in captured.err
    assert captured.err.count("\n") == 1, captured.err


def test_compare_outputs_reports_the_first_difference() -> None:
    cached = {(1, "a"): (5, 6, 7), (1, "b"): (5, 6), (2, "a"): (1, 2)}
    reprefill = {(1, "a"): (5, 9, 7), (1, "b"): (5, 6, 8), (2, "a"): (1, 2)}
    assert compare_outputs(cached, reprefill) == [
        GenerationMismatch(1, "a", first_difference=1, cached_tokens=3, reprefill_tokens=3),
        GenerationMismatch(1, "b", first_difference=2, cached_tokens=2, reprefill_tokens=3),
    ]
    assert compare_outputs(cached, cached) == []


def test_console_script(cache_dir: Path) -> None:
    script = Path(sys.executable).parent / "kvpool"
    assert script.is_file(), f"no console script at {script}: is kvpool installed?"
    proc = subprocess.run(
        [
            str(script),
            "--no-fast-blas",
            "demo",
            "--model",
            "demo",
            "--agents",
            "2",
            "--turns",
            "2",
            "--max-tokens",
            "8",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "KVPOOL_CACHE_DIR": str(cache_dir)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["config"]["model"] == "demo"
    assert data["blas"] == "reference (bundled with mlx)"  # --no-fast-blas
    assert data["outputs_identical"] is True
    assert [r["cached_tokens"] > 0 for r in data["cached"]["records"]] == [
        False,
        False,
        True,
        True,
    ]


def test_demo_with_quantized_blocks(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", "--model", "demo", "--agents", "2", "--turns", "2", "--max-tokens", "4"]
    data = _run_json(capsys, [*argv, "--kv-bits", "8", "--json"])
    assert (data["config"]["kv_bits"], data["config"]["kv_group_size"]) == (8, 64)
    assert "q8g64-float32" in data["model"]["cache_spec"]
    turn2 = [r for r in data["cached"]["records"] if r["turn"] == 2]
    assert len(turn2) == 2 and all(r["cached_tokens"] > 0 for r in turn2)


def test_demo_with_quantized_blocks_reports_agreement(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", "--model", "demo", "--agents", "2", "--turns", "2", "--max-tokens", "4"]
    assert main(["--no-fast-blas", *argv, "--kv-bits", "4"]) == 0
    out = capsys.readouterr().out
    assert "outputs identical" not in out
    (line,) = [line for line in out.splitlines() if line.strip().startswith("agreement")]
    assert "generations equal to the re-prefill run, first token equal in" in line
    assert "4-bit blocks at rest are lossy" in line
