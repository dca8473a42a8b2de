"""`kvpool bench`: a fast benchmark end to end through ``main`` (records, report, plots),
the default results folder inside and outside a checkout, and bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from helpers import assert_one_line_error

from kvpool.benchmarks.environment import default_out_dir, source_tree
from kvpool.benchmarks.registry import REGISTRY
from kvpool.cli import main

REPO = Path(__file__).resolve().parents[2]
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
# Quick mode: pool sizes x blocks per call (batches larger than the pool are skipped).
QUICK_POINTS = [(256, 1), (256, 32), (256, 256), (4096, 1), (4096, 32), (4096, 256)]
OPS = {"allocate", "share", "free_shared", "release_shared", "free", "release", "ref_cnt"}


def _bench(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, Any]:
    assert main(["--no-fast-blas", "bench", *argv]) == 0
    captured = capsys.readouterr()
    (line,) = captured.out.splitlines()  # one JSON record per benchmark, nothing else
    record: dict[str, Any] = json.loads(line)
    assert "[1/1] bookkeeping done in" in captured.err
    return record


def _check_bookkeeping(record: dict[str, Any], out: Path) -> None:
    assert (record["bench"], record["quick"], record["error"]) == ("bookkeeping", True, None)
    assert [(p["num_blocks"], p["batch"]) for p in record["python"]] == QUICK_POINTS
    for point in record["python"]:
        assert set(point) - {"num_blocks", "batch"} == OPS
        assert all(point[op] > 0 for op in OPS)
    assert "blas" in record["environment"]["blas"]  # every record says which BLAS ran
    assert json.loads((out / "bookkeeping.json").read_text()) == record
    markdown = (out / "results.md").read_text()
    assert "## bookkeeping" in markdown
    assert "| pool blocks | batch | allocate |" in markdown
    assert (out / "bookkeeping.png").is_file() == HAS_MATPLOTLIB
    if not HAS_MATPLOTLIB:
        assert "Plots skipped: matplotlib is not installed" in markdown


def test_bookkeeping_quick_from_a_checkout(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    out, json_file = tmp_path / "results", tmp_path / "all.json"
    record = _bench(capsys, ["bookkeeping", "--quick", "--out", str(out), "--json", str(json_file)])

    _check_bookkeeping(record, out)
    assert json.loads(json_file.read_text()) == [record]
    cpp = record["cpp"]
    if cpp["available"]:  # a compiler and CMake are there: the C++ side ran
        points = {(p["num_blocks"], p["batch"]) for p in cpp["results"]}
        assert set(QUICK_POINTS) <= points
    else:
        assert "cmake" in cpp["reason"] or "failed" in cpp["reason"]


def test_bookkeeping_quick_outside_a_checkout_defaults_and_skips_cpp(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    record = _bench(capsys, ["bookkeeping", "--quick"])

    out = tmp_path / "kvpool-bench-results" / "quick"
    _check_bookkeeping(record, out)
    assert record["cpp"]["available"] is False
    assert "no kvpool source tree" in record["cpp"]["reason"]


def test_default_results_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO / "python")
    assert source_tree() == REPO
    assert default_out_dir(quick=False) == REPO / "bench" / "results"
    assert default_out_dir(quick=True) == REPO / "bench" / "results" / "quick"
    monkeypatch.chdir(tmp_path)
    assert source_tree() is None
    assert default_out_dir(quick=False) == tmp_path / "kvpool-bench-results"


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--no-fast-blas", "bench", "--list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == list(REGISTRY)
    assert names == [
        "reconstruct",
        "engine_overhead",
        "mixed_prefill",
        "resume",
        "workload",
        "multiround",
        "prefix",
        "memory",
        "persist",
        "fork",
        "bookkeeping",
        "blas",
        "serve",
        "responses",
        "quant",
        "quality",
        "redis",
        "structured",
        "hybrid",
    ]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["bench", "nope"], "no benchmark named 'nope' (benchmarks: reconstruct, engine_overhead"),
        (["bench", "--quick", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    assert main(["--no-fast-blas", *argv]) == 2
    captured = capsys.readouterr()
    assert_one_line_error(captured, expected)


def test_out_must_be_a_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    assert main(["--no-fast-blas", "bench", "bookkeeping", "--out", str(not_a_dir)]) == 2
    assert "is not a directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "default"),
    [("resume", "llama-8x128"), ("workload", "llama-8x128"), ("prefix", "llama-8x128")],
)
def test_model_runs_a_benchmark_on_the_model_given_and_the_record_says_so(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str, default: str
) -> None:
    """``--model demo`` on benchmarks whose own model is another recipe: the record's config
    names the model that ran, not the benchmark's default."""
    argv = ["--no-fast-blas", "bench", name, "--quick", "--out", str(tmp_path), "--model", "demo"]
    assert main(argv) == 0
    record: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert (record["bench"], record["error"]) == (name, None)
    assert record["config"]["model"] == "demo" != default
    assert json.loads((tmp_path / f"{name}.json").read_text()) == record
    assert REGISTRY[name].takes_model


def test_benchmarks_that_run_a_model_take_one() -> None:
    """Every benchmark that runs a model takes ``--model``; the others run none."""
    no_model = {"reconstruct", "persist", "fork", "bookkeeping"}
    assert {n for n, b in REGISTRY.items() if not b.takes_model} == no_model
