"""response_format: parsed into a grammar, or refused with a 400 in OpenAI's shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from server_app import MODEL, app_client

from kvpool.server import openai_api
from kvpool.server.errors import ApiError
from kvpool.server.params import Body

_CHAT: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def parse(response_format: object) -> Any:
    return openai_api.parse_chat(Body({**_CHAT, "response_format": response_format}))


def test_formats_become_grammars() -> None:
    assert parse({"type": "text"}).grammar is None
    assert openai_api.parse_chat(Body(dict(_CHAT))).grammar is None
    assert '"type":"object"' in parse({"type": "json_object"}).grammar.replace(" ", "")
    spec = {"name": "n", "schema": _SCHEMA, "strict": True}
    grammar = parse({"type": "json_schema", "json_schema": spec}).grammar
    assert '"required":["a"]' in grammar.replace(" ", "")
    # the layout is fixed: ", " and ": " (the grammar carries llguidance's options)
    assert '"whitespace_flexible":false' in grammar.replace(" ", "")


@pytest.mark.parametrize(
    ("fmt", "fragment"),
    [
        ("json", "response_format must be an object"),
        ({"type": "yaml"}, "response_format.type 'yaml' is not supported"),
        ({"type": "json_object", "schema": {}}, "unsupported field(s): schema"),
        ({"type": "json_schema"}, "response_format.json_schema must be an object"),
        ({"type": "json_schema", "json_schema": {"schema": _SCHEMA}}, ".name must be 1-64"),
        ({"type": "json_schema", "json_schema": {"name": "a b"}}, ".name must be 1-64"),
        ({"type": "json_schema", "json_schema": {"name": "n", "strict": "yes"}}, "strict must"),
        ({"type": "json_schema", "json_schema": {"name": "n", "x": 1}}, "unsupported field(s): x"),
        (
            {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "foo"}}},
            "schema: invalid JSON schema: Invalid type: foo",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "n", "schema": [1]}},
            "a JSON schema must be an object",
        ),
    ],
)
def test_bad_formats_are_400(fmt: object, fragment: str) -> None:
    with pytest.raises(ApiError) as info:
        parse(fmt)
    assert info.value.status == 400 and info.value.param == "response_format"
    assert fragment in info.value.message, info.value.message


def test_the_server_answers_in_openais_shape(tmp_path: Path) -> None:
    with app_client(tmp_path) as client:
        bad = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "foo"}}}
        r = client.post("/v1/chat/completions", json={**_CHAT, "response_format": bad})
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_schema"
        assert error["param"] == "response_format"
        # the fake tokenizer is no Hugging Face tokenizer: no constrained decoding
        r = client.post(
            "/v1/chat/completions", json={**_CHAT, "response_format": {"type": "json_object"}}
        )
        assert r.status_code == 400
        assert "does not support" in r.json()["error"]["message"]
        # control: without a format, the request gets past that check (and fails at the
        # fake's missing chat template)
        r = client.post("/v1/chat/completions", json={**_CHAT, "max_tokens": 2})
        assert r.status_code == 400 and "apply_chat_template" in r.json()["error"]["message"]
