"""Typed benchmark records: JSON round trip, shape errors, and the report built from them
(no MLX: the record types and renderers import none)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvpool.benchmarks import multiround, redis_tier, report, workload
from kvpool.benchmarks.measure import Summary, at_most
from kvpool.benchmarks.records import (
    Envelope,
    RecordError,
    Section,
    Target,
    from_json,
    to_json,
)
from kvpool.benchmarks.registry import REGISTRY
from kvpool.benchmarks.turns import WayTotals, rotation

ENVIRONMENT = {
    "kvpool": "0.1.0",
    "mlx": "0.32.4",
    "mlx_lm": "0.32.2",
    "python": "3.11.7",
    "machine": "Linux x86_64",
    "processor": "test CPU",
    "cpu_count": 2,
    "load_average": [1.5, 1.0, 0.5],
    "blas": {"blas": "openblas", "openblas_threads": 1, "cblas_sgemm": "ignored"},
}


def _way(total: float, ttft: float) -> WayTotals:
    return WayTotals(
        total_s=total, mean_ttft_ms=ttft, p50_ttft_ms=ttft, p95_ttft_ms=2 * ttft,
        prefilled_tokens=100,
    )  # fmt: skip


def _workload_record() -> workload.WorkloadRecord:
    ways = {"kvpool": _way(8.0, 100.0), "lru": _way(10.0, 150.0), "plain": _way(20.0, 400.0)}
    row = workload.TurnRow(
        turn=1,
        prompt_tokens=512,
        total_s={"kvpool": 4.0, "lru": 5.0, "plain": 10.0},
        mean_ttft_ms={"kvpool": 100.0, "lru": 150.0, "plain": 400.0},
        prefilled_tokens={"kvpool": 128, "lru": 128, "plain": 512},
    )
    result = workload.AgentsResult(
        agents=4,
        turns=2,
        lru_max_size=10,
        pool_blocks=17,
        ways=ways,
        kvpool_vs_lru_total=0.8,
        kvpool_vs_plain_total=0.4,
        kvpool_vs_lru_mean_ttft=0.67,
        kvpool_vs_plain_mean_ttft=0.25,
        agent_turns=8,
        agent_turns_unequal={"lru": 0, "plain": 1},
        per_turn=(row,),
    )
    return workload.WorkloadRecord(
        targets=(at_most("4 agents: kvpool / LRU", 0.8, 0.8),),
        config=workload.WorkloadConfig(
            model="m",
            agent_counts=(4,),
            turns=2,
            system_tokens=64,
            task_tokens=64,
            user_tokens=32,
            max_tokens=4,
            cache_limit_bytes=1 << 30,
        ),
        results=(result,),
    )


def _multiround_record() -> multiround.MultiroundRecord:
    way = multiround.WayResult(
        total_s=10.0, ttft_p50_ms=300.0, ttft_p95_ms=900.0, resumed_ttft_p50_ms=250.0,
        resumed_ttft_p95_ms=800.0, new_ttft_p50_ms=700.0, prompt_tokens=1000,
        cached_tokens=750, prefix_hit_rate=0.75, turns_unequal=0,
    )  # fmt: skip
    scenario = multiround.ScenarioResult(
        config=multiround.ScenarioConfig(
            name="peer at its best",
            users=3,
            rounds=2,
            arrivals=1,
            steps=4,
            system_tokens=64,
            first_question_tokens=32,
            question_tokens=16,
            answer_tokens=4,
            lru_max_size=10,
        ),
        turns=6,
        ways={"kvpool": way, "lru": way, "plain": way},
        step_total_s={"kvpool": (1.0, 2.0), "lru": (1.5, 2.5), "plain": (3.0, 4.0)},
        kvpool_vs_lru_total=0.9,
        kvpool_vs_lru_resumed_ttft_p50=None,
        kvpool_vs_plain_total=0.5,
        kvpool_vs_plain_resumed_ttft_p50=0.3,
    )
    return multiround.MultiroundRecord(
        targets=(at_most("total", 0.7, 0.9), at_most("resumed", 0.6, None)),
        model="m",
        cache_limit_bytes=1 << 30,
        scenarios=(scenario,),
    )  # fmt: skip


def _redis_record() -> redis_tier.RedisRecord:
    resume = redis_tier.ResumeResult(
        context_tokens=4096, prompt_tokens=4136, cached_tokens_from_redis=4104,
        ttft_redis_ms=Summary(3, 382.0, 419.0, 276.0, 423.0),
        ttft_prefill_ms=Summary(3, 7613.0, 8738.0, 7296.0, 8863.0), speedup=19.93,
        tokens_equal=True, bytes_sent={"float16": 4 << 20, "q4": 1 << 20},
        bytes_sent_q4_vs_dense=0.25,
    )  # fmt: skip
    dedup = redis_tier.DedupResult(
        sessions=16, system_tokens=2048, own_tokens=64, bytes_sent=13 << 20,
        sum_of_caches_bytes=130 << 20, bytes_ratio=0.1, blocks_written=24,
        blocks_deduplicated=120,
    )  # fmt: skip
    return redis_tier.RedisRecord(
        targets=(Target("bytes", "<= 0.25x", 0.1, True),),
        model="demo",
        resume=resume,
        dedup=dedup,
    )


def test_nested_record_round_trips_through_json_text() -> None:
    record = _workload_record()
    text = json.dumps(to_json(record))
    back = from_json(workload.WorkloadRecord, json.loads(text))
    assert back == record
    assert type(back.results[0].per_turn) is tuple
    assert type(back.results[0].ways["lru"]) is WayTotals
    assert back.targets[0] == Target("4 agents: kvpool / LRU", "<= 0.8x", 0.8, True)


def test_optional_fields_and_ints_read_as_floats() -> None:
    record = _multiround_record()
    data = json.loads(json.dumps(to_json(record)))
    data["scenarios"][0]["ways"]["kvpool"]["total_s"] = 10  # 10.0 can come back as 10
    back = from_json(multiround.MultiroundRecord, data)
    assert back == record
    assert isinstance(back.scenarios[0].ways["kvpool"].total_s, float)
    assert back.scenarios[0].kvpool_vs_lru_resumed_ttft_p50 is None
    assert back.targets[1].met is None


def test_summary_of_samples_in_seconds() -> None:
    assert Summary.of([0.1, 0.2, 0.3]) == Summary(3, 200.0, 290.0, 100.0, 300.0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("config"), "field 'config' missing"),
        (lambda d: d["results"][0].update(agents="4"), "expected int, got '4'"),
        (lambda d: d["results"][0].update(agents=True), "expected int, got True"),
        (lambda d: d["results"][0]["ways"]["kvpool"].update(total_s=None), "expected a number"),
        (lambda d: d.update(results={}), "expected a list"),
    ],
)
def test_a_record_of_another_shape_is_refused(change: Any, message: str) -> None:
    data = json.loads(json.dumps(to_json(_workload_record())))
    change(data)
    with pytest.raises(RecordError, match=message):
        from_json(workload.WorkloadRecord, data)


def test_envelope_reads_what_the_runner_writes_and_ignores_the_rest() -> None:
    data = {
        "bench": "workload", "quick": True, "started": "2026-12-01T00:00:00+00:00",
        "elapsed_s": 12, "error": None, "environment": ENVIRONMENT,
        **to_json(_workload_record()),
    }  # fmt: skip
    env = from_json(Envelope, data)
    assert (env.bench, env.quick, env.elapsed_s, env.error) == ("workload", True, 12.0, None)
    assert env.environment.blas.openblas_threads == 1
    assert env.environment.load_average == (1.5, 1.0, 0.5)
    assert env.targets[0].met is True


def test_rotation_moves_each_way_one_place_per_turn() -> None:
    ways = ("kvpool", "lru", "plain")
    assert [rotation(t, ways) for t in range(1, 4)] == [
        ["lru", "plain", "kvpool"],
        ["plain", "kvpool", "lru"],
        ["kvpool", "lru", "plain"],
    ]


def _write(out: Path, name: str, body: dict[str, Any], error: str | None = None) -> None:
    record = {
        "bench": name, "quick": False, "started": "2026-12-01T00:00:00+00:00",
        "elapsed_s": 3.0, "error": error, **body, "environment": ENVIRONMENT,
    }  # fmt: skip
    (out / f"{name}.json").write_text(json.dumps(record))


def test_report_renders_typed_records(tmp_path: Path) -> None:
    _write(tmp_path, "workload", to_json(_workload_record()))
    _write(tmp_path, "multiround", to_json(_multiround_record()))
    _write(tmp_path, "redis", to_json(_redis_record()))
    _write(tmp_path, "resume", {}, error="RuntimeError: boom")
    run = {"benchmarks": ["workload"], "quick": False, "total_s": 9.0, "finished": "now"}
    (tmp_path / report.RUN_NAME).write_text(json.dumps(run))

    written = report.write_report(tmp_path)

    markdown = written.markdown.read_text()
    assert "- last run: `kvpool bench workload`, 9 s in all, finished now" in markdown
    assert "| workload | 4 agents: kvpool / LRU | <= 0.8x | 0.80 | yes |" in markdown
    assert "| multiround | resumed | <= 0.6x | - | n/a |" in markdown
    assert "| 4 | mlx-lm LRUPromptCache | 10.00 | 150.00 | 150.00 | 300.00 | 100 | 0 |" in markdown
    assert "| 4 | 0.80x | 0.40x | 0.67x | 0.25x | 10 |" in markdown
    assert "| kvpool | 10.00 | 300.00 | 900.00 | 250.00 | 800.00 | 700.00 | 75.0% | 0 |" in (
        markdown
    )
    assert "TTFT 382.0 ms vs 7613.0 ms prefilling it (19.93x faster)" in markdown
    assert "float16 4.0 MiB, q4 1.0 MiB (4-bit / dense 0.25x)" in markdown
    assert "13.0 MiB sent to Redis vs 130.0 MiB of caches (0.10x; 120 blocks" in markdown
    assert "**failed**: `RuntimeError: boom`" in markdown
    # registry order: resume, workload, multiround, ..., redis
    assert markdown.index("## resume") < markdown.index("## workload")
    assert markdown.index("## multiround") < markdown.index("## redis")


def test_every_benchmark_has_a_typed_section() -> None:
    typed = list(REGISTRY)  # every benchmark: no dict records are left
    for name in typed:
        # these import mlx at module level: covered in integration (test_bench_cli)
        if name in ("reconstruct", "persist", "quant"):
            continue
        assert isinstance(report.section_of(name), Section), name


def test_a_skipped_redis_record_renders_why() -> None:
    record = redis_tier.RedisRecord(targets=(), skipped="redis-server is not installed")
    back = from_json(redis_tier.RedisRecord, json.loads(json.dumps(to_json(record))))
    assert back == record
    assert redis_tier.render_section(back) == ["Skipped: redis-server is not installed."]


def test_a_typed_record_of_the_wrong_shape_fails_the_report(tmp_path: Path) -> None:
    body = to_json(_workload_record())
    del body["results"]
    _write(tmp_path, "workload", body)
    with pytest.raises(RecordError, match="field 'results' missing"):
        report.write_report(tmp_path)


RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def test_memory_records_from_before_the_generator_comparison_still_render() -> None:
    from kvpool.benchmarks import memory

    data = json.loads((RESULTS / "memory.json").read_text())
    prefix = "mlx_lm_generator_resume_peak_extra"
    new_fields = (f"{prefix}_bytes", f"{prefix}_x_cache")
    older = {**data, "resume": {k: v for k, v in data["resume"].items() if k not in new_fields}}
    record = memory.SECTION.read(older)
    assert record.resume.mlx_lm_generator_resume_peak_extra_bytes is None
    text = "\n".join(memory.render_section(record))
    assert "BatchGenerator behind the engine" not in text
    assert f"{record.config.agents} agents x {record.turns.turns} turns" in text
    newer = {**older, "resume": {**older["resume"], new_fields[0]: 3 << 20, new_fields[1]: 1.5}}
    text = "\n".join(memory.render_section(memory.SECTION.read(newer)))
    assert "with mlx-lm's BatchGenerator behind the engine: 3.0 MiB = 1.50x" in text


def test_committed_engine_overhead_record_renders() -> None:
    from kvpool.benchmarks import engine_overhead

    data = json.loads((RESULTS / "engine_overhead.json").read_text())
    record = engine_overhead.SECTION.read(data)
    first = record.results[0]
    assert isinstance(first.paired_ratio_p5_p95, tuple)
    lines = engine_overhead.render_section(record)
    assert sum(line.startswith(f"| {first.model} | ") for line in lines) == sum(
        x.model == first.model for x in record.results
    )
    del data["results"][0]["paired_ratio_p50"]
    with pytest.raises(RecordError, match="field 'paired_ratio_p50' missing"):
        engine_overhead.SECTION.read(data)
