"""Cache file layout and header: names, the tensor table, the metadata, and reading it back.

A file is a safetensors file (``docs/CACHE_FORMAT.md`` describes it byte by byte)::

    u64 header length | JSON header (padded with spaces to 8 bytes) | tensor data
    tensors, in file order:  token_ids                U32 [num_tokens]
                             layers.{i}.<part>        one per codec part (persist.codec)
                             snapshots.{L}.layers.{i}.state.{e}   (version 4) the states of
                                                      every recurrent layer i after L tokens

The header's metadata holds the format version, the cache spec (geometry, dtype, block
size, block format), the model fingerprint, a sha256 per tensor and a sha256 of the header.
:func:`read_cache_info` checks all of it but the data. Version 1 files (dense, no block
format in the spec) still read: they are dense files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import os
import re
import stat
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvpool.cache.spec import AttentionKind, LayerSpec, ModelCacheSpec, StateSpec
from kvpool.errors import (
    CacheCorruptionError,
    IncompatibleCacheError,
    InvalidRequestError,
    KvpoolError,
)
from kvpool.persist.codec import TAG_BYTES, layer_codec
from kvpool.validation import validate_agent_id

FORMAT = "kvpool-agent-cache"
FORMAT_VERSION = 4
"""The newest version this kvpool reads and writes: 3 adds recurrent layers' end states, 4
state snapshots of the cache's prefix. A file is written in the lowest version that
describes it (:func:`version_for`), so files of attention-only models stay version 2 and
those of recurrent models without snapshots 3; 1 (dense only, no block format in the spec)
reads."""
FILE_SUFFIX = ".kvcache.safetensors"
PROMPT_CACHE_FORMAT = "kvpool-mlx-prompt-cache"

_TOKEN_DTYPE = "U32"
_DIGEST_PLACEHOLDER = "0" * 64
_MAX_HEADER_BYTES = 16 << 20
_MAX_JSON_DEPTH = 8  # the format nests 3 deep; deeper JSON is refused before it is parsed
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')

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
    start: int = 0  # first position held (K/V); the tokens a state follows (states)
    snapshot: bool = False  # a state snapshot's (version 4), not the cache's own layers
    sha256: str = ""  # hex digest of the data, once known

    def header_entry(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "data_offsets": [self.begin, self.end],
        }


def version_for(spec: ModelCacheSpec, num_snapshots: int = 0) -> int:
    """The format version a file of ``spec`` is written in: 4 with state snapshots, 3 with
    recurrent layers, else 2."""
    if num_snapshots:
        return 4
    return 3 if spec.has_recurrent else 2


def _layer_start(layer: LayerSpec, sliding_valid_from: int, num_tokens: int) -> int:
    if layer.kind is AttentionKind.RECURRENT:
        return num_tokens  # a state: after every token
    return sliding_valid_from if layer.kind is AttentionKind.SLIDING else 0


def _plan(
    spec: ModelCacheSpec,
    num_tokens: int,
    sliding_valid_from: int,
    snapshot_lengths: Sequence[int] = (),
) -> list[_Tensor]:
    """Every tensor of the file, in file order, with its offsets: token ids, each layer's
    K/V or end state, then for each snapshot length (ascending) every recurrent layer's
    state after that many tokens."""
    tensors: list[_Tensor] = []
    offset = 0

    def add(name: str, dtype: str, shape: tuple[int, ...], itemsize: int, **kw: Any) -> None:
        nonlocal offset
        nbytes = itemsize * int(np.prod(shape, dtype=np.int64))
        tensors.append(_Tensor(name, dtype, shape, offset, offset + nbytes, **kw))
        offset += nbytes

    add("token_ids", _TOKEN_DTYPE, (num_tokens,), 4)
    for i, layer in enumerate(spec.layers):
        start = _layer_start(layer, sliding_valid_from, num_tokens)
        n = num_tokens - start
        for part in layer_codec(spec, i).parts(layer):
            shape = part.shape or (layer.n_kv_heads, n, part.last_dim)
            add(f"layers.{i}.{part.suffix}", part.dtype, shape, TAG_BYTES[part.dtype],
                layer=i, start=start)  # fmt: skip
    for length in snapshot_lengths:
        for i, layer in enumerate(spec.layers):
            if layer.kind is not AttentionKind.RECURRENT:
                continue
            for part in layer_codec(spec, i).parts(layer):
                assert part.shape is not None, "a state has a fixed shape: this indicates a bug"
                add(f"snapshots.{length}.layers.{i}.{part.suffix}", part.dtype, part.shape,
                    TAG_BYTES[part.dtype], layer=i, start=length, snapshot=True)  # fmt: skip
    return tensors


def _snapshot_lengths_from_json(text: str, num_tokens: int) -> tuple[int, ...]:
    """A version-4 header's snapshot lengths: strictly increasing, each in ``1 .. num_tokens
    - 1``; ValueError otherwise."""
    raw = _parse_json(text)
    if not isinstance(raw, list) or not all(type(n) is int for n in raw):
        raise ValueError(f"snapshot_lengths is not a list of integers: {text[:80]!r}")
    if any(not 0 < n < num_tokens for n in raw) or any(a >= b for a, b in itertools.pairwise(raw)):
        raise ValueError(
            f"snapshot_lengths must increase strictly within 1..{num_tokens - 1}, got {raw[:20]}"
        )
    return tuple(raw)


def _spec_to_json(spec: ModelCacheSpec) -> str:
    layers: list[dict[str, Any]] = [
        {
            "kind": layer.kind.value,
            "n_kv_heads": layer.n_kv_heads,
            "k_head_dim": layer.k_head_dim,
            "v_head_dim": layer.v_head_dim,
            "window": layer.window,
        }
        for layer in spec.layers
    ]
    for d, layer in zip(layers, spec.layers, strict=True):
        if layer.states:  # version 3 only: attention-only specs read as before
            d["states"] = [{"shape": list(st.shape), "dtype": st.dtype} for st in layer.states]
    return _canonical(
        {
            "dtype": spec.dtype,
            "block_tokens": spec.block_tokens,
            "kv_bits": spec.kv_bits,
            "kv_group_size": spec.kv_group_size,
            "layers": layers,
        }
    )


def _spec_from_json(text: str, version: int = FORMAT_VERSION) -> ModelCacheSpec:
    """The spec a header holds; version 1 specs have no block format (dense)."""
    raw = _parse_json(text)
    bits, group_size = None, 64
    if version >= 2:
        bits = None if raw["kv_bits"] is None else int(raw["kv_bits"])
        group_size = int(raw["kv_group_size"])
    layers = tuple(
        LayerSpec(
            AttentionKind(d["kind"]),
            int(d["n_kv_heads"]),
            int(d["k_head_dim"]),
            int(d["v_head_dim"]),
            None if d["window"] is None else int(d["window"]),
            tuple(
                StateSpec(tuple(int(n) for n in st["shape"]), str(st["dtype"]))
                for st in (d.get("states", ()) if version >= 3 else ())
            ),
        )
        for d in raw["layers"]
    )
    return ModelCacheSpec(layers, str(raw["dtype"]), int(raw["block_tokens"]), bits, group_size)


def _spec_difference(saved: ModelCacheSpec, pool: ModelCacheSpec) -> str:
    if saved.block_tokens != pool.block_tokens:
        return f"block_tokens {saved.block_tokens} vs {pool.block_tokens}"
    if saved.dtype != pool.dtype:
        return f"dtype {saved.dtype} vs {pool.dtype}"
    if saved.format != pool.format:
        return (
            f"block format {saved.format.name} vs {pool.format.name} (files are not converted "
            "on load: use a pool of the file's format, e.g. the same --kv-bits)"
        )
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
    snapshot_lengths: tuple[int, ...] = ()  # version 4: the state snapshots it holds

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
        if version < 1:
            raise ValueError(f"format version {version}")
        if version > FORMAT_VERSION:
            raise IncompatibleCacheError(
                f"{path}: format version {version} is newer than this kvpool reads "
                f"({FORMAT_VERSION})"
            )
        agent_id = validate_agent_id(meta["agent_id"])
        num_tokens, valid_from = int(meta["num_tokens"]), int(meta["sliding_valid_from"])
        spec = _spec_from_json(meta["spec"], version)
        fingerprint = meta["model_fingerprint"]
        digests = _parse_json(meta["tensor_sha256"])
        snapshots: tuple[int, ...] = ()
        if version >= 4:
            snapshots = _snapshot_lengths_from_json(meta["snapshot_lengths"], num_tokens)
            if snapshots and not spec.has_recurrent:
                raise ValueError("state snapshots of a model without recurrent layers")
    except IncompatibleCacheError:
        raise
    except (KeyError, ValueError, TypeError, AttributeError, RecursionError, KvpoolError) as exc:
        raise corrupt(f"bad metadata: {exc!r}") from exc
    if not 0 <= valid_from <= num_tokens or num_tokens < 1:
        raise corrupt(f"num_tokens {num_tokens}, sliding_valid_from {valid_from}")
    expected = _plan(spec, num_tokens, valid_from, snapshots)
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
        tensors, snapshots,
    )  # fmt: skip
