"""Grammars for constrained decoding (llguidance), and the per-sequence token matcher.

A request's constraint is an llguidance grammar string: a JSON schema
(:func:`json_schema_grammar`), any JSON object (:func:`json_object_grammar`) or a Lark
grammar (:func:`lark_grammar`, tool calls). :class:`GrammarCompiler` turns one into a
:class:`TokenMatcher` for one sequence; the matcher says which tokens may come next::

    matcher = compiler.matcher(json_schema_grammar({"type": "object"}))
    allowed = matcher.advance(None)      # before the first token: only tokens opening '{'
    allowed = matcher.advance(token)     # after each generated token
    # once the grammar is complete, only the EOS tokens are allowed

JSON is written in one layout (``", "`` between items, ``": "`` after keys, no other
whitespace): a small model cannot wander into endless whitespace, and a reply rendered
again with ``json.dumps`` is the same text. No MLX here: the logits processor that applies
the mask is :mod:`kvpool.mlx.constrain`.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np

from kvpool.errors import InvalidRequestError

__all__ = [
    "JSON_LAYOUT",
    "GrammarCompiler",
    "GrammarError",
    "TokenMatcher",
    "check_grammar",
    "json_object_grammar",
    "json_schema_grammar",
    "lark_grammar",
    "lark_json",
    "lark_literal",
]

logger = logging.getLogger(__name__)

# llguidance's JSON compiler options: one layout, the one json.dumps writes by default.
JSON_LAYOUT: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


class GrammarError(InvalidRequestError):
    """A schema or grammar llguidance refuses; the message says why."""


def _llg() -> Any:
    import llguidance

    return llguidance


def json_schema_grammar(schema: object) -> str:
    """The grammar of JSON documents valid against ``schema`` (a JSON Schema object)."""
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        grammar = _llg().LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
    except (ValueError, TypeError) as exc:
        raise GrammarError(f"invalid JSON schema: {exc}") from None
    check_grammar(grammar, "JSON schema")
    return str(grammar)


def json_object_grammar() -> str:
    """Any JSON object."""
    return json_schema_grammar({"type": "object"})


def lark_literal(text: str) -> str:
    """``text`` as a Lark string literal (JSON escapes, which llguidance's Lark reads)."""
    return json.dumps(text, ensure_ascii=False)


def lark_json(schema: dict[str, Any]) -> str:
    """A Lark ``%json`` rule body: JSON valid against ``schema``, in :data:`JSON_LAYOUT`."""
    guidance = {**JSON_LAYOUT, **schema.get("x-guidance", {})}
    return "%json " + json.dumps({**schema, "x-guidance": guidance}, ensure_ascii=False)


def lark_grammar(lark: str, what: str = "grammar") -> str:
    """A Lark grammar (llguidance's dialect, ``%json`` rules included), checked."""
    grammar = str(_llg().LLMatcher.grammar_from_lark(lark))
    check_grammar(grammar, what)
    return grammar


def check_grammar(grammar: str, what: str) -> None:
    """Raise GrammarError if llguidance refuses ``grammar`` (no tokenizer needed)."""
    message = _llg().LLMatcher.validate_grammar(grammar)
    if message and not message.startswith("WARNING"):
        raise GrammarError(f"invalid {what}: {message}")


class TokenMatcher:
    """One sequence's position in a grammar: which tokens may come next.

    :meth:`advance` takes the token just generated (None before the first one) and returns
    a boolean mask over the model's ``vocab_size`` ids (a view valid until the next call).
    Once the grammar is complete only ``eos`` ids are allowed; a matcher that failed (a
    token the mask forbade, which a correct caller never feeds) allows only ``eos`` too,
    so the sequence ends instead of the batch failing. Never raises after construction.
    """

    def __init__(self, matcher: Any, vocab_size: int, eos: Iterable[int]) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._bits = np.zeros((1, (vocab_size + 31) // 32), dtype=np.int32)
        self._eos_only = np.zeros(vocab_size, dtype=bool)
        self._eos_only[[t for t in eos if 0 <= t < vocab_size]] = True
        self.num_tokens = 0  # tokens consumed

    @property
    def error(self) -> str:
        """Why the matcher failed ("" while it has not)."""
        return str(self._matcher.get_error()) if self._matcher.is_error() else ""

    @property
    def is_accepting(self) -> bool:
        """The tokens so far form a complete document of the grammar."""
        return bool(self._matcher.is_accepting())

    def advance(self, token: int | None) -> np.ndarray[Any, np.dtype[np.bool_]]:
        if token is not None:
            self.num_tokens += 1
            if not self._matcher.is_stopped() and not self._matcher.consume_token(int(token)):
                logger.warning("constrained decoding failed: %s", self._matcher.get_error())
        if self._matcher.is_error() or self._matcher.is_stopped():
            return self._eos_only
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.vocab_size]
        return bits.view(np.bool_)


class GrammarCompiler:
    """Builds :class:`TokenMatcher` s for one tokenizer (thread-safe).

    ``tokenizer`` is a Hugging Face fast tokenizer, or mlx-lm's wrapper of one (it forwards
    ``backend_tokenizer``). Its llguidance form is built once, on first use (about 0.3 s
    for a 49K vocabulary), and shared by every matcher. ``vocab_size`` is the model's
    (logits) vocabulary, ``eos`` the ids that end a generation.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos: Iterable[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos = tuple(sorted(int(t) for t in eos))
        self._lock = threading.Lock()
        self._ll_tokenizer: Any = None

    @classmethod
    def supports(cls, tokenizer: Any) -> bool:
        """Whether ``tokenizer`` has a Hugging Face fast tokenizer inside."""
        try:
            backend = tokenizer.backend_tokenizer
        except (AttributeError, ValueError):
            return False
        return callable(getattr(backend, "to_str", None))

    def ll_tokenizer(self) -> Any:
        with self._lock:
            if self._ll_tokenizer is None:
                backend = copy.copy(self._tokenizer.backend_tokenizer)
                backend.no_padding()
                backend.no_truncation()
                self._ll_tokenizer = _llg().LLTokenizer(
                    backend.to_str(), n_vocab=self.vocab_size, eos_token=list(self.eos)
                )
            return self._ll_tokenizer

    def matcher(self, grammar: str) -> TokenMatcher:
        """A fresh matcher at the start of ``grammar``; GrammarError if it is refused."""
        matcher = _llg().LLMatcher(self.ll_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"invalid grammar: {matcher.get_error()}")
        return TokenMatcher(matcher, self.vocab_size, self.eos)
