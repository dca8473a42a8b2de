"""Constrained decoding on real MLX + mlx-lm: a random-weight model under a JSON schema
always writes a valid document, and a constrained row leaves its batch neighbours alone."""

from __future__ import annotations

import json
from typing import Any

import jsonschema

from kvpool import BlockPool, BlockPoolBatchEngine, ModelCacheSpec
from kvpool.grammar import GrammarCompiler, json_schema_grammar
from kvpool.mlx.constrain import GrammarLogitsProcessor

SCHEMA = {
    "type": "object",
    "properties": {
        "mood": {"enum": ["calm", "busy"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
    },
    "required": ["mood", "n", "ok"],
    "additionalProperties": False,
}


def _engine(model: Any, tokenizer: Any) -> BlockPoolBatchEngine:
    spec = ModelCacheSpec.from_model(model)
    return BlockPoolBatchEngine(model, tokenizer, BlockPool(spec, max_bytes=32 * 2**20), spec)


def test_a_random_model_under_a_schema_writes_valid_json(tiny_model: Any) -> None:
    model, tokenizer, _ = tiny_model
    assert GrammarCompiler.supports(tokenizer)
    compiler = GrammarCompiler(tokenizer, model.args.vocab_size, tokenizer.eos_token_ids)
    grammar = json_schema_grammar(SCHEMA)
    prompts = [[(7 * i + k) % 500 + 1 for k in range(12 + i)] for i in range(4)]
    engine = _engine(model, tokenizer)
    uids = {}
    for i, prompt in enumerate(prompts):
        processors = [GrammarLogitsProcessor(compiler.matcher(grammar))] if i < 3 else []
        uids[engine.submit(f"a{i}", prompt, max_tokens=64, logits_processors=processors)] = i
    done = {uids[c.uid]: c for c in engine.drain()}
    for i in range(3):
        c = done[i]
        assert c.error is None and c.finish_reason == "stop", (c.finish_reason, c.text)
        jsonschema.validate(json.loads(c.text), SCHEMA)
    # the free row is what the same prompt generates alone: the neighbours' masks are theirs
    alone = _engine(model, tokenizer)
    alone.submit("x", prompts[3], max_tokens=64)
    (free,) = alone.drain()
    assert done[3].token_ids == free.token_ids
    # negative control: without the constraint, a constrained prompt writes something else
    alone.submit("y", prompts[0], max_tokens=64)
    (unconstrained,) = alone.drain()
    assert unconstrained.token_ids != done[0].token_ids
    try:
        jsonschema.validate(json.loads(unconstrained.text), SCHEMA)
        valid = True
    except (json.JSONDecodeError, jsonschema.ValidationError):
        valid = False
    assert not valid


def test_sampling_under_a_schema_stays_valid(tiny_model: Any) -> None:
    from kvpool.sampling import SamplingParams

    model, tokenizer, _ = tiny_model
    compiler = GrammarCompiler(tokenizer, model.args.vocab_size, tokenizer.eos_token_ids)
    grammar = json_schema_grammar(SCHEMA)
    engine = _engine(model, tokenizer)
    for i in range(6):
        engine.submit(
            f"s{i}", [3, 4, 5, 6 + i], max_tokens=64,
            sampling=SamplingParams(temperature=1.5, top_k=50),
            logits_processors=[GrammarLogitsProcessor(compiler.matcher(grammar))],
        )  # fmt: skip
    done = engine.drain()
    assert len(done) == 6
    for c in done:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), SCHEMA)
