"""Logprobs and stop strings of any length on a real ``kvpool serve`` (trained SmolLM2),
through the official ``openai`` and ``anthropic`` clients, checked against mlx-lm run
directly in this process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import mlx.core as mx
import openai
import pytest
from server_process import ServerProcess

from conftest import LoadedModel

TIMEOUT_S = 120.0
QUESTION = [{"role": "user", "content": "List three fruits, one per line, then say why."}]
# SmolLM2 is float32 here: a batched, cached decode and one full forward pass differ only by
# summation order (largest difference measured: 4.2e-05 on this prompt); 2e-3 still tells a
# wrong row apart (the top logprobs of neighbouring positions differ by more than 0.1).
LOGPROB_ATOL = 2e-3


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("server-text")
    with ServerProcess(tmp / "sessions", tmp / "models", "--model", str(smollm2_dir)) as proc:
        yield proc
        code = proc.stop()
    assert code == 0, proc.log()


@pytest.fixture(scope="module")
def oai(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S
    )


@pytest.fixture(scope="module")
def model_name(oai: openai.OpenAI) -> str:
    return oai.models.list().data[0].id


def _chat(oai: openai.OpenAI, model: str, **kw: Any) -> Any:
    return oai.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, extra_body={"return_token_ids": True}, **kw
    )


def _direct_logprobs(loaded: LoadedModel, context: list[int]) -> mx.array:
    """log-softmax of the model's next-token logits after ``context``: one full forward."""
    model, _, _ = loaded
    logits = model(mx.array([context]))[0, -1].astype(mx.float32)
    return logits - mx.logsumexp(logits)


def test_chat_logprobs_match_a_direct_forward_pass(
    oai: openai.OpenAI, model_name: str, smollm2_model: LoadedModel
) -> None:
    r = _chat(oai, model_name, max_tokens=8, logprobs=True, top_logprobs=5)
    choice = r.choices[0]
    generated = choice.model_extra["token_ids"]
    entries = choice.logprobs.content
    assert len(entries) == len(generated) == 8 and choice.finish_reason == "length"
    _, tokenizer, _ = smollm2_model
    prompt = list(tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True))
    assert r.usage.prompt_tokens == len(prompt)
    worst = 0.0
    for i, (entry, token) in enumerate(zip(entries, generated, strict=True)):
        row = _direct_logprobs(smollm2_model, prompt + generated[:i])
        expected_top = mx.argsort(-row)[:5].tolist()
        assert entry.token == tokenizer.decode([token])
        assert bytes(entry.bytes) == entry.token.encode()
        worst = max(worst, abs(entry.logprob - row[token].item()))
        # greedy: the chosen token is the most likely one
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == entry.logprob
        assert [tokenizer.decode([t]) for t in expected_top] == [
            t.token for t in entry.top_logprobs
        ]
        for top, t in zip(entry.top_logprobs, expected_top, strict=True):
            worst = max(worst, abs(top.logprob - row[t].item()))
    print(f"largest logprob difference from a direct forward pass: {worst:.2e}")
    assert worst < LOGPROB_ATOL
    # streamed: the same entries, spread over the chunks
    stream = _chat(oai, model_name, max_tokens=8, logprobs=True, top_logprobs=5, stream=True)
    streamed = [
        e for chunk in stream for c in chunk.choices if c.logprobs for e in c.logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
    # not asked: none
    assert _chat(oai, model_name, max_tokens=2).choices[0].logprobs is None


def test_completion_logprobs(oai: openai.OpenAI, model_name: str) -> None:
    r = oai.completions.create(
        model=model_name, prompt="The capital of France is", max_tokens=5, temperature=0, logprobs=3
    )
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.tokens) == 5
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and max(top.values()) == logprob and top[token] == logprob
    with pytest.raises(openai.BadRequestError, match="logprobs must be <= 20"):
        oai.completions.create(model=model_name, prompt="x", max_tokens=1, logprobs=21)


def _two_token_stop(oai: openai.OpenAI, model: str, tokenizer: Any) -> tuple[str, str]:
    """(reply, stop): the greedy reply and a stop string of two of its tokens, from the
    middle of the reply, that the tokenizer does not make one token."""
    r = _chat(oai, model, max_tokens=24)
    text, ids = r.choices[0].message.content, r.choices[0].model_extra["token_ids"]
    for i in range(4, len(ids) - 2):
        stop = tokenizer.decode(ids[i : i + 2])
        if len(tokenizer.encode(stop, add_special_tokens=False)) >= 2 and stop.strip():
            assert stop in text
            return text, stop
    raise AssertionError(f"no two-token stop string in {text!r}")


def test_a_two_token_stop_string_in_both_apis_streamed_and_not(
    server: ServerProcess, oai: openai.OpenAI, model_name: str, smollm2_model: LoadedModel
) -> None:
    reply, stop = _two_token_stop(oai, model_name, smollm2_model[1])
    expected = reply[: reply.find(stop)]
    r = _chat(oai, model_name, max_tokens=24, stop=[stop, "never said"])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    chunks = [
        c.choices[0].delta.content or ""
        for c in _chat(oai, model_name, max_tokens=24, stop=stop, stream=True)
        if c.choices
    ]
    assert "".join(chunks) == expected
    print(f"stop string {stop!r}; reply {reply!r}")
    claude = anthropic.Anthropic(
        base_url=server.url, api_key="unused", max_retries=0, timeout=TIMEOUT_S
    )
    msg = claude.messages.create(
        model=model_name,
        max_tokens=24,
        messages=QUESTION,
        stop_sequences=[stop],
        extra_body={"temperature": 0},
    )
    assert msg.content[0].text == expected
    assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", stop)
    with claude.messages.stream(
        model=model_name,
        max_tokens=24,
        messages=QUESTION,
        stop_sequences=[stop],
        extra_body={"temperature": 0},
    ) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed == expected and final.stop_sequence == stop
    # negative control: without it the reply goes on past the stop string
    assert stop in _chat(oai, model_name, max_tokens=24).choices[0].message.content


def test_the_next_turn_after_a_stop_reuses_the_session(oai: openai.OpenAI, model_name: str) -> None:
    session = {"X-Session-ID": "stopped-turn"}
    first = oai.chat.completions.create(
        model=model_name, messages=QUESTION, temperature=0, max_tokens=24, stop="\n",
        extra_headers=session,
    )  # fmt: skip
    text = first.choices[0].message.content
    assert "\n" not in text and first.choices[0].finish_reason == "stop"
    history = [*QUESTION, {"role": "assistant", "content": text}]
    second = oai.chat.completions.create(
        model=model_name, messages=[*history, {"role": "user", "content": "And a fourth?"}],
        temperature=0, max_tokens=4, extra_headers=session,
    )  # fmt: skip
    # the whole first prompt comes from the cache, and what was generated up to the cut
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
