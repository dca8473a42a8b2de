"""Run as ``python trained_probe.py MODEL_DIR`` (a subprocess, with KVPOOL_FAST_BLAS=1: these
checks need no exact tokens, and OpenBLAS prefills ~10x faster than MLX's reference BLAS).

Prints one JSON object: the greedy answer to a fixed question and the perplexity of a fixed
English text, for the converted model as it is and for a control whose q/k projection rows
are permuted back into llama.cpp's order (what skipping the converter's un-permute gives).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import kvpool  # with KVPOOL_FAST_BLAS=1: routes MLX to OpenBLAS before mlx is imported

QUESTION = "What is the capital of France?"
TEXT = Path("/usr/share/common-licenses/Apache-2.0")


def _measure(model: Any, tokenizer: Any) -> dict[str, Any]:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm import generate
    from mlx_lm.sample_utils import make_sampler

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True
    )
    answer = generate(model, tokenizer, prompt, max_tokens=12, sampler=make_sampler(0.0))
    ids = tokenizer.encode(TEXT.read_text())[:128]
    logits = model(mx.array([ids]))[0, :-1].astype(mx.float32)
    nll = nn.losses.cross_entropy(logits, mx.array(ids[1:]), reduction="mean")
    return {"answer": answer, "perplexity": math.exp(float(nll.item()))}


def main(model_dir: str) -> None:
    from kvpool.blas import blas_info
    from kvpool.gguf import permute_rope_rows
    from kvpool.models import load_model

    model, tokenizer = load_model(Path(model_dir))
    result = {"blas": blas_info()["blas"], "kvpool": kvpool.__version__}
    result["converted"] = _measure(model, tokenizer)
    args = model.args
    heads = {"q_proj": args.num_attention_heads, "k_proj": args.num_key_value_heads}
    skipped = [
        (f"model.layers.{i}.self_attn.{proj}.weight", permute_rope_rows(w, n))
        for i, layer in enumerate(model.model.layers)
        for proj, n in heads.items()
        for w in (getattr(layer.self_attn, proj).weight,)
    ]
    model.load_weights(skipped, strict=False)
    result["unpermute_skipped"] = _measure(model, tokenizer)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
