"""Hardening (issue 11) of persistence and the store on the fakes: odd files, hostile
headers, a full disk, a missing fingerprint, use from a second thread."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from fakes import SPEC, fake_engine, prompt_of, run_one

from kvpool import (
    BlockPool,
    CacheCorruptionError,
    CompletedGeneration,
    InvalidRequestError,
)
from kvpool.persist import (
    _header_digest,
    cache_path,
    load_cache,
    read_cache_info,
    save_cache,
    verify_cache,
)
from kvpool.store import AgentCacheStore, Tier
from kvpool.testing import (
    FakeModel,
    FakeStorage,
    reference_tokens,
)

FP = "sha256:fake-model"
ROOT = Path(__file__).resolve().parents[2]


def make_store(directory: Path, num_blocks: int = 64) -> AgentCacheStore:
    return AgentCacheStore(fake_engine(SPEC, num_blocks), directory, fingerprint=FP)


def run(
    store: AgentCacheStore, agent: str, prompt: Sequence[int], max_tokens: int = 3
) -> CompletedGeneration:
    return run_one(store, agent, prompt, max_tokens)


def set_aside(path: Path) -> Path:
    return path.with_name(path.name + ".corrupt")


class FifoWatchdog:
    """Unblocks a reader stuck on ``fifo`` after ``seconds`` (by opening it for writing) and
    remembers that it had to: a test fails instead of hanging on code that blocks."""

    def __init__(self, fifo: Path, seconds: float = 10) -> None:
        self.fifo = fifo
        self.fired = False
        self._timer = threading.Timer(seconds, self._unblock)

    def _unblock(self) -> None:
        try:
            fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # no reader (ENXIO) or no FIFO any more
            return
        self.fired = True
        os.close(fd)

    def __enter__(self) -> FifoWatchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        assert not self.fired, f"blocked reading the FIFO {self.fifo}"


def saved_cache(directory: Path, agent: str = "a") -> Path:
    store = make_store(directory)
    run(store, agent, prompt_of(10))
    store.close()
    return cache_path(directory, agent)


# --------------------------------------------------------------------------- item 5


def test_a_dangling_symlink_under_a_cache_name_is_set_aside(tmp_path: Path) -> None:
    path = cache_path(tmp_path, "a")
    path.symlink_to(tmp_path / "nowhere")
    store = make_store(tmp_path)  # raised FileNotFoundError
    assert store.stats.num_set_aside == 1 and store.tier("a") is None
    assert set_aside(path).is_symlink() and not path.exists() and not path.is_symlink()
    done = run(store, "a", prompt_of(10))
    assert done.cached_tokens == 0 and store.stats.num_misses == 1
    assert store.evict("a") and read_cache_info(path).agent_id == "a"  # saves work
    assert run(store, "a", prompt_of(12)).cached_tokens > 0


def test_a_directory_under_a_cache_name_is_set_aside(tmp_path: Path) -> None:
    path = cache_path(tmp_path, "a")
    path.mkdir()
    (path / "inside").write_text("keep me")
    store = make_store(tmp_path)
    done = run(store, "a", prompt_of(10))  # raised IsADirectoryError
    assert done.cached_tokens == 0 and store.stats.num_set_aside == 1
    assert (set_aside(path) / "inside").read_text() == "keep me"  # moved, not deleted
    store.close()
    assert read_cache_info(path).agent_id == "a"


def test_a_fifo_under_a_cache_name_never_blocks_the_store(tmp_path: Path) -> None:
    path = cache_path(tmp_path, "a")
    os.mkfifo(path)
    with FifoWatchdog(path):
        store = make_store(tmp_path)
    assert store.stats.num_set_aside == 1 and store.tier("a") is None
    assert run(store, "a", prompt_of(10)).cached_tokens == 0


def test_a_fifo_swapped_in_after_the_scan_is_refused_without_blocking(tmp_path: Path) -> None:
    path = saved_cache(tmp_path)
    store = make_store(tmp_path)
    assert store.tier("a") is Tier.COLD
    path.unlink()
    os.mkfifo(path)
    with FifoWatchdog(path):
        done = run(store, "a", prompt_of(10))
    assert done.cached_tokens == 0
    assert (store.stats.num_load_errors, store.stats.num_set_aside) == (1, 1)
    assert set_aside(path).exists() and not path.exists()


def test_load_cache_and_friends_refuse_non_regular_files_without_blocking(
    tmp_path: Path,
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    pool = BlockPool(SPEC, num_blocks=8, storage=FakeStorage)
    for call in (
        lambda p: load_cache(p, pool, fingerprint=FP),
        read_cache_info,
        verify_cache,
    ):
        for bad, kind in ((fifo, "a FIFO"), (tmp_path, "a directory")):
            with FifoWatchdog(fifo), pytest.raises(CacheCorruptionError, match=f"but {kind}"):
                call(bad)
    assert pool.num_used == 0
    with pytest.raises(FileNotFoundError):
        load_cache(tmp_path / "missing", pool, fingerprint=FP)


def test_an_unreadable_file_is_a_corruption_error(tmp_path: Path) -> None:
    path = saved_cache(tmp_path)
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as a user who reads any file (root)")
        with pytest.raises(CacheCorruptionError, match="cannot be read"):
            read_cache_info(path)
    finally:
        path.chmod(0o644)


def _nested_header_file(path: Path, depth: int) -> None:
    header = b"[" * depth + b"]" * depth
    path.write_bytes(struct.pack("<Q", len(header)) + header)


def test_a_deeply_nested_header_is_corrupt_not_a_recursion_error(tmp_path: Path) -> None:
    path = tmp_path / "nested.kvcache.safetensors"
    _nested_header_file(path, 200_000)
    with pytest.raises(CacheCorruptionError, match="nested 200000 levels deep"):
        read_cache_info(path)
    _nested_header_file(path, 9)  # just past the bound: refused before parsing
    with pytest.raises(CacheCorruptionError, match="nested 9 levels deep"):
        read_cache_info(path)
    _nested_header_file(path, 8)  # within it: parsed, and then not a cache header
    with pytest.raises(CacheCorruptionError, match="__metadata__"):
        read_cache_info(path)


def test_deep_json_inside_a_checksummed_metadata_value_is_corrupt(tmp_path: Path) -> None:
    """A hostile writer can compute a valid header checksum: the JSON strings inside the
    metadata are bounded as well."""
    good = saved_cache(tmp_path)
    (length,) = struct.unpack("<Q", good.read_bytes()[:8])
    header = json.loads(good.read_bytes()[8 : 8 + length])
    for key in ("tensor_sha256", "spec"):
        meta = dict(header["__metadata__"], **{key: "[" * 100_000 + "]" * 100_000})
        hostile = {**header, "__metadata__": meta}
        hostile["__metadata__"]["header_sha256"] = _header_digest(hostile)
        raw = json.dumps(hostile).encode()
        path = tmp_path / f"hostile-{key}.kvcache.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw)
        with pytest.raises(CacheCorruptionError, match="bad metadata"):
            read_cache_info(path)


def test_a_hostile_cold_file_is_set_aside_and_the_agent_starts_fresh(tmp_path: Path) -> None:
    path = cache_path(tmp_path, "a")
    _nested_header_file(path, 200_000)
    store = make_store(tmp_path)
    done = run(store, "a", prompt_of(10))  # raised RecursionError; the file stayed
    assert done.cached_tokens == 0
    assert list(done.token_ids) == reference_tokens(FakeModel(SPEC), prompt_of(10), 3)
    stats = store.stats
    assert (stats.num_misses, stats.num_load_errors, stats.num_set_aside) == (1, 1, 1)
    assert set_aside(path).read_bytes()[8:9] == b"[" and not path.exists()
    # a later set-aside of the same agent replaces the earlier one: one .corrupt per agent
    _nested_header_file(path, 50)
    second = make_store(tmp_path)
    run(second, "a", prompt_of(10))
    assert second.stats.num_set_aside == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [set_aside(path).name]
    assert set_aside(path).read_bytes()[8 + 49 : 8 + 51] == b"[]"  # the newer one


def test_a_file_that_fails_its_checksum_is_set_aside_not_deleted(tmp_path: Path) -> None:
    path = saved_cache(tmp_path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    store = make_store(tmp_path)
    assert run(store, "a", prompt_of(10)).cached_tokens == 0
    assert set_aside(path).read_bytes() == bytes(data)
    assert store.stats.num_set_aside == 1 and store.stats.bytes_on_disk == 0


def test_a_file_in_place_of_the_cache_directory_is_an_invalid_request(tmp_path: Path) -> None:
    (tmp_path / "caches").write_text("not a directory")
    with pytest.raises(InvalidRequestError, match="cannot be used"):
        make_store(tmp_path / "caches")


# --------------------------------------------------------------------------- item 6


def test_saving_without_a_fingerprint_is_refused(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    blocks = run(store, "a", prompt_of(10)).blocks
    assert blocks is not None
    for bad in (None, "", 5):
        with pytest.raises(InvalidRequestError, match="fingerprint"):
            save_cache(tmp_path / "x.kvcache", store.pool, blocks, fingerprint=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match="fingerprint"):
            load_cache(tmp_path / "x.kvcache", store.pool, fingerprint=bad)  # type: ignore[arg-type]
    assert not (tmp_path / "x.kvcache").exists()
    assert save_cache(tmp_path / "x.kvcache", store.pool, blocks, fingerprint=FP) > 0


_FULL_DISK_CHILD = textwrap.dedent(
    """
    import hashlib, json, os, resource, signal, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from test_hardening_store import make_store, prompt_of, run
    from kvpool.persist import cache_path, save_cache
    from kvpool.store import Tier

    directory = Path(sys.argv[1])
    store = make_store(directory)
    short = run(store, "a", prompt_of(6)).blocks
    path = cache_path(directory, "a")
    size = save_cache(path, store.pool, short, fingerprint="sha256:fake-model")
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    long = run(store, "a", [*short.token_ids, *prompt_of(200, seed=2)]).blocks
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails: EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 1000, resource.RLIM_INFINITY))
    out = {}
    try:
        save_cache(path, store.pool, long, fingerprint="sha256:fake-model")
    except Exception as exc:
        out["save"] = [type(exc).__name__, str(exc), getattr(exc, "errno", None)]
    try:
        store.evict("a")  # the store's own save
    except Exception as exc:
        out["evict"] = [type(exc).__name__, str(exc)]
    out["tier"] = store.tier("a").value
    out["intact"] = hashlib.sha256(path.read_bytes()).hexdigest() == before
    out["files"] = sorted(p.name for p in directory.iterdir())
    # a pool budget that cannot evict (the disk is full) does not lose the completion
    budget = make_store(directory / "budget")
    budget.max_pool_bytes = 0
    b = run(budget, "b", prompt_of(200, seed=3))
    out["budget"] = [budget.tier("b").value, budget.stats.num_evictions]
    budget.submit("b", [*b.blocks.token_ids, 5], 2)  # b was checked in
    out["budget_next"] = budget.drain()[0].cached_tokens == b.blocks.total_tokens
    print(json.dumps(out))
    """
)


def test_a_full_disk_is_a_cache_write_error_naming_the_file(tmp_path: Path) -> None:
    """RLIMIT_FSIZE in a child process stands in for a full disk (ENOSPC and EFBIG both
    reach save_cache as an OSError from write)."""
    result = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_CHILD, str(tmp_path), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    out = json.loads(result.stdout)
    path = cache_path(tmp_path, "a")
    for key in ("save", "evict"):
        name, message = out[key][:2]
        assert name == "CacheWriteError", out
        assert str(path) in message and "intact" in message
    assert out["save"][2] == 27  # EFBIG, kept on the error
    assert out["tier"] == "hot"  # the failed eviction freed nothing
    assert out["intact"] and out["files"] == [path.name]  # no temp file left
    assert out["budget"] == ["hot", 0] and out["budget_next"]


# --------------------------------------------------------------------------- item 7


def test_the_store_refuses_calls_from_another_thread(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    blocks = run(store, "a", prompt_of(10)).blocks
    assert blocks is not None
    calls: dict[str, Callable[[], object]] = {
        "submit": lambda: store.submit("b", prompt_of(5), 2),
        "step": store.step,
        "drain": store.drain,
        "run_turns": lambda: store.run_turns({"b": prompt_of(5)}, 2),
        "cancel": lambda: store.cancel(0),
        "get": lambda: store.get("a"),
        "put_back": lambda: store.put_back("a"),
        "evict": lambda: store.evict("a"),
        "flush": store.flush,
        "close": store.close,
        "forget": lambda: store.forget("a"),
        "tier": lambda: store.tier("a"),
        "stats": lambda: store.stats,
    }
    errors: dict[str, BaseException | None] = {}

    def other() -> None:
        for name, call in calls.items():
            try:
                call()
                errors[name] = None
            except BaseException as exc:
                errors[name] = exc

    thread = threading.Thread(target=other, name="intruder")
    thread.start()
    thread.join()
    for name, exc in errors.items():
        assert isinstance(exc, InvalidRequestError), (name, exc)
        assert "not thread-safe" in str(exc) and "'intruder'" in str(exc), str(exc)
    assert sorted(errors) == sorted(calls)
    # nothing changed: the owner thread goes on
    assert store.tier("a") is Tier.HOT and store.stats.num_evictions == 0
    assert run(store, "a", [*blocks.token_ids, 7]).cached_tokens == blocks.total_tokens
