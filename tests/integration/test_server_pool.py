"""``kvpool serve`` with a pool of 4 blocks: requests wait for room, past --max-queue 503."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from server_process import ServerProcess, wait_until

from kvpool.models import build_model

TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("pool-server")
    build_model("demo", root / "models" / "demo")
    with ServerProcess(
        root / "sessions", root / "models", "--pool-mb", "4", "--max-queue", "1"
    ) as proc:
        yield proc
        assert proc.stop() == 0


def _stats(server: ServerProcess) -> dict[str, Any]:
    return dict(httpx.get(server.url + "/v1/cache/stats", timeout=TIMEOUT_S).json())


def test_full_pool_queues_then_refuses_with_503(server: ServerProcess) -> None:
    # each request reserves blocks for prompt + max_tokens: 3 of the pool's 4
    big = {"model": "demo", "prompt": "go on", "max_tokens": 700, "temperature": 0}
    assert _stats(server)["pool"]["num_blocks"] == 4
    waited: dict[str, Any] = {}

    def second() -> None:
        r = httpx.post(
            server.url + "/v1/completions",
            json={**big, "max_tokens": 600, "session_id": "waiter"},
            timeout=TIMEOUT_S,
        )
        waited["status"], waited["body"] = r.status_code, r.json()

    with (
        httpx.Client(base_url=server.url, timeout=TIMEOUT_S) as http,
        http.stream("POST", "/v1/completions", json={**big, "stream": True}) as first,
    ):
        lines = (line for line in first.iter_lines() if line.startswith("data: "))
        next(lines)  # the first request runs and holds 3 blocks
        waiter = threading.Thread(target=second)
        waiter.start()
        wait_until(lambda: _stats(server)["requests"]["waiting"] == 1, 20.0, "a waiting request")
        third = http.post("/v1/completions", json={**big, "session_id": "third"})
        assert third.status_code == 503
        assert third.headers["retry-after"] == "1"
        error = third.json()["error"]
        assert error["code"] == "queue_full" and "--max-queue 1" in error["message"]
        third_a = http.post(
            "/v1/messages",
            json={
                "model": "demo",
                "max_tokens": 700,
                "messages": [{"role": "user", "content": "hi"}],
            },
        )
        assert third_a.status_code == 503
        assert third_a.json()["error"]["type"] == "overloaded_error"
    # the first stream was closed: its blocks go to the waiting request, which now runs
    waiter.join(TIMEOUT_S)
    assert waited["status"] == 200, waited
    assert waited["body"]["usage"]["completion_tokens"] >= 1
    assert _stats(server)["requests"] == {"running": 0, "waiting": 0, "max_queue": 1}


def test_idle_sessions_go_to_disk_when_the_pool_needs_room(server: ServerProcess) -> None:
    body = {"model": "demo", "prompt": "a short turn", "max_tokens": 4, "temperature": 0}
    for i in range(4):  # four idle sessions fill the pool (one block each)
        r = httpx.post(
            server.url + "/v1/completions",
            json={**body, "session_id": f"idle-{i}"},
            timeout=TIMEOUT_S,
        )
        assert r.status_code == 200
    r = httpx.post(
        server.url + "/v1/completions",
        json={**body, "max_tokens": 600, "session_id": "needs-room"},
        timeout=TIMEOUT_S,
    )
    assert r.status_code == 200, r.text
    tiers = {
        s["id"]: s["tier"]
        for s in httpx.get(server.url + "/v1/sessions", timeout=TIMEOUT_S).json()["data"]
    }
    assert "cold" in {tiers[f"idle-{i}"] for i in range(4)}
    assert _stats(server)["store"]["num_evictions"] >= 1
    again = httpx.post(
        server.url + "/v1/completions", json={**body, "session_id": "idle-0"}, timeout=TIMEOUT_S
    )
    assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # from disk
