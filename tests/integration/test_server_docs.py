"""The server examples of README.md and docs/SERVER.md run against a real ``kvpool serve``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from server_process import ServerProcess

from kvpool.models import build_model

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_URL = "http://127.0.0.1:8000"


def _blocks(path: Path, fence: str) -> list[str]:
    return re.findall(rf"```{fence}\n(.*?)```", path.read_text(), flags=re.S)


def test_readme_and_server_doc_examples_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # README's server example is fenced ```py (its ```python blocks are the engine examples)
    (readme,) = [b for b in _blocks(ROOT / "README.md", "py") if "OpenAI(" in b]
    (doc,) = [b for b in _blocks(ROOT / "docs" / "SERVER.md", "python") if "OpenAI(" in b]
    assert DEFAULT_URL in readme and DEFAULT_URL in doc
    build_model("demo", tmp_path / "models" / "demo")
    with ServerProcess(tmp_path / "sessions", tmp_path / "models") as server:
        for example in (readme, doc):
            code = example.replace(DEFAULT_URL, server.url)
            exec(compile(code, "example", "exec"), {})
        assert server.stop() == 0
    out = capsys.readouterr().out.splitlines()
    turns = [line for line in out if line.startswith("turn ")]
    assert [t.split(":")[0] for t in turns] == ["turn 0", "turn 1"]
    cached = [int(re.search(r": (\d+)/", t).group(1)) for t in turns]  # type: ignore[union-attr]
    # The second example's first turn may reuse what the first one shares (the chat
    # template's opening); its second turn reuses its whole first turn.
    assert cached[1] > cached[0] >= 0
