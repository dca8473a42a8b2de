"""kvpool.models: offline model directories that mlx_lm.load loads through its real code."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from helpers import reference_generate
from mlx_lm.models.cache import KVCache, RotatingKVCache

from kvpool.errors import ModelNotFoundError
from kvpool.models import (
    BUILDER_VERSION,
    RECIPES,
    TOKENIZER_SIZE,
    build_model,
    ensure_model,
    load_model,
    model_cache_dir,
)

FILES = [
    "config.json",
    "kvpool_manifest.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
]
PROMPT_TEXTS = [
    "The morning train left the station a few minutes after seven.",
    "Computers learn in a similar way, although the process is different.",
    "A library solves this problem with shelves, a catalog, and rules. " * 6,
    "Language models work on text instead of pictures.",
]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftover_temp_dirs(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------- building, loading


def test_tiny_loads_with_its_geometry(tiny_model):
    model, _, path = tiny_model
    assert sorted(p.name for p in path.iterdir()) == FILES
    args = model.args
    assert (args.model_type, args.num_hidden_layers, args.hidden_size) == ("llama", 2, 64)
    assert (args.num_attention_heads, args.num_key_value_heads, args.head_dim) == (4, 2, 16)
    assert args.vocab_size == TOKENIZER_SIZE == 512
    assert model.model.embed_tokens.weight.dtype == mx.float32
    assert not hasattr(model, "lm_head")  # tied
    logits = model(mx.array([[1, 2, 3]]))
    assert logits.shape == (1, 3, 512)
    config = json.loads((path / "config.json").read_text())
    assert config["num_key_value_heads"] == 2
    assert config["eos_token_id"] == [257, 259]


def test_tiny_swa_alternates_sliding_and_global_layers(tiny_swa_model):
    model, _, path = tiny_swa_model
    assert model.args.model_type == "gemma3_text"
    assert (model.args.sliding_window, model.args.sliding_window_pattern) == (64, 2)
    # Gemma ties the embeddings when the checkpoint has no lm_head.
    assert model.tie_word_embeddings
    caches = model.make_cache()
    # layer:   0        1        2        3
    # kind:    sliding  global   sliding  global
    assert [type(c) for c in caches] == [RotatingKVCache, KVCache, RotatingKVCache, KVCache]
    assert [c.max_size for c in caches[::2]] == [64, 64]
    config = json.loads((path / "config.json").read_text())
    assert config["layer_types"] == ["sliding_attention", "full_attention"] * 2


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_recipes_load_in_their_dtype(tmp_path, dtype):
    recipe = dataclasses.replace(RECIPES["tiny"], name=f"tiny-{dtype}", dtype=dtype)
    model, _ = load_model(build_model(recipe, tmp_path / recipe.name))
    expected = getattr(mx, dtype)
    assert {v.dtype for _, v in _flat_parameters(model)} == {expected}
    reference = load_model(build_model("tiny", tmp_path / "tiny"))[0]
    # Same seed, same values, rounded: q_proj entries lie in [-0.5, 0.5].
    got = model.model.layers[0].self_attn.q_proj.weight.astype(mx.float32)
    want = reference.model.layers[0].self_attn.q_proj.weight
    assert mx.abs(got - want).max().item() <= 2**-9
    assert mx.abs(got - want).max().item() > 0


def _flat_parameters(model):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


def test_build_replaces_an_existing_directory(tmp_path):
    path = tmp_path / "m"
    path.mkdir()
    (path / "stale.txt").write_text("old")
    assert build_model("tiny", path) == path
    assert sorted(p.name for p in path.iterdir()) == FILES
    assert _leftover_temp_dirs(tmp_path) == []


# --------------------------------------------------------------------------- determinism


def test_builds_are_byte_identical_across_processes(tmp_path, tiny_model):
    _, _, first = tiny_model
    second = tmp_path / "second"
    # A fresh interpreter: the tokenizers library seeds its hash maps per process.
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from kvpool.models import build_model; "
            "build_model('tiny', Path(sys.argv[1]))",
            str(second),
        ],
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    for name in FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_a_different_seed_changes_only_the_weights(tmp_path, tiny_model):
    """Negative control for the determinism test: the comparison does see a change."""
    _, _, first = tiny_model
    recipe = dataclasses.replace(RECIPES["tiny"], seed=1)
    other = build_model(recipe, tmp_path / "seed1")
    differing = [n for n in FILES if (first / n).read_bytes() != (other / n).read_bytes()]
    assert differing == ["kvpool_manifest.json", "model.safetensors"]


def test_manifest_records_recipe_and_file_hashes(tiny_model):
    _, _, path = tiny_model
    manifest = json.loads((path / "kvpool_manifest.json").read_text())
    assert manifest["builder_version"] == BUILDER_VERSION
    assert manifest["recipe"] == json.loads(json.dumps(dataclasses.asdict(RECIPES["tiny"])))
    assert manifest["files"] == {
        name: _sha256(path / name) for name in FILES if name != "kvpool_manifest.json"
    }


# --------------------------------------------------------------------------- the model cache


def test_model_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KVPOOL_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert model_cache_dir() == tmp_path / "home" / ".cache" / "kvpool" / "models"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model_cache_dir() == tmp_path / "xdg" / "kvpool" / "models"
    monkeypatch.setenv("KVPOOL_CACHE_DIR", str(tmp_path / "explicit"))
    assert model_cache_dir() == tmp_path / "explicit"


def test_ensure_model_builds_once(monkeypatch, tmp_path):
    monkeypatch.setenv("KVPOOL_CACHE_DIR", str(tmp_path))
    path = ensure_model("tiny")
    assert path == tmp_path / "tiny"
    inode = (path / "model.safetensors").stat().st_ino
    assert ensure_model("tiny") == path
    assert (path / "model.safetensors").stat().st_ino == inode  # not rebuilt
    assert _leftover_temp_dirs(tmp_path) == []


def _delete(path: Path) -> None:
    path.unlink()


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _garble(path: Path) -> None:
    path.write_text("{not json")


@pytest.mark.parametrize(
    ("damaged", "damage"),
    [
        ("model.safetensors", _flip_last_byte),
        ("tokenizer.json", _delete),
        ("config.json", _flip_last_byte),
        ("kvpool_manifest.json", _delete),
        ("kvpool_manifest.json", _garble),
    ],
)
def test_ensure_model_rebuilds_a_damaged_directory(monkeypatch, tmp_path, damaged, damage):
    monkeypatch.setenv("KVPOOL_CACHE_DIR", str(tmp_path))
    path = ensure_model("tiny")
    hashes = {name: _sha256(path / name) for name in FILES}
    damage(path / damaged)
    assert ensure_model("tiny") == path
    assert {name: _sha256(path / name) for name in FILES} == hashes
    assert _leftover_temp_dirs(tmp_path) == []


def test_ensure_model_rebuilds_a_build_of_another_recipe(monkeypatch, tmp_path):
    monkeypatch.setenv("KVPOOL_CACHE_DIR", str(tmp_path))
    build_model(dataclasses.replace(RECIPES["tiny"], seed=7), tmp_path / "tiny")
    stale = _sha256(tmp_path / "tiny" / "model.safetensors")
    path = ensure_model("tiny")
    assert _sha256(path / "model.safetensors") != stale
    manifest = json.loads((path / "kvpool_manifest.json").read_text())
    assert manifest["recipe"]["seed"] == 0


def test_ensure_model_keeps_the_winners_build_when_it_loses_the_race(monkeypatch, tmp_path):
    from kvpool import models

    monkeypatch.setenv("KVPOOL_CACHE_DIR", str(tmp_path))
    winner = ensure_model("tiny")
    inode = (winner / "model.safetensors").stat().st_ino
    # This process checked before the winner renamed its build into place: it saw nothing
    # there, builds its own, and finds the winner's intact build when it comes to rename.
    real_is_intact = models._is_intact
    num_checks = 0

    def is_intact_but_first_check_misses(path: Path, recipe: models.ModelRecipe) -> bool:
        nonlocal num_checks
        num_checks += 1
        return num_checks > 1 and real_is_intact(path, recipe)

    monkeypatch.setattr(models, "_is_intact", is_intact_but_first_check_misses)
    assert ensure_model("tiny") == winner
    assert num_checks == 2
    assert (winner / "model.safetensors").stat().st_ino == inode
    assert _leftover_temp_dirs(tmp_path) == []


def test_ensure_model_is_safe_when_processes_race(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "KVPOOL_CACHE_DIR": str(tmp_path)}
    code = "from kvpool.models import ensure_model; print(ensure_model('tiny'))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0]
    assert outputs == [str(tmp_path / "tiny")] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
    manifest = json.loads((tmp_path / "tiny" / "kvpool_manifest.json").read_text())
    assert manifest["files"]["model.safetensors"] == _sha256(
        tmp_path / "tiny" / "model.safetensors"
    )


def test_load_model_by_recipe_name_builds_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("KVPOOL_CACHE_DIR", str(tmp_path))
    model, tokenizer = load_model("tiny")
    assert (tmp_path / "tiny" / "kvpool_manifest.json").is_file()
    assert model.args.num_hidden_layers == 2
    assert tokenizer.eos_token_ids == {257, 259}


def test_load_model_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="neither a directory nor a recipe"):
        load_model(tmp_path / "missing")
    with pytest.raises(ModelNotFoundError, match="neither a directory nor a recipe"):
        load_model("no-such-recipe")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match=r"has no config\.json"):
        load_model(empty)
    (empty / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match=r"has no model\*\.safetensors"):
        load_model(str(empty))


# --------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_swa_model"])
def test_greedy_output_depends_on_the_prompt(request, fixture):
    model, tokenizer, _ = request.getfixturevalue(fixture)
    prompts = [tokenizer.encode(text) for text in PROMPT_TEXTS]
    outputs = reference_generate(model, prompts, max_tokens=24)
    assert [len(out) for out in outputs] == [24] * 4
    assert len({tuple(out) for out in outputs}) == 4  # every prompt continues differently
    for out in outputs:
        assert len(set(out)) >= 4, out  # and not by repeating one token


def test_default_scale_weights_repeat_one_token(tmp_path, tiny_model):
    """Negative control: at MLX's default init scale greedy decoding degenerates."""
    _, tokenizer, _ = tiny_model
    recipe = dataclasses.replace(RECIPES["tiny"], name="tiny-x1", weight_scale=1.0)
    model, _ = load_model(build_model(recipe, tmp_path / recipe.name))
    outputs = reference_generate(model, [tokenizer.encode(t) for t in PROMPT_TEXTS], 24)
    assert min(len(set(out)) for out in outputs) == 1


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_swa_model"])
def test_reference_generate_batched_equals_one_at_a_time(request, fixture):
    model, tokenizer, _ = request.getfixturevalue(fixture)
    # The long prompt (~100 tokens) wraps tiny-swa's 64-token window.
    prompts = [tokenizer.encode(text) for text in PROMPT_TEXTS]
    batched = reference_generate(model, prompts, max_tokens=12)
    single = [reference_generate(model, [p], max_tokens=12)[0] for p in prompts]
    assert batched == single


def test_reference_generate_stops_on_a_stop_token(tiny_model):
    model, tokenizer, _ = tiny_model
    prompt = tokenizer.encode(PROMPT_TEXTS[0])
    free = reference_generate(model, [prompt], max_tokens=10)[0]
    stopped = reference_generate(model, [prompt], max_tokens=10, stop_tokens=[free[3]])[0]
    assert stopped == free[: free.index(free[3]) + 1]


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_roundtrips_text(tiny_model):
    _, tokenizer, _ = tiny_model
    text = "Hello, world!\n  Tabs\tand ünïcödé — and 🙂 emoji. <not special>"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert max(ids) < TOKENIZER_SIZE
    assert ids[0] != tokenizer.bos_token_id  # no BOS is added


def test_tokenizer_merges_give_realistic_token_counts(tiny_model):
    _, tokenizer, _ = tiny_model
    text = "When the train stopped at the next station, a group of students got on."
    ids = tokenizer.encode(text)
    assert len(text) / len(ids) > 2.0  # bytes alone would be 1.0
    assert len(tokenizer.get_vocab()) == TOKENIZER_SIZE


def test_special_tokens_are_single_ids(tiny_model):
    _, tokenizer, _ = tiny_model
    specials = ["<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
    assert [tokenizer.encode(t) for t in specials] == [[256], [257], [258], [259]]
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|bos|>", "<|eos|>")
    assert tokenizer.eos_token_ids == {257, 259}


def test_chat_template_is_chatml(tiny_model):
    _, tokenizer, _ = tiny_model
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert ids == tokenizer.encode(text)
    assert ids.count(258) == 3
    assert ids.count(259) == 2
