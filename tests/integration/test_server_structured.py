"""Structured outputs on a real ``kvpool serve`` with the trained default model, driven by
the official ``openai`` client: every reply parses and validates against its schema."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pydantic
import pytest
from server_process import ServerProcess

TIMEOUT_S = 120.0
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Give me a person called Ann aged 31 as JSON."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("structured")
    with ServerProcess(tmp / "sessions", tmp / "models", "--model", str(smollm2_dir)) as proc:
        yield proc
        assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT_S
    )


def _schema_format(schema: dict[str, Any]) -> Any:
    return {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": schema, "strict": True},
    }


def test_a_strict_schema_reply_validates(client: openai.OpenAI, server: ServerProcess) -> None:
    model = server_model(client)
    reply = client.chat.completions.create(
        model=model, messages=ASK, max_tokens=60, temperature=0,
        response_format=_schema_format(PERSON),
    )  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    value = json.loads(choice.message.content or "")
    jsonschema.validate(value, PERSON)
    assert value == {"name": "Ann", "age": 31}
    # the layout is the one json.dumps writes: the text renders back unchanged
    assert choice.message.content == json.dumps(value)
    # negative control: the same request unconstrained is not valid against the schema
    free = client.chat.completions.create(model=model, messages=ASK, max_tokens=60, temperature=0)
    text = free.choices[0].message.content or ""
    with pytest.raises((json.JSONDecodeError, jsonschema.ValidationError)):
        jsonschema.validate(json.loads(text), PERSON)


def test_sampled_replies_validate_too(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "tags": {"type": "array", "items": {"enum": ["sun", "rain", "snow"]}, "maxItems": 3},
            "temperature": {"type": "number"},
        },
        "required": ["city", "tags", "temperature"],
        "additionalProperties": False,
    }
    ask = [{"role": "user", "content": "Describe the weather in Paris as JSON."}]
    for seed_text in ("today", "tomorrow", "in spring"):
        reply = client.chat.completions.create(
            model=server_model(client),
            messages=[{"role": "user", "content": ask[0]["content"] + " " + seed_text}],
            max_tokens=120, temperature=1.0,
            response_format=_schema_format(schema),
        )  # fmt: skip
        if reply.choices[0].finish_reason == "length":
            continue  # cut inside the document: reported as such (see the test below)
        jsonschema.validate(json.loads(reply.choices[0].message.content or ""), schema)


def test_json_object_parses(client: openai.OpenAI) -> None:
    ask = "What is the capital of France? Answer with a JSON object whose key is capital."
    reply = client.chat.completions.create(
        model=server_model(client), messages=[{"role": "user", "content": ask}], max_tokens=60,
        temperature=0,
        response_format={"type": "json_object"},
    )  # fmt: skip
    assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)


def test_a_streamed_schema_reply_validates(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=server_model(client), messages=ASK, max_tokens=60, temperature=0,
        response_format=_schema_format(PERSON), stream=True,
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert json.loads(text) == {"name": "Ann", "age": 31}


def test_the_clients_parse_helper_gets_a_pydantic_object(client: openai.OpenAI) -> None:
    class Person(pydantic.BaseModel):
        name: str
        age: int

    reply = client.chat.completions.parse(
        model=server_model(client), messages=ASK, max_tokens=60, temperature=0,
        response_format=Person,
    )  # fmt: skip
    assert reply.choices[0].message.parsed == Person(name="Ann", age=31)


def test_max_tokens_inside_the_document_is_finish_reason_length(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=server_model(client), messages=ASK, max_tokens=4, temperature=0,
        response_format=_schema_format(PERSON),
    )  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 4
    assert '{"name": "Ann", "age": 31}'.startswith(choice.message.content or "")


def test_an_invalid_schema_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=server_model(client), messages=ASK, max_tokens=4,
            response_format=_schema_format({"properties": {"a": {"$ref": "#/x"}}}),
        )  # fmt: skip
    assert info.value.status_code == 400
    body: Any = info.value.body
    assert body["code"] == "invalid_schema" and "does not exist" in body["message"]


def server_model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id
