"""Saving, loading and verifying an agent's cache file (any block format).

* Atomic: :func:`save_cache` writes through :mod:`kvpool.persist.atomic`.
* Checked: :func:`load_cache` verifies the header checksum, that the tensor table is exactly
  the one the metadata implies (names, dtypes, shapes, offsets, file size) and every tensor's
  sha256; any failure raises :class:`CacheCorruptionError` naming the file. A cache written for
  another model (fingerprint) or another layout (geometry, block size, dtype, block format)
  raises :class:`IncompatibleCacheError` before a block is taken. The pool is unchanged when
  either is raised.
* Snapshots (version 4): a recurrent model's file also holds the state snapshots the pool
  holds for the handle's prefix (:meth:`BlockPool.snapshot_lengths`), checked like every
  tensor; :func:`load_cache` registers each one after the handle (skipped when the pool has
  no free state block), having checked them all before it takes a block.
* Bounded memory: K/V move layer by layer through the format's codec
  (:mod:`kvpool.persist.codec`), hashed on two threads while the next layer is written or
  read, so saving or loading an agent never holds a second copy of it in memory.
"""

from __future__ import annotations

import io
import itertools
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from kvpool.cache.manager import PoolFull
from kvpool.cache.sequence import HostWrite
from kvpool.cache.tables import CacheHandle
from kvpool.errors import CacheCorruptionError, InvalidRequestError
from kvpool.persist.atomic import _atomic_write
from kvpool.persist.codec import StateCodec, host_dtype_of_tag, layer_codec
from kvpool.persist.hashing import _bytes_of, _hash_async, _Hasher, _sha256
from kvpool.persist.layout import (
    _DIGEST_PLACEHOLDER,
    FORMAT,
    CacheInfo,
    _canonical,
    _encode_header,
    _header_dict,
    _header_digest,
    _open_cache_file,
    _plan,
    _read_header,
    _spec_to_json,
    _Tensor,
    version_for,
)
from kvpool.pool import BlockPool
from kvpool.validation import validate_agent_id

_SAVE_CHUNK_BYTES = 64 << 20  # K/V gathered per read call when saving

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
    only read: the agent's cache stays in the pool. So are the state snapshots the pool
    holds for its prefix (a recurrent model's; held meanwhile so none is evicted), which
    the file lists too (version 4). A failed write (a full disk) raises CacheWriteError and
    leaves the old file intact.
    """
    path = Path(path)
    _check_fingerprint(fingerprint)
    validate_agent_id(blocks.agent_id)
    pool.check_live(blocks)
    if blocks.total_tokens == 0:
        raise InvalidRequestError(f"the cache of agent {blocks.agent_id!r} holds no tokens")
    held = pool.hold_snapshots(blocks)
    try:
        return _save_held(path, pool, blocks, fingerprint, held.lengths)
    finally:
        pool.release_snapshots(held)


def _save_held(
    path: Path, pool: BlockPool, blocks: CacheHandle, fingerprint: str, snapshots: tuple[int, ...]
) -> int:
    """:func:`save_cache` with the snapshots after ``snapshots`` tokens held in the pool."""
    spec = pool.spec
    valid_from = sliding_valid_from(pool, blocks)
    tensors = _plan(spec, blocks.total_tokens, valid_from, snapshots)
    metadata = {
        "format": FORMAT,
        "format_version": str(version_for(spec, len(snapshots))),
        "agent_id": blocks.agent_id,
        "num_tokens": str(blocks.total_tokens),
        "sliding_valid_from": str(valid_from),
        "spec": _spec_to_json(spec),
        "model_fingerprint": fingerprint,
        "created_by": _created_by(),
        "tensor_sha256": _canonical(dict.fromkeys((t.name for t in tensors), _DIGEST_PLACEHOLDER)),
        "header_sha256": _DIGEST_PLACEHOLDER,
    }
    if snapshots:
        metadata["snapshot_lengths"] = _canonical(list(snapshots))
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


def _layers(tensors: Sequence[_Tensor]) -> Iterator[list[_Tensor]]:
    """The cache's layer tensors grouped by layer, in file order (token_ids and snapshots
    skipped)."""
    for _, group in itertools.groupby(
        (t for t in tensors if t.layer is not None and not t.snapshot), key=lambda t: t.layer
    ):
        yield list(group)


def _snapshots(tensors: Sequence[_Tensor]) -> Iterator[tuple[int, list[_Tensor]]]:
    """(length, its tensors: every recurrent layer's state arrays) per snapshot, in file
    order."""
    for length, group in itertools.groupby(
        (t for t in tensors if t.snapshot), key=lambda t: t.start
    ):
        yield length, list(group)


def _snapshot_states(length: int, tensors: Sequence[_Tensor], arrays: Sequence[Any]) -> list[Any]:
    """One snapshot's arrays (in ``tensors`` order) as a LayerState per recurrent layer."""
    states = []
    for layer, group in itertools.groupby(zip(tensors, arrays, strict=True),
                                          key=lambda ta: ta[0].layer):  # fmt: skip
        states.append(StateCodec().record(layer, length, [a for _, a in group]))
    return states


def _save_chunks(tensors: Sequence[_Tensor]) -> Iterator[tuple[list[int], int]]:
    """(layers, start) groups of consecutive layers sharing a start, ~_SAVE_CHUNK_BYTES each."""
    layers: list[int] = []
    start, nbytes = 0, 0
    for group in _layers(tensors):
        first = group[0]
        assert first.layer is not None
        size = sum(t.end - t.begin for t in group)
        if layers and (first.start != start or nbytes + size > _SAVE_CHUNK_BYTES):
            yield layers, start
            layers, nbytes = [], 0
        if not layers:
            start = first.start
        layers.append(first.layer)
        nbytes += size
    if layers:
        yield layers, start


def _write_data(
    f: io.BufferedWriter, pool: BlockPool, blocks: CacheHandle, tensors: Sequence[_Tensor]
) -> dict[str, str]:
    by_layer = {group[0].layer: group for group in _layers(tensors)}
    hasher = _Hasher()
    tokens = np.asarray(blocks.token_ids, dtype="<u4")
    hasher.add_group([("token_ids", tokens)])
    f.write(_bytes_of(tokens))
    for layers, start in _save_chunks(tensors):
        codec = layer_codec(pool.spec, layers[0])  # a chunk's layers share their codec
        records = codec.read(pool, blocks, layers, start, blocks.total_tokens)
        named = []
        for record in records:
            arrays = codec.arrays(record)
            expected_ts = by_layer[record.layer]
            assert len(arrays) == len(expected_ts), "codec and plan disagree: this indicates a bug"
            for array, expected in zip(arrays, expected_ts, strict=True):
                assert array.shape == expected.shape and array.dtype == host_dtype_of_tag(
                    expected.dtype
                ), (
                    f"storage returned {array.shape} {array.dtype} for {expected}: "
                    "this indicates a bug"
                )
                named.append((expected.name, array))
                f.write(_bytes_of(array))
        hasher.add_group(named)
        del records, named
    state_layers = sorted({t.layer for t in tensors if t.snapshot and t.layer is not None})
    for length, expected_ts in _snapshots(tensors):
        states = pool.read_snapshot(blocks, length, state_layers)
        assert states is not None, "a held snapshot is gone: this indicates a bug"
        arrays = [a for st in states for a in StateCodec().arrays(st)]
        named = []
        for array, expected in zip(arrays, expected_ts, strict=True):
            assert array.shape == expected.shape and array.dtype == host_dtype_of_tag(
                expected.dtype
            ), f"storage returned {array.shape} {array.dtype} for {expected}: this indicates a bug"
            named.append((expected.name, array))
            f.write(_bytes_of(array))
        hasher.add_group(named)
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
    the file's. The state snapshots a version-4 file holds are registered after the handle
    (:meth:`BlockPool.write_snapshot`: published as a prompt's are, so a later prompt with
    exactly that prefix resumes there); one the pool has no free state block for is
    skipped.

    Raises CacheCorruptionError (the file fails a check), IncompatibleCacheError (another
    model or layout), PoolExhaustedError (too few free blocks), FileNotFoundError. A path
    that is not a regular file (a FIFO, a directory) is a CacheCorruptionError, refused
    without a blocking read. The pool is unchanged when it raises: the header is checked
    before any block is taken, and so are the snapshots' tensors (read once more to be
    written, and checked again); each layer's sha256 is checked before it is written into
    the blocks this call took (nobody else reads them before the commit), and they are given
    back on any failure. (Snapshots registered before a later failure stay cached: they are
    checked states of their prefixes, as any published block.)
    """
    path = Path(path)
    writes: list[HostWrite] = []

    def reserve(tokens: tuple[int, ...]) -> None:
        got = pool.write_from_host(info.agent_id, tokens, salt=cache_salt)
        if isinstance(got, PoolFull):
            raise got.error(f"{path}: loading {len(tokens)} tokens")
        writes.append(got)

    def sink(record: Any) -> None:
        writes[0].write([record])

    _check_fingerprint(fingerprint)
    with _open_cache_file(path) as f:
        info = _read_header(f, path)
        info.check_compatible(pool.spec, fingerprint)  # the format too: before any block
        if agent_id is not None and info.agent_id != agent_id:
            raise CacheCorruptionError(
                f"{path}: holds the cache of agent {info.agent_id!r}, not {agent_id!r}"
            )
        _read_snapshots(f, info, lambda states: None)  # all checked before a block is taken
        _check_end(f, info)
        try:
            _read_data(f, info, sink, on_tokens=reserve)
        except BaseException:
            if writes:
                writes[0].abort()
            raise
        with writes[0] as write:
            handle = write.commit(
                [info.sliding_valid_from if g.window else 0 for g in pool.spec.groups]
            )
        try:
            _read_snapshots(f, info, lambda states: pool.write_snapshot(handle, states))
        except BaseException:
            pool.release(handle)
            raise
    return handle


def verify_cache(path: str | os.PathLike[str]) -> CacheInfo:
    """Check a cache file completely (header and every tensor's sha256) without a pool."""
    path = Path(path)
    with _open_cache_file(path) as f:
        info = _read_header(f, path)
        _read_data(f, info, lambda record: None)
        _read_snapshots(f, info, lambda states: None)
        _check_end(f, info)
    return info


def _read_data(
    f: io.BufferedReader,
    info: CacheInfo,
    sink: Callable[[Any], None],
    on_tokens: Callable[[tuple[int, ...]], None] | None = None,
) -> tuple[int, ...]:
    """Read every tensor, check its sha256, hand each checked layer's record to ``sink``.

    ``on_tokens`` receives the checked token ids before any layer is read.

    No byte reaches ``sink`` before its tensor's sha256 matched: layer ``j`` is hashed (its
    tensors on two threads) while layer ``j - 1``, already checked, goes to ``sink``.
    ``sink`` must copy what it keeps: the arrays are reused buffers. Returns the token ids.
    """
    f.seek(info.data_offset)
    tokens_t = info.tensors[0]
    tokens = _read_tensor(f, info, tokens_t, np.empty(tokens_t.end - tokens_t.begin, np.uint8))
    _check_digest(info, tokens_t, _sha256(tokens))
    token_ids = tuple(int(t) for t in tokens.view("<u4"))
    if on_tokens is not None:
        on_tokens(token_ids)
    layers = list(_layers(info.tensors))
    num_parts = max(len(group) for group in layers)  # states may have more parts than K/V
    largest = [
        max((group[k].end - group[k].begin for group in layers if k < len(group)), default=0)
        for k in range(num_parts)
    ]
    # Layer j is read into ring[j % 2]; layer j - 2, its last user, went to sink before.
    ring = [[np.empty(n, np.uint8) for n in largest] for _ in range(2)]
    Checks = list[tuple[_Tensor, Future[str]]]
    pending: tuple[Any, Checks] | None = None

    def settle(record: Any, checks: Checks) -> None:
        for tensor, digest in checks:
            _check_digest(info, tensor, digest.result())
        sink(record)

    for j, group in enumerate(layers):
        first = group[0]
        assert first.layer is not None
        arrays = [
            _read_tensor(f, info, t, buf).view(host_dtype_of_tag(t.dtype)).reshape(t.shape)
            for t, buf in zip(group, ring[j % 2][: len(group)], strict=True)
        ]
        checks = [(t, _hash_async(a)) for t, a in zip(group, arrays, strict=True)]
        if pending is not None:
            settle(*pending)
        codec = layer_codec(info.spec, first.layer)
        pending = (codec.record(first.layer, first.start, arrays), checks)
    if pending is not None:
        settle(*pending)
    return token_ids


def _read_snapshots(
    f: io.BufferedReader, info: CacheInfo, sink: Callable[[list[Any]], object]
) -> None:
    """Read each snapshot's tensors (after the layers), check their sha256 and hand the
    snapshot's states (a LayerState per recurrent layer) to ``sink``, one snapshot at a
    time. ``sink`` must copy what it keeps: the arrays are reused buffers."""
    snapshots = list(_snapshots(info.tensors))
    if not snapshots:
        return
    f.seek(info.data_offset + snapshots[0][1][0].begin)
    buffers = [np.empty(t.end - t.begin, np.uint8) for t in snapshots[0][1]]
    for length, tensors in snapshots:
        arrays = [
            _read_tensor(f, info, t, buf).view(host_dtype_of_tag(t.dtype)).reshape(t.shape)
            for t, buf in zip(tensors, buffers, strict=True)
        ]
        for tensor, array in zip(tensors, arrays, strict=True):
            _check_digest(info, tensor, _sha256(array))
        sink(_snapshot_states(length, tensors, arrays))


def _check_end(f: io.BufferedReader, info: CacheInfo) -> None:
    """After the last tensor: no byte more (the size was checked with the header)."""
    f.seek(info.data_offset + info.tensors[-1].end)
    if f.read(1):
        raise CacheCorruptionError(f"{info.path}: the file grew while it was read")


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
