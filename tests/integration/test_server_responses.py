"""``/v1/responses`` and session fork on a real ``kvpool serve`` (the trained default model),
driven by the official ``openai`` client.

Greedy throughout, so "the same context" means the same tokens out; a fresh run is a request
under another ``cache_salt`` (nothing of the sessions' blocks is visible to it).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from server_process import ServerProcess

INSTRUCTIONS = "You are a concise assistant. Answer in one sentence."
QUESTIONS = [
    "Name a fruit that is red.",
    "What color is the sky on a clear day?",
    "How many legs does a spider have?",
    "What is the capital of France?",
    "Name a large animal that lives in the ocean.",
    "What do bees make?",
    "What is frozen water called?",
    "Which planet do we live on?",
    "What do you call a baby cat?",
    "What is two plus two?",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("responses")
    with ServerProcess(tmp / "sessions", tmp / "models", "--model", str(smollm2_dir)) as proc:
        yield proc


def client_of(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def model_of(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def ask(client: openai.OpenAI, question: str, previous: Any = None, **kw: Any) -> Any:
    return client.responses.create(
        model=model_of(client),
        input=question,
        instructions=INSTRUCTIONS,
        previous_response_id=previous.id if previous is not None else None,
        max_output_tokens=24,
        temperature=0,
        **kw,
    )


def test_ten_turn_chain_prefills_only_the_new_input(server: ServerProcess) -> None:
    client = client_of(server)
    previous = None
    prefilled = []
    for k, question in enumerate(QUESTIONS):
        r = ask(client, question, previous)
        assert r.status in ("completed", "incomplete") and r.output_text
        cached = r.usage.input_tokens_details.cached_tokens
        if previous is None:
            assert cached == 0
        else:  # the whole previous conversation: its input and its output
            whole = previous.usage.input_tokens + previous.usage.output_tokens
            assert cached == whole, (k, cached, whole)
            assert r.session_id == previous.session_id  # type: ignore[attr-defined]
        prefilled.append(r.usage.input_tokens - cached)
        previous = r
    # each turn prefills the question with its template markup (< 40 tokens), never the
    # history (the last conversation holds > 200 tokens)
    assert previous is not None and previous.usage.input_tokens > 200
    assert max(prefilled[1:]) < 40, prefilled
    # negative control: instructions are not carried over; other instructions change the
    # start of the conversation, so almost nothing of it is reused
    other = client.responses.create(
        model=model_of(client),
        input="And one more?",
        instructions="Answer like a pirate.",
        previous_response_id=previous.id,
        max_output_tokens=4,
        temperature=0,
    )
    assert other.usage.input_tokens_details.cached_tokens < 20


def test_a_streamed_turn_equals_the_same_turn_not_streamed(server: ServerProcess) -> None:
    client = client_of(server)
    first = ask(client, "Name a color.")
    with client.responses.stream(
        model=model_of(client),
        input="Name another one.",
        instructions=INSTRUCTIONS,
        previous_response_id=first.id,
        max_output_tokens=24,
        temperature=0,
    ) as stream:
        events = list(stream)
        kinds = [event.type for event in events]
        streamed = stream.get_final_response() if kinds[-1] == "response.completed" else None
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response  # type: ignore[union-attr]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    # the same turn again from ``first``: no longer its session's head, so a fork; the fork
    # holds the streamed turn too, whose input is the same: all but the last token is cached
    again = ask(client, "Name another one.", first)
    assert again.session_id != first.session_id  # type: ignore[attr-defined]
    whole = first.usage.input_tokens + first.usage.output_tokens
    assert again.usage.input_tokens_details.cached_tokens == again.usage.input_tokens - 1
    assert again.usage.input_tokens > whole
    assert text == final.output_text == again.output_text
    assert final.usage.input_tokens_details.cached_tokens == whole
    if streamed is not None:  # the helper's accumulated response (when it completed)
        assert streamed.output_text == text
    stored = client.responses.retrieve(again.id)
    assert stored.output_text == again.output_text


def test_continuing_a_response_whose_session_is_busy_starts_a_new_session(
    server: ServerProcess,
) -> None:
    client = client_of(server)
    first = ask(client, "Tell me a long story about a cat.")
    whole = first.usage.input_tokens + first.usage.output_tokens
    with client.responses.stream(
        model=model_of(client),
        input="Go on, at length.",
        instructions=INSTRUCTIONS,
        previous_response_id=first.id,
        max_output_tokens=300,
        temperature=0,
    ) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                break  # its session is busy now
        other = ask(client, "Now a short one.", first)
        for _ in stream:
            pass
    # the first turn's session was checked out: a new session, which found the previous
    # conversation's blocks through the prefix cache (no fork needed)
    assert other.session_id not in (None, first.session_id)  # type: ignore[attr-defined]
    assert other.usage.input_tokens_details.cached_tokens >= whole


def test_get_delete_and_errors(server: ServerProcess) -> None:
    client = client_of(server)
    r = ask(client, "Say hello.")
    got = client.responses.retrieve(r.id)
    assert (got.id, got.output_text, got.usage.input_tokens) == (
        r.id,
        r.output_text,
        r.usage.input_tokens,
    )
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r.id)
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, "Again?", r)  # deleted: it cannot be continued
    assert info.value.code == "previous_response_not_found"
    assert info.value.param == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=model_of(client), input="x", tools=[{"type": "web_search"}])
    assert info.value.param == "tools"


def test_store_false_leaves_nothing_behind(server: ServerProcess) -> None:
    client = client_of(server)
    sessions = httpx.get(server.url + "/v1/sessions").json()["data"]
    first = ask(client, "Name a fruit.")
    n_sessions = len(sessions) + 1
    loose = ask(client, "Name another.", first, store=False)
    assert loose.usage.input_tokens_details.cached_tokens == (
        first.usage.input_tokens + first.usage.output_tokens
    )
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(loose.id)
    assert len(httpx.get(server.url + "/v1/sessions").json()["data"]) == n_sessions
    # ``first`` is still its session's head: a stored continuation runs in its session
    kept = ask(client, "Name another.", first)
    assert kept.session_id == first.session_id  # type: ignore[attr-defined]
    assert kept.output_text == loose.output_text


# ------------------------------------------------------------------------------ session fork


def turn(
    server: ServerProcess, prompt: list[int], session: str | None, salt: str | None = None
) -> dict[str, Any]:
    """A greedy turn on token ids (``salt``: a cache partition of its own: a fresh run)."""
    body: dict[str, Any] = {
        "model": httpx.get(server.url + "/v1/models").json()["data"][0]["id"],
        "prompt": prompt,
        "max_tokens": 12,
        "temperature": 0,
        "return_token_ids": True,
    }
    if salt is not None:
        body["cache_salt"] = salt
    headers = {"X-Session-ID": session} if session else {}
    r = httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    return dict(r.json())


def ids(body: dict[str, Any]) -> list[int]:
    return [int(t) for t in body["choices"][0]["token_ids"]]


def cached(body: dict[str, Any]) -> int:
    return int(body["usage"]["prompt_tokens_details"]["cached_tokens"])


def test_fork_branches_generate_what_fresh_runs_generate(server: ServerProcess) -> None:
    client = client_of(server)
    base_prompt = [1, 504, 3458, 282, 253, 1789, 30, 378, 1789, 436] * 30  # 300 tokens
    first = turn(server, base_prompt, "root")
    base = base_prompt + ids(first)
    forked = client.post(
        "/sessions/root/fork", body={"session_id": "branch"}, cast_to=httpx.Response
    ).json()
    assert (forked["id"], forked["forked_from"], forked["context_tokens"]) == (
        "branch",
        "root",
        len(base),
    )
    ctx_a = [*base, 3458, 282, 253]
    ctx_b = [*base, 1789, 30, 378, 1789, 436, 504]
    got_b = turn(server, ctx_b, "branch")
    got_a = turn(server, ctx_a, "root")
    assert cached(got_a) == cached(got_b) == len(base)
    fresh_a, fresh_b = turn(server, ctx_a, None, "fresh-a"), turn(server, ctx_b, None, "fresh-b")
    assert cached(fresh_a) == cached(fresh_b) == 0
    assert ids(got_a) == ids(fresh_a) and ids(got_b) == ids(fresh_b)
    assert ids(fresh_a) != ids(fresh_b)  # negative control: the contexts differ, so do runs


def test_forking_a_busy_session_is_a_409_in_the_openai_shape(server: ServerProcess) -> None:
    client = client_of(server)
    model = model_of(client)
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 400, "stream": True}
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        json={**body, "temperature": 0},
        headers={"X-Session-ID": "busy"},
        timeout=120,
    ) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data:"))  # it is generating
        with pytest.raises(openai.ConflictError) as info:
            client.post("/sessions/busy/fork", body={}, cast_to=httpx.Response)
        assert info.value.code == "session_busy"
        for _ in lines:
            pass
    done = client.post("/sessions/busy/fork", body={}, cast_to=httpx.Response).json()
    assert done["forked_from"] == "busy" and done["context_tokens"] > 4


# ------------------------------------------------------------------------------ restarts


def test_stored_responses_survive_a_restart(tmp_path: Path, smollm2_dir: Path) -> None:
    args = (tmp_path / "sessions", tmp_path / "models", "--model", str(smollm2_dir))
    with ServerProcess(*args) as before:
        client = client_of(before)
        r1 = ask(client, QUESTIONS[0])
        r2 = ask(client, QUESTIONS[1], r1)
        assert before.stop() == 0
    assert len(list((tmp_path / "sessions").rglob("resp_*.json"))) == 2
    with ServerProcess(*args) as after:
        client = client_of(after)
        got = client.responses.retrieve(r2.id)
        assert got.output_text == r2.output_text and got.previous_response_id == r1.id
        r3 = ask(client, QUESTIONS[2], r2)
        assert r3.usage.input_tokens_details.cached_tokens == (
            r2.usage.input_tokens + r2.usage.output_tokens
        )
        assert r3.session_id == r2.session_id  # type: ignore[attr-defined]
        assert after.stop() == 0


def test_the_server_doc_responses_example_runs(
    server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "SERVER.md").read_text()
    (example,) = [b for b in re.findall(r"```py\n(.*?)```", doc, flags=re.S) if "responses." in b]
    exec(compile(example.replace("http://127.0.0.1:8000", server.url), "doc", "exec"), {})
    text, cached = capsys.readouterr().out.rsplit(" ", 1)
    assert text.strip() and int(cached) > 30  # the first turn, read from the session
