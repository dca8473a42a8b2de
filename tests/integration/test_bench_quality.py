"""``kvpool bench quality`` on the trained model (quick) and ``--model`` on a recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_one_line_error

from kvpool.cli import main

KVPOOL = Path(sys.executable).parent / "kvpool"


def _bench(out: Path, *args: str) -> dict[str, object]:
    proc = subprocess.run(
        [str(KVPOOL), "bench", "quality", "--quick", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record: dict[str, object] = json.loads((out / "quality.json").read_text())
    return record


def test_quality_quick_on_the_trained_model(smollm2_dir: Path, tmp_path: Path) -> None:
    record = _bench(tmp_path, "--model", str(smollm2_dir))
    assert record["error"] is None
    assert record["random_weights"] is False
    (text,) = record["texts"]  # type: ignore[misc]
    scores = text["by_format"]
    assert list(scores) == ["dense", "q8g64", "q8g32", "q4g64", "q4g32"]
    dense = scores["dense"]
    assert (dense["change_pct"], dense["next_token_kl_mnat"], dense["argmax_equal"]) == (0, 0, 1)
    assert 5 < dense["perplexity"] < 40  # a trained model on license text
    for bits in ("q8", "q4"):
        for group in ("g64", "g32"):
            assert scores[bits + group]["next_token_kl_mnat"] > 0  # lossy: never exactly dense
    # 8-bit blocks lose far less than 4-bit ones
    assert scores["q8g64"]["next_token_kl_mnat"] * 10 < scores["q4g64"]["next_token_kl_mnat"]
    report = (tmp_path / "results.md").read_text()
    assert "| q4g32 |" in report and "KL (mnat)" in report


def test_quality_on_a_random_weight_recipe_says_so(tmp_path: Path) -> None:
    record = _bench(tmp_path / "out", "--model", "demo")
    assert record["model"] == "demo" and record["random_weights"] is True
    assert "RANDOM weights" in (tmp_path / "out" / "results.md").read_text()


def test_model_for_benchmarks_that_take_none_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--no-fast-blas", "bench", "bookkeeping", "persist", "--quick", "--model", "tiny"]
    assert main(argv) == 2
    assert_one_line_error(capsys.readouterr(), "none of which is chosen (bookkeeping, persist)")
