"""kvpool.persist on MLX slabs: exact resumes, corruptions, SIGKILL mid-save, mlx-lm format."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from helpers import LoadedModel, Reference, fresh, make_engine, words

from kvpool import (
    AttentionKind,
    BlockPool,
    CacheCorruptionError,
    CacheHandle,
    IncompatibleCacheError,
    InvalidRequestError,
    LayerSpec,
    ModelCacheSpec,
    persist,
)
from kvpool.cache.storage import LayerKV, host_dtype
from kvpool.mlx import kernels
from kvpool.models import RECIPES, build_model, load_model
from kvpool.persist import (
    agent_id_of,
    cache_path,
    export_prompt_cache,
    import_prompt_cache,
    load_cache,
    model_fingerprint,
    save_cache,
    sliding_valid_from,
    verify_cache,
)

FP = "sha256:" + "0f" * 32


def first_turn(loaded: LoadedModel, n_tokens: int, seed: int = 3) -> tuple[Any, ...]:
    """An engine whose agent "a" has taken one turn: (engine, pool, rng, completion)."""
    engine, pool = make_engine(loaded, 32)
    rng = random.Random(seed)
    engine.submit("a", words(rng, loaded[1], n_tokens), max_tokens=6)
    (done,) = engine.drain()
    assert done.error is None and done.blocks is not None
    return engine, pool, rng, done


# A spec with a sliding layer between global ones, and random K/V written into a pool.
MIXED = (
    LayerSpec(AttentionKind.GLOBAL, 2, 16, 16),
    LayerSpec(AttentionKind.SLIDING, 2, 16, 8, window=6),
    LayerSpec(AttentionKind.GLOBAL, 1, 8, 8),
)


def random_agent(
    dtype: str = "float16",
    num_tokens: int = 21,
    valid_from: int = 9,
    seed: int = 0,
    agent_id: str = "a",
) -> tuple[BlockPool, CacheHandle, list[LayerKV]]:
    """A pool with one agent of random bits (NaN patterns included) in every position held.

    The sliding layer (window 6) keeps only positions >= 21 - 6 = 15 of the 9.. given.
    """
    spec = ModelCacheSpec(MIXED, dtype, block_tokens=4)
    pool = BlockPool(spec, num_blocks=24)
    rng = np.random.default_rng(seed)
    kvs = []
    bits = np.dtype(f"<u{spec.itemsize}")
    for i, layer in enumerate(spec.layers):
        start = valid_from if layer.window else 0
        n = num_tokens - start
        k = rng.integers(0, np.iinfo(bits).max, (layer.n_kv_heads, n, layer.k_head_dim), bits)
        v = rng.integers(0, np.iinfo(bits).max, (layer.n_kv_heads, n, layer.v_head_dim), bits)
        kvs.append(LayerKV(i, start, k.view(host_dtype(dtype)), v.view(host_dtype(dtype))))
    tokens = tuple(int(t) for t in rng.integers(0, 50_000, num_tokens))
    handle = pool.write_cache(agent_id, tokens, kvs, valid_from=valid_from)
    kept = []
    for kv in kvs:
        skip = max(0, sliding_valid_from(pool, handle) - kv.start) if kv.start else 0
        kept.append(LayerKV(kv.layer, kv.start + skip, kv.keys[:, skip:], kv.values[:, skip:]))
    return pool, handle, kept


def held_bits(pool: BlockPool, blocks: CacheHandle) -> list[bytes]:
    """The bytes of every position the blocks hold, layer by layer (keys, values)."""
    out = []
    for i, layer in enumerate(pool.spec.layers):
        start = sliding_valid_from(pool, blocks) if layer.window else 0
        (kv,) = pool.read_layers(blocks, [i], start, blocks.total_tokens)
        out += [kv.keys.tobytes(), kv.values.tobytes()]
    return out


def pool_state(pool: BlockPool) -> tuple[int, int]:
    return pool.num_free, pool.num_handles


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("model_name", ["tiny_model", "tiny_swa_model"])
def test_a_loaded_cache_resumes_exactly_and_nothing_is_prefilled_again(
    model_name: str, request: pytest.FixtureRequest, reference_generate: Reference, tmp_path: Path
) -> None:
    loaded: LoadedModel = request.getfixturevalue(model_name)
    engine, pool, rng, first = first_turn(loaded, 300)
    fp = model_fingerprint(loaded[0])
    path = cache_path(tmp_path, "a")
    nbytes = save_cache(path, pool, first.blocks, fingerprint=fp)
    assert nbytes == path.stat().st_size
    pool.release(first.blocks)
    assert pool.num_used == 0
    # A fresh engine and pool: in the old pool the load would find the blocks still cached.
    engine, pool = make_engine(loaded, 32)
    kernels.reset_scatter_stats()

    blocks = load_cache(path, pool, fingerprint=fp, agent_id="a")
    assert blocks.token_ids == first.blocks.token_ids
    assert [t.valid_from for t in blocks.tables] == [t.valid_from for t in first.blocks.tables]
    assert pool.is_live(blocks) and pool.num_used == blocks.num_blocks
    stats = kernels.scatter_stats()
    assert stats["num_copied"] == 0 and stats["num_in_place"] > 0

    context = [*blocks.token_ids, *words(rng, loaded[1], 40)]
    engine.submit("a", context, blocks, max_tokens=8)
    (second,) = engine.drain()
    assert second.error is None
    assert second.cached_tokens == blocks.total_tokens  # the whole saved context
    assert list(second.token_ids) == fresh(reference_generate, loaded, context, 8)
    assert kernels.scatter_stats()["num_copied"] == 0


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_is_bit_exact_and_a_standard_safetensors_file(
    dtype: str, tmp_path: Path
) -> None:
    pool, blocks, kvs = random_agent(dtype)
    path = tmp_path / "a.safetensors"
    save_cache(path, pool, blocks, fingerprint=FP)
    # Into the same pool, the load shares the blocks it already holds.
    shared = load_cache(path, pool, fingerprint=FP)
    assert shared.tables[0].block_ids[:5] == blocks.tables[0].block_ids[:5]
    # Into another pool, every byte comes from the file.
    other = BlockPool(pool.spec, num_blocks=24)
    restored = load_cache(path, other, fingerprint=FP)
    assert restored.token_ids == blocks.token_ids
    assert sliding_valid_from(other, restored) == 15
    assert held_bits(other, restored) == held_bits(pool, blocks) == held_bits(pool, shared)
    assert held_bits(pool, blocks) == [a.tobytes() for kv in kvs for a in (kv.keys, kv.values)]
    # any safetensors reader sees the layout the format documents
    arrays, metadata = mx.load(str(path), return_metadata=True)
    assert arrays["token_ids"].dtype == mx.uint32
    assert arrays["token_ids"].tolist() == list(blocks.token_ids)
    assert tuple(arrays["layers.1.values"].shape) == (2, 21 - 15, 8)
    assert str(arrays["layers.0.keys"].dtype) == f"mlx.core.{dtype}"
    assert (metadata["format"], metadata["format_version"]) == ("kvpool-agent-cache", "2")
    info = verify_cache(path)
    assert (info.num_tokens, info.sliding_valid_from, info.spec) == (21, 15, pool.spec)


# --------------------------------------------------------------------------- corruption


@pytest.fixture
def small_file(tmp_path: Path) -> tuple[BlockPool, Path, bytes]:
    """A pool with room to load, and a saved small cache file (path, bytes)."""
    pool, blocks, _ = random_agent("float16", num_tokens=10, valid_from=4)
    path = tmp_path / "a.safetensors"
    save_cache(path, pool, blocks, fingerprint=FP)
    pool.release(blocks)
    return pool, path, path.read_bytes()


def expect_corruption(
    pool: BlockPool, path: Path, match: str | None = None
) -> CacheCorruptionError:
    before = pool_state(pool)
    with pytest.raises(CacheCorruptionError, match=match) as info:
        load_cache(path, pool, fingerprint=FP)
    assert str(path) in str(info.value)  # the message names the file
    assert pool_state(pool) == before  # nothing taken, nothing leaked
    return info.value


def test_every_truncation_is_detected(small_file: tuple[BlockPool, Path, bytes]) -> None:
    pool, path, data = small_file
    (header_len,) = struct.unpack("<Q", data[:8])
    cuts = {0, 1, 7, 8, 9, 8 + header_len - 1, 8 + header_len, 8 + header_len + 1, len(data) - 1}
    cuts |= set(random.Random(0).sample(range(len(data)), 60))
    for cut in sorted(cuts):
        path.write_bytes(data[:cut])
        expect_corruption(pool, path)
    path.write_bytes(data)
    load_cache(path, pool, fingerprint=FP)  # the intact file loads


def test_every_byte_with_a_flipped_bit_is_detected(
    small_file: tuple[BlockPool, Path, bytes],
) -> None:
    """One flipped bit in any byte of the file (length, header, padding, data) is caught."""
    pool, path, data = small_file
    messages = set()
    for offset in range(len(data)):
        bad = bytearray(data)
        bad[offset] ^= 1 << (offset * 5 % 8)
        path.write_bytes(bytes(bad))
        with pytest.raises(CacheCorruptionError) as info:
            verify_cache(path)
        messages.add(str(info.value).split(": ", 1)[1].split(" (")[0][:40])
    assert any("sha256" in m for m in messages) and any("checksum" in m for m in messages)
    # through load_cache too: the pool is unchanged after each
    for offset in (3, 100, len(data) // 2, len(data) - 1):
        bad = bytearray(data)
        bad[offset] ^= 0x04
        path.write_bytes(bytes(bad))
        expect_corruption(pool, path)


def rewrite_header(path: Path, data: bytes, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite the header with ``edit`` applied and a *valid* header checksum."""
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    edit(header)
    header["__metadata__"]["header_sha256"] = persist.layout._header_digest(header)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + header_len :])


def test_a_wrong_shape_or_dtype_is_corruption_even_with_a_valid_checksum(
    small_file: tuple[BlockPool, Path, bytes],
) -> None:
    pool, path, data = small_file

    def transpose(h: dict[str, Any]) -> None:  # same number of bytes, other shape
        h["layers.0.keys"]["shape"] = [2, 16, 10]

    def as_bf16(h: dict[str, Any]) -> None:  # same bytes, other dtype
        h["layers.2.values"]["dtype"] = "BF16"

    def fewer_tokens(h: dict[str, Any]) -> None:  # metadata disagrees with the tensors
        h["__metadata__"]["num_tokens"] = "9"

    def extra_tensor(h: dict[str, Any]) -> None:
        h["extra"] = {"dtype": "F16", "shape": [0], "data_offsets": [0, 0]}

    def wrong_digest_list(h: dict[str, Any]) -> None:
        h["__metadata__"]["tensor_sha256"] = json.dumps({"token_ids": "0" * 64})

    for edit, match in (
        (transpose, "tensor layers.0.keys"),
        (as_bf16, "tensor layers.2.values"),
        (fewer_tokens, "tensor token_ids"),
        (extra_tensor, "unexpected tensors"),
        (wrong_digest_list, "tensor_sha256"),
    ):
        rewrite_header(path, data, edit)
        expect_corruption(pool, path, match)
    # the same edits without fixing the checksum are caught by the checksum
    (header_len,) = struct.unpack("<Q", data[:8])
    text = data[8 : 8 + header_len].replace(b'"shape":[2,10,16]', b'"shape":[2,16,10]', 1)
    path.write_bytes(data[:8] + text + data[8 + header_len :])
    expect_corruption(pool, path, "header checksum")


def test_foreign_and_padded_files_are_corruption(
    small_file: tuple[BlockPool, Path, bytes], tmp_path: Path
) -> None:
    pool, path, data = small_file
    path.write_bytes(data + b"\0")
    expect_corruption(pool, path, "header describes")
    path.write_bytes(b"")
    expect_corruption(pool, path, "truncated")
    path.write_bytes(os.urandom(4096))
    expect_corruption(pool, path)
    mx.save_safetensors(str(path), {"x": mx.zeros((2, 2))}, {"format": "mlx"})
    expect_corruption(pool, path, "header_sha256")
    with pytest.raises(FileNotFoundError):
        load_cache(tmp_path / "missing.safetensors", pool, fingerprint=FP)


def test_a_newer_format_version_is_incompatible(
    small_file: tuple[BlockPool, Path, bytes],
) -> None:
    pool, path, data = small_file

    def bump(h: dict[str, Any]) -> None:
        h["__metadata__"]["format_version"] = "5"

    rewrite_header(path, data, bump)
    with pytest.raises(IncompatibleCacheError, match=r"version 5 is newer .* \(4\)"):
        load_cache(path, pool, fingerprint=FP)


# --------------------------------------------------------------------------- compatibility


def test_fingerprint_tells_models_of_the_same_geometry_apart(
    tiny_model: LoadedModel, tmp_path: Path
) -> None:
    recipe = dataclasses.replace(RECIPES["tiny"], seed=1)
    other_model, _ = load_model(build_model(recipe, tmp_path / "tiny-seed1"))
    again, _ = load_model(tiny_model[2])
    fp = model_fingerprint(tiny_model[0])
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    assert model_fingerprint(again) == fp  # stable across loads (and processes)
    assert ModelCacheSpec.from_model(other_model) == ModelCacheSpec.from_model(tiny_model[0])
    other_fp = model_fingerprint(other_model)
    assert other_fp != fp  # same geometry, other weights

    _, pool, _, first = first_turn(tiny_model, 100)
    path = cache_path(tmp_path, "a")
    save_cache(path, pool, first.blocks, fingerprint=fp)
    before = pool_state(pool)
    with pytest.raises(IncompatibleCacheError, match="written for model"):
        load_cache(path, pool, fingerprint=other_fp)
    assert pool_state(pool) == before


@pytest.mark.parametrize(
    ("change", "match"),
    [({"block_tokens": 8}, "block_tokens 4 vs 8"), ({"dtype": "bfloat16"}, "dtype float16")],
)
def test_another_block_size_or_dtype_is_incompatible(
    change: dict[str, Any], match: str, tmp_path: Path
) -> None:
    pool, blocks, _ = random_agent("float16")
    path = tmp_path / "a.safetensors"
    save_cache(path, pool, blocks, fingerprint=FP)
    other = BlockPool(dataclasses.replace(pool.spec, **change), num_blocks=24)
    with pytest.raises(IncompatibleCacheError, match=match):
        load_cache(path, other, fingerprint=FP)
    assert other.num_used == 0


# --------------------------------------------------------------------------- agent ids


@pytest.mark.parametrize(
    "bad", ["../x", "a/../../b", "/etc/passwd", "..", ".x", "a\x00b", "y" * 200]
)
def test_agent_ids_are_validated(bad: str, tmp_path: Path) -> None:
    directory = tmp_path / "caches"
    with pytest.raises(InvalidRequestError):
        cache_path(directory, bad)
    pool, blocks, _ = random_agent()
    with pytest.raises(InvalidRequestError):
        save_cache(directory / "x.safetensors", pool, dataclasses.replace(blocks, agent_id=bad),
                   fingerprint=FP)  # fmt: skip
    with pytest.raises(InvalidRequestError):
        export_prompt_cache(directory / "x.safetensors", pool,
                            dataclasses.replace(blocks, agent_id=bad))  # fmt: skip
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere


def test_file_names_encode_the_agent_and_a_file_must_hold_its_agent(tmp_path: Path) -> None:
    path = cache_path(tmp_path, "planner-1")
    assert path.parent == tmp_path and agent_id_of(path) == "planner-1"
    assert agent_id_of(path.with_name("planner-2" + path.name[len("planner-1") :])) is None
    assert agent_id_of(tmp_path / "notes.txt") is None
    pool, blocks, _ = random_agent(agent_id="planner-1")
    save_cache(path, pool, blocks, fingerprint=FP)
    # A handle is unforgeable: a copy under another name is not live in the pool.
    with pytest.raises(InvalidRequestError, match="not live"):
        save_cache(path, pool, dataclasses.replace(blocks, agent_id="planner-3"), fingerprint=FP)
    other = cache_path(tmp_path, "planner-2")
    os.rename(path, other)  # a file under another agent's name
    with pytest.raises(CacheCorruptionError, match="not 'planner-2'"):
        load_cache(other, pool, fingerprint=FP, agent_id="planner-2")


# --------------------------------------------------------------------------- crashes

_CHILD = r"""
import os, signal, sys
from kvpool import BlockPool, ModelCacheSpec, persist
from kvpool.persist import atomic, files
from kvpool.cache.storage import LayerKV
from kvpool.testing import FakeStorage

path, version, kill_at = sys.argv[1], int(sys.argv[2]), sys.argv[3]
spec = ModelCacheSpec.uniform(4, 8, 128, dtype="float16", block_tokens=64)
N = 1500  # 24 MB of K/V per save
pool = BlockPool(spec, num_blocks=2 * spec.blocks_for(N), storage=FakeStorage)

def die(*_):
    os.kill(os.getpid(), signal.SIGKILL)

def hook(owner, name, when):  # SIGKILL ourselves right before or after owner.name()
    original = getattr(owner, name)
    def wrapped(*args, **kwargs):
        if when == "before":
            die()
        result = original(*args, **kwargs)
        die()
    setattr(owner, name, wrapped)

if kill_at.startswith("in-place"):  # negative control: no temp file, write the final path
    def in_place(path, write):
        path.unlink(missing_ok=True)
        write(path)
    files._atomic_write = in_place  # what save_cache calls
    kill_at = kill_at.partition("+")[2] or "random"
if kill_at != "random":
    owner, name, when = kill_at.split(":")
    hook({"files": files, "atomic": atomic, "os": os}[owner], name, when)
def say(line):
    # one write per line: with PYTHONUNBUFFERED, print() writes its pieces separately and
    # a kill between them would leave a torn line
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
say("ready")
while True:
    tokens = tuple((version * 7919 + i) % 30000 + 1 for i in range(N))
    handle = pool.write_cache(
        "a", tokens, [LayerKV(i, 0, *pool.storage._encode(i, tokens)) for i in range(spec.n_layers)]
    )
    say(f"start {version}")
    persist.save_cache(path, pool, handle, fingerprint="fp")
    say(f"saved {version}")
    pool.release(handle)
    version += 1
"""


def _expected_tokens(version: int) -> tuple[int, ...]:
    return tuple((version * 7919 + i) % 30000 + 1 for i in range(1500))


def _run_child(path: Path, version: int, kill_at: str, delay: float | None) -> list[str]:
    """Run the saving child until it dies (by its own hook, or our SIGKILL after ``delay``)."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), str(version), kill_at],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline() == "ready\n"
    if delay is not None:
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)  # reaped: its pid is no longer alive for the temp-file cleanup
    assert child.returncode == -signal.SIGKILL
    # only complete lines: a kill can land in the middle of one
    return child.stdout.read().split("\n")[:-1]


def test_sigkill_during_saves_leaves_the_old_or_the_new_file(tmp_path: Path) -> None:
    """Kill a saving process many times, at random moments and at each step of a save.

    After each kill the file at the final path must be absent (nothing saved yet), the last
    version the child reported saved, or the one it was saving (renamed but not reported);
    it always loads cleanly, with K/V and tokens of one version only.
    """
    from kvpool.testing import FakeStorage

    spec = ModelCacheSpec.uniform(4, 8, 128, dtype="float16", block_tokens=64)
    pool = BlockPool(spec, num_blocks=2 * spec.blocks_for(1500), storage=FakeStorage)
    path = tmp_path / "a.safetensors"
    rng = random.Random(1234)
    steps = [
        "files:_write_data:before",  # temp file created, nothing written
        "files:_write_data:after",  # data written, header not yet
        "atomic:_fsync_file:before",  # complete, not fsynced
        "os:replace:before",  # fsynced, not renamed
        "os:replace:after",  # renamed, directory not fsynced
        "atomic:_fsync_dir:after",  # done, not reported
    ]
    plan = [(step, None) for step in steps] + [
        ("random", rng.uniform(0.0, 0.25)) for _ in range(50)
    ]
    saved: int | None = None  # the version the file must hold, once one save completed
    version = 0
    outcome = {"old": 0, "new": 0, "absent": 0, "kills_mid_save": 0}
    max_temps = 0
    for kill_at, delay in plan:
        lines = _run_child(path, version, kill_at, delay)
        started = [int(x.split()[1]) for x in lines if x.startswith("start")]
        done = [int(x.split()[1]) for x in lines if x.startswith("saved")]
        if done:
            saved = done[-1]
        in_progress = started[-1] if started and (not done or started[-1] > done[-1]) else None
        outcome["kills_mid_save"] += in_progress is not None
        if not path.exists():
            assert saved is None, f"{kill_at}: the file vanished after version {saved} was saved"
            outcome["absent"] += 1
        else:
            blocks = load_cache(path, pool, fingerprint="fp", agent_id="a")  # never raises
            candidates = [v for v in (saved, in_progress) if v is not None]
            matches = [v for v in candidates if blocks.token_ids == _expected_tokens(v)]
            assert len(matches) == 1, f"{kill_at}: the file is none of versions {candidates}"
            got = matches[0]
            for kv in pool.read_layers(blocks, range(4), 0, 1500):
                # every layer's K/V is of the same version as the token ids
                assert tuple(int(t) for t in kv.keys.view("<u2")[0, :, 0]) == blocks.token_ids
            outcome["new" if got == in_progress else "old"] += 1
            saved = got
            pool.release(blocks)
        max_temps = max(max_temps, len(list(tmp_path.glob(".*.tmp-*"))))
        version = (in_progress if in_progress is not None else (saved or 0)) + 1
    assert outcome["old"] + outcome["new"] + outcome["absent"] == len(plan)
    assert outcome["new"] >= 2 and outcome["old"] >= 10 and outcome["kills_mid_save"] >= 20
    # the next save removes the dead writers' temporary files
    tokens = _expected_tokens(version)
    storage = pool.storage
    assert isinstance(storage, FakeStorage)
    handle = pool.write_cache(
        "a", tokens, [LayerKV(i, 0, *storage._encode(i, tokens)) for i in range(4)]
    )
    save_cache(path, pool, handle, fingerprint="fp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
    print(f"\ncrash test: {len(plan)} kills, {outcome}, up to {max_temps} stray temp files")


def test_negative_control_saving_in_place_leaves_torn_files(tmp_path: Path) -> None:
    """The crash test can fail: without the temp file + rename, kills leave torn files."""
    from kvpool.testing import FakeStorage

    spec = ModelCacheSpec.uniform(4, 8, 128, dtype="float16", block_tokens=64)
    pool = BlockPool(spec, num_blocks=2 * spec.blocks_for(1500), storage=FakeStorage)
    path = tmp_path / "a.safetensors"
    rng = random.Random(99)
    plan = [
        ("in-place+files:_write_data:before", None),
        ("in-place+files:_write_data:after", None),
    ]
    plan += [("in-place", rng.uniform(0.05, 0.25)) for _ in range(6)]
    broken = []
    for version, (kill_at, delay) in enumerate(plan):
        _run_child(path, 10 * version, kill_at, delay)
        try:
            pool.release(load_cache(path, pool, fingerprint="fp"))
        except (CacheCorruptionError, FileNotFoundError):
            broken.append(kill_at)  # the old file is gone, the new one torn or missing
    print(f"\nnegative control: {len(broken)} of {len(plan)} kills left no loadable file")
    assert broken[:2] == [kill_at for kill_at, _ in plan[:2]]


# --------------------------------------------------------------------------- mlx-lm format


def generate_from_cache(
    loaded: LoadedModel, caches: list[Any], prefix: list[int], rest: list[int], n: int
) -> list[int]:
    """Greedy tokens from mlx-lm's BatchGenerator given a prompt cache for ``prefix``."""
    from mlx_lm.generate import BatchGenerator

    model, tokenizer, _ = loaded
    gen = BatchGenerator(model, stop_tokens=[[t] for t in sorted(tokenizer.eos_token_ids)])
    try:
        (uid,) = gen.insert([rest], max_tokens=[n], caches=[caches], all_tokens=[list(prefix)])
        out: list[int] = []
        while True:
            for r in gen.next()[1]:
                assert r.uid == uid
                out.append(int(r.token))
                if r.finish_reason is not None:
                    return out
    finally:
        gen.close()


@pytest.mark.parametrize("model_name", ["tiny_model", "tiny_swa_model"])
def test_export_loads_in_mlx_lm_and_imports_back(
    model_name: str, request: pytest.FixtureRequest, reference_generate: Reference, tmp_path: Path
) -> None:
    from mlx_lm.models.cache import KVCache, RotatingKVCache, load_prompt_cache

    loaded: LoadedModel = request.getfixturevalue(model_name)
    engine, pool, rng, first = first_turn(loaded, 300)
    blocks = first.blocks
    fp = model_fingerprint(loaded[0])
    path = tmp_path / "a.prompt.safetensors"
    export_prompt_cache(path, pool, blocks, fingerprint=fp)

    caches, metadata = load_prompt_cache(str(path), return_metadata=True)  # mlx-lm's own loader
    assert json.loads(metadata["kvpool_token_ids"]) == list(blocks.token_ids)
    for cache, layer in zip(caches, pool.spec.layers, strict=True):
        assert type(cache) is (KVCache if layer.window is None else RotatingKVCache)
        assert cache.offset == blocks.total_tokens
    prefix = list(blocks.token_ids)
    rest = words(rng, loaded[1], 30)
    expected = fresh(reference_generate, loaded, [*prefix, *rest], 8)
    assert generate_from_cache(loaded, caches, prefix, rest, 8) == expected

    # and back: an imported cache serves the engine like the original
    pool.release(blocks)
    imported = import_prompt_cache(path, pool, fingerprint=fp)
    assert (imported.agent_id, imported.token_ids) == ("a", blocks.token_ids)
    engine.submit("a", [*prefix, *rest], imported, max_tokens=8)
    (second,) = engine.drain()
    assert second.cached_tokens == len(prefix) and list(second.token_ids) == expected
    with pytest.raises(IncompatibleCacheError):
        import_prompt_cache(path, pool, fingerprint="sha256:other")


def test_import_of_a_cache_mlx_lm_built_itself(tiny_swa_model: LoadedModel, tmp_path: Path) -> None:
    """A plain mlx-lm prompt cache (rotating layers wrapped around) imports with its tokens."""
    from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache

    model, tokenizer, _ = tiny_swa_model
    rng = random.Random(9)
    prompt = words(rng, tokenizer, 200)
    caches = make_prompt_cache(model)
    for i in range(0, 180, 36):  # prefill in chunks, then decode-style steps: the rotating
        model(mx.array([prompt[i : i + 36]]), cache=caches)  # caches wrap around
    for t in prompt[180:]:
        model(mx.array([[t]]), cache=caches)
    rotating = [c for c in caches if hasattr(c, "max_size")]
    assert rotating and all(0 < c._idx < c.keys.shape[2] for c in rotating)  # wrapped
    mx.eval([(c.keys, c.values) for c in caches])
    path = tmp_path / "plain.safetensors"
    save_prompt_cache(str(path), caches)

    engine, pool = make_engine(tiny_swa_model, 16)
    with pytest.raises(InvalidRequestError, match="token"):
        import_prompt_cache(path, pool, agent_id="p")
    blocks = import_prompt_cache(path, pool, agent_id="p", token_ids=prompt)
    assert blocks.total_tokens == 200 and sliding_valid_from(pool, blocks) > 0
    rest = words(rng, tokenizer, 20)
    engine.submit("p", [*prompt, *rest], blocks, max_tokens=8)
    (done,) = engine.drain()
    assert done.cached_tokens == 200
    # the engine continues exactly as mlx-lm does from the same file
    expected = generate_from_cache(tiny_swa_model, load_prompt_cache(str(path)), prompt, rest, 8)
    assert list(done.token_ids) == expected
    with pytest.raises(IncompatibleCacheError, match="holds"):
        import_prompt_cache(path, pool, agent_id="p", token_ids=prompt[:-1])
