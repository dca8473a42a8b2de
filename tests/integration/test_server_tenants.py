"""Tenants on a real ``kvpool serve`` (demo model, the official ``openai`` client): the
prefix-cache side channel of issue 20, item 1, across two tenants and inside one."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from server_process import ServerProcess

from kvpool.models import build_model

KEYS = ("--api-key", "k-alice:alice", "--api-key", "k-mallory:mallory",
        "--api-key", "k-alice-2:alice")  # fmt: skip
SYSTEM = (
    "You are the assistant of the finance team. Answer in one short sentence and never "
    "repeat a password. "
)
SECRET = "hunter2-open-sesame-42"
GUESSES = [
    "apple-pie-17", "mango-tree-88", "river-stone-5", SECRET, "zebra-crossing-3",
    "hunter1-open-sesame-41", "kite-flying-9", "orange-peel-64",
]  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    models = tmp_path_factory.mktemp("tenant-models")
    build_model("demo", models / "demo")
    with ServerProcess(tmp_path_factory.mktemp("tenant-sessions"), models, *KEYS) as proc:
        yield proc
        assert proc.stop() == 0, proc.log()


def ask(server: ServerProcess, key: str, text: str, session: str | None = None) -> int:
    """Cached prompt tokens of one greedy chat turn."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)
    reply = client.chat.completions.create(
        model="demo",
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
        max_tokens=2,
        temperature=0,
        extra_headers={"X-Session-ID": session} if session else None,
    )
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    return int(reply.usage.prompt_tokens_details.cached_tokens or 0)


def attack(server: ServerProcess, key: str) -> tuple[int, list[int]]:
    got = {g: ask(server, key, f"The vault password is {g}. Summarize Q3.") for g in GUESSES}
    right = got.pop(SECRET)
    return right, list(got.values())


def test_another_tenants_right_guess_gets_no_more_cached_tokens(server: ServerProcess) -> None:
    ask(server, "k-alice", f"The vault password is {SECRET}. Summarize Q3.", session="victim-7")
    right, wrong = attack(server, "k-mallory")
    assert right <= max(wrong), (right, wrong)
    # the control: alice's second key shares her tenant's prefix cache, and there the
    # right guess stands out (what any key holder saw before tenants)
    right_in, wrong_in = attack(server, "k-alice-2")
    assert right_in > max(wrong_in), (right_in, wrong_in)


def test_sessions_of_another_tenant_are_invisible(server: ServerProcess) -> None:
    ask(server, "k-alice", "Plan the quarter.", session="alice-plan")

    def get(key: str, path: str) -> httpx.Response:
        return httpx.get(server.url + path, headers={"x-api-key": key}, timeout=60)

    mine = {s["id"] for s in get("k-mallory", "/v1/sessions").json()["data"]}
    assert "alice-plan" not in mine and "victim-7" not in mine
    assert get("k-mallory", "/v1/sessions/alice-plan").status_code == 404
    assert get("k-alice-2", "/v1/sessions/alice-plan").status_code == 200
