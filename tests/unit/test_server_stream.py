"""A streamed reply is the non-streamed reply, first token's leading space included
(issue 20, item 10)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from server_app import MODEL, app_client

from kvpool.testing import FakeDetokenizer, FakeTokenizer


class WordTokenizer(FakeTokenizer):
    """Every token decodes to a word after a space (as byte-level BPE does); its streaming
    detokenizer trims the reply's leading space, as mlx-lm's do."""

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(f" w{t % 7}" for t in ids)

    @property
    def detokenizer(self) -> FakeDetokenizer:
        return TrimmingDetokenizer(self)


class TrimmingDetokenizer(FakeDetokenizer):
    @property
    def text(self) -> str:
        return super().text.lstrip()


def _streamed_text(client: object, body: dict[str, object]) -> str:
    r = client.post("/v1/completions", json={**body, "stream": True})  # type: ignore[attr-defined]
    assert r.status_code == 200, r.text
    text = ""
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            choices = json.loads(line[6:])["choices"]
            text += choices[0]["text"] if choices else ""
    return text


@pytest.mark.parametrize("tokenizer", [WordTokenizer(), FakeTokenizer()], ids=["bpe", "plain"])
def test_streamed_text_equals_the_non_streamed_text(
    tmp_path: Path, tokenizer: FakeTokenizer
) -> None:
    body = {"model": MODEL, "prompt": "the agent reads", "max_tokens": 5, "temperature": 0}
    with app_client(tmp_path, tokenizer=tokenizer) as client:
        whole = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        streamed = _streamed_text(client, body)
    assert streamed == whole
    if isinstance(tokenizer, WordTokenizer):
        assert whole.startswith(" w")  # the case that differed: the leading space kept
