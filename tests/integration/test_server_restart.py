"""``kvpool serve`` across restarts: graceful (SIGTERM) and not (SIGKILL mid-turn).

Sessions are driven with token-id prompts (``/v1/completions``, ``return_token_ids``) so
the saved context is known exactly: a resumed turn must prefill only its new tokens.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_process import ServerProcess, wait_until

from kvpool.models import build_model, load_model

MAX_TOKENS = 6
TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("restart-models")
    build_model("demo", path / "demo")
    return path


@pytest.fixture(scope="module")
def tokenizer(models_dir: Path) -> Any:
    return load_model(models_dir / "demo")[1]


def turn(server: ServerProcess, session: str, context: list[int]) -> tuple[list[int], int, int]:
    """One greedy turn; returns (generated ids, prompt tokens, cached tokens)."""
    body = {"model": "demo", "prompt": context, "max_tokens": MAX_TOKENS, "temperature": 0,
            "return_token_ids": True}  # fmt: skip
    r = httpx.post(server.url + "/v1/completions", json=body,
                   headers={"X-Session-ID": session}, timeout=TIMEOUT_S)  # fmt: skip
    assert r.status_code == 200, r.text
    data = r.json()
    usage = data["usage"]
    return (
        data["choices"][0]["token_ids"],
        usage["prompt_tokens"],
        usage["prompt_tokens_details"]["cached_tokens"],
    )


def files(cache_dir: Path) -> set[str]:
    return {p.name.split(".")[0] for p in cache_dir.glob("*.kvcache.safetensors")}


def _contexts(tokenizer: Any, names: list[str]) -> dict[str, list[int]]:
    return {
        n: list(tokenizer.encode(f"{n}: the agent reads the plan and writes {n} " * 6))
        for n in names
    }


def test_restart_resumes_sessions_with_nothing_prefilled(
    tmp_path: Path, models_dir: Path, tokenizer: Any
) -> None:
    cache_dir = tmp_path / "sessions"
    names = ["alpha", "beta", "gamma"]
    ctx = _contexts(tokenizer, names)
    expected: dict[str, list[int]] = {}
    with ServerProcess(cache_dir, models_dir) as server:
        for n in names:
            gen, _, cached = turn(server, n, ctx[n])
            assert cached == 0
            ctx[n] = [*ctx[n], *gen, *tokenizer.encode(f" then {n} again.")]
        for n in names:  # the control: turn 2 without a restart, from the pool
            expected[n], _, _ = turn(server, n + "-control", ctx[n])
        # a graceful stop while a stream is in flight: it finishes, then the process exits 0
        body = {"model": "demo", "prompt": "a last story", "max_tokens": 60, "stream": True,
                "temperature": 0}  # fmt: skip
        with httpx.stream("POST", server.url + "/v1/completions", json=body,
                          timeout=TIMEOUT_S) as stream:  # fmt: skip
            lines = (line for line in stream.iter_lines() if line.startswith("data: "))
            next(lines)
            assert server.proc is not None
            server.proc.send_signal(signal.SIGTERM)
            rest = list(lines)
        assert rest[-1] == "data: [DONE]", rest[-3:]
        assert server.stop() == 0, server.log()
    assert set(names) <= files(cache_dir)
    (cache_dir / next(p.name for p in cache_dir.glob("gamma.*"))).unlink()  # negative control
    with ServerProcess(cache_dir, models_dir) as server:
        listed = httpx.get(server.url + "/v1/sessions", timeout=TIMEOUT_S).json()["data"]
        tiers = {s["id"]: s["tier"] for s in listed}
        assert tiers["alpha"] == tiers["beta"] == "cold"
        assert "gamma" not in tiers
        for n in names:
            gen, prompt, cached = turn(server, n, ctx[n])
            assert gen == expected[n], n
            new = len(tokenizer.encode(f" then {n} again."))
            if n == "gamma":
                assert cached == 0  # its file was deleted: everything prefilled
            else:  # only the new user tokens (and the last generated one) prefilled
                assert prompt - cached <= new + 1, (n, prompt, cached)
        assert server.stop() == 0


def test_sigkill_mid_turn_loses_only_that_turn(
    tmp_path: Path, models_dir: Path, tokenizer: Any
) -> None:
    cache_dir = tmp_path / "sessions"
    names = ["one", "two", "three"]
    ctx = _contexts(tokenizer, names)
    with ServerProcess(cache_dir, models_dir) as server:
        for n in names:
            gen, _, _ = turn(server, n, ctx[n])
            ctx[n] = [*ctx[n], *gen, *tokenizer.encode(f" and {n} on.")]
        # idle now: every finished turn is written to disk
        wait_until(lambda: set(names) <= files(cache_dir), 20.0, "the sessions on disk")
        body = {"model": "demo", "prompt": ctx["one"], "max_tokens": 400, "stream": True,
                "temperature": 0, "session_id": "one"}  # fmt: skip
        with httpx.stream("POST", server.url + "/v1/completions", json=body,
                          timeout=TIMEOUT_S) as stream:  # fmt: skip
            lines = (line for line in stream.iter_lines() if line.startswith("data: "))
            first = json.loads(next(lines)[6:])
            assert first["object"] == "text_completion"
            server.kill()  # mid-turn, no cleanup
    with ServerProcess(cache_dir, models_dir) as server:
        for n in names:  # "one" repeats the turn that was lost
            _, prompt, cached = turn(server, n, ctx[n])
            new = len(tokenizer.encode(f" and {n} on."))
            assert prompt - cached <= new + 1, (n, prompt, cached)
        assert server.stop() == 0


def test_sessions_that_could_not_be_saved_make_the_exit_code_1(
    tmp_path: Path, models_dir: Path, tokenizer: Any
) -> None:
    cache_dir = tmp_path / "sessions"
    ctx = _contexts(tokenizer, ["lost"])["lost"]
    with ServerProcess(cache_dir, models_dir) as server:
        shutil.rmtree(cache_dir)
        cache_dir.write_text("not a directory")  # every write under it fails, root's too
        turn(server, "lost", ctx)  # the request itself is served
        code = server.stop()
        log = server.log()
    assert code == 1, log
    assert "1 FAILED: lost" in log, log


def test_a_port_in_use_is_a_clean_error(tmp_path: Path, models_dir: Path) -> None:
    import socket
    import subprocess

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = ServerProcess(tmp_path / "sessions", models_dir)
        args = [a if a != "0" else str(port) for a in server.args]
        done = subprocess.run(args, env=server.env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2, done.stderr
    assert f"kvpool serve: could not listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr
