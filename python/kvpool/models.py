"""Model references (:func:`locate_and_load`) and mlx-lm model directories built offline from
recipes: random weights, real geometry.

A reference is a recipe name, a trained model's name (:mod:`kvpool.pretrained`), a directory
or a Hugging Face repo id. A recipe needs no network: it is built here from a
:class:`ModelRecipe`: a ``config.json`` for one of mlx-lm's own architectures,
a ``model.safetensors`` of seeded random weights whose names and shapes are read from that
architecture's mlx-lm class (so they cannot drift from what ``mlx_lm.load`` expects), and a
byte-level BPE tokenizer trained on a small embedded English text. ``mlx_lm.load(dir)`` loads the
result through its real loading code.

Random weights at their default scale make greedy decoding repeat one token whatever the
context. Scaling the Linear and embedding weights (``weight_scale``, x4 by default) gives output
that depends on the context, which the equivalence tests (engine vs. plain mlx-lm) need.

A build is a pure function of the recipe: two builds give byte-identical files. Layout::

    <dir>/config.json             mlx-lm / Hugging Face model config
    <dir>/model.safetensors       weights, in the recipe's dtype
    <dir>/tokenizer.json          byte-level BPE (256 byte tokens, 4 specials, 252 merges)
    <dir>/tokenizer_config.json   bos/eos tokens and a ChatML chat template
    <dir>/kvpool_manifest.json    the recipe, the builder version and each file's sha256

Only numpy, json and the ``tokenizers`` library are imported at module level; mlx and mlx-lm are
imported inside the functions that need them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import struct
import tempfile
import uuid
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np

from kvpool.cache.format import DTYPES
from kvpool.errors import ModelNotFoundError

if TYPE_CHECKING:
    from mlx.nn.layers.base import Module
    from mlx_lm.tokenizer_utils import TokenizerWrapper

__all__ = [
    "BUILDER_VERSION",
    "RECIPES",
    "ModelRecipe",
    "build_model",
    "ensure_model",
    "load_model",
    "locate_and_load",
    "model_cache_dir",
]

# Bump when a change here changes the files a recipe builds: cached models built by an older
# builder then fail the manifest check and are rebuilt by ensure_model().
BUILDER_VERSION = 1

Dtype = Literal["float32", "float16", "bfloat16"]

MANIFEST_NAME = "kvpool_manifest.json"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"

# Special tokens take the ids right after the 256 byte tokens, in this order.
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
NUM_MERGES = 252
TOKENIZER_SIZE = 256 + len(SPECIAL_TOKENS) + NUM_MERGES  # 512

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


@dataclass(frozen=True, slots=True)
class ModelRecipe:
    """Everything that determines a built model directory.

    The config fields keep their Hugging Face names. ``sliding_window`` and
    ``sliding_window_pattern`` are used by ``gemma3_text`` only: layer ``i`` attends globally
    when ``i % sliding_window_pattern == sliding_window_pattern - 1`` and to the last
    ``sliding_window`` tokens otherwise (pattern 2 over 4 layers: local, global, local,
    global).
    """

    name: str
    model_type: str  # an mlx_lm.models module: "llama", "qwen2", "gemma3_text"
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int  # >= TOKENIZER_SIZE; ids past the tokenizer decode to ""
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    sliding_window: int | None = None
    sliding_window_pattern: int | None = None
    dtype: Dtype = "float32"
    weight_scale: float = 4.0  # multiplies the default init of Linear and Embedding weights
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model_type not in _ARCHITECTURES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported; "
                f"expected one of {sorted(_ARCHITECTURES)}"
            )
        if self.vocab_size < TOKENIZER_SIZE:
            raise ValueError(
                f"vocab_size {self.vocab_size} is smaller than the tokenizer "
                f"({TOKENIZER_SIZE} tokens)"
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype {self.dtype!r} is not float32, float16 or bfloat16")
        is_gemma = self.model_type == "gemma3_text"
        if is_gemma and (self.sliding_window is None or self.sliding_window_pattern is None):
            raise ValueError("gemma3_text needs sliding_window and sliding_window_pattern")
        if not is_gemma and self.sliding_window_pattern is not None:
            raise ValueError(f"sliding_window_pattern is for gemma3_text, not {self.model_type}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config(self) -> dict[str, Any]:
        """The ``config.json`` contents."""
        specials = _special_token_ids()
        config: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": specials[BOS_TOKEN],
            "eos_token_id": [specials[EOS_TOKEN], specials[IM_END_TOKEN]],
            "torch_dtype": self.dtype,
        }
        if self.model_type == "llama":
            config["hidden_act"] = "silu"
        elif self.model_type == "qwen2":
            config["hidden_act"] = "silu"
            config["use_sliding_window"] = False
        elif self.model_type == "gemma3_text":
            assert self.sliding_window_pattern is not None  # checked in __post_init__
            pattern = self.sliding_window_pattern
            config["hidden_activation"] = "gelu_pytorch_tanh"
            config["query_pre_attn_scalar"] = self.head_dim
            config["rope_local_base_freq"] = 10000.0
            config["sliding_window"] = self.sliding_window
            config["sliding_window_pattern"] = pattern
            # mlx-lm reads sliding_window_pattern; newer transformers configs spell the same
            # schedule as layer_types. Both are written and agree.
            config["layer_types"] = [
                "full_attention" if i % pattern == pattern - 1 else "sliding_attention"
                for i in range(self.num_hidden_layers)
            ]
        return config


RECIPES: dict[str, ModelRecipe] = {
    recipe.name: recipe
    for recipe in (
        # Unit of the integration tests: builds and loads in well under a second.
        ModelRecipe(
            name="tiny",
            model_type="llama",
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=128,
            vocab_size=TOKENIZER_SIZE,
        ),
        # Sliding-window layers (RotatingKVCache) next to global ones. The window (64) is
        # smaller than a 256-token block, so prompts of a few hundred tokens wrap it.
        ModelRecipe(
            name="tiny-swa",
            model_type="gemma3_text",
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=128,
            vocab_size=TOKENIZER_SIZE,
            rms_norm_eps=1e-6,
            sliding_window=64,
            sliding_window_pattern=2,
        ),
        # Default model of `kvpool demo`. Sized for the 2-core CPU with MLX's reference BLAS:
        # 4 agents x 4 turns x a few hundred tokens, run cached and re-prefilled, in well under
        # two minutes. Realistic cache geometry per layer (4 KV heads x 64).
        ModelRecipe(
            name="demo",
            model_type="llama",
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            intermediate_size=512,
            vocab_size=TOKENIZER_SIZE,
        ),
        # SmolLM2-135M's geometry (benchmarks). Its 49152-token vocabulary is kept so the
        # lm_head costs what it really costs; ids past the 512-token tokenizer decode to "".
        ModelRecipe(
            name="smollm2-135m",
            model_type="llama",
            hidden_size=576,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            intermediate_size=1536,
            vocab_size=49152,
            rope_theta=100000.0,
        ),
        # The cache geometry of Llama-3-8B-class models (8 KV heads x head_dim 128: 4 KiB of
        # K+V per token per layer in float16) on a body small enough for a CPU: hidden 1024 =
        # 8 query heads x 128 (no GQA), 8 layers instead of 32, a tied 32768-token vocabulary;
        # 136M parameters, about smollm2-135m's size and decode speed.
        ModelRecipe(
            name="llama-8x128",
            model_type="llama",
            hidden_size=1024,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=2816,
            vocab_size=32768,
            rope_theta=500000.0,
        ),
    )
}


# --------------------------------------------------------------------------- cache directory


def model_cache_dir() -> Path:
    """Where :func:`ensure_model` keeps built models.

    ``$KVPOOL_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/kvpool/models``, else
    ``~/.cache/kvpool/models``.
    """
    if explicit := os.environ.get("KVPOOL_CACHE_DIR"):
        return Path(explicit)
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg) / "kvpool" / "models"
    return Path.home() / ".cache" / "kvpool" / "models"


def ensure_model(name: str = "demo") -> Path:
    """The cached directory of recipe ``name``, built first if missing or damaged.

    Damaged means: no readable manifest, a manifest from another recipe or builder version, a
    file missing, or a sha256 mismatch. Safe when processes race: each builds into its own
    temporary directory and renames it into place; a process that finds an intact directory
    already there when it comes to rename keeps that one and drops its own.
    """
    recipe = _recipe(name)
    path = model_cache_dir() / recipe.name
    if _is_intact(path, recipe):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _build_into_temp(recipe, path.parent, path.name)
    _install(tmp, path, recipe, keep_intact=True)
    return path


def build_model(recipe: ModelRecipe | str, path: Path) -> Path:
    """Build ``recipe`` (or the named recipe) into the directory ``path`` and return it.

    Deterministic: the same recipe gives byte-identical files. Atomic: the files are written
    into a temporary directory next to ``path`` and renamed into place, replacing whatever was
    at ``path``.
    """
    recipe = _recipe(recipe) if isinstance(recipe, str) else recipe
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _build_into_temp(recipe, path.parent, path.name)
    _install(tmp, path, recipe, keep_intact=False)
    return path


def load_model(path_or_name: str | Path) -> tuple[Module, TokenizerWrapper]:
    """Load a model with mlx-lm: see :func:`locate_and_load` for what ``path_or_name`` may be."""
    _, model, tokenizer = locate_and_load(path_or_name)
    return model, tokenizer


def locate_and_load(path_or_name: str | Path) -> tuple[Path, Module, TokenizerWrapper]:
    """``(directory, model, tokenizer)`` of a model reference, loaded by mlx-lm's own loader.

    In this order, ``path_or_name`` is: a recipe name (built on first use, random weights); a
    trained model's name (:mod:`kvpool.pretrained`, fetched and converted on first use); an
    existing directory; a Hugging Face repo id ``owner/name``, which ``mlx_lm.load`` takes
    from the Hugging Face cache or downloads (``HF_HUB_OFFLINE=1``: the cache only).

    Every failure is a :class:`~kvpool.errors.ModelNotFoundError` with a one-line message.
    """
    from kvpool.pretrained import TRAINED_MODELS, ensure_trained_model

    name = str(path_or_name)
    if isinstance(path_or_name, str) and name in RECIPES:
        return _load_directory(ensure_model(name))
    if isinstance(path_or_name, str) and name in TRAINED_MODELS:
        return _load_directory(ensure_trained_model(name))
    path = Path(path_or_name)
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise ModelNotFoundError(f"model directory {name!r} has no {CONFIG_NAME}")
        if not any(path.glob("model*.safetensors")):
            raise ModelNotFoundError(f"model directory {name!r} has no model*.safetensors weights")
        return _load_directory(path)
    if isinstance(path_or_name, str) and _HF_REPO_ID.fullmatch(name):
        return _load_hub_model(name)
    raise ModelNotFoundError(
        f"model {name!r} is neither a directory nor a recipe name ({', '.join(sorted(RECIPES))}), "
        f"a trained model ({', '.join(sorted(TRAINED_MODELS))}) or a Hugging Face repo id "
        "(owner/name)"
    )


# "owner/name" as the Hugging Face hub spells repo ids; a path that exists is taken first.
_HF_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def _load_directory(path: Path) -> tuple[Path, Module, TokenizerWrapper]:
    from kvpool.mlx.mlx_lm import load

    try:
        model, tokenizer = load(str(path))
    except Exception as exc:  # mlx-lm raises many kinds for a broken directory
        raise ModelNotFoundError(
            f"model directory {str(path)!r} could not be loaded by mlx_lm: {exc}"
        ) from exc
    return path, model, tokenizer


def _load_hub_model(repo_id: str) -> tuple[Path, Module, TokenizerWrapper]:
    from kvpool.mlx.mlx_lm import hub_snapshot_path, load

    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    try:
        model, tokenizer = load(repo_id)
        path = hub_snapshot_path(repo_id)
    except Exception as exc:  # huggingface_hub's and mlx-lm's errors, many kinds
        where = "the Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "the hub"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelNotFoundError(
            f"model {repo_id!r} is not a local directory, and as a Hugging Face repo id it "
            f"could not be loaded from {where}: {type(exc).__name__}: {first}"
        ) from exc
    return path, model, tokenizer


# --------------------------------------------------------------------------- build + install


def _recipe(name: str) -> ModelRecipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ModelNotFoundError(
            f"no model recipe named {name!r} (recipes: {', '.join(sorted(RECIPES))})"
        ) from None


def _build_into_temp(recipe: ModelRecipe, parent: Path, name: str) -> Path:
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.building-"))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0o700
        _write_model_files(recipe, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _install(tmp: Path, path: Path, recipe: ModelRecipe, *, keep_intact: bool) -> None:
    """Rename the finished build ``tmp`` to ``path``.

    A directory already at ``path`` is moved aside and deleted, unless ``keep_intact`` and it
    is an intact build of ``recipe`` (another process won the race): then ``tmp`` is dropped.
    """
    for _ in range(8):
        try:
            os.rename(tmp, path)  # also replaces an empty directory
            return
        except OSError:
            if not path.exists():
                raise
        if keep_intact and _is_intact(path, recipe):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        trash = path.with_name(f".{path.name}.old-{uuid.uuid4().hex}")
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            continue  # someone else moved it first; try the rename again
        shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    raise RuntimeError(f"could not install model build at {path}: it kept being replaced")


def _write_model_files(recipe: ModelRecipe, out: Path) -> None:
    config = recipe.config()
    _write_json(out / CONFIG_NAME, config)
    _write_weights(recipe, config, out / WEIGHTS_NAME)
    tokenizer_json = _build_tokenizer_json()
    (out / TOKENIZER_NAME).write_text(tokenizer_json, encoding="utf-8")
    _write_json(out / TOKENIZER_CONFIG_NAME, _tokenizer_config())
    files = (CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_NAME, TOKENIZER_CONFIG_NAME)
    manifest = {
        "builder_version": BUILDER_VERSION,
        "recipe": recipe.to_dict(),
        "files": {name: _sha256(out / name) for name in files},
    }
    _write_json(out / MANIFEST_NAME, manifest)


def _is_intact(path: Path, recipe: ModelRecipe) -> bool:
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
        if manifest["builder_version"] != BUILDER_VERSION:
            return False
        if manifest["recipe"] != json.loads(json.dumps(recipe.to_dict())):
            return False
        files: dict[str, str] = manifest["files"]
        return bool(files) and all(_sha256(path / name) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- weights


@dataclass(frozen=True, slots=True)
class _TensorPlan:
    """How to fill one tensor of the checkpoint."""

    name: str
    shape: tuple[int, ...]
    kind: Literal["uniform", "normal", "constant"]
    bound: float  # uniform: half-width; normal: std; constant: the value


def _plan_weights(recipe: ModelRecipe, config: dict[str, Any]) -> list[_TensorPlan]:
    """One plan per tensor, in name order, read off mlx-lm's own model class.

    Linear weights follow MLX's default init U(-1/sqrt(in), 1/sqrt(in)) and embeddings
    N(0, 1/sqrt(dims)), both times ``weight_scale`` (embeddings that the model rescales by
    sqrt(hidden_size) are divided by as much); Linear biases keep the default bound.
    Every other parameter (norm scales) must have a constant default, which is kept.
    """

    import mlx.core as mx
    from mlx.nn.layers.base import Module
    from mlx.nn.layers.embedding import Embedding
    from mlx.nn.layers.linear import Linear
    from mlx.utils import tree_flatten

    from kvpool.mlx.mlx_lm import model_module

    arch = model_module(recipe.model_type)
    model = arch.Model(arch.ModelArgs.from_dict(config))
    leaves = cast(
        "list[tuple[str, Any]]",  # (path, leaf Module); Module's methods are untyped
        tree_flatten(model.leaf_modules(), is_leaf=Module.is_module),
    )
    # gemma3_text multiplies the embeddings by sqrt(hidden_size) on the way in; dividing the
    # init by as much gives layer 0 the input scale llama gets. Without it the (tied) input
    # embedding dominates the residual stream and greedy decoding repeats the last token.
    embed_multiplier = math.sqrt(recipe.hidden_size) if recipe.model_type == "gemma3_text" else 1.0
    plans: list[_TensorPlan] = []
    for prefix, module in leaves:
        for local, value in cast("list[tuple[str, mx.array]]", tree_flatten(module.parameters())):
            name = f"{prefix}.{local}"
            shape = tuple(value.shape)
            if isinstance(module, Linear) and local == "weight":
                bound = recipe.weight_scale / math.sqrt(shape[1])
                plans.append(_TensorPlan(name, shape, "uniform", bound))
            elif isinstance(module, Linear) and local == "bias":
                bound = 1.0 / math.sqrt(module.weight.shape[1])
                plans.append(_TensorPlan(name, shape, "uniform", bound))
            elif isinstance(module, Embedding) and local == "weight":
                std = recipe.weight_scale / math.sqrt(shape[1]) / embed_multiplier
                plans.append(_TensorPlan(name, shape, "normal", std))
            else:
                default = np.asarray(value.astype(mx.float32))
                lo, hi = float(default.min()), float(default.max())
                if lo != hi:
                    raise NotImplementedError(
                        f"[kvpool.models] no init rule for {name} ({type(module).__name__}, "
                        f"shape {shape}): its default is not constant"
                    )
                plans.append(_TensorPlan(name, shape, "constant", lo))
    # A tied checkpoint has no lm_head: gemma3_text's sanitize() ties the embeddings exactly
    # when lm_head.weight is absent, and llama builds no lm_head when tied.
    if recipe.tie_word_embeddings:
        plans = [p for p in plans if p.name != "lm_head.weight"]
    return sorted(plans, key=lambda p: p.name)


def _fill(plan: _TensorPlan, seed: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    # One generator per tensor, keyed by its name: a tensor's values do not depend on which
    # other tensors exist or on the order they are generated in.
    rng = np.random.default_rng([seed, zlib.crc32(plan.name.encode())])
    if plan.kind == "uniform":
        values = rng.random(plan.shape, dtype=np.float32)
        values *= np.float32(2 * plan.bound)
        values -= np.float32(plan.bound)
        return values
    if plan.kind == "normal":
        values = rng.standard_normal(plan.shape, dtype=np.float32)
        values *= np.float32(plan.bound)
        return values
    return np.full(plan.shape, plan.bound, dtype=np.float32)


def _encode(values: np.ndarray[Any, np.dtype[np.float32]], dtype: Dtype) -> bytes:
    if dtype == "float32":
        return values.astype("<f4").tobytes()
    if dtype == "float16":
        return values.astype("<f2").tobytes()
    # bfloat16: the top 16 bits of the float32, rounded to nearest even (no NaNs here).
    bits = values.astype("<f4").view("<u4")
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> 16
    return rounded.astype("<u2").tobytes()


def _write_weights(recipe: ModelRecipe, config: dict[str, Any], path: Path) -> None:
    """Write a safetensors file tensor by tensor (never the whole model in memory).

    The format: a little-endian u64 header length, a JSON header (padded with spaces to a
    multiple of 8 bytes) mapping each name to dtype, shape and [begin, end) data offsets,
    then the tensors' bytes back to back in header order.
    """
    plans = _plan_weights(recipe, config)
    code, itemsize = DTYPES[recipe.dtype].safetensors, DTYPES[recipe.dtype].nbytes
    header: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for plan in plans:
        nbytes = math.prod(plan.shape) * itemsize
        header[plan.name] = {
            "dtype": code,
            "shape": list(plan.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for plan in plans:
            f.write(_encode(_fill(plan, recipe.seed), recipe.dtype))


# --------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which the ByteLevel pre-tokenizer uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    byte_to_char = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in byte_to_char:
            byte_to_char[b] = chr(256 + n)
            n += 1
    return byte_to_char


def _special_token_ids() -> dict[str, int]:
    return {token: 256 + i for i, token in enumerate(SPECIAL_TOKENS)}


def _train_merges(words: Iterator[str], num_merges: int) -> list[tuple[str, str]]:
    """Deterministic BPE training over pre-tokenized (byte-mapped) words.

    Each round merges the most frequent adjacent pair; ties go to the lexicographically
    smallest pair. Stops early when no pair occurs twice.
    """
    word_counts = Counter(words)
    # A word as its current symbols, with its count; sorted for a fixed iteration order.
    corpus = [(list(word), count) for word, count in sorted(word_counts.items())]
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for symbols, count in corpus:
            for pair in itertools.pairwise(symbols):
                pair_counts[pair] += count
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        if pair_counts[best] < 2:
            break
        merges.append(best)
        joined = best[0] + best[1]
        for symbols, _ in corpus:
            i = 0
            while i < len(symbols) - 1:
                if symbols[i] == best[0] and symbols[i + 1] == best[1]:
                    symbols[i : i + 2] = [joined]
                i += 1
    return merges


def _build_tokenizer_json() -> str:
    """A byte-level BPE ``tokenizer.json``: ids 0-255 bytes, 256-259 specials, then merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = (piece for piece, _ in pre_tokenizer.pre_tokenize_str(_CORPUS))
    merges = _train_merges(words, NUM_MERGES)
    if len(merges) != NUM_MERGES:
        raise AssertionError(
            f"the corpus yields {len(merges)} merges, not {NUM_MERGES}: this indicates a bug"
        )
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    vocab.update(_special_token_ids())
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    )
    # Round-trip through json so the file's key order does not depend on the library's
    # internal hash maps.
    return json.dumps(json.loads(tokenizer.to_str()), indent=2, sort_keys=True) + "\n"


def _tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
        "chat_template": CHATML_TEMPLATE,
    }


# Training text for the tokenizer's merges: plain English prose, written for kvpool.
_CORPUS = """\
The morning train left the station a few minutes after seven. Most of the people on board were
going to work, and many of them had made the same trip every weekday for years. They knew which
seats were warm in winter, which doors opened first, and which part of the platform would be
closest to the stairs at the other end. A woman by the window was reading a book about the
history of bridges. Across from her, a man with a gray coat was writing a list of things he had
to do before the end of the week: call the bank, fix the kitchen light, buy a present for his
sister, and finish the report that his team had been talking about for a month.

The report was about water. The city had grown faster than anyone had planned, and the old pipes
under the streets were not large enough for the number of homes that now depended on them. In
the summer, when the weather was hot and dry, the pressure in some neighborhoods dropped so low
that people on the upper floors of tall buildings could not take a shower in the evening. The
team had spent many weeks measuring the flow at different points in the network, and they had
found that a small number of old valves were responsible for most of the problem.

When the train stopped at the next station, a group of students got on. They were talking about
a test they had taken the day before. One of them said that the questions had been easier than
expected, but another said that she had not had enough time to answer the last part. A third
student, who had been quiet until then, said that he thought the teacher would let them try again
if enough of them asked. The others laughed, but they also agreed that it would be worth asking.

Learning is often like that. We try something, we make mistakes, and we try again with a little
more knowledge than we had the first time. A child learning to walk falls many times before she
can cross a room without help. A writer drafts the same paragraph again and again until the words
sound right. A scientist runs an experiment, looks at the results, changes one thing, and runs it
again. In each case, the important part is not the failure itself but what we do after it.

Computers learn in a similar way, although the process is very different in its details. A
program that recognizes pictures of cats, for example, is shown thousands of images, some with
cats and some without. Each time it makes a guess, it is told whether the guess was right, and
it adjusts a large number of internal values so that the next guess is a little better. After
enough examples, the program can often recognize a cat in a picture it has never seen before.

Language models work on text instead of pictures. They read a sequence of words and try to
predict the word that comes next. To do this well, they need to remember what came earlier in
the conversation. A model that answers a question about a long document has to keep track of
names, places, and ideas that appeared many pages before. This memory is expensive. Every word
the model has seen takes up space, and when many people are talking to the same model at once,
that space adds up quickly.

One way to save time is to keep the memory of each conversation between turns. When a person
sends a new message, the model does not need to read the whole conversation again from the
beginning; it can continue from where it stopped. This is the same idea as a bookmark in a
book. Without the bookmark, you would have to start from the first page every time you picked
up the book. With it, you can open the book at the right place and keep reading.

Of course, bookmarks have costs of their own. If you are reading a hundred books at once, you
need a hundred bookmarks, and you need somewhere to keep all of those books. A library solves
this problem with shelves, a catalog, and rules about how long each book may be borrowed. A
system that serves many conversations needs similar rules: how much memory each conversation may
use, what happens when the memory is full, and which conversations should be moved to slower
storage when they have been quiet for a while.

By the time the train reached the center of the city, the woman by the window had finished her
chapter about bridges. She had learned that the oldest stone bridges were built without any
cement at all. The stones held each other in place because of the shape of the arch, and some of
those bridges were still standing after two thousand years. She thought about how strange it was
that something so simple could last so long, while the phone in her pocket would probably need
to be replaced in three or four years.

The man in the gray coat put his list away and looked out of the window. The sun was coming up
over the river, and the water was bright and still. He decided that he would start with the
report, because it was the hardest thing on the list, and because the people in the tall
buildings had waited long enough for an answer. The kitchen light could wait until the weekend.

At the last stop, everyone stood up at once, and for a moment the car was full of the sound of
bags, coats, and footsteps. Then the doors opened, and the people on the train walked out into
the morning, each of them carrying their own plans for the day, their own questions, and their
own small piece of the city's long story.
"""
