"""Anthropic ``cache_control`` on a real ``kvpool serve`` (trained default model), driven by
the official ``anthropic`` client: breakpoints are pinned, and the usage numbers add up as
Anthropic defines them (input_tokens: the tokens after the last breakpoint)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest
from server_process import ServerProcess

SYSTEM = "You are the helpful assistant of a small town library. " * 30
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("cache-control")
    with ServerProcess(tmp / "sessions", tmp / "models", "--model", str(smollm2_dir)) as proc:
        yield proc


def ask(client: anthropic.Anthropic, question: Any, ttl: str | None = None, **extra: Any) -> Any:
    control: dict[str, str] = {"type": "ephemeral"}
    if ttl is not None:
        control["ttl"] = ttl
    return client.messages.create(
        model=client.models.list().data[0].id,
        max_tokens=6,
        system=[{"type": "text", "text": SYSTEM, "cache_control": control}],
        messages=[{"role": "user", "content": question}],
        extra_body={**GREEDY, **extra},
    )


def prompt_tokens(client: anthropic.Anthropic, question: Any, salt: str) -> int:
    """The prompt's size: the same request with no breakpoint, in a cache of its own."""
    r = client.messages.create(
        model=client.models.list().data[0].id,
        max_tokens=1,
        system=SYSTEM,
        messages=[{"role": "user", "content": question}],
        extra_body={**GREEDY, "cache_salt": salt},
    )
    assert r.usage.cache_read_input_tokens == 0
    return int(r.usage.input_tokens)


def test_usage_adds_up_and_the_prefix_is_read_back(server: ServerProcess) -> None:
    client = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0)
    q1, q2 = "Where are the history books?", "When do you open on Sundays?"
    p1, p2 = prompt_tokens(client, q1, "count-1"), prompt_tokens(client, q2, "count-2")
    first = ask(client, q1).usage
    end = first.cache_creation_input_tokens  # the system turn, written now
    assert first.cache_read_input_tokens == 0 and end > 300
    assert first.input_tokens + end == p1
    second = ask(client, q2, ttl="1h").usage
    assert (second.cache_read_input_tokens, second.cache_creation_input_tokens) == (end, 0)
    assert second.input_tokens == p2 - end
    # a stream reports the same split
    with client.messages.stream(
        model=client.models.list().data[0].id,
        max_tokens=6,
        system=[{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": q2}],
        extra_body=GREEDY,
    ) as stream:
        final = stream.get_final_message().usage
    assert (final.input_tokens, final.cache_creation_input_tokens) == (p2 - end, 0)
    assert final.cache_read_input_tokens == end


def test_the_last_breakpoint_sets_input_tokens(server: ServerProcess) -> None:
    client = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0)
    question = "Do you have books about birds?"
    p = prompt_tokens(client, question, "count-3")
    marked = [{"type": "text", "text": question, "cache_control": {"type": "ephemeral"}}]
    usage = ask(client, marked).usage
    total = usage.input_tokens + usage.cache_creation_input_tokens + usage.cache_read_input_tokens
    assert total == p
    # after the user turn's breakpoint only the generation prompt is left: a few tokens
    assert 0 < usage.input_tokens <= 5
    # negative control: the same request without that breakpoint has the question as input
    plain = ask(client, question).usage
    assert plain.input_tokens > usage.input_tokens + 5


def test_bad_cache_control_is_a_400_in_anthropics_shape(server: ServerProcess) -> None:
    client = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as info:
        ask(client, "hi", ttl="10m")
    assert info.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "ttl" in info.value.body["error"]["message"]  # type: ignore[index]
