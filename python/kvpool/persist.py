"""Agent caches on disk: one safetensors file per agent, written atomically, checked on load.

A file holds an agent's token ids and, for every layer, the K/V of the positions its blocks
hold, plus (in the safetensors metadata) the format version, the cache spec, the model
fingerprint, a sha256 per tensor and a sha256 of the header. ``docs/CACHE_FORMAT.md``
describes it byte by byte. In short::

    u64 header length | JSON header (padded with spaces to 8 bytes) | tensor data
    tensors, in file order:  token_ids          U32 [num_tokens]
                             layers.{i}.keys    F32|F16|BF16 [n_kv_heads, T_i, k_head_dim]
                             layers.{i}.values  F32|F16|BF16 [n_kv_heads, T_i, v_head_dim]
    T_i = num_tokens (global layer) or num_tokens - sliding_valid_from (sliding layer)

Guarantees:

* Atomic: :func:`save_cache` writes a temporary file in the same directory, fsyncs it,
  renames it over the old file and fsyncs the directory. A crash at any point leaves the old
  file or the new one at ``path``, never a mix; stray temporary files are removed by the next
  save (or :func:`remove_stale_temp_files`) once their writer is dead.
* Checked: :func:`load_cache` verifies the header checksum, that the tensor table is exactly
  the one the metadata implies (names, dtypes, shapes, offsets, file size) and every tensor's
  sha256; any failure raises :class:`CacheCorruptionError` naming the file. A cache written for
  another model (fingerprint) or another layout (geometry, block size, dtype) raises
  :class:`IncompatibleCacheError`. The pool is unchanged when either is raised.
* Bounded memory: K/V move layer by layer (``KVStorage.read_layers`` / ``write_layers``),
  hashed on two threads while the next layer is written or read, so saving or loading an
  agent never holds a second copy of it in memory.

MLX is imported only by :func:`model_fingerprint`, :func:`export_prompt_cache` and
:func:`import_prompt_cache` (the first two need a model or real arrays anyway): saving and
loading run on any :class:`~kvpool.storage.KVStorage`, including the MLX-free fake.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import secrets
import stat
import struct
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from kvpool.cache.manager import PoolFull, Reservation
from kvpool.cache.tables import CacheHandle
from kvpool.errors import (
    CacheCorruptionError,
    CacheWriteError,
    IncompatibleCacheError,
    InvalidRequestError,
    KvpoolError,
)
from kvpool.pool import BlockPool
from kvpool.spec import AttentionKind, LayerSpec, ModelCacheSpec
from kvpool.storage import HostArray, LayerKV, host_dtype
from kvpool.validation import validate_agent_id, validate_token_ids

__all__ = [
    "FILE_SUFFIX",
    "FORMAT",
    "FORMAT_VERSION",
    "CacheInfo",
    "agent_id_of",
    "cache_path",
    "export_prompt_cache",
    "import_prompt_cache",
    "load_cache",
    "model_fingerprint",
    "read_cache_info",
    "remove_stale_temp_files",
    "save_cache",
    "verify_cache",
]

FORMAT = "kvpool-agent-cache"
FORMAT_VERSION = 1
FILE_SUFFIX = ".kvcache.safetensors"
PROMPT_CACHE_FORMAT = "kvpool-mlx-prompt-cache"

_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_TOKEN_DTYPE = "U32"
_DIGEST_PLACEHOLDER = "0" * 64
_MAX_HEADER_BYTES = 16 << 20
_MAX_JSON_DEPTH = 8  # the format nests 3 deep; deeper JSON is refused before it is parsed
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_SAVE_CHUNK_BYTES = 64 << 20  # K/V gathered per read_layers call when saving
_HASH_THREADS = 2
_THREAD_HASH_BYTES = 1 << 20  # smaller tensors are hashed inline: a thread costs more
_FINGERPRINT_SAMPLES = 1024  # elements sampled from each parameter
# Temporary files: ".{final name}.tmp-{pid}-{8 hex}.safetensors" (the suffix keeps
# mx.save_safetensors from appending one). Hidden names never collide with agent files.
_TEMP_RE = re.compile(r"\.(?P<final>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}\.safetensors")

if sys.byteorder != "little":  # safetensors is little-endian; host arrays are native
    raise ImportError("kvpool.persist supports little-endian hosts only")


# --------------------------------------------------------------------------- names


def cache_path(directory: str | os.PathLike[str], agent_id: str) -> Path:
    """The file of ``agent_id`` in ``directory``: ``{agent_id}.{h}.kvcache.safetensors``.

    ``agent_id`` is validated (:func:`~kvpool.validation.validate_agent_id`: no ``/``,
    ``..``, NUL or leading dot), so the path never leaves ``directory``. ``h`` is the first 8
    hex digits of the id's sha256: ids that differ only in case get different files on
    case-insensitive file systems (macOS).
    """
    validate_agent_id(agent_id)
    return Path(directory) / f"{agent_id}.{_id_hash(agent_id)}{FILE_SUFFIX}"


def agent_id_of(path: str | os.PathLike[str]) -> str | None:
    """The agent id a :func:`cache_path` file name encodes, or None for any other name."""
    name = Path(path).name
    if not name.endswith(FILE_SUFFIX):
        return None
    agent_id, _, digest = name[: -len(FILE_SUFFIX)].rpartition(".")
    try:
        validate_agent_id(agent_id)
    except InvalidRequestError:
        return None
    return agent_id if digest == _id_hash(agent_id) else None


def _id_hash(agent_id: str) -> str:
    return hashlib.sha256(agent_id.encode()).hexdigest()[:8]


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True, slots=True)
class _Tensor:
    """One tensor of a cache file; ``begin``/``end`` are offsets into the data section."""

    name: str
    dtype: str  # safetensors dtype tag
    shape: tuple[int, ...]
    begin: int
    end: int
    layer: int | None = None  # None for token_ids
    start: int = 0  # first position held (layers)
    sha256: str = ""  # hex digest of the data, once known

    def header_entry(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "data_offsets": [self.begin, self.end],
        }


def _layer_start(layer: LayerSpec, sliding_valid_from: int) -> int:
    return sliding_valid_from if layer.kind is AttentionKind.SLIDING else 0


def _plan(spec: ModelCacheSpec, num_tokens: int, sliding_valid_from: int) -> list[_Tensor]:
    """Every tensor of the file, in file order, with its offsets."""
    tensors: list[_Tensor] = []
    offset = 0

    def add(name: str, dtype: str, shape: tuple[int, ...], itemsize: int, **kw: Any) -> None:
        nonlocal offset
        nbytes = itemsize * int(np.prod(shape, dtype=np.int64))
        tensors.append(_Tensor(name, dtype, shape, offset, offset + nbytes, **kw))
        offset += nbytes

    add("token_ids", _TOKEN_DTYPE, (num_tokens,), 4)
    code, itemsize = _ST_DTYPES[spec.dtype], spec.itemsize
    for i, layer in enumerate(spec.layers):
        start = _layer_start(layer, sliding_valid_from)
        n = num_tokens - start
        for part, dim in (("keys", layer.k_head_dim), ("values", layer.v_head_dim)):
            shape = (layer.n_kv_heads, n, dim)
            add(f"layers.{i}.{part}", code, shape, itemsize, layer=i, start=start)
    return tensors


def _spec_to_json(spec: ModelCacheSpec) -> str:
    layers = [
        {
            "kind": layer.kind.value,
            "n_kv_heads": layer.n_kv_heads,
            "k_head_dim": layer.k_head_dim,
            "v_head_dim": layer.v_head_dim,
            "window": layer.window,
        }
        for layer in spec.layers
    ]
    return _canonical({"dtype": spec.dtype, "block_tokens": spec.block_tokens, "layers": layers})


def _spec_from_json(text: str) -> ModelCacheSpec:
    raw = _parse_json(text)
    layers = tuple(
        LayerSpec(
            AttentionKind(d["kind"]),
            int(d["n_kv_heads"]),
            int(d["k_head_dim"]),
            int(d["v_head_dim"]),
            None if d["window"] is None else int(d["window"]),
        )
        for d in raw["layers"]
    )
    return ModelCacheSpec(layers, str(raw["dtype"]), int(raw["block_tokens"]))


def _spec_difference(saved: ModelCacheSpec, pool: ModelCacheSpec) -> str:
    if saved.block_tokens != pool.block_tokens:
        return f"block_tokens {saved.block_tokens} vs {pool.block_tokens}"
    if saved.dtype != pool.dtype:
        return f"dtype {saved.dtype} vs {pool.dtype}"
    if saved.n_layers != pool.n_layers:
        return f"{saved.n_layers} layers vs {pool.n_layers}"
    i = next(i for i, (a, b) in enumerate(zip(saved.layers, pool.layers, strict=True)) if a != b)
    return f"layer {i}: {saved.layers[i]} vs {pool.layers[i]}"


def _parse_json(text: str, **kwargs: Any) -> Any:
    """``json.loads(text)``, but ValueError for JSON nested deeper than ``_MAX_JSON_DEPTH``.

    The depth is measured before parsing (brackets outside strings), so a file of
    ``[[[[...]]]]`` cannot drive the parser into a RecursionError.
    """
    skeleton = np.frombuffer(_JSON_STRING.sub('""', text).encode(), np.uint8)
    if skeleton.size:
        opens = np.isin(skeleton, np.frombuffer(b"[{", np.uint8)).astype(np.int64)
        closes = np.isin(skeleton, np.frombuffer(b"]}", np.uint8))
        depth = int(np.cumsum(opens - closes).max())
        if depth > _MAX_JSON_DEPTH:
            raise ValueError(f"JSON nested {depth} levels deep (at most {_MAX_JSON_DEPTH})")
    return json.loads(text, **kwargs)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _header_dict(metadata: dict[str, str], tensors: Sequence[_Tensor]) -> dict[str, Any]:
    header: dict[str, Any] = {"__metadata__": metadata}
    header.update((t.name, t.header_entry()) for t in tensors)
    return header


def _header_digest(header: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the header without ``header_sha256`` itself."""
    meta = {k: v for k, v in header["__metadata__"].items() if k != "header_sha256"}
    return hashlib.sha256(_canonical({**header, "__metadata__": meta}).encode()).hexdigest()


def _encode_header(metadata: dict[str, str], tensors: Sequence[_Tensor]) -> bytes:
    """The header as written: compact JSON, space-padded to a multiple of 8 bytes."""
    header = _header_dict(metadata, tensors)
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    return encoded + b" " * (-len(encoded) % 8)


# --------------------------------------------------------------------------- info


@dataclass(frozen=True, slots=True)
class CacheInfo:
    """What a cache file's header says (checked: checksum, layout, size)."""

    path: Path
    agent_id: str
    num_tokens: int
    sliding_valid_from: int
    spec: ModelCacheSpec
    fingerprint: str
    format_version: int
    file_bytes: int
    data_offset: int  # where the data section starts
    tensors: tuple[_Tensor, ...]  # in file order, with their recorded sha256

    @property
    def num_blocks(self) -> int:
        return self.spec.blocks_for(self.num_tokens)

    def check_compatible(self, spec: ModelCacheSpec, fingerprint: str) -> None:
        """Raise IncompatibleCacheError unless the cache fits this model and pool layout."""
        if self.fingerprint != fingerprint:
            raise IncompatibleCacheError(
                f"{self.path}: written for model {self.fingerprint}, not this model ({fingerprint})"
            )
        if self.spec != spec:
            raise IncompatibleCacheError(
                f"{self.path}: cache layout differs from the pool's: "
                f"{_spec_difference(self.spec, spec)}"
            )


def read_cache_info(path: str | os.PathLike[str]) -> CacheInfo:
    """Read and check a cache file's header (not its data).

    Raises CacheCorruptionError (unreadable, truncated, bad checksum, inconsistent layout)
    or IncompatibleCacheError (a newer format version).
    """
    path = Path(path)
    with _open_cache_file(path) as f:
        return _read_header(f, path)


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return kind
    return f"of mode {mode:o}"


def _require_regular(path: Path, mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise CacheCorruptionError(f"{path}: not a regular file but {_file_kind(mode)}")


def _open_cache_file(path: Path) -> io.BufferedReader:
    """``path`` opened for reading, if it is a regular file (symlinks followed).

    Anything else (a FIFO, a device, a directory) raises CacheCorruptionError without a
    blocking open or read: the type is checked on ``stat``, the file opened with
    ``O_NONBLOCK`` (which regular files ignore) and checked again on the descriptor, so a
    FIFO swapped in between cannot block either. An unreadable file (permissions, I/O
    error) is a CacheCorruptionError too; a missing one raises FileNotFoundError.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        _require_regular(path, os.stat(path).st_mode)
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CacheCorruptionError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    try:
        _require_regular(path, os.fstat(fd).st_mode)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate keys")
    return out


def _read_header(f: io.BufferedReader, path: Path) -> CacheInfo:
    def corrupt(what: str) -> CacheCorruptionError:
        return CacheCorruptionError(f"{path}: {what}")

    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise corrupt(f"truncated: {size} bytes, no safetensors header")
    (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len > min(_MAX_HEADER_BYTES, size - 8):
        raise corrupt(f"header length {header_len} does not fit a file of {size} bytes")
    raw = f.read(header_len)
    if len(raw) != header_len:
        raise corrupt(f"truncated header: {len(raw)} of {header_len} bytes")
    try:
        header = _parse_json(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError, JSONDecodeError too
        raise corrupt(f"header is not valid JSON ({exc})") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise corrupt("no string-valued __metadata__ in the header")
    if "header_sha256" not in meta:
        raise corrupt(f"no header_sha256: not a {FORMAT} file")
    if meta["header_sha256"] != _header_digest(header):
        raise corrupt("header checksum mismatch")
    # From here on the header is what a writer wrote: what is left to catch is a writer
    # of another format or version, or one that wrote an inconsistent file.
    if meta.get("format") != FORMAT:
        raise corrupt(f"format is {meta.get('format')!r}, not {FORMAT!r}")
    try:
        version = int(meta["format_version"])
        if version > FORMAT_VERSION:
            raise IncompatibleCacheError(
                f"{path}: format version {version} is newer than this kvpool reads "
                f"({FORMAT_VERSION})"
            )
        agent_id = validate_agent_id(meta["agent_id"])
        num_tokens, valid_from = int(meta["num_tokens"]), int(meta["sliding_valid_from"])
        spec = _spec_from_json(meta["spec"])
        fingerprint = meta["model_fingerprint"]
        digests = _parse_json(meta["tensor_sha256"])
    except IncompatibleCacheError:
        raise
    except (KeyError, ValueError, TypeError, AttributeError, RecursionError, KvpoolError) as exc:
        raise corrupt(f"bad metadata: {exc!r}") from exc
    if not 0 <= valid_from <= num_tokens or num_tokens < 1:
        raise corrupt(f"num_tokens {num_tokens}, sliding_valid_from {valid_from}")
    expected = _plan(spec, num_tokens, valid_from)
    found = {k: v for k, v in header.items() if k != "__metadata__"}
    for tensor in expected:
        entry = found.pop(tensor.name, None)
        if entry != tensor.header_entry():
            raise corrupt(f"tensor {tensor.name}: expected {tensor.header_entry()}, found {entry}")
    if found:
        raise corrupt(f"unexpected tensors {sorted(found)}")
    if not isinstance(digests, dict) or set(digests) != {t.name for t in expected}:
        raise corrupt("tensor_sha256 does not list exactly the file's tensors")
    if not all(isinstance(d, str) and len(d) == 64 for d in digests.values()):
        raise corrupt("tensor_sha256 holds something other than sha256 hex digests")
    data_offset = 8 + header_len
    if data_offset + expected[-1].end != size:
        raise corrupt(
            f"file is {size} bytes, its header describes {data_offset + expected[-1].end}"
        )
    tensors = tuple(dataclasses.replace(t, sha256=digests[t.name]) for t in expected)
    return CacheInfo(
        path, agent_id, num_tokens, valid_from, spec, fingerprint, version, size, data_offset,
        tensors,
    )  # fmt: skip


# --------------------------------------------------------------------------- atomic files


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if sys.platform == "darwin":  # fsync does not reach the disk on macOS
            import fcntl

            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
        else:
            os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` creates a temporary file next to ``path``; it becomes ``path`` atomically.

    Order: make the directory, write, fsync the file, rename over ``path``, fsync the
    directory. On any error the temporary file is removed and ``path`` is untouched; an
    OSError (a full disk, permissions) is raised as CacheWriteError naming ``path``.
    """
    directory = path.parent
    tmp = directory / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}.safetensors"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(directory, path.name)
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, KvpoolError):
            raise _write_error(path, exc, "the old file, if any, is intact") from exc
        raise
    try:
        _fsync_dir(directory)
    except OSError as exc:
        raise _write_error(path, exc, "written, but its directory could not be synced") from exc


def _write_error(path: Path, exc: OSError, what: str) -> CacheWriteError:
    error = CacheWriteError(f"could not write {path}: {exc.strerror or exc} ({what})")
    error.errno = exc.errno
    return error


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temp_files(
    directory: str | os.PathLike[str], final_name: str | None = None
) -> int:
    """Delete temporary files whose writer process is gone; returns how many.

    Only names this module creates are touched; ``final_name`` limits it to the temporaries
    of one file. A live writer's temporary file is left alone.
    """
    removed = 0
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    for name in names:
        match = _TEMP_RE.fullmatch(name)
        if match is None or (final_name is not None and match["final"] != final_name):
            continue
        if _pid_alive(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):  # gone already, or not a file we could remove
            os.unlink(Path(directory) / name)
            removed += 1
    return removed


# --------------------------------------------------------------------------- hashing


def _bytes_of(array: HostArray) -> memoryview:
    """The array's bytes, without a copy when it is C-contiguous."""
    return np.ascontiguousarray(array).data.cast("B")


def _sha256(array: HostArray) -> str:
    return hashlib.sha256(_bytes_of(array)).hexdigest()


_executor: tuple[int, ThreadPoolExecutor] | None = None  # (pid that made it, executor)
_executor_lock = threading.Lock()


def _hash_async(array: HostArray) -> Future[str]:
    """sha256 of ``array``: on a shared thread pool (hashlib releases the GIL) if large."""
    global _executor
    if array.nbytes < _THREAD_HASH_BYTES:
        done: Future[str] = Future()
        done.set_result(_sha256(array))
        return done
    with _executor_lock:
        if _executor is None or _executor[0] != os.getpid():  # none yet, or we were forked
            pool = ThreadPoolExecutor(_HASH_THREADS, thread_name_prefix="kvpool-hash")
            _executor = (os.getpid(), pool)
        executor = _executor[1]
    return executor.submit(_sha256, array)


class _Hasher:
    """sha256 of tensors in the background, for saving.

    ``window`` bounds how many groups of tensors may wait to be hashed, which bounds the
    memory their arrays hold.
    """

    def __init__(self, window: int = 2) -> None:
        self._window = window
        self._groups: deque[list[Future[str]]] = deque()
        self.name_to_digest: dict[str, Future[str]] = {}

    def add_group(self, named: Sequence[tuple[str, HostArray]]) -> None:
        group = []
        for name, array in named:
            future = _hash_async(array)
            self.name_to_digest[name] = future
            group.append(future)
        self._groups.append(group)
        while len(self._groups) > self._window:
            for future in self._groups.popleft():
                future.result()

    def digests(self) -> dict[str, str]:
        return {name: future.result() for name, future in self.name_to_digest.items()}


# --------------------------------------------------------------------------- save


def sliding_valid_from(pool: BlockPool, handle: CacheHandle) -> int:
    """First position every sliding layer of ``handle`` holds (0 without sliding layers)."""
    return max(
        (t.valid_from for g, t in zip(pool.spec.groups, handle.tables, strict=True) if g.window),
        default=0,
    )


def save_cache(
    path: str | os.PathLike[str], pool: BlockPool, blocks: CacheHandle, *, fingerprint: str
) -> int:
    """Write ``blocks`` (live in ``pool``) to ``path`` atomically; returns the file's size.

    ``fingerprint`` identifies the model (:func:`model_fingerprint`): a non-empty string,
    else InvalidRequestError (a file without one could never be loaded). The blocks are
    only read: the agent's cache stays in the pool. A failed write (a full disk) raises
    CacheWriteError and leaves the old file intact.
    """
    path = Path(path)
    _check_fingerprint(fingerprint)
    validate_agent_id(blocks.agent_id)
    pool.check_live(blocks)
    if blocks.total_tokens == 0:
        raise InvalidRequestError(f"the cache of agent {blocks.agent_id!r} holds no tokens")
    spec = pool.spec
    valid_from = sliding_valid_from(pool, blocks)
    tensors = _plan(spec, blocks.total_tokens, valid_from)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "agent_id": blocks.agent_id,
        "num_tokens": str(blocks.total_tokens),
        "sliding_valid_from": str(valid_from),
        "spec": _spec_to_json(spec),
        "model_fingerprint": fingerprint,
        "created_by": _created_by(),
        "tensor_sha256": _canonical(dict.fromkeys((t.name for t in tensors), _DIGEST_PLACEHOLDER)),
        "header_sha256": _DIGEST_PLACEHOLDER,
    }
    # Digests are fixed-length hex, so the header's length is known before the data is
    # hashed: the data goes first, the header is written over the reserved space last.
    header_len = len(_encode_header(metadata, tensors))

    def write(tmp: Path) -> None:
        with tmp.open("xb") as f:
            f.seek(8 + header_len)
            digests = _write_data(f, pool, blocks, tensors)
            metadata["tensor_sha256"] = _canonical(digests)
            metadata["header_sha256"] = _header_digest(_header_dict(metadata, tensors))
            encoded = _encode_header(metadata, tensors)
            assert len(encoded) == header_len, "header length changed: this indicates a bug"
            f.seek(0)
            f.write(struct.pack("<Q", header_len))
            f.write(encoded)

    _atomic_write(path, write)
    return 8 + header_len + tensors[-1].end


def _check_fingerprint(fingerprint: object) -> None:
    if not isinstance(fingerprint, str) or not fingerprint:
        raise InvalidRequestError(
            f"fingerprint must be a non-empty string (model_fingerprint(model)), got "
            f"{fingerprint!r}"
        )


def _created_by() -> str:
    import kvpool

    return f"kvpool {kvpool.__version__}"


def _save_chunks(tensors: Sequence[_Tensor]) -> Iterator[tuple[list[int], int]]:
    """(layers, start) groups of consecutive layers sharing a start, ~_SAVE_CHUNK_BYTES each."""
    layers: list[int] = []
    start, nbytes = 0, 0
    for t in tensors:
        if t.layer is None or t.name.endswith(".values"):
            continue
        size = 2 * (t.end - t.begin)  # keys and values (about)
        if layers and (t.start != start or nbytes + size > _SAVE_CHUNK_BYTES):
            yield layers, start
            layers, nbytes = [], 0
        if not layers:
            start = t.start
        layers.append(t.layer)
        nbytes += size
    if layers:
        yield layers, start


def _write_data(
    f: io.BufferedWriter, pool: BlockPool, blocks: CacheHandle, tensors: Sequence[_Tensor]
) -> dict[str, str]:
    by_name = {t.name: t for t in tensors}
    dtype = host_dtype(pool.spec.dtype)
    hasher = _Hasher()
    tokens = np.asarray(blocks.token_ids, dtype="<u4")
    hasher.add_group([("token_ids", tokens)])
    f.write(_bytes_of(tokens))
    for layers, start in _save_chunks(tensors):
        kvs = pool.read_layers(blocks, layers, start, blocks.total_tokens)
        named = []
        for kv in kvs:
            for part, array in (("keys", kv.keys), ("values", kv.values)):
                expected = by_name[f"layers.{kv.layer}.{part}"]
                assert array.shape == expected.shape and array.dtype == dtype, (
                    f"storage returned {array.shape} {array.dtype} for {expected}: "
                    "this indicates a bug"
                )
                named.append((expected.name, array))
                f.write(_bytes_of(array))
        hasher.add_group(named)
        del kvs, named
    return hasher.digests()


# --------------------------------------------------------------------------- load


def load_cache(
    path: str | os.PathLike[str],
    pool: BlockPool,
    *,
    fingerprint: str,
    agent_id: str | None = None,
    cache_salt: str = "",
) -> CacheHandle:
    """Load a saved cache into ``pool``; returns the agent's handle.

    Pass the result as ``cache`` to the engine's ``submit`` (``pool.release(handle)``
    frees it). Blocks the pool already holds for a prefix of the file's tokens (under
    ``cache_salt``) are shared instead of written again. ``agent_id``, if given, must be
    the file's.

    Raises CacheCorruptionError (the file fails a check), IncompatibleCacheError (another
    model or layout), PoolExhaustedError (too few free blocks), FileNotFoundError. A path
    that is not a regular file (a FIFO, a directory) is a CacheCorruptionError, refused
    without a blocking read. The pool is unchanged when it raises: the header is checked
    before any block is taken; each
    layer's sha256 is checked before it is written into the blocks this call took (nobody
    else reads them before the commit), and they are given back on any failure.
    """
    path = Path(path)
    reservation: list[tuple[Reservation, tuple[tuple[int, ...], ...]]] = []

    def reserve(tokens: tuple[int, ...]) -> None:
        got = pool.reserve_exact(info.agent_id, tokens, salt=cache_salt)
        if isinstance(got, PoolFull):
            raise got.error(f"{path}: loading {len(tokens)} tokens")
        reservation.append(got)

    def sink(kvs: list[LayerKV]) -> None:
        res, tables = reservation[0]
        size = pool.spec.block_tokens
        pool.write_layers(tables, kvs, (res.match.num_tokens // size) * size)

    _check_fingerprint(fingerprint)
    with _open_cache_file(path) as f:
        info = _read_header(f, path)
        info.check_compatible(pool.spec, fingerprint)
        if agent_id is not None and info.agent_id != agent_id:
            raise CacheCorruptionError(
                f"{path}: holds the cache of agent {info.agent_id!r}, not {agent_id!r}"
            )
        try:
            _read_data(f, info, sink, on_tokens=reserve)
        except BaseException:
            if reservation:
                pool.rollback(reservation[0][0])
            raise
    res, tables = reservation[0]
    valid_from = [info.sliding_valid_from if g.window else 0 for g in pool.spec.groups]
    return pool.commit_exact(res, tables, valid_from)


def verify_cache(path: str | os.PathLike[str]) -> CacheInfo:
    """Check a cache file completely (header and every tensor's sha256) without a pool."""
    path = Path(path)
    with _open_cache_file(path) as f:
        info = _read_header(f, path)
        _read_data(f, info, lambda kvs: None)
    return info


def _read_data(
    f: io.BufferedReader,
    info: CacheInfo,
    sink: Callable[[list[LayerKV]], None],
    on_tokens: Callable[[tuple[int, ...]], None] | None = None,
) -> tuple[int, ...]:
    """Read every tensor, check its sha256, hand each checked layer to ``sink``.

    ``on_tokens`` receives the checked token ids before any layer is read.

    No byte reaches ``sink`` before its tensor's sha256 matched: layer ``j`` is hashed (keys
    and values on two threads) while layer ``j - 1``, already checked, goes to ``sink``.
    ``sink`` must copy what it keeps: the arrays are reused buffers. Returns the token ids.
    """
    dtype = host_dtype(info.spec.dtype)
    f.seek(info.data_offset)
    tokens_t, *layer_ts = info.tensors
    tokens = _read_tensor(f, info, tokens_t, np.empty(tokens_t.end - tokens_t.begin, np.uint8))
    _check_digest(info, tokens_t, _sha256(tokens))
    token_ids = tuple(int(t) for t in tokens.view("<u4"))
    if on_tokens is not None:
        on_tokens(token_ids)
    largest = max(t.end - t.begin for t in layer_ts)
    # Layer j is read into ring[j % 2]; layer j - 2, its last user, went to sink before.
    ring = [(np.empty(largest, np.uint8), np.empty(largest, np.uint8)) for _ in range(2)]
    Checks = list[tuple[_Tensor, Future[str]]]
    pending: tuple[LayerKV, Checks] | None = None

    def settle(kv: LayerKV, checks: Checks) -> None:
        for tensor, digest in checks:
            _check_digest(info, tensor, digest.result())
        sink([kv])

    for j, (keys_t, values_t) in enumerate(zip(layer_ts[::2], layer_ts[1::2], strict=True)):
        assert keys_t.layer is not None
        keys_buf, values_buf = ring[j % 2]
        keys = _read_tensor(f, info, keys_t, keys_buf).view(dtype).reshape(keys_t.shape)
        values = _read_tensor(f, info, values_t, values_buf).view(dtype)
        values = values.reshape(values_t.shape)
        checks = [
            (keys_t, _hash_async(keys)),
            (values_t, _hash_async(values)),
        ]
        if pending is not None:
            settle(*pending)
        pending = (LayerKV(keys_t.layer, keys_t.start, keys, values), checks)
    if pending is not None:
        settle(*pending)
    if f.read(1):
        raise CacheCorruptionError(f"{info.path}: the file grew while it was read")
    return token_ids


def _check_digest(info: CacheInfo, tensor: _Tensor, digest: str) -> None:
    if digest != tensor.sha256:
        raise CacheCorruptionError(f"{info.path}: tensor {tensor.name} fails its sha256 check")


def _read_tensor(
    f: io.BufferedReader,
    info: CacheInfo,
    tensor: _Tensor,
    buffer: np.ndarray[Any, np.dtype[np.uint8]],
) -> np.ndarray[Any, np.dtype[np.uint8]]:
    nbytes = tensor.end - tensor.begin
    view = buffer.data[:nbytes]
    done = 0
    while done < nbytes:
        n = f.readinto(view[done:])
        if not n:
            raise CacheCorruptionError(
                f"{info.path}: truncated in tensor {tensor.name} "
                f"({done} of {nbytes} bytes at offset {info.data_offset + tensor.begin})"
            )
        done += n
    return buffer[:nbytes]


# --------------------------------------------------------------------------- fingerprint


def model_fingerprint(model: Any) -> str:
    """A stable id of a model's weights: ``"sha256:<64 hex>"``.

    sha256 over the model class, then, for every parameter in name order, its name, dtype,
    shape and the bits of ``_FINGERPRINT_SAMPLES`` elements at evenly spaced positions. Two
    random models of the same geometry differ; reading it costs a few thousand elements
    per parameter, whatever the model's size. The cache layout (block size, dtype,
    geometry) is checked separately, against the spec saved with each cache.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    flat_params = cast("list[tuple[str, mx.array]]", tree_flatten(model.parameters()))
    params = sorted(flat_params, key=lambda item: item[0])
    samples = []
    for _, p in params:
        flat = p.reshape(-1)
        n = min(flat.size, _FINGERPRINT_SAMPLES)
        if n == 0:
            samples.append(flat)
            continue
        idx = np.linspace(0, flat.size - 1, num=n).round().astype(np.int64)
        samples.append(mx.take(flat, mx.array(idx)).view(mx.uint8))
    mx.eval(samples)
    digest = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}\n".encode())
    for (name, p), sample in zip(params, samples, strict=True):
        digest.update(f"{name}|{p.dtype}|{tuple(p.shape)}\n".encode())
        digest.update(np.asarray(sample).tobytes())
    return f"sha256:{digest.hexdigest()}"


# --------------------------------------------------------------------------- mlx-lm format


def export_prompt_cache(
    path: str | os.PathLike[str],
    pool: BlockPool,
    blocks: CacheHandle,
    *,
    fingerprint: str | None = None,
) -> None:
    """Write ``blocks`` as an mlx-lm prompt cache (``mlx_lm.models.cache.save_prompt_cache``).

    ``load_prompt_cache(path)`` returns one ``KVCache`` per global layer (``offset`` = the
    cache's tokens) and one ``RotatingKVCache`` per sliding layer (its window, in temporal
    order), ready for mlx-lm generation with the tokens after ``blocks.token_ids``. The token
    ids, agent id, spec and fingerprint go into the file's metadata (``kvpool_*`` keys) so
    :func:`import_prompt_cache` can restore the cache. Atomic, like :func:`save_cache`.
    """
    import mlx.core as mx

    from kvpool.mlx.mlx_lm import kv_cache, rotating_cache, save_prompt_cache_file

    path = Path(path)
    validate_agent_id(blocks.agent_id)
    pool.check_live(blocks)
    spec, n = pool.spec, blocks.total_tokens
    group_of_layer = spec.group_of_layer()
    caches: list[Any] = []
    for i, layer in enumerate(spec.layers):
        start = 0 if layer.window is None else n - min(n, layer.window)
        held_from = blocks.tables[group_of_layer[i]].valid_from
        if start < held_from:
            raise InvalidRequestError(
                f"the cache of agent {blocks.agent_id!r} no longer holds layer {i}'s window "
                f"(positions from {start}; it holds from {held_from})"
            )
        (kv,) = pool.read_layers(blocks, [i], start, n)
        keys, values = (_host_to_mx(a, spec.dtype)[None] for a in (kv.keys, kv.values))
        cache: Any
        if layer.window is None:
            cache = kv_cache(keys, values, n)
        else:
            cache = rotating_cache(keys, values, n, layer.window)
        caches.append(cache)
    mx.eval([a for c in caches for a in (c.keys, c.values)])
    metadata = {
        "kvpool_format": PROMPT_CACHE_FORMAT,
        "kvpool_agent_id": blocks.agent_id,
        "kvpool_token_ids": _canonical(list(blocks.token_ids)),
        "kvpool_spec": _spec_to_json(spec),
        "kvpool_model_fingerprint": fingerprint or "",
    }
    _atomic_write(path, lambda tmp: save_prompt_cache_file(str(tmp), caches, metadata))


def import_prompt_cache(
    path: str | os.PathLike[str],
    pool: BlockPool,
    *,
    agent_id: str | None = None,
    token_ids: Sequence[int] | None = None,
    fingerprint: str | None = None,
) -> CacheHandle:
    """Load an mlx-lm prompt cache file into fresh blocks of ``pool``.

    Files from :func:`export_prompt_cache` carry their agent id and token ids; for any other
    mlx-lm prompt cache pass ``agent_id`` and the ``token_ids`` the cache holds. With
    ``fingerprint`` given, a file that names another model raises IncompatibleCacheError.
    Layers must match the pool's spec: ``KVCache`` for global layers, ``RotatingKVCache``
    (``keep=0``, the same window) for sliding ones, the spec's heads, head dims and dtype,
    batch size 1, all at offset ``len(token_ids)``; else IncompatibleCacheError. An
    unreadable file raises CacheCorruptionError. The pool is unchanged when it raises.
    """
    from kvpool.mlx.mlx_lm import (
        is_kv_cache,
        is_rotating_cache,
        load_prompt_cache_file,
        temporal_rows,
    )

    path = Path(path)
    with _open_cache_file(path):  # a FIFO or directory is refused before mlx opens it
        pass
    try:
        caches, metadata = load_prompt_cache_file(str(path))
    except FileNotFoundError:
        raise
    except Exception as exc:  # mlx raises RuntimeError/ValueError on unreadable files
        raise CacheCorruptionError(f"{path}: not a readable mlx-lm prompt cache: {exc}") from exc
    metadata = metadata if isinstance(metadata, dict) else {}

    def incompatible(what: str) -> IncompatibleCacheError:
        return IncompatibleCacheError(f"{path}: {what}")

    saved_fp = metadata.get("kvpool_model_fingerprint")
    if fingerprint is not None and saved_fp and saved_fp != fingerprint:
        raise incompatible(f"written for model {saved_fp}, not this model ({fingerprint})")
    if agent_id is None:
        agent_id = metadata.get("kvpool_agent_id")
        if agent_id is None:
            raise InvalidRequestError(f"{path} names no agent: pass agent_id")
    validate_agent_id(agent_id)
    if token_ids is None:
        if "kvpool_token_ids" not in metadata:
            raise InvalidRequestError(f"{path} holds no token ids: pass token_ids")
        try:
            token_ids = _parse_json(metadata["kvpool_token_ids"])
        except (ValueError, RecursionError) as exc:
            raise CacheCorruptionError(f"{path}: bad kvpool_token_ids ({exc})") from exc
    try:
        tokens = tuple(validate_token_ids(token_ids)) if len(token_ids) else ()
    except (TypeError, InvalidRequestError) as exc:
        raise InvalidRequestError(f"{path}: token_ids are not token ids ({exc})") from exc
    spec, n = pool.spec, len(tokens)
    if n == 0:
        raise InvalidRequestError("token_ids is empty")
    if len(caches) != spec.n_layers:
        raise incompatible(f"{len(caches)} layers, the pool's model has {spec.n_layers}")
    kvs: list[LayerKV] = []
    for i, (cache, layer) in enumerate(zip(caches, spec.layers, strict=True)):
        expected, is_expected = (
            ("KVCache", is_kv_cache)
            if layer.window is None
            else ("RotatingKVCache", is_rotating_cache)
        )
        if not is_expected(cache):
            raise incompatible(f"layer {i} is a {type(cache).__name__}, expected {expected}")
        if int(cache.offset) != n:
            raise incompatible(f"layer {i} holds {cache.offset} positions, token_ids has {n}")
        keys, values = cache.keys, cache.values
        if layer.window is None:
            keys, values = keys[..., :n, :], values[..., :n, :]
        else:
            if cache.keep != 0 or cache.max_size != layer.window:
                raise incompatible(
                    f"layer {i}: RotatingKVCache(max_size={cache.max_size}, keep={cache.keep}), "
                    f"expected max_size={layer.window}, keep=0"
                )
            keys, values = temporal_rows(cache)
        for name, array, dim in (
            ("keys", keys, layer.k_head_dim),
            ("values", values, layer.v_head_dim),
        ):
            shape = (1, layer.n_kv_heads, array.shape[2], dim)
            if tuple(array.shape) != shape or array.dtype != _mx_dtype(spec.dtype):
                raise incompatible(
                    f"layer {i} {name}: shape {tuple(array.shape)} {array.dtype}, expected "
                    f"{shape} {spec.dtype}"
                )
        held = int(keys.shape[2])
        if held > n:
            raise incompatible(f"layer {i} holds {held} rows for {n} positions")
        kvs.append(LayerKV(i, n - held, _mx_to_host(keys[0]), _mx_to_host(values[0])))
    # Global layers start at 0; the blocks hold sliding positions from the latest start.
    valid_from = max((kv.start for kv in kvs if spec.layers[kv.layer].window), default=0)
    return pool.write_cache(agent_id, tokens, kvs, valid_from=valid_from)


def _mx_dtype(dtype: str) -> Any:
    import mlx.core as mx

    return {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}[dtype]


def _host_to_mx(array: HostArray, dtype: str) -> Any:
    import mlx.core as mx

    out = mx.array(array)
    return out.view(mx.bfloat16) if dtype == "bfloat16" else out


def _mx_to_host(array: Any) -> HostArray:
    import mlx.core as mx

    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    return np.ascontiguousarray(np.asarray(array))
