"""The report of ``kvpool bench``: ``results.md`` (tables) and one PNG plot per benchmark.

Built from every ``<name>.json`` record in the results folder, so re-running one benchmark
refreshes its section and keeps the others. Each record is read back as typed values: the
runner's :class:`~kvpool.benchmarks.records.Envelope` (name, timing, environment, targets),
then the benchmark's own record through the ``SECTION`` its module defines (record type,
section renderer, plot), so this module knows no benchmark's fields.

Plots need matplotlib (the ``bench`` extra, ``pip install 'kvpool[bench]'``); without it the
tables are still written and the report says the plots were skipped.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from kvpool.benchmarks.records import BenchRecord, Envelope, Section, from_json
from kvpool.benchmarks.registry import REGISTRY
from kvpool.benchmarks.tables import table

MARKDOWN_NAME = "results.md"
RUN_NAME = "run.json"  # the last `kvpool bench` run into this folder: what ran, how long


@dataclass(frozen=True, slots=True)
class RunInfo:
    """``run.json``: the last ``kvpool bench`` run into the folder."""

    benchmarks: tuple[str, ...]
    quick: bool
    total_s: float
    finished: str


@dataclass(slots=True)
class Written:
    markdown: Path
    plots: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Loaded:
    """One record file: its envelope, and its JSON for the benchmark's section to read."""

    envelope: Envelope
    data: dict[str, Any]


def load_records(out_dir: Path) -> list[Loaded]:
    """The records in ``out_dir``, in registry order."""
    records = []
    for name in REGISTRY:
        path = out_dir / f"{name}.json"
        if path.is_file():
            data = json.loads(path.read_text())
            records.append(Loaded(from_json(Envelope, data), data))
    return records


def section_of(name: str) -> Section[Any]:
    """The ``SECTION`` of a typed benchmark's module."""
    module = importlib.import_module(f"kvpool.benchmarks.{REGISTRY[name].module}")
    return cast(Section[Any], module.SECTION)


def write_report(out_dir: Path) -> Written:
    """Rewrite ``results.md`` and the plots from the records in ``out_dir``."""
    records = load_records(out_dir)
    last_run = out_dir / RUN_NAME
    run = from_json(RunInfo, json.loads(last_run.read_text())) if last_run.is_file() else None
    written = Written(out_dir / MARKDOWN_NAME)
    plotter = _plotter()
    if plotter is None:
        written.notes.append(
            "matplotlib is not installed: plots skipped (pip install 'kvpool[bench]')"
        )
    lines = _header(records, run)
    lines += _targets(records)
    for loaded in records:
        env = loaded.envelope
        lines += ["", f"## {env.bench}", ""]
        lines += _run_line(env)
        if env.error:
            lines += ["", f"**failed**: `{env.error}`"]
            continue
        body, draw = _render(env.bench, loaded.data)
        lines += ["", *body]
        if plotter is not None and draw is not None:
            path = out_dir / f"{env.bench}.png"
            plotter(draw, path)
            written.plots.append(path)
            lines += ["", f"![{env.bench}]({path.name})"]
    if plotter is None:
        lines += [
            "",
            "_Plots skipped: matplotlib is not installed (`pip install 'kvpool[bench]'`)._",
        ]
    written.markdown.write_text("\n".join(lines) + "\n")
    return written


Draw = Callable[[Any], None]  # draws into a matplotlib figure


def _render(name: str, data: dict[str, Any]) -> tuple[list[str], Draw | None]:
    """A record's section lines and its plot (None: no plot)."""
    section = section_of(name)
    record: BenchRecord = section.read(data)
    plot = section.plot
    return section.render(record), None if plot is None else (lambda fig: plot(fig, record))


# --------------------------------------------------------------------------- markdown


def _header(records: Sequence[Loaded], run: RunInfo | None) -> list[str]:
    lines = ["# kvpool benchmark results", ""]
    if not records:
        return [*lines, "No records."]
    first = records[0].envelope
    env = first.environment
    blas = env.blas
    threads = f", {blas.openblas_threads} thread(s)" if blas.openblas_threads else ""
    lines += [
        f"- machine: {env.machine}, {env.processor}, {env.cpu_count} CPUs",
        f"- versions: kvpool {env.kvpool}, mlx {env.mlx}, mlx-lm {env.mlx_lm}, python {env.python}",
        f"- BLAS (first record): {blas.blas}{threads}",
        f"- mode: {'--quick (smoke run)' if first.quick else 'full'}",
    ]
    if run is not None:
        command = "kvpool bench" + (" --quick" if run.quick else "")
        if list(run.benchmarks) != list(REGISTRY):
            command += " " + " ".join(run.benchmarks)
        lines.append(
            f"- last run: `{command}`, {run.total_s:.0f} s in all, finished {run.finished}"
        )
    return lines


def _run_line(env: Envelope) -> list[str]:
    load = ", ".join(f"{x:g}" for x in env.environment.load_average)
    return [
        f"`kvpool bench {env.bench}{' --quick' if env.quick else ''}`: "
        f"{env.elapsed_s:.0f} s, started {env.started}, BLAS "
        f"{env.environment.blas.blas}, load average at the end {load or '-'}"
    ]


def _targets(records: Sequence[Loaded]) -> list[str]:
    rows = [
        (r.envelope.bench, t.name, t.target, t.value, "n/a" if t.met is None else t.met)
        for r in records
        for t in r.envelope.targets
    ]
    if not rows:
        return []
    return ["", "## Targets", "", *table(("benchmark", "what", "target", "measured", "met"), rows)]


# --------------------------------------------------------------------------- plots


def _plotter() -> Callable[[Draw, Path], None] | None:
    """A function drawing one plot into a PNG, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None

    def draw(fn: Draw, path: Path) -> None:
        figure = plt.figure(figsize=(10, 4.5))
        try:
            fn(figure)
            figure.tight_layout()
            figure.savefig(path, dpi=100)
        finally:
            plt.close(figure)

    return draw
