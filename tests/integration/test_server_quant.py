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
    (path,) = cache_dir.glob("*.kvcache.safetensors")
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
