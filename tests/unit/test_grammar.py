"""kvpool.grammar: grammars from schemas, and the token matcher on a real byte tokenizer."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from kvpool.grammar import (
    GrammarCompiler,
    GrammarError,
    json_object_grammar,
    json_schema_grammar,
    lark_grammar,
    lark_json,
    lark_literal,
)

EOS = 256


def byte_tokenizer() -> Any:
    """A Hugging Face fast tokenizer with one token per byte (ids 0..255) and EOS 256,
    inside an object that forwards ``backend_tokenizer`` as mlx-lm's wrapper does."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: _byte_of(c))
    vocab = {c: i for i, c in enumerate(byte_chars)}
    vocab["<eos>"] = EOS
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>"])
    return SimpleNamespace(backend_tokenizer=tok)


def _byte_of(char: str) -> int:
    """The byte GPT-2's byte-level alphabet maps to ``char``."""
    table = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 256))
    if ord(char) in table:
        return ord(char)
    extra = [b for b in range(256) if b not in table]
    return extra[ord(char) - 256]


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    return GrammarCompiler(byte_tokenizer(), vocab_size=EOS + 8, eos=[EOS])


def allowed_bytes(mask: Any) -> str:
    return "".join(chr(i) for i in range(256) if mask[i])


def feed(matcher: Any, text: str) -> Any:
    mask = matcher.advance(None)
    for b in text.encode():
        assert mask[b], (text, chr(b), allowed_bytes(mask))
        mask = matcher.advance(b)
    return mask


def test_a_schema_forces_its_layout_and_ends_with_eos(compiler: GrammarCompiler) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"],
        "additionalProperties": False,
    }
    matcher = compiler.matcher(json_schema_grammar(schema))
    mask = matcher.advance(None)
    assert allowed_bytes(mask) == "{" and mask.shape == (EOS + 8,)
    text = json.dumps({"city": "Oslo", "days": 12})  # json.dumps's layout is the grammar's
    mask = feed(matcher, text)
    assert matcher.is_accepting and matcher.error == ""
    assert [i for i in range(EOS + 8) if mask[i]] == [EOS]  # done: only EOS
    # the ids past the tokenizer's vocabulary are never allowed
    fresh = compiler.matcher(json_schema_grammar(schema))
    feed(fresh, '{"city": "')
    assert not fresh.advance(ord("a"))[EOS + 1 :].any()


def test_the_mask_refuses_what_the_schema_does_not_allow(compiler: GrammarCompiler) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    matcher = compiler.matcher(json_schema_grammar(schema))
    mask = feed(matcher, '{"n": ')
    assert set(allowed_bytes(mask)) == set("-0123456789")
    # a compact layout is refused: one layout only
    compact = compiler.matcher(json_schema_grammar(schema))
    mask = feed(compact, '{"n"')
    assert allowed_bytes(mask) == ":"
    mask = compact.advance(ord(":"))
    assert allowed_bytes(mask) == " "


def test_a_forbidden_token_ends_the_sequence_instead_of_raising(
    compiler: GrammarCompiler,
) -> None:
    matcher = compiler.matcher(json_object_grammar())
    matcher.advance(None)
    mask = matcher.advance(ord("x"))  # not '{': a caller that ignored the mask
    assert [i for i in range(EOS + 8) if mask[i]] == [EOS]
    assert "x" in matcher.error or matcher.error


def test_a_lark_tool_call_grammar(compiler: GrammarCompiler) -> None:
    args = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    lark = f"start: {lark_literal('<call>')} args {lark_literal('</call>')}\n"
    lark += f"args: {lark_json(args)}\n"
    matcher = compiler.matcher(lark_grammar(lark))
    mask = feed(matcher, '<call>{"q": "tea"}</call>')
    assert [i for i in range(EOS + 8) if mask[i]] == [EOS]


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "foo"}, "Invalid type: foo"),
        ({"properties": {"a": {"$ref": "#/nope"}}}, "does not exist"),
        ({"type": "integer", "minimum": "x"}, "minimum"),
        ([1, 2], "must be an object"),
    ],
)
def test_an_invalid_schema_is_refused(schema: Any, message: str) -> None:
    with pytest.raises(GrammarError, match=r"invalid JSON schema|must be an object") as info:
        json_schema_grammar(schema)
    assert message in str(info.value)


def test_a_valid_schema_passes_the_check() -> None:
    """Control for the test above: the check accepts what it should."""
    assert "json_schema" in json_schema_grammar({"type": "object", "properties": {}})


def test_a_bad_lark_grammar_is_refused() -> None:
    with pytest.raises(GrammarError, match="invalid tools"):
        lark_grammar("start: nothing_defined\n", "tools")


def test_supports_needs_a_fast_tokenizer() -> None:
    assert GrammarCompiler.supports(byte_tokenizer())
    assert not GrammarCompiler.supports(SimpleNamespace(encode=lambda s: []))
