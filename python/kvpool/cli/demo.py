"""``kvpool demo``: a multi-agent workload run twice, with and without cache reuse."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kvpool.cli.common import (
    DEMO_DEFAULTS,
    EXIT_OK,
    ProgressLine,
    add_format_arguments,
    add_model_argument,
    int_at_least,
    mib,
    positive_float,
    resolve_model_argument,
)
from kvpool.demo import CACHED, REPREFILL, DemoConfig, DemoResult, RunResult, run_demo


def add_parser(commands: Any) -> None:
    demo = commands.add_parser(
        "demo",
        help="run a multi-agent, multi-turn workload with and without cache reuse",
        description=(
            "Run N agents for T turns through the block-pool engine twice: reusing "
            "each agent's cache turn after turn, then re-prefilling every turn from scratch "
            "with the same prompts. Prints a per-turn table and a summary; checks that both "
            "runs generate the same tokens (greedy decoding)."
        ),
    )
    add_model_argument(demo)
    demo.add_argument(
        "--agents",
        type=int_at_least(1),
        default=DEMO_DEFAULTS.num_agents,
        metavar="N",
        help="number of agents (default: %(default)s)",
    )
    demo.add_argument(
        "--turns",
        type=int_at_least(1),
        default=DEMO_DEFAULTS.num_turns,
        metavar="T",
        help="turns per agent (default: %(default)s)",
    )
    demo.add_argument(
        "--max-tokens",
        type=int_at_least(1),
        default=DEMO_DEFAULTS.max_tokens,
        metavar="M",
        help="tokens generated per turn, at most (default: %(default)s)",
    )
    demo.add_argument(
        "--pool-mb",
        type=positive_float,
        default=None,
        metavar="MB",
        help="K/V pool size in MiB (default: the workload's worst case)",
    )
    add_format_arguments(demo)
    demo.add_argument(
        "--seed",
        type=int_at_least(0),
        default=DEMO_DEFAULTS.seed,
        metavar="S",
        help="picks the agents' text (default: %(default)s)",
    )
    demo.add_argument(
        "--json", action="store_true", help="print the result as JSON on stdout, nothing else"
    )
    demo.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    progress = ProgressLine(sys.stderr)
    model = resolve_model_argument(args.model, progress)
    config = DemoConfig(
        model=model,
        num_agents=args.agents,
        num_turns=args.turns,
        max_tokens=args.max_tokens,
        pool_mb=args.pool_mb,
        seed=args.seed,
        kv_bits=args.kv_bits,
        kv_group_size=args.kv_group_size,
    )
    progress.note(f"loading {config.model} ...")
    try:
        result = run_demo(config, progress)
    finally:
        progress.close()
    if args.json:
        print(result.to_json())
    else:
        print(format_result(result))
    return EXIT_OK


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _speedup(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_table(cached: RunResult, reprefill: RunResult, identical: set[tuple[int, str]]) -> str:
    """Per turn and agent: the cached run's numbers, then the re-prefill run's."""
    head = (
        f"{'turn':>4}  {'agent':<10} {'prompt':>6}  "
        f"{'cached':>6} {'prefill':>7} {'TTFT ms':>8} {'tok/s':>6}  | "
        f"{'prefill':>7} {'TTFT ms':>8} {'tok/s':>6}  {'same':>4}"
    )
    group = f"{'':24}{'--- ' + CACHED + ' ---':^31}| {'--- ' + REPREFILL + ' ---':^24}"
    lines = [group, head, "-" * len(head)]
    previous_turn = None
    for a in cached.records:
        b = reprefill.record(a.turn, a.agent_id)
        if previous_turn is not None and a.turn != previous_turn:
            lines.append("")
        previous_turn = a.turn
        lines.append(
            f"{a.turn:>4}  {a.agent_id:<10} {a.prompt_tokens:>6}  "
            f"{a.cached_tokens:>6} {a.prefilled_tokens:>7} {_ms(a.ttft_ms):>8} "
            f"{_rate(a.decode_tokens_per_s):>6}  | "
            f"{b.prefilled_tokens:>7} {_ms(b.ttft_ms):>8} {_rate(b.decode_tokens_per_s):>6}  "
            f"{'yes' if (a.turn, a.agent_id) in identical else 'NO':>4}"
        )
    return "\n".join(lines)


def format_result(result: DemoResult) -> str:
    """The human-readable report: the table, then the summary."""
    config, model, pool = result.config, result.model, result.pool
    cached, reprefill = result.cached, result.reprefill
    different = {(m.turn, m.agent_id) for m in result.mismatches}
    identical = {(r.turn, r.agent_id) for r in cached.records} - different
    lines = [format_table(cached, reprefill, identical), "", "summary"]

    def row(label: str, a: str, b: str, speedup: str = "") -> str:
        return f"  {label:<20} {a:>12} {b:>12} {speedup:>9}"

    total_a, total_b = f"{cached.total_s:.2f} s", f"{reprefill.total_s:.2f} s"
    ttft_a, ttft_b = f"{_ms(cached.mean_ttft_ms)} ms", f"{_ms(reprefill.mean_ttft_ms)} ms"
    lines += [
        row("", CACHED, REPREFILL, "speedup"),
        row("total time", total_a, total_b, _speedup(result.speedup_total)),
        row("mean TTFT", ttft_a, ttft_b, _speedup(result.speedup_ttft)),
        row("prefilled tokens", f"{cached.prefilled_tokens:,}", f"{reprefill.prefilled_tokens:,}"),
        row("cached tokens", f"{cached.cached_tokens:,}", f"{reprefill.cached_tokens:,}"),
        row("generated tokens", f"{cached.generated_tokens:,}", f"{reprefill.generated_tokens:,}"),
    ]
    num_equal = result.num_compared - len(result.mismatches)
    if config.kv_bits is None:
        verdict = "yes" if result.outputs_identical else "NO"
        lines.append(
            f"  outputs identical: {verdict} ({num_equal}/{result.num_compared} generations "
            f"equal, {len(result.mismatches)} mismatches)"
        )
    else:
        # Quantized blocks change the resumed caches, not the re-prefilled ones: agreement
        # is the measure, not identity.
        first_equal = result.num_compared - sum(m.first_difference == 0 for m in result.mismatches)
        lines.append(
            f"  agreement            {num_equal}/{result.num_compared} generations equal to the "
            f"re-prefill run, first token equal in {first_equal}/{result.num_compared}; "
            f"{config.kv_bits}-bit blocks at rest are lossy, so some resumed turns are expected "
            "to differ"
        )
    for m in result.mismatches:
        lines.append(
            f"    turn {m.turn} {m.agent_id}: first difference at generated token "
            f"{m.first_difference} ({m.cached_tokens} vs {m.reprefill_tokens} tokens)"
        )
    lines += [
        f"  workload             {config.num_agents} agents x {config.num_turns} turns, "
        f"up to {config.max_tokens} new tokens per turn, greedy, seed {config.seed}; "
        f"prompts {_prompt_range(cached)} tokens",
        f"  pool                 {pool.num_blocks} blocks x {mib(pool.bytes_per_block)} = "
        f"{mib(pool.bytes_total)}; after the cached run {pool.num_used} used "
        f"({mib(pool.bytes_used)}), {pool.num_free} free; peak {pool.peak_used} used",
        f"  model                {model.name}: {model.model_type}, {model.num_layers} layers, "
        f"hidden {model.hidden_size}, {model.num_attention_heads} heads, "
        f"{model.num_kv_heads} KV heads x {model.head_dim}, vocab {model.vocab_size}, "
        f"{model.num_params / 1e6:.1f}M params",
        f"  cache                {model.cache_spec}",
        f"  blas                 {result.blas}",
    ]
    if model.random_weights:
        lines += [
            "  note                 this model has RANDOM weights: its text is not meaningful "
            "(the geometry and the timings are real)",
            f"  sample text          {_clip(result.sample_text, 60)}",
        ]
    else:
        lines += [
            f"  conversation         agent-0, turn {config.num_turns} (cached run; "
            f"at most {config.max_tokens} tokens per answer)",
            *_wrapped("    user:      ", result.sample_question),
            *_wrapped("    assistant: ", result.sample_text),
        ]
    return "\n".join(lines)


def _wrapped(label: str, text: str, width: int = 100) -> list[str]:
    """``text`` on lines of at most ``width`` columns, the first after ``label``."""
    import textwrap

    return textwrap.wrap(
        " ".join(text.split()) or "(nothing)",
        width=width,
        initial_indent=label,
        subsequent_indent=" " * len(label),
    )


def _prompt_range(run: RunResult) -> str:
    lengths = [r.prompt_tokens for r in run.records]
    return f"{min(lengths)}-{max(lengths)}"


def _clip(text: str, limit: int) -> str:
    shown = ascii(text[:limit])
    return shown + (" ..." if len(text) > limit else "")
