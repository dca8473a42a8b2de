"""``POST /v1/sessions/{id}/fork`` on the in-process app over fakes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server_app import MODEL, app_client, auth
from starlette.testclient import TestClient

from kvpool.testing import FakeModel, reference_tokens

KEYS = ["key-a:alice", "key-m:mallory"]


def turn(client: TestClient, prompt: list[int], session: str, key: str = "key-a") -> dict[str, Any]:
    """A greedy turn on token ids; the body (raises on a non-200)."""
    r = client.post(
        "/v1/completions",
        json={
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": 3,
            "temperature": 0,
            "return_token_ids": True,
        },
        headers={**auth(key), "X-Session-ID": session},
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def ids(body: dict[str, Any]) -> list[int]:
    return [int(t) for t in body["choices"][0]["token_ids"]]


def test_fork_shares_the_parent_and_both_branches_continue(tmp_path: Path) -> None:
    with app_client(tmp_path, keys=KEYS) as client:
        state = client.app_state  # type: ignore[attr-defined]
        prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
        first = turn(client, prompt, "root")
        base = prompt + ids(first)
        used = client.get("/v1/cache/stats", headers=auth("key-a")).json()["pool"]["num_used"]

        r = client.post(
            "/v1/sessions/root/fork", json={"session_id": "twig"}, headers=auth("key-a")
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["id"], body["forked_from"], body["tier"]) == ("twig", "root", "hot")
        assert body["context_tokens"] == len(base)
        stats = client.get("/v1/cache/stats", headers=auth("key-a")).json()["pool"]
        assert stats["num_used"] == used  # no block taken: shared by reference

        ctx_a, ctx_b = [*base, 21, 22, 23], [*base, 31, 32, 33, 34, 35]
        got_b = turn(client, ctx_b, "twig")
        got_a = turn(client, ctx_a, "root")
        model = FakeModel(state.loop.engine.model.spec)
        assert ids(got_a) == reference_tokens(model, ctx_a, 3)
        assert ids(got_b) == reference_tokens(model, ctx_b, 3)
        assert reference_tokens(model, ctx_a, 3) != reference_tokens(model, ctx_b, 3)
        assert got_b["usage"]["prompt_tokens_details"]["cached_tokens"] == len(base)
        assert got_a["usage"]["prompt_tokens_details"]["cached_tokens"] == len(base)

        listed = {s["id"] for s in client.get("/v1/sessions", headers=auth("key-a")).json()["data"]}
        assert listed == {"root", "twig"}


def test_fork_errors_in_the_openai_shape(tmp_path: Path) -> None:
    with app_client(tmp_path, keys=KEYS) as client:
        turn(client, [5, 6, 7, 8, 9], "root")
        turn(client, [5, 6, 7], "other")
        r = client.post("/v1/sessions/nope/fork", headers=auth("key-a"))
        assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
        r = client.post(
            "/v1/sessions/root/fork", json={"session_id": "other"}, headers=auth("key-a")
        )
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_exists"
        assert r.json()["error"]["type"] == "conflict_error"
        r = client.post("/v1/sessions/root/fork", json={"id": "x"}, headers=auth("key-a"))
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = client.post(
            "/v1/sessions/root/fork", json={"session_id": "bad id"}, headers=auth("key-a")
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_session_id"
        # another tenant sees no session "root"
        r = client.post("/v1/sessions/root/fork", headers=auth("key-m"))
        assert r.status_code == 404
        # no id given: the server names the child
        r = client.post("/v1/sessions/root/fork", headers=auth("key-a"))
        assert r.status_code == 200 and r.json()["id"].startswith("s-")
