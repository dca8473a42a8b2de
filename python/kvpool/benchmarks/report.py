"""The report of ``kvpool bench``: ``results.md`` (tables) and one PNG plot per benchmark.

Built from every ``<name>.json`` record in the results folder, so re-running one benchmark
refreshes its section and keeps the others. Each record is read back as typed values: the
runner's :class:`~kvpool.benchmarks.records.Envelope` (name, timing, environment, targets),
then the benchmark's own record through the ``SECTION`` its module defines (record type,
section renderer, plot), so this module knows no benchmark's fields. Benchmarks that still
return dict records (``LEGACY_DICT_BENCHMARKS``) go through the transitional renderers at
the end of this module until they are converted.

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
from kvpool.benchmarks.runner import REGISTRY
from kvpool.benchmarks.tables import cell, mib, table, times

MARKDOWN_NAME = "results.md"
RUN_NAME = "run.json"  # the last `kvpool bench` run into this folder: what ran, how long
MIB = 1 << 20

# Transitional: benchmarks whose records are still dicts read by key (being edited on other
# branches); converting one = giving its module a typed record and SECTION, and removing it
# here with its renderer and plot below.
LEGACY_DICT_BENCHMARKS = (
    "engine_overhead",
    "memory",
    "mixed_prefill",
)

# the old private names of the table helpers, used by the transitional renderers
_table, _cell, _x, _mib = table, cell, times, mib


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
    if name in LEGACY_DICT_BENCHMARKS:
        legacy_plot = _LEGACY_DICT_PLOTS.get(name)
        draw = None if legacy_plot is None else (lambda fig: legacy_plot(fig, data))
        return _LEGACY_DICT_SECTIONS[name](data), draw
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


# --------------------------------------------------------------------------- transitional
# Renderers of the benchmarks still returning dict records (LEGACY_DICT_BENCHMARKS).


def _engine_overhead(r: dict[str, Any]) -> list[str]:
    rows = [
        (
            x["model"],
            x["batch"],
            x["kvpool_tok_s"],
            x["plain_tok_s"],
            x["paired_ratio_p50"],
            f"{x['paired_ratio_p5_p95'][0]:.3f}-{x['paired_ratio_p5_p95'][1]:.3f}",
            x["engine_overhead_us_p50"],
            f"{x['engine_overhead_pct_of_step']:.3f}%",
            x["finish_ms"],
            x["decode_steps"],
        )
        for x in r["results"]
    ]
    c = r["config"]
    return [
        f"{c['prompt_tokens']}-token prompts, {c['decode_steps']} decode steps per batch, "
        "engine and plain generator stepped in alternation:",
        "",
        *_table(
            ("model", "batch", "kvpool tok/s", "plain tok/s", "kvpool/plain (paired p50)",
             "pairs p5-p95", "engine us/step", "of step", "finish ms", "steps"),
            rows,
        ),
    ]  # fmt: skip


def _memory(r: dict[str, Any]) -> list[str]:
    t, res = r["turns"], r["resume"]
    c = r["config"]
    shown = [x for x in t["readings"] if x["turn"] % c["period"] in (0, 1)]
    rows = [
        (
            x["turn"],
            x["prompt_tokens_max"],
            _mib(x["rss"]),
            _mib(x["mlx_active"]),
            _mib(x["mlx_peak"]),
            _mib(x["mlx_cache"]),
            _mib(x["pool_used_bytes"]),
            x["turn_s"],
        )
        for x in shown
    ]
    first, last = t["first_period"], t["last_period"]

    def growth(key: str) -> str:
        pct = t.get(f"{key}_growth_pct")
        if pct is None:
            return "-"
        before, after = t[f"{key}_max_first_period"], t[f"{key}_max_last_period"]
        return f"{_mib(before)} -> {_mib(after)} ({pct:+.2f}%)"

    return [
        f"Model {c['model']}, {c['agents']} agents x {t['turns']} turns, new conversations "
        f"every {c['period']} turns; MLX cache limit {_mib(c['cache_limit_bytes'])}.",
        "",
        f"- pool: {_mib(t['pool_bytes'])} ({t['pool_blocks']} blocks), allocated up front",
        f"- max RSS, turns {first[0]}-{first[1]} -> turns {last[0]}-{last[1]}: {growth('rss')}",
        f"- max MLX active: {growth('mlx_active')}; max MLX peak in a turn: "
        f"{growth('mlx_peak')}; max MLX buffer cache: {growth('mlx_cache')}",
        f"- RSS after turn {t['warmup_turns']}: {_mib(t['rss_after_warmup'])}, after turn "
        f"{t['turns']}: {_mib(t['rss_last'])} ({t.get('rss_point_growth_pct', 0):+.2f}%, "
        "point to point)",
        f"- scatters: {t['scatter_stats']}",
        f"- one resume of a {res['context_tokens']}-token agent ({_mib(res['cache_bytes'])} of "
        f"K/V): peak extra MLX memory {_mib(res['resume_peak_extra_bytes'])} = "
        f"{res['resume_peak_extra_x_cache']:.2f}x the cache; plain mlx-lm re-prefill of the "
        f"same context: {_mib(res['reprefill_peak_extra_bytes'])} = "
        f"{res['reprefill_peak_extra_x_cache']:.2f}x",
        "",
        "First and last turn of each conversation:",
        "",
        *_table(
            ("turn", "prompt tokens", "RSS", "MLX active", "MLX peak in turn", "MLX cache",
             "pool used", "turn s"),
            rows,
        ),
    ]  # fmt: skip


def _mixed_prefill(r: dict[str, Any]) -> list[str]:
    x = r["resume_ttft_x_alone"]
    return [
        f"Resumes' TTFT with a new {r['config']['new_prompt_tokens']}-token agent in the same "
        f"step: {x['waves_on']:.2f}x of without it with prefill waves, {x['waves_off']:.2f}x "
        f"without; turn total {r['total_waves_on_x_off']:.2f}x; tokens equal: "
        f"{r['resume_tokens_equal']}."
    ]


def _plot_engine_overhead(figure: Any, r: dict[str, Any]) -> None:
    ax = figure.add_subplot(1, 1, 1)
    results = r["results"]
    labels = [f"{x['model']}\nbatch {x['batch']}" for x in results]
    xs = list(range(len(results)))
    width = 0.4
    ax.bar([x - width / 2 for x in xs], [x["kvpool_tok_s"] for x in results], width, label="kvpool")
    ax.bar(
        [x + width / 2 for x in xs],
        [x["plain_tok_s"] for x in results],
        width,
        label="plain mlx-lm",
    )
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_ylabel("decode tokens/s (median step)")
    ax.set_title("engine overhead: decode throughput")
    ax.legend()


def _plot_memory(figure: Any, r: dict[str, Any]) -> None:
    readings = r["turns"]["readings"]
    turns = [x["turn"] for x in readings]
    ax = figure.add_subplot(1, 1, 1)
    for key, label in (
        ("rss", "process RSS"),
        ("mlx_active", "MLX active"),
        ("mlx_peak", "MLX peak in turn"),
        ("mlx_cache", "MLX buffer cache"),
        ("pool_bytes", "pool (allocated)"),
    ):
        ax.plot(turns, [(x[key] or 0) / MIB for x in readings], label=label)
    ax.axvline(r["turns"]["warmup_turns"], color="gray", linestyle="--", label="end of warm-up")
    ax.set_xlabel("turn")
    ax.set_ylabel("MiB")
    ax.set_title(f"memory over {len(turns)} turns of {r['config']['agents']} agents")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


_LEGACY_DICT_SECTIONS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "engine_overhead": _engine_overhead,
    "memory": _memory,
    "mixed_prefill": _mixed_prefill,
}
_LEGACY_DICT_PLOTS: dict[str, Callable[[Any, dict[str, Any]], None]] = {
    "engine_overhead": _plot_engine_overhead,
    "memory": _plot_memory,
}
