"""The server examples of README.md and docs/SERVER.md run against a real ``kvpool serve``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_URL = "http://127.0.0.1:8000"


def _blocks(path: Path, fence: str) -> list[str]:
    return re.findall(rf"```{fence}\n(.*?)```", path.read_text(), flags=re.S)


def test_readme_and_server_doc_examples_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], smollm2_dir: Path
) -> None:
    """On the default model, trained: the replies are English words."""
    # README's server example is fenced ```py (its ```python blocks are the engine examples)
    (readme,) = [b for b in _blocks(ROOT / "README.md", "py") if "OpenAI(" in b]
    (doc,) = [b for b in _blocks(ROOT / "docs" / "SERVER.md", "python") if "OpenAI(" in b]
    assert DEFAULT_URL in readme and DEFAULT_URL in doc
    models = tmp_path / "models"  # an empty model cache: the directory is given
    with ServerProcess(tmp_path / "sessions", models, "--model", str(smollm2_dir)) as server:
        for example in (readme, doc):
            code = example.replace(DEFAULT_URL, server.url)
            exec(compile(code, "example", "exec"), {})
        assert server.stop() == 0
    out = capsys.readouterr().out.splitlines()
    # README's example prints the reply (it may span lines), then the cached token count;
    # the second example's lines start with "turn "
    first = "\n".join(out[: next(i for i, line in enumerate(out) if line.startswith("turn "))])
    reply = first.rsplit(" ", 1)[0]
    words = re.findall(r"[A-Za-z]{2,}", reply)
    assert len(words) >= 5 and len(" ".join(words)) > len(reply) / 2, reply
    turns = [line for line in out if line.startswith("turn ")]
    assert [t.split(":")[0] for t in turns] == ["turn 0", "turn 1"]
    cached = [int(re.search(r": (\d+)/", t).group(1)) for t in turns]  # type: ignore[union-attr]
    # The second example's first turn may reuse what the first one shares (the chat
    # template's opening); its second turn reuses its whole first turn.
    assert cached[1] > cached[0] >= 0
