"""The GPU device check (bench/gpu/device_check.py) runs on this CPU at --quick sizes.

Device time is scarce (minutes per session): a section that crashes on a renamed function
would waste it. Every section must print its figures as JSON records, none an error. The
figures themselves are CPU smoke-test figures and are not checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu" / "device_check.py"
SECTIONS = (
    "env",
    "gather",
    "quant",
    "scatter8",
    "store_ways",
    "ttft",
    "decode",
    "workload",
    "arrival",
    "persist",
    "resize",
)


def _records(section: str) -> list[dict[str, object]]:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), section, "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def test_the_sections_listed_here_are_the_scripts() -> None:
    text = SCRIPT.read_text()
    for section in SECTIONS:
        assert f'"{section}": section_{section}' in text
    run_sh = (SCRIPT.parent / "run.sh").read_text()
    assert f"SECTIONS=({' '.join(SECTIONS)})" in run_sh


@pytest.mark.parametrize("section", SECTIONS)
def test_a_section_prints_its_figures(section: str) -> None:
    records = _records(section)
    assert records, "no record printed"
    for r in records:
        assert r["section"] == section
        assert r["figure"] != "error", r


def test_arrival_serves_every_agent_turn_three_ways_with_equal_tokens() -> None:
    (r,) = _records("arrival")
    assert r["agents"] == 8 and r["of_agent_turns"] == 16
    assert r["agent_turns_unequal"] == {"lru": 0, "plain": 0}
    prefilled = r["prefilled_tokens"]
    assert isinstance(prefilled, dict)
    # re-prefill computes every prompt token; kvpool and the LRU way reuse earlier turns
    assert prefilled["kvpool"] < prefilled["plain"]
    assert prefilled["lru"] < prefilled["plain"]
