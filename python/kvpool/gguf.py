"""GGUF -> mlx-lm model directory, for llama-architecture files with a GPT-2 BPE tokenizer.

``convert_gguf(gguf, out)`` writes, all at once (built in a temporary directory next to
``out``, then renamed into place; nothing is left half-written when it raises)::

    <out>/config.json            Hugging Face llama config, read off the GGUF metadata
    <out>/model.safetensors      dense weights (float32 by default: fast on a Linux CPU)
    <out>/tokenizer.json         byte-level BPE from tokenizer.ggml.tokens / merges
    <out>/tokenizer_config.json  special tokens and tokenizer.chat_template

MLX reads the GGUF (``mx.load(..., return_metadata=True)``): Q4_0/Q4_1/Q8_0 tensors arrive as
MLX affine triples ``(weight, scales, biases)`` of group 32, which are dequantized. llama.cpp
stores the rows of ``attn_q`` / ``attn_k`` permuted for its RoPE; they are permuted back
(:func:`unpermute_rope_rows`), which is exact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kvpool.errors import ModelConversionError

if TYPE_CHECKING:
    import mlx.core as mx

__all__ = [
    "CONVERTER_VERSION",
    "GGUF_GROUP_SIZE",
    "PROVENANCE_NAME",
    "convert_gguf",
    "permute_rope_rows",
    "unpermute_rope_rows",
]

# Bump when a change here changes the files a conversion writes.
CONVERTER_VERSION = 1
GGUF_GROUP_SIZE = 32  # values per ggml block: MLX's group size for GGUF quantized tensors
PROVENANCE_NAME = "kvpool_source.json"  # where a converted directory came from

Dtype = Literal["float32", "float16", "bfloat16"]

# GGUF tensor name (after "blk.N.") -> mlx-lm parameter name (after "model.layers.N.").
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# tokenizer.ggml.pre values whose pre-tokenization this module reproduces: whether digits are
# split one by one before GPT-2's byte-level regex.
_PRE_TOKENIZERS = {"smollm": True, "gpt-2": False, "default": False}
_TOKEN_TYPE_CONTROL = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL: special tokens
_TOKEN_TYPE_USER_DEFINED = 4


def permute_rope_rows(weight: mx.array, num_heads: int) -> mx.array:
    """llama.cpp's permutation of q/k projection rows (what its HF -> GGUF converter does).

    Per head, rows ``[r0 .. r(h/2-1) | r(h/2) .. r(h-1)]`` (rotate-half pairs) become
    interleaved ``[r0, r(h/2), r1, r(h/2+1), ...]``.
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    grouped = weight.reshape(num_heads, 2, half, *weight.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weight.shape)


def unpermute_rope_rows(weight: mx.array, num_heads: int) -> mx.array:
    """The inverse of :func:`permute_rope_rows`: GGUF's interleaved rows back to HF's order."""
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise ModelConversionError(
            f"a q/k projection of {rows} rows does not split into {num_heads} heads of an even size"
        )
    half = rows // num_heads // 2
    grouped = weight.reshape(num_heads, half, 2, *weight.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weight.shape)


def convert_gguf(
    gguf: Path | str,
    out: Path | str,
    *,
    dtype: Dtype = "float32",
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Convert the llama GGUF file ``gguf`` into the mlx-lm model directory ``out``.

    Replaces whatever was at ``out``. ``provenance``, if given, is written with the other
    files as ``PROVENANCE_NAME`` (JSON; the converter version and each file's size added).
    Raises :class:`~kvpool.errors.ModelConversionError`
    (one line: the file and what was wrong) for an unreadable or truncated file, another
    architecture or tokenizer, or a tensor it cannot place; ``out`` is then untouched and no
    temporary directory remains.
    """
    gguf, out = Path(gguf), Path(out)
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ModelConversionError(f"dtype {dtype!r} is not float32, float16 or bfloat16")
    tensors, metadata = _read(gguf)
    config = _config(gguf, metadata, tensors)
    weights = _weights(gguf, tensors, config, dtype)
    tokenizer_json = _tokenizer_json(gguf, metadata)
    tokenizer_config = _tokenizer_config(metadata)

    import mlx.core as mx

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.converting-"))
    try:
        tmp.chmod(0o755)
        _write_json(tmp / "config.json", config)
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        _write_json(tmp / "tokenizer_config.json", tokenizer_config)
        if provenance is not None:
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
            record = {**provenance, "converter_version": CONVERTER_VERSION, "files": files}
            _write_json(tmp / PROVENANCE_NAME, record)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------- reading


def _read(gguf: Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    import mlx.core as mx

    if not gguf.is_file():
        raise ModelConversionError(f"{str(gguf)!r} is not a file")
    try:
        tensors, metadata = mx.load(str(gguf), return_metadata=True)
    except Exception as exc:  # MLX raises ValueError/RuntimeError for a bad or truncated file
        raise ModelConversionError(
            f"{str(gguf)!r} is not a readable GGUF file (truncated or damaged?): {exc}"
        ) from exc
    assert isinstance(tensors, dict) and isinstance(metadata, dict)  # always, for a .gguf
    return tensors, metadata


def _scalar(metadata: dict[str, Any], key: str, gguf: Path, default: Any = None) -> Any:
    value = metadata.get(key, default)
    if value is None:
        raise ModelConversionError(f"{str(gguf)!r} has no {key!r} in its metadata")
    return value.item() if hasattr(value, "item") else value


def _config(gguf: Path, metadata: dict[str, Any], tensors: dict[str, mx.array]) -> dict[str, Any]:
    """``config.json`` for mlx-lm's llama, from the GGUF's ``llama.*`` keys."""
    architecture = _scalar(metadata, "general.architecture", gguf)
    if architecture != "llama":
        raise ModelConversionError(
            f"{str(gguf)!r} is a {architecture!r} model; only 'llama' GGUF files are converted"
        )
    scaling = metadata.get("llama.rope.scaling.type")
    if scaling is not None and str(scaling) != "none":
        raise ModelConversionError(f"{str(gguf)!r} uses RoPE scaling {scaling!r}, not converted")

    def get(key: str, default: Any = None) -> Any:
        return _scalar(metadata, f"llama.{key}", gguf, default)

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = int(get("vocab_size", len(tokens) if tokens is not None else None))
    eps = float(get("attention.layer_norm_rms_epsilon"))
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "intermediate_size": int(get("feed_forward_length")),
        "vocab_size": vocab,
        "max_position_embeddings": int(get("context_length")),
        # The GGUF stores float32: its shortest decimal (9.999999747e-06 -> 1e-05).
        "rms_norm_eps": float(f"{eps:.7g}"),
        "rope_theta": float(f"{float(get('rope.freq_base', 10000.0)):.7g}"),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": int(_scalar(metadata, "tokenizer.ggml.bos_token_id", gguf)),
        "eos_token_id": int(_scalar(metadata, "tokenizer.ggml.eos_token_id", gguf)),
    }
    return config


# --------------------------------------------------------------------------- weights


def _weights(
    gguf: Path, tensors: dict[str, mx.array], config: dict[str, Any], dtype: Dtype
) -> dict[str, mx.array]:
    """Every tensor under its mlx-lm name: dequantized, q/k rows un-permuted, cast to dtype."""
    import mlx.core as mx

    bases = sorted({name.rsplit(".", 1)[0] for name in tensors})
    weights: dict[str, mx.array] = {}
    for base in bases:
        target = _target_name(gguf, base)
        value = _dense(gguf, base, tensors)
        kind = base.rsplit(".", 1)[-1]
        if kind == "attn_q":
            value = unpermute_rope_rows(value, config["num_attention_heads"])
        elif kind == "attn_k":
            value = unpermute_rope_rows(value, config["num_key_value_heads"])
        weights[f"{target}.weight"] = value.astype(getattr(mx, dtype))
    expected = 2 + 9 * config["num_hidden_layers"] + (0 if config["tie_word_embeddings"] else 1)
    if len(weights) != expected:
        raise ModelConversionError(
            f"{str(gguf)!r} holds {len(weights)} weight tensors; a llama of "
            f"{config['num_hidden_layers']} layers has {expected}"
        )
    mx.eval(weights)
    return weights


def _target_name(gguf: Path, base: str) -> str:
    if base in _TOP_NAMES:
        return _TOP_NAMES[base]
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise ModelConversionError(f"{str(gguf)!r} has a tensor {base!r} with no llama counterpart")


def _dense(gguf: Path, base: str, tensors: dict[str, mx.array]) -> mx.array:
    """``base``'s values in float32: a plain tensor, or an MLX quantized triple dequantized.

    Scales and biases are widened to float32 first, as llama.cpp computes ``d * q + m``.
    """
    import mlx.core as mx

    weight = tensors.get(f"{base}.weight")
    if weight is None:
        raise ModelConversionError(f"{str(gguf)!r} has {base!r} parts but no {base}.weight")
    scales, biases = tensors.get(f"{base}.scales"), tensors.get(f"{base}.biases")
    if scales is None and biases is None:
        return weight.astype(mx.float32)
    if scales is None or biases is None or weight.dtype != mx.uint32:
        raise ModelConversionError(f"{str(gguf)!r}: {base!r} is an incomplete quantized tensor")
    bits = weight.shape[-1] // scales.shape[-1]  # 32-bit words per group of 32 values
    if bits not in (4, 8) or weight.shape[-1] != bits * scales.shape[-1]:
        raise ModelConversionError(
            f"{str(gguf)!r}: {base!r} has {weight.shape[-1]} words per row and "
            f"{scales.shape[-1]} groups, not a 4- or 8-bit layout of group {GGUF_GROUP_SIZE}"
        )
    return mx.dequantize(
        weight,
        scales.astype(mx.float32),
        biases.astype(mx.float32),
        group_size=GGUF_GROUP_SIZE,
        bits=bits,
    )


# --------------------------------------------------------------------------- tokenizer


def _tokenizer_json(gguf: Path, metadata: dict[str, Any]) -> str:
    """GPT-2 byte-level BPE (``tokenizer.ggml.model == "gpt2"``) as a ``tokenizer.json``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ModelConversionError(
            f"{str(gguf)!r} has a {model!r} tokenizer; only 'gpt2' (byte-level BPE) is converted"
        )
    pre = str(metadata.get("tokenizer.ggml.pre", "default"))
    if pre not in _PRE_TOKENIZERS:
        raise ModelConversionError(
            f"{str(gguf)!r} has pre-tokenizer {pre!r}; converted: {sorted(_PRE_TOKENIZERS)}"
        )
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    merge_lines: list[str] = list(metadata.get("tokenizer.ggml.merges", []))
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ModelConversionError(f"{str(gguf)!r}: tokenizer.ggml.tokens has duplicates")
    merges = []
    for line in merge_lines:
        left, sep, right = line.partition(" ")
        if not sep or " " in right:
            raise ModelConversionError(f"{str(gguf)!r}: merge {line!r} is not two symbols")
        merges.append((left, right))

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _PRE_TOKENIZERS[pre]:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    types = metadata.get("tokenizer.ggml.token_type")
    type_list = [int(t) for t in types.tolist()] if types is not None else []
    specials = [
        AddedToken(tokens[i], special=kind == _TOKEN_TYPE_CONTROL, normalized=False)
        for i, kind in enumerate(type_list)
        if kind in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)
    ]
    tokenizer.add_special_tokens(specials)
    return json.dumps(json.loads(tokenizer.to_str()), indent=2, ensure_ascii=False) + "\n"


def _tokenizer_config(metadata: dict[str, Any]) -> dict[str, Any]:
    tokens = metadata["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        value = metadata.get(f"tokenizer.ggml.{key}")
        return None if value is None else str(tokens[int(value.item())])

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": bool(_item(metadata.get("tokenizer.ggml.add_bos_token", False))),
        "add_eos_token": bool(_item(metadata.get("tokenizer.ggml.add_eos_token", False))),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_item(metadata.get("llama.context_length", 2048))),
    }
    if (template := metadata.get("tokenizer.chat_template")) is not None:
        config["chat_template"] = str(template)
    return {k: v for k, v in config.items() if v is not None}


def _item(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


# --------------------------------------------------------------------------- files


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``; an existing ``out`` is moved aside, then deleted."""
    trash: Path | None = None
    if out.exists() or out.is_symlink():
        trash = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.rename(out, trash / out.name)
    os.rename(tmp, out)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
