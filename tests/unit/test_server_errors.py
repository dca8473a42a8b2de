"""Every failure is an error in the API's own shape (issue 20, items 7, 9, 11, 12)."""

from __future__ import annotations

from pathlib import Path

import pytest
from server_app import MODEL, app_client, complete

from kvpool.persist import cache_path
from kvpool.server import openai_api
from kvpool.server.errors import ApiError
from kvpool.server.params import Body
from kvpool.server.serve import ServerConfig, _model_names

_CHAT = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000 + b"]" * 100_000,  # json.loads: RecursionError
        b'{"model": "fake", "max_tokens": ' + b"7" * 5000 + b"}",  # ValueError: digit limit
        b'{"model": "fake", "prompt": "x", "stop": ' + b"[" * 900 + b"]" * 900 + b"}",
    ],
    ids=["nested-100k", "int-5000-digits", "nested-field"],
)
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/messages"])
def test_bodies_json_rejects_oddly_are_400_in_the_apis_shape(
    tmp_path: Path, raw: bytes, route: str
) -> None:
    with app_client(tmp_path) as client:
        r = client.post(route, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    body = r.json()
    if route == "/v1/messages":
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    else:
        assert body["error"]["type"] == "invalid_request_error"


def test_delete_of_a_session_whose_path_is_a_directory(tmp_path: Path) -> None:
    with app_client(tmp_path) as client:
        complete(client, "a session to delete", session="d1")
        state = client.app_state  # type: ignore[attr-defined]
        state.loop.call(state.loop.store.flush).result(5)
        path = cache_path(tmp_path, "d1")
        path.unlink()
        path.mkdir()
        r = client.delete("/v1/sessions/d1")
        assert r.status_code == 200, r.text
        assert client.get("/v1/sessions/d1").status_code == 404
        assert client.delete("/v1/sessions/d1").status_code == 404
    assert not path.exists()  # set aside (renamed *.corrupt), never read again


def test_the_model_is_served_under_the_string_given_and_its_aliases(tmp_path: Path) -> None:
    assert _model_names(ServerConfig(model="/models/Qwen-0.5B")) == (
        "/models/Qwen-0.5B",
        "Qwen-0.5B",
    )
    assert _model_names(ServerConfig(model="demo")) == ("demo",)
    named = ServerConfig(model="/m/q", served_model_names=("qwen", "gpt-x", "qwen"))
    assert _model_names(named) == ("qwen", "gpt-x")
    with app_client(tmp_path, aliases=("/models/fake",)) as client:
        body = {"model": "/models/fake", "prompt": "hi", "max_tokens": 1, "temperature": 0}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == MODEL
        ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert ids == [MODEL, "/models/fake"]
        r = client.post("/v1/completions", json={"model": "other", "prompt": "hi"})
        assert r.status_code == 404


def test_chat_message_name_and_stream_options_without_stream_are_refused() -> None:
    named = {**_CHAT, "messages": [{"role": "user", "content": "hi", "name": "bob"}]}
    with pytest.raises(ApiError, match=r"unsupported field\(s\): name") as info:
        openai_api.parse_chat(Body(named))
    assert info.value.status == 400
    for parse, body in [
        (openai_api.parse_chat, _CHAT),
        (openai_api.parse_completion, {"model": MODEL, "prompt": "x"}),
    ]:
        with pytest.raises(ApiError, match="only allowed with stream: true"):
            parse(Body({**body, "stream_options": {"include_usage": True}}))
        with pytest.raises(ApiError, match="only allowed with stream: true"):
            parse(Body({**body, "stream": False, "stream_options": {"include_usage": True}}))
        gen = parse(Body({**body, "stream": True, "stream_options": {"include_usage": True}}))
        assert gen.include_usage  # the control: with stream it is taken


def test_a_bug_below_a_route_is_a_json_500_without_details(tmp_path: Path) -> None:
    with app_client(tmp_path) as client:
        state = client.app_state  # type: ignore[attr-defined]

        def broken() -> dict[str, object]:
            raise RuntimeError("/secret/path/of/the/server")

        state.loop.snapshot = broken
        r = client.get("/v1/cache/stats")
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error" and "/secret" not in r.text


def test_a_missing_extra_is_named_with_its_install_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['uvicorn'] = None\n"
        "from kvpool.cli import main; sys.exit(main(['--no-fast-blas', 'serve']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2, result.stderr
    assert "uvicorn not installed" in result.stderr and "kvpool[serve]" in result.stderr
    assert "Traceback" not in result.stderr
    from kvpool import ModelCacheSpec
    from kvpool.errors import InvalidRequestError
    from kvpool.tier import open_tier

    spec = ModelCacheSpec.uniform(2, 2, 8, dtype="float32", block_tokens=4)
    saved = sys.modules.get("redis")
    sys.modules["redis"] = None  # type: ignore[assignment]
    try:
        with pytest.raises(InvalidRequestError, match=r"kvpool\[redis\]"):
            open_tier("redis://127.0.0.1:1/0", spec=spec, fingerprint="sha256:x")
    finally:
        if saved is not None:
            sys.modules["redis"] = saved
        else:
            del sys.modules["redis"]


def test_sessions_found_on_disk_show_their_context_size(tmp_path: Path) -> None:
    from kvpool.server.sessions import SessionRegistry

    with app_client(tmp_path) as client:
        complete(client, "twelve chars", session="r1", max_tokens=3)
    info = SessionRegistry(tmp_path).get("r1")
    assert info is not None and info.context_tokens == 12 + 3 and info.turns == 0
