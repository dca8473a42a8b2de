"""The report of ``kvpool bench``: ``results.md`` (tables) and one PNG plot per benchmark.

Built from every ``<name>.json`` record in the results folder, so re-running one benchmark
refreshes its section and keeps the others. Plots need matplotlib (the ``bench`` extra,
``pip install 'kvpool[bench]'``); without it the tables are still written and the report
says the plots were skipped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvpool.benchmarks.runner import REGISTRY

MARKDOWN_NAME = "results.md"
RUN_NAME = "run.json"  # the last `kvpool bench` run into this folder: what ran, how long
MIB = 1 << 20


@dataclass(slots=True)
class Written:
    markdown: Path
    plots: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def load_records(out_dir: Path) -> list[dict[str, Any]]:
    """The records in ``out_dir``, in registry order."""
    records = []
    for name in REGISTRY:
        path = out_dir / f"{name}.json"
        if path.is_file():
            records.append(json.loads(path.read_text()))
    return records


def write_report(out_dir: Path) -> Written:
    """Rewrite ``results.md`` and the plots from the records in ``out_dir``."""
    records = load_records(out_dir)
    last_run = out_dir / RUN_NAME
    run = json.loads(last_run.read_text()) if last_run.is_file() else None
    written = Written(out_dir / MARKDOWN_NAME)
    plot = _plotter()
    if plot is None:
        written.notes.append(
            "matplotlib is not installed: plots skipped (pip install 'kvpool[bench]')"
        )
    lines = _header(records, run)
    lines += _targets(records)
    for record in records:
        name = record["bench"]
        lines += ["", f"## {name}", ""]
        lines += _run_line(record)
        if record.get("error"):
            lines += ["", f"**failed**: `{record['error']}`"]
            continue
        lines += ["", *_SECTIONS[name](record)]
        if plot is not None and name in _PLOTS:
            path = out_dir / f"{name}.png"
            plot(_PLOTS[name], record, path)
            written.plots.append(path)
            lines += ["", f"![{name}]({path.name})"]
    if plot is None:
        lines += [
            "",
            "_Plots skipped: matplotlib is not installed (`pip install 'kvpool[bench]'`)._",
        ]
    written.markdown.write_text("\n".join(lines) + "\n")
    return written


# --------------------------------------------------------------------------- markdown


def _table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _mib(num_bytes: float | None) -> str:
    return "-" if num_bytes is None else f"{num_bytes / MIB:,.1f} MiB"


def _header(records: list[dict[str, Any]], run: dict[str, Any] | None) -> list[str]:
    lines = ["# kvpool benchmark results", ""]
    if not records:
        return [*lines, "No records."]
    env = records[0]["environment"]
    blas = env["blas"]
    threads = f", {blas['openblas_threads']} thread(s)" if blas.get("openblas_threads") else ""
    lines += [
        f"- machine: {env['machine']}, {env['processor']}, {env['cpu_count']} CPUs",
        f"- versions: kvpool {env['kvpool']}, mlx {env['mlx']}, mlx-lm {env['mlx_lm']}, "
        f"python {env['python']}",
        f"- BLAS (first record): {blas['blas']}{threads}",
        f"- mode: {'--quick (smoke run)' if records[0]['quick'] else 'full'}",
    ]
    if run is not None:
        command = "kvpool bench" + (" --quick" if run["quick"] else "")
        if run["benchmarks"] != list(REGISTRY):
            command += " " + " ".join(run["benchmarks"])
        lines.append(
            f"- last run: `{command}`, {run['total_s']:.0f} s in all, finished {run['finished']}"
        )
    return lines


def _run_line(record: dict[str, Any]) -> list[str]:
    env = record["environment"]
    load = ", ".join(f"{x:g}" for x in env.get("load_average", []))
    return [
        f"`kvpool bench {record['bench']}{' --quick' if record['quick'] else ''}`: "
        f"{record['elapsed_s']:.0f} s, started {record['started']}, BLAS "
        f"{env['blas']['blas']}, load average at the end {load or '-'}"
    ]


def _targets(records: list[dict[str, Any]]) -> list[str]:
    rows = [
        (r["bench"], t["name"], t["target"], t["value"], "n/a" if t["met"] is None else t["met"])
        for r in records
        for t in r.get("targets", [])
    ]
    if not rows:
        return []
    return ["", "## Targets", "", *_table(("benchmark", "what", "target", "measured", "met"), rows)]


def _reconstruct(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    lines = [
        f"EXP-006: {c['blocks']} blocks x {c['layers']} layers x K,V of "
        f"[{c['kv_heads']}, {c['block_tokens']}, {c['head_dim']}] {c['dtype']} "
        f"({_mib(r['bytes_moved'])}), {r['iters']} rounds, interleaved:",
        "",
    ]
    rows = [
        (m, r[m]["p50_ms"], r[m]["p95_ms"], r[m]["gb_per_s"])
        for m in ("gather", "gather_with_headroom", "memcpy", "concatenate")
    ]
    lines += _table(("method", "p50 ms", "p95 ms", "GB/s (p50)"), rows)
    lines += [
        "",
        f"gather is {_x(r['speedup_vs_concatenate'])} faster than mx.concatenate and runs at "
        f"{r['fraction_of_memcpy_bandwidth']:.0%} of memcpy's bandwidth.",
    ]
    sweep = r["sweep"]
    for key, label in (("by_blocks", "blocks (48 layers)"), ("by_layers", "layers (32 blocks)")):
        sweep_rows = [
            (
                p["blocks"] if key == "by_blocks" else p["layers"],
                _mib(p["bytes"]),
                p["gather"]["gb_per_s"],
                p["memcpy"]["gb_per_s"],
                p["concatenate"]["gb_per_s"] if p["concatenate_copies"] else "(no copy)",
                _x(p["speedup_vs_concatenate"]),
                p["fraction_of_memcpy"],
            )
            for p in sweep[key]
        ]
        lines += [
            "",
            f"Sweep over {label}, GB/s at the median of {sweep['iters']} rounds:",
            "",
            *_table(
                (label.split()[0], "bytes", "gather", "memcpy", "concatenate",
                 "gather vs concat", "gather / memcpy"),
                sweep_rows,
            ),
        ]  # fmt: skip
    lines += ["", f"Sweep: {sweep['note']}."]
    return lines


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


def _resume(r: dict[str, Any]) -> list[str]:
    rows = []
    for x in r["results"]:
        disk = x["disk"]
        has_disk = isinstance(disk, dict)
        rows.append(
            (
                x["context_tokens"],
                _mib(x["cache_bytes"]),
                f"{x['pool']['p50_ms']:.1f} ({x['pool']['n']})",
                f"{disk['p50_ms']:.1f} ({disk['n']})" if has_disk else disk,
                f"{x['disk_load']['p50_ms']:.1f}" if has_disk else "-",
                f"{x['reprefill']['p50_ms']:.0f} ({x['reprefill']['n']})",
                _x(x["speedup_pool_vs_reprefill"]),
                _x(x.get("speedup_disk_vs_reprefill")),
                _x(x.get("speedup_pool_vs_disk")),
            )
        )
    c = r["config"]
    return [
        f"Model {c['model']}; next turn = {c['new_tokens']} new tokens, TTFT p50 in ms "
        "(samples). Disk: page cache dropped before each load; load = `load_cache` alone.",
        "",
        *_table(
            ("context", "cache", "pool ms", "disk ms", "load ms", "re-prefill ms",
             "pool vs re-prefill", "disk vs re-prefill", "pool vs disk"),
            rows,
        ),
    ]  # fmt: skip


def _workload(r: dict[str, Any]) -> list[str]:
    rows = [
        (
            x["agents"],
            x["turns"],
            x["kvpool_total_s"],
            x["plain_total_s"],
            _x(x["speedup_total"]),
            x["kvpool_mean_ttft_ms"],
            x["plain_mean_ttft_ms"],
            _x(x["speedup_mean_ttft"]),
            f"{x['kvpool_prefilled_tokens']:,} / {x['plain_prefilled_tokens']:,}",
        )
        for x in r["results"]
    ]
    c = r["config"]
    lines = [
        f"Model {c['model']}; per agent: {c['system_tokens']} shared + {c['task_tokens']} own "
        f"tokens, then per turn {c['max_tokens']} generated + {c['user_tokens']} user tokens:",
        "",
        *_table(
            ("agents", "turns", "kvpool s", "plain s", "speedup", "kvpool mean TTFT ms",
             "plain mean TTFT ms", "TTFT speedup", "prefilled tokens kvpool / plain"),
            rows,
        ),
    ]  # fmt: skip
    for x in r["results"]:
        per_turn = [
            (
                t["turn"],
                t["prompt_tokens"],
                t["kvpool_prefilled_tokens"],
                t["kvpool_total_s"],
                t["plain_total_s"],
                t["kvpool_mean_ttft_ms"],
                t["plain_mean_ttft_ms"],
            )
            for t in x["per_turn"]
        ]
        lines += [
            "",
            f"{x['agents']} agents, per turn:",
            "",
            *_table(
                ("turn", "prompt tokens", "kvpool prefilled", "kvpool s", "plain s",
                 "kvpool TTFT ms", "plain TTFT ms"),
                per_turn,
            ),
        ]  # fmt: skip
    return lines


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


def _bookkeeping(r: dict[str, Any]) -> list[str]:
    cpp = r["cpp"]
    cpp_points = {(p["num_blocks"], p["batch"]): p for p in cpp.get("results", [])}
    ops = ("allocate", "share", "free_shared", "free", "release", "ref_cnt")
    rows = []
    for p in r["python"]:
        c = cpp_points.get((p["num_blocks"], p["batch"]), {})
        rows.append(
            (p["num_blocks"], p["batch"], *(f"{p[o]:.0f} / {_cpp_cell(c.get(o))}" for o in ops))
        )
    lines = [
        f"ns per block, median of {r['config']['reps']} repetitions (Python) and of "
        f"{cpp.get('reps', '-')} (C++); cells are Python / C++:",
        "",
        *_table(("pool blocks", "batch", *ops), rows),
    ]
    if not cpp["available"]:
        lines += ["", f"C++: unavailable ({cpp['reason']})"]
    return lines


def _cpp_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _blas(r: dict[str, Any]) -> list[str]:
    variants = list(r["blas"])
    rows = []
    for key in ("matmul_1024_f32_s", "prefill_tok_s", "decode_tok_s"):
        values = r[key]
        rows.append(
            (
                key,
                *(values[v] for v in variants),
                *(_x(values.get(f"speedup_{v}")) for v in variants[1:]),
            )
        )
    return [
        f"Model {r['model']}, prompt {r['prompt_tokens']} tokens, {r['decode_tokens']} decode "
        "steps; each variant in its own interpreter:",
        "",
        *_table(("metric", *variants, *(f"speedup {v}" for v in variants[1:])), rows),
        "",
        *(f"- {v}: {r['blas'][v]}" for v in variants),
    ]


def _serve(r: dict[str, Any]) -> list[str]:
    from kvpool.benchmarks.serve import report_lines

    return report_lines(r)


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


def _prefix(r: dict[str, Any]) -> list[str]:
    c, m, n, t, w = r["config"], r["memory"], r["new_agent"], r["together"], r["windows"]
    return [
        f"System prompt of {c['system_tokens']} tokens, {c['private_tokens']} private tokens "
        f"per agent, {c['model']} ({c['weights']}).",
        "",
        *_table(
            ("measure", "with sharing", "without", "ratio"),
            [
                (
                    f"blocks held, {m['agents']} agents after one turn",
                    m["blocks_held"],
                    m["blocks_unshared"],
                    f"{m['ratio']}x",
                ),
                (
                    "new agent TTFT p50 (system prompt cached)",
                    f"{n['cached']['p50_ms']:.0f} ms",
                    f"{n['nothing_cached']['p50_ms']:.0f} ms",
                    _x(n["speedup"]),
                ),
                (
                    f"{t['agents']} agents together: prefilled tokens",
                    t["shared"]["prefilled_tokens"],
                    t["unshared"]["prefilled_tokens"],
                    f"bound {t['prefill_bound']}",
                ),
                (
                    f"{t['agents']} agents together: wall time",
                    f"{t['shared']['total_s']:.2f} s",
                    f"{t['unshared']['total_s']:.2f} s",
                    _x(t["speedup_total"]),
                ),
                (
                    f"8K-token agent, {w['geometry']}",
                    _mib(w["bytes_per_group_tables"]),
                    _mib(w["bytes_one_table"]),
                    f"{w['ratio']}x",
                ),
            ],
        ),
        "",
        f"Partial block: a prompt sharing {r['partial']['shared_tokens']} tokens reused "
        f"{r['partial']['cached_tokens']}. Prefix hit rate {r['prefix_cache']['hit_rate']:.1%} "
        f"({r['prefix_cache']['hit_tokens']} of {r['prefix_cache']['query_tokens']} tokens); "
        f"bytes saved after the shared turn: {_mib(m['bytes_saved'])}; tokens equal with and "
        f"without sharing: {t['tokens_equal']}.",
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


_SECTIONS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "prefix": _prefix,
    "reconstruct": _reconstruct,
    "engine_overhead": _engine_overhead,
    "resume": _resume,
    "serve": _serve,
    "workload": _workload,
    "memory": _memory,
    "persist": _persist,
    "bookkeeping": _bookkeeping,
    "blas": _blas,
    "quant": _quant,
    "redis": _redis,
}


# --------------------------------------------------------------------------- plots

PlotFn = Callable[[Any, dict[str, Any]], None]  # (figure, record)


def _plotter() -> Callable[[PlotFn, dict[str, Any], Path], None] | None:
    """A function drawing one plot into a PNG, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None

    def draw(fn: PlotFn, record: dict[str, Any], path: Path) -> None:
        figure = plt.figure(figsize=(10, 4.5))
        try:
            fn(figure, record)
            figure.tight_layout()
            figure.savefig(path, dpi=100)
        finally:
            plt.close(figure)

    return draw


def _plot_reconstruct(figure: Any, r: dict[str, Any]) -> None:
    sweep = r["sweep"]
    for i, (key, label) in enumerate((("by_blocks", "blocks"), ("by_layers", "layers"))):
        ax = figure.add_subplot(1, 2, i + 1)
        for method in ("gather", "memcpy", "concatenate"):
            # concatenate of a single block copies nothing: no bandwidth to show
            shown = [p for p in sweep[key] if method != "concatenate" or p["concatenate_copies"]]
            ax.plot(
                [p[label] for p in shown],
                [p[method]["gb_per_s"] for p in shown],
                marker="o",
                label=method,
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label + (" (48 layers)" if label == "blocks" else " (32 blocks)"))
        ax.set_ylabel("GB/s (median)")
        ax.set_title(f"reconstruct: bandwidth vs {label}")
        ax.grid(True, alpha=0.3)
        ax.legend()


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


def _plot_resume(figure: Any, r: dict[str, Any]) -> None:
    ax = figure.add_subplot(1, 1, 1)
    results = r["results"]
    xs = [x["context_tokens"] for x in results]
    ax.plot(xs, [x["pool"]["p50_ms"] for x in results], marker="o", label="from the pool")
    if all(isinstance(x["disk"], dict) for x in results):
        ax.plot(xs, [x["disk"]["p50_ms"] for x in results], marker="o", label="from disk")
    ax.plot(
        xs, [x["reprefill"]["p50_ms"] for x in results], marker="o", label="re-prefill (mlx-lm)"
    )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context tokens")
    ax.set_ylabel("time to first token, ms (median)")
    ax.set_title(f"resume: TTFT of the next turn ({r['config']['model']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


def _plot_workload(figure: Any, r: dict[str, Any]) -> None:
    results = r["results"]
    labels = [f"{x['agents']} agents" for x in results]
    xs = list(range(len(results)))
    width = 0.4
    for i, (metric, title) in enumerate(
        (("total_s", "total time, s"), ("mean_ttft_ms", "mean TTFT, ms"))
    ):
        ax = figure.add_subplot(1, 2, i + 1)
        ax.bar(
            [x - width / 2 for x in xs],
            [x[f"kvpool_{metric}"] for x in results],
            width,
            label="kvpool",
        )
        ax.bar(
            [x + width / 2 for x in xs],
            [x[f"plain_{metric}"] for x in results],
            width,
            label="re-prefill (mlx-lm)",
        )
        ax.set_xticks(xs, labels)
        ax.set_title(f"workload: {title}")
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


def _plot_bookkeeping(figure: Any, r: dict[str, Any]) -> None:
    cpp = {(p["num_blocks"], p["batch"]): p for p in r["cpp"].get("results", [])}
    points = r["python"]
    labels = [f"{p['num_blocks']}\nx{p['batch']}" for p in points]
    xs = list(range(len(points)))
    for i, op in enumerate(("allocate", "free")):
        ax = figure.add_subplot(1, 2, i + 1)
        width = 0.4
        ax.bar([x - width / 2 for x in xs], [p[op] for p in points], width, label="Python")
        cpp_values = [cpp.get((p["num_blocks"], p["batch"]), {}).get(op, 0) for p in points]
        ax.bar([x + width / 2 for x in xs], cpp_values, width, label="C++")
        ax.set_yscale("log")
        ax.set_xticks(xs, labels, fontsize=8)
        ax.set_xlabel("pool blocks x blocks per call")
        ax.set_ylabel("ns per block (median)")
        ax.set_title(f"bookkeeping: {op}")
        ax.legend()


_PLOTS: dict[str, PlotFn] = {
    "reconstruct": _plot_reconstruct,
    "engine_overhead": _plot_engine_overhead,
    "resume": _plot_resume,
    "workload": _plot_workload,
    "memory": _plot_memory,
    "bookkeeping": _plot_bookkeeping,
}
