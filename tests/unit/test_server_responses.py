"""``/v1/responses`` on the in-process app over fakes, with a small chat template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from server_app import MODEL, ChatTokenizer, app_client, auth
from starlette.testclient import TestClient

from kvpool.server.response_store import ResponseStore
from kvpool.server.responses_api import continuation_text

KEYS = ["key-a:alice", "key-m:mallory"]


def create(client: TestClient, key: str = "key-a", **body: Any) -> Any:
    return client.post(
        "/v1/responses",
        json={"model": MODEL, "max_output_tokens": 3, "temperature": 0, **body},
        headers=auth(key),
    )


def ok(r: Any) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    return dict(r.json())


def whole(r: dict[str, Any]) -> int:
    return int(r["usage"]["input_tokens"] + r["usage"]["output_tokens"])


def cached(r: dict[str, Any]) -> int:
    return int(r["usage"]["input_tokens_details"]["cached_tokens"])


def test_continuation_text_follows_the_previous_tokens() -> None:
    tok = ChatTokenizer()
    before = [{"role": "user", "content": "hi"}]
    new = [{"role": "user", "content": "more"}]
    assert continuation_text(tok, before, "yo", None, new) == "|<user>more|<assistant>"
    assert continuation_text(tok, before, "yo", "|", new) == "<user>more|<assistant>"
    assert continuation_text(tok, before, "yo", "#", new) is None  # not what the template has


def test_a_chain_prefills_only_the_new_input(tmp_path: Path) -> None:
    with app_client(tmp_path, keys=KEYS, tokenizer=ChatTokenizer()) as client:
        r1 = ok(create(client, input="hello", instructions="be kind"))
        assert r1["object"] == "response" and r1["status"] == "incomplete"
        assert r1["output"][0]["content"][0]["type"] == "output_text"
        assert r1["usage"]["input_tokens"] == len("<system>be kind|<user>hello|<assistant>")
        previous = r1
        for question in ("and then?", "why?", "ok"):
            r = ok(
                create(
                    client,
                    input=question,
                    instructions="be kind",
                    previous_response_id=previous["id"],
                )
            )
            assert cached(r) == whole(previous)
            new = len(f"|<user>{question}|<assistant>")
            assert r["usage"]["input_tokens"] == whole(previous) + new
            assert r["session_id"] == r1["session_id"]
            previous = r
        # negative control: without the instructions, the conversation starts differently
        r = ok(create(client, input="x", previous_response_id=previous["id"]))
        assert cached(r) == 1  # "<" of "<user>" (was "<system>")


def test_continuing_an_older_response_forks_its_session(tmp_path: Path) -> None:
    with app_client(tmp_path, keys=KEYS, tokenizer=ChatTokenizer()) as client:
        r1 = ok(create(client, input="hello"))
        r2 = ok(create(client, input="next", previous_response_id=r1["id"]))
        assert r2["session_id"] == r1["session_id"]
        used = client.get("/v1/cache/stats", headers=auth("key-a")).json()["pool"]["num_used"]
        r2b = ok(create(client, input="other", previous_response_id=r1["id"]))
        assert r2b["session_id"] != r1["session_id"]
        assert cached(r2b) == whole(r1) + len("|<user>")  # shared with r2's input too
        sessions = client.get("/v1/sessions", headers=auth("key-a")).json()["data"]
        assert {s["id"] for s in sessions} == {r1["session_id"], r2b["session_id"]}
        # the fork shared r1's session's blocks: the new turn took fresh blocks only for its
        # own tokens past them
        stats = client.get("/v1/cache/stats", headers=auth("key-a")).json()["pool"]
        assert stats["num_used"] - used <= -(-(r2b["usage"]["total_tokens"] - whole(r1)) // 4) + 1
        # both branches continue
        ok(create(client, input="go", previous_response_id=r2["id"]))
        ok(create(client, input="go", previous_response_id=r2b["id"]))


def test_responses_are_private_to_their_tenant(tmp_path: Path) -> None:
    with app_client(tmp_path, keys=KEYS, tokenizer=ChatTokenizer()) as client:
        r = ok(create(client, input="secret"))
        assert client.get(f"/v1/responses/{r['id']}", headers=auth("key-m")).status_code == 404
        assert client.delete(f"/v1/responses/{r['id']}", headers=auth("key-m")).status_code == 404
        bad = create(client, key="key-m", input="x", previous_response_id=r["id"])
        assert bad.status_code == 400
        assert bad.json()["error"]["code"] == "previous_response_not_found"
        got = client.get(f"/v1/responses/{r['id']}", headers=auth("key-a"))
        assert got.status_code == 200 and got.json() == r


def test_bad_input_is_a_400_naming_the_field(tmp_path: Path) -> None:
    with app_client(tmp_path, tokenizer=ChatTokenizer()) as client:
        cases = [
            ({"input": [{"type": "function_call_output", "output": "x"}]}, "input"),
            ({"input": [{"role": "tool", "content": "x"}]}, "input"),
            ({"input": ""}, "input"),
            ({"input": "x", "previous_response_id": ""}, "previous_response_id"),
            ({"input": "x", "tools": [{"type": "function", "name": "f"}]}, "tools"),
            ({"input": "x", "text": {"format": {"type": "json_object"}}}, "text"),
            ({"input": "x", "frobnicate": 1}, "frobnicate"),
            ({"input": "x", "store": "yes"}, "store"),
        ]
        for body, param in cases:
            r = create(client, **body)
            assert r.status_code == 400, (body, r.text)
            error = r.json()["error"]
            assert (error["type"], error["param"]) == ("invalid_request_error", param), body
        r = create(client, input="x", previous_response_id="resp_" + "0" * 32)
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "previous_response_not_found"
        assert client.get("/v1/responses/resp_nope").status_code == 404


def test_store_false_leaves_no_response_and_no_session(tmp_path: Path) -> None:
    with app_client(tmp_path, tokenizer=ChatTokenizer()) as client:
        first = ok(create(client, input="hello"))
        loose = ok(create(client, input="more", previous_response_id=first["id"], store=False))
        assert cached(loose) == whole(first) and loose["store"] is False
        assert client.get(f"/v1/responses/{loose['id']}").status_code == 404
        sessions = client.get("/v1/sessions").json()["data"]
        assert [s["id"] for s in sessions] == [first["session_id"]]
        alone = ok(create(client, input="hello", store=False))
        assert alone["session_id"] is None
    files = sorted(p.name for p in (tmp_path / "responses").iterdir())
    assert files == [f"{first['id']}.json"]


def test_stored_responses_are_read_back_with_their_heads(tmp_path: Path) -> None:
    with app_client(tmp_path, tokenizer=ChatTokenizer()) as client:
        r1 = ok(create(client, input="hello"))
        r2 = ok(create(client, input="next", previous_response_id=r1["id"]))
    (tmp_path / "responses" / "resp_broken.json").write_text("{not json")
    store = ResponseStore(tmp_path / "responses")
    assert len(store) == 2
    back = store.get("", r2["id"])
    assert back is not None and back.body == r2 and store.is_head(back)
    older = store.get("", r1["id"])
    assert older is not None and not store.is_head(older)
    assert json.loads((tmp_path / "responses" / f"{r1['id']}.json").read_text())["id"] == r1["id"]
    with app_client(tmp_path, tokenizer=ChatTokenizer()) as client:
        r3 = ok(create(client, input="again", previous_response_id=r2["id"]))
        assert cached(r3) == whole(r2) and r3["session_id"] == r1["session_id"]


def test_a_stream_sends_openais_events_and_stores_the_response(tmp_path: Path) -> None:
    with app_client(tmp_path, tokenizer=ChatTokenizer()) as client:
        first = ok(create(client, input="hello"))
        body = {"model": MODEL, "max_output_tokens": 3, "temperature": 0, "stream": True}
        body |= {"input": "more", "previous_response_id": first["id"]}
        with client.stream("POST", "/v1/responses", json=body) as r:
            assert r.status_code == 200
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        kinds = [e["type"] for e in events]
        assert kinds == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            *["response.output_text.delta"] * (len(kinds) - 8),
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.incomplete",  # 3 tokens ran out
        ]
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        final = events[-1]["response"]
        deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        assert deltas == final["output"][0]["content"][0]["text"] == events[-4]["text"]
        assert cached(final) == whole(first)
        stored = client.get(f"/v1/responses/{final['id']}").json()
        assert stored == final
