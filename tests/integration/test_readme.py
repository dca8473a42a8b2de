"""The README's commands and example stay true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_readme_starts_with_the_two_commands() -> None:
    commands = re.findall(r"^    (python3 -m venv .+)$", README, flags=re.M)
    assert len(commands) >= 2
    install_demo, install_test = commands[:2]
    assert install_demo.endswith("kvpool demo")
    assert "pytest tests/unit" in install_test and "pytest tests/integration" in install_test
    # CI runs exactly the README's test command
    assert install_test in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_python_example_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KVPOOL_CACHE_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    engine_example, store_example = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    namespace: dict[str, object] = {}
    exec(compile(engine_example, "README.md", "exec"), namespace)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["turn 0", "turn 1", "turn 2"]
    cached = [int(re.search(r": (\d+)/", line).group(1)) for line in lines]  # type: ignore[union-attr]
    assert cached[0] == 0 and cached[1] > 0 and cached[2] > cached[1]
    # the persistence example continues from the engine example's names
    exec(compile(store_example, "README.md", "exec"), namespace)
    assert (tmp_path / "planner.kvcache").is_file()
    stats = capsys.readouterr().out
    assert stats.startswith("StoreStats(") and "num_misses=1" in stats
