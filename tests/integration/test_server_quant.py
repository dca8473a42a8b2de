"""``kvpool serve --kv-bits 4``: sessions resume from 4-bit blocks, in the pool and after a
restart from the 4-bit files (version 2) the server wrote."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from server_process import ServerProcess
from test_server_restart import turn

from kvpool.models import build_model, load_model


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("quant-models")
    build_model("demo", path / "demo")
    return path


def test_a_4bit_server_resumes_sessions_across_a_restart(tmp_path: Path, models_dir: Path) -> None:
    tokenizer: Any = load_model(models_dir / "demo")[1]
    cache_dir = tmp_path / "sessions"
    context = list(tokenizer.encode("the agent reads the plan and writes it down " * 8))
    with ServerProcess(cache_dir, models_dir, "--kv-bits", "4") as server:
        gen, _, cached = turn(server, "s", context)
        assert cached == 0
        context = [*context, *gen, *tokenizer.encode(" and again.")]
        _, prompt, cached = turn(server, "s", context)
        assert cached > 0 and prompt == len(context)  # from the pool's 4-bit blocks
        code = server.stop()
        assert code == 0, f"kvpool serve exited with {code}:\n{server.log()}"
    assert not list(cache_dir.glob("*.kvcache.safetensors"))  # 4-bit files: their own dir
    (path,) = (cache_dir / "q4g64-float32").glob("*.kvcache.safetensors")
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    assert header["__metadata__"]["format_version"] == "2"
    assert json.loads(header["__metadata__"]["spec"])["kv_bits"] == 4
    assert "layers.0.keys.codes" in header
    with ServerProcess(cache_dir, models_dir, "--kv-bits", "4") as server:
        _, _, cached = turn(server, "s", [*context, *tokenizer.encode(" once more.")])
        assert cached > 0  # from the file
        code = server.stop()
        assert code == 0, f"kvpool serve exited with {code}:\n{server.log()}"


def test_switching_kv_bits_on_one_cache_dir_loses_no_session(
    tmp_path: Path, models_dir: Path
) -> None:
    """Issue 20, item 8: each block format keeps its own sessions (dense in the directory,
    4-bit in q4g64-float32/); a server started with another --kv-bits lists the others at
    start and never overwrites them (before: the dense session was overwritten by the 4-bit
    server's next turn, and the dense server resumed it with 0 cached tokens)."""
    tokenizer: Any = load_model(models_dir / "demo")[1]
    cache_dir = tmp_path / "sessions"
    context = list(tokenizer.encode("the planner keeps its notes in the shared folder " * 8))
    with ServerProcess(cache_dir, models_dir) as dense:
        gen, _, _ = turn(dense, "s", context)
        assert dense.stop() == 0, dense.log()
    dense_context = [*context, *gen]
    with ServerProcess(cache_dir, models_dir, "--kv-bits", "4") as quant:
        _, _, cached = turn(quant, "s", [*dense_context, *tokenizer.encode(" q4.")])
        assert cached == 0  # a dense cache is not a 4-bit one
        assert quant.stop() == 0, quant.log()
        assert "1 sessions of another block format are kept in" in quant.log(), quant.log()
    with ServerProcess(cache_dir, models_dir) as dense:
        _, _, cached = turn(dense, "s", [*dense_context, *tokenizer.encode(" dense again.")])
        assert cached >= len(context)  # its own file, untouched
        assert dense.stop() == 0, dense.log()
        assert "1 sessions of another block format" in dense.log(), dense.log()
