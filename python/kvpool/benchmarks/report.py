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
    "persist",
    "quant",
    "redis",
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


def _persist(r: dict[str, Any]) -> list[str]:
    rows = [
        (
            op,
            f"{r[op]['median_ms']:.1f}",
            f"{r[op]['best_ms']:.1f}",
            f"{r[op]['median_MB_per_s']:.0f}",
        )
        for op in ("save", "raw_write", "load", "load_cold", "raw_read")
    ]
    return [
        f"One agent of {r['num_tokens']} tokens, {r['geometry']}: {r['file_MB']} MB file, "
        f"{r['rounds']} rounds; loaded blocks equal the saved ones: {r['round_trip_equal']}, "
        f"slab copies: {r['scatter_num_copied']}.",
        "",
        *_table(("operation", "median ms", "best ms", "MB/s (median)"), rows),
    ]


def _quant(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    g = r["gather"]
    rows = [
        (
            name,
            g[name]["p50_ms"],
            g[name]["p95_ms"],
            _x(r["vs_dense"].get(name, 1.0)),
            _mib(r["slab_bytes"][name]),
            _x(r["capacity_vs_dense"].get(name, 1.0)),
        )
        for name in ("dense", "q8", "q4")
    ]
    f32 = r["capacity_vs_dense_float32_model"]
    return [
        f"Gather of {c['blocks']} blocks x {c['layers']} layers x K,V of "
        f"[{c['kv_heads']}, {c['block_tokens']}, {c['head_dim']}] into dense {c['dtype']} "
        f"caches ({_mib(r['output_bytes'])}) out of dense, 8-bit and 4-bit slabs (group "
        f"size {c['group_size']}), {r['iters']} rounds, interleaved:",
        "",
        *_table(("slabs", "p50 ms", "p95 ms", "vs dense", "slab bytes", "capacity"), rows),
        "",
        f"Relative RMS error of the dequantized values: 8-bit {r['relative_rms_error']['q8']}, "
        f"4-bit {r['relative_rms_error']['q4']} (random normal data). Capacity for a float32 "
        f"model: 8-bit {_x(f32['q8'])}, 4-bit {_x(f32['q4'])}.",
        *_quant_formats(r),
    ]


def _quant_formats(r: dict[str, Any]) -> list[str]:
    """Capacity, save/load and quality per block format (absent from older records)."""
    if "capacity" not in r:
        return []
    cap, saved, quality = r["capacity"], r["save_load"], r["quality"]
    cap_rows = [
        (dtype, *(str(row[n]["agents"]) for n in ("dense", "q8", "q4")),
         _x(row["q8"]["agents_vs_dense"]), _x(row["q4"]["agents_vs_dense"]))
        for dtype, row in cap["by_dtype"].items()
    ]  # fmt: skip
    fmts = saved["formats"]
    io_rows = [
        (n, _mib(f["file_bytes"]), f["save"]["p50_ms"], f["load"]["p50_ms"],
         _x(f["file_vs_dense"]), _x(f["load_speedup_vs_dense"]))
        for n, f in fmts.items()
    ]  # fmt: skip
    q_rows = [
        (n, f"{q['turns_equal_to_dense']:.0%} of {quality['resumed_turns']}",
         f"{q['first_token_argmax_equal']:.0%}",
         f"{q['first_logit_max_abs_diff']['mean']:.3g}", f"{q['first_token_kl']['mean']:.3g}",
         f"{q['relative_rms_error_k']:.3g}", f"{q['relative_rms_error_v']:.3g}")
        for n, q in quality["by_format"].items()
    ]  # fmt: skip
    return [
        "",
        f"Agents of {cap['agent_tokens']} tokens ({cap['geometry']}) in "
        f"{_mib(cap['budget_bytes'])}:",
        "",
        *_table(("dtype", "dense", "8-bit", "4-bit", "8-bit vs dense", "4-bit vs dense"), cap_rows),
        "",
        cap["float32_note"] + ".",
        "",
        f"Save and load of one {saved['num_tokens']}-token agent ({saved['geometry']}), "
        f"{saved['rounds']} rounds interleaved:",
        "",
        *_table(
            ("format", "file", "save p50 ms", "load p50 ms", "smaller", "load faster"), io_rows
        ),
        "",
        f"Quality: {quality['agents']} agents x {quality['turns']} turns on the "
        f"{quality['model']!r} model, resumed from quantized blocks vs the dense run "
        f"({quality['note']}):",
        "",
        *_table(
            (
                "format",
                "turns equal",
                "first token equal",
                "logit max-abs (mean)",
                "KL (mean)",
                "K rel. RMS",
                "V rel. RMS",
            ),
            q_rows,
        ),
        *_quant_sensitivity(quality.get("sensitivity")),
    ]


def _quant_sensitivity(sens: dict[str, Any] | None) -> list[str]:
    if not sens:
        return []
    rows = [
        (scale, str(row["distinct_dense_outputs"]),
         *(f"{v:.0%}" for v in row["turns_equal_to_dense"].values()))
        for scale, row in sens["by_weight_scale"].items()
    ]  # fmt: skip
    first = next(iter(sens["by_weight_scale"].values()))["turns_equal_to_dense"]
    return [
        "",
        f"Sensitivity of the random-weight model ({sens['model']}): {sens['resume_points']} "
        f"resume points, {sens['tokens']} greedy tokens each, equal to the unperturbed "
        f"decode after perturbing the K/V ({sens['note']}):",
        "",
        *_table(("weights", "distinct outputs", *first), rows),
    ]


def _redis(r: dict[str, Any]) -> list[str]:
    if "skipped" in r:
        return [f"Skipped: {r['skipped']}."]
    res, d = r["resume"], r["dedup"]
    return [
        f"A {res['prompt_tokens']}-token turn of a session saved in Redis by another engine "
        f"({res['cached_tokens_from_redis']} tokens from Redis): TTFT "
        f"{res['ttft_redis_ms']['p50_ms']} ms vs {res['ttft_prefill_ms']['p50_ms']} ms "
        f"prefilling it ({_x(res['speedup'])} faster); tokens equal: {res['tokens_equal']}.",
        "",
        f"{d['sessions']} sessions sharing a {d['system_tokens']}-token system prompt: "
        f"{_mib(d['bytes_sent'])} sent to Redis vs {_mib(d['sum_of_caches_bytes'])} of caches "
        f"({_x(d['bytes_ratio'])}; {d['blocks_deduplicated']} blocks found already there).",
    ]


_LEGACY_DICT_SECTIONS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "persist": _persist,
    "quant": _quant,
    "redis": _redis,
}
_LEGACY_DICT_PLOTS: dict[str, Callable[[Any, dict[str, Any]], None]] = {}
