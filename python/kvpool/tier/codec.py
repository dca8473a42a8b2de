"""The block codec: one block's tokens and K/V as bytes at rest in a shared tier.

A block is positions ``[256 j, 256 j + n)`` of every layer (``n`` = 256, or fewer for a
session's last, partial block). Its record::

    magic | u32 n | u32 n_layers | 32-byte blake2b of the rest | rest
    dense (magic b"KVB1"):     rest = u32 token ids [n] | per layer: keys, values
    quantized (magic b"KVQ1"): rest = u32 token ids [n] | per layer:
                               K codes, K scales, K biases, V codes, V scales, V biases

Dense K/V are the pool's host arrays (``BlockPool.read_layers``: ``[n_kv_heads, n,
head_dim]``, C order, the spec's dtype bit for bit). A quantized pool's blocks travel as
they are at rest (``BlockPool.read_codes``: uint32 codes ``[n_kv_heads, n, head_dim * bits
// 32]``, scales and biases ``[n_kv_heads, n, head_dim // group_size]`` in the spec's dtype),
so a block read back is bit for bit the block written, never re-quantized.

A recurrent layer holds no positions: block records carry the K/V layers only, and a
state (every recurrent layer's ``ArraysCache`` arrays, dense) after exactly ``num_tokens``
tokens is its own record, stored under the chain key of those tokens: a session's end state
(all its tokens) and the snapshots the pool took at block boundaries of its prefix::

    magic b"KVS1" | u32 num_tokens | u32 n_layers | 32-byte blake2b of the rest | rest
    rest = per recurrent layer, per state array: its host array (its own dtype and shape)

:func:`mac_key` turns a deployment's secret (``--cache-secret``) into the key of a keyed
blake2b: records encoded with it carry a MAC of the rest *and of the Redis key they are
stored under* (``context``), so nobody without the secret can write a record a reader
accepts, nor move a real one to another key (another tenant's salt). Without a key the
digest is the plain checksum (public ``person``): it catches corruption, not forgery.

:func:`block_format_id` names the encoding in block keys (``"dense-float16-v1"``,
``"q4g64-float16-v1"``): pools of different formats never read each other's blocks.
:func:`decode_block` also checks the record's magic and every length against the reading
pool's format, and the checksum, before it returns anything; a record that fails raises
:class:`~kvpool.errors.CacheCorruptionError`. :func:`read_block` reads a block into a record
and :meth:`~kvpool.cache.sequence.HostWrite.write` writes a decoded one back, whatever the
format: the tier never branches on it.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvpool.cache.format import SAFETENSORS_DTYPES
from kvpool.cache.spec import AttentionKind, ModelCacheSpec
from kvpool.cache.storage import HostArray, LayerCodes, LayerKV, LayerState
from kvpool.cache.tables import CacheHandle
from kvpool.errors import CacheCorruptionError
from kvpool.persist.codec import HOST_OF_TAG, LayerCodec, codec_for
from kvpool.pool import BlockPool

__all__ = [
    "CODEC_VERSION",
    "DecodedBlock",
    "block_format_id",
    "decode_block",
    "decode_state",
    "encode_block",
    "encode_state",
    "mac_key",
    "read_block",
    "read_snapshot",
    "read_state",
    "read_window",
    "record_bytes",
    "state_record_bytes",
]

CODEC_VERSION = 1
_DENSE_MAGIC = b"KVB1"
_QUANT_MAGIC = b"KVQ1"
_STATE_MAGIC = b"KVS1"
_HEAD = struct.Struct("<4sII32s")
_PERSON = b"kvpool.block.1"

BlockLayer = LayerKV | LayerCodes
"""One layer of a block: dense K/V, or quantized codes (the pool's format)."""


def block_format_id(pool_or_spec: Any) -> str:
    """The encoding blocks of this pool are stored in: ``"dense-<dtype>-v1"`` or, for a
    quantized pool, ``"<BlockFormat.name>-v1"`` (``"q4g64-float16-v1"``).

    The one place that names it (block keys carry it). Takes a pool or a spec.
    """
    spec: ModelCacheSpec = getattr(pool_or_spec, "spec", pool_or_spec)
    fmt = spec.format
    if fmt.is_quantized:
        return f"{fmt.name}-v{CODEC_VERSION}"
    return f"dense-{spec.dtype}-v{CODEC_VERSION}"


def record_bytes(spec: ModelCacheSpec, num_tokens: int, group: int | None = None) -> int:
    """Bytes of the record of a block of ``num_tokens`` positions of a ``spec`` pool
    (:func:`record_layers` of ``group``)."""
    per_token = spec.layers_bytes_per_token(record_layers(spec, group))
    return _HEAD.size + 4 * num_tokens + num_tokens * per_token


def state_record_bytes(spec: ModelCacheSpec) -> int:
    """Bytes of the record of one state of every recurrent layer of a ``spec`` pool (an end
    state or a snapshot: the same size at any length)."""
    return _HEAD.size + spec.state_bytes


def mac_key(secret: bytes) -> bytes:
    """The 32-byte blake2b key of a shared secret of any length (its own person)."""
    if not secret:
        raise ValueError("a cache secret must not be empty")
    return hashlib.blake2b(secret, digest_size=32, person=b"kvpool.secret.1").digest()


def _checksum(data: bytes | memoryview, key: bytes | None = None, context: bytes = b"") -> bytes:
    """The record's digest: an unkeyed checksum, or with ``key`` a MAC of ``context`` (the
    storage key, length-prefixed) and ``data``."""
    if key is None:
        return hashlib.blake2b(data, digest_size=32, person=_PERSON).digest()
    h = hashlib.blake2b(digest_size=32, key=key, person=_PERSON)
    h.update(struct.pack("<I", len(context)) + context)
    h.update(data)
    return h.digest()


@dataclass(frozen=True, slots=True)
class DecodedBlock:
    """A checked block: its token ids and each layer's K/V (``start`` = its first position):
    :class:`LayerKV` for a dense pool, :class:`LayerCodes` for a quantized one."""

    token_ids: tuple[int, ...]
    layers: tuple[BlockLayer, ...]


def _arrays(kv: BlockLayer) -> list[HostArray]:
    if isinstance(kv, LayerKV):
        return [kv.keys, kv.values]
    return [a for rows in (kv.keys, kv.values) for a in (rows.codes, rows.scales, rows.biases)]


def encode_block(
    token_ids: Sequence[int],
    kvs: Sequence[BlockLayer],
    key: bytes | None = None,
    context: bytes = b"",
) -> bytes:
    """The record of one block: ``kvs`` holds every layer, in order, for ``token_ids``
    (all :class:`LayerKV`, or all :class:`LayerCodes`); with ``key`` (:func:`mac_key`), its
    digest is a MAC bound to ``context`` (the key it is stored under)."""
    n = len(token_ids)
    quantized = bool(kvs) and isinstance(kvs[0], LayerCodes)
    parts: list[bytes | memoryview] = [np.asarray(token_ids, dtype="<u4").tobytes()]
    for kv in kvs:
        assert kv.num_tokens == n, f"layer {kv.layer}: {kv.num_tokens} rows for {n} tokens"
        assert isinstance(kv, LayerCodes) == quantized, "a block mixes dense and quantized layers"
        for array in _arrays(kv):
            parts.append(np.ascontiguousarray(array).data.cast("B"))
    rest = b"".join(parts)
    magic = _QUANT_MAGIC if quantized else _DENSE_MAGIC
    return _HEAD.pack(magic, n, len(kvs), _checksum(rest, key, context)) + rest


def _kv_layers(spec: ModelCacheSpec) -> list[int]:
    """The layers a block record holds: every one but the recurrent ones."""
    return [i for i, x in enumerate(spec.layers) if x.kind is not AttentionKind.RECURRENT]


def _state_layers(spec: ModelCacheSpec) -> list[int]:
    return [i for i, x in enumerate(spec.layers) if x.kind is AttentionKind.RECURRENT]


def record_layers(spec: ModelCacheSpec, group: int | None = None) -> list[int]:
    """The layers of one record: sliding-window group ``group``'s, or (None) those of every
    group without a window and not recurrent (a block record)."""
    if group is not None:
        return list(spec.groups[group].layers)
    windowed = {i for g in spec.groups if g.window is not None for i in g.layers}
    return [i for i in _kv_layers(spec) if i not in windowed]


def _layer_arrays(
    spec: ModelCacheSpec, codec: LayerCodec, n: int, layers: Sequence[int]
) -> list[list[tuple[tuple[int, ...], np.dtype[Any]]]]:
    """Per K/V layer, the (shape, dtype) of each array of its record, in record order (the
    persist codec's parts: the same tensors a cache file holds)."""
    return [
        [
            ((spec.layers[i].n_kv_heads, n, part.last_dim), np.dtype(HOST_OF_TAG[part.dtype]))
            for part in codec.parts(spec.layers[i])
        ]
        for i in layers
    ]


def decode_block(
    record: bytes,
    spec: ModelCacheSpec,
    start: int,
    what: str,
    key: bytes | None = None,
    context: bytes = b"",
    group: int | None = None,
) -> DecodedBlock:
    """Check and split a record written by :func:`encode_block` for positions from ``start``
    of a pool of ``spec`` (its format decides the record's magic and lengths), with the same
    ``key`` and ``context``, holding :func:`record_layers` of ``group``.

    Raises CacheCorruptionError naming ``what`` (the key) on any mismatch. The arrays are
    views of ``record`` (read-only).
    """
    fmt = spec.format
    codec = codec_for(fmt)
    want_magic = _QUANT_MAGIC if fmt.is_quantized else _DENSE_MAGIC
    if len(record) < _HEAD.size:
        raise CacheCorruptionError(f"{what}: a block record of {len(record)} bytes is truncated")
    magic, n, n_layers, digest = _HEAD.unpack_from(record)
    if magic != want_magic:
        raise CacheCorruptionError(
            f"{what}: not a {fmt.name} block record (magic {magic!r}, expected {want_magic!r})"
        )
    kv_layers = record_layers(spec, group)
    if n_layers != len(kv_layers) or not 0 < n <= spec.block_tokens:
        raise CacheCorruptionError(
            f"{what}: a block of {n} tokens and {n_layers} layers, expected 1..{spec.block_tokens} "
            f"tokens and {len(kv_layers)} layers"
        )
    layouts = _layer_arrays(spec, codec, n, kv_layers)
    expected = (
        _HEAD.size
        + 4 * n
        + sum(int(np.prod(shape)) * dt.itemsize for arrays in layouts for shape, dt in arrays)
    )
    if len(record) != expected:
        raise CacheCorruptionError(
            f"{what}: a block record of {len(record)} bytes, expected {expected}"
        )
    rest = memoryview(record)[_HEAD.size :]
    if not hmac.compare_digest(_checksum(rest, key, context), digest):
        kind = "MAC (written without this server's --cache-secret?)" if key else "checksum"
        raise CacheCorruptionError(f"{what}: the block fails its blake2b {kind}")
    tokens = np.frombuffer(record, dtype="<u4", count=n, offset=_HEAD.size)
    offset = _HEAD.size + 4 * n
    layers: list[BlockLayer] = []
    for i, arrays in zip(kv_layers, layouts, strict=True):
        got: list[HostArray] = []
        for shape, dt in arrays:
            count = int(np.prod(shape))
            got.append(np.frombuffer(record, dtype=dt, count=count, offset=offset).reshape(shape))
            offset += count * dt.itemsize
        layers.append(codec.record(i, start, got))
    return DecodedBlock(tuple(int(t) for t in tokens), tuple(layers))


def read_block(
    pool: BlockPool,
    handle: CacheHandle,
    token_ids: Sequence[int],
    start: int,
    stop: int,
    key: bytes | None = None,
    context: bytes = b"",
    group: int | None = None,
) -> bytes:
    """The record of positions ``[start, stop)`` of :func:`record_layers` of ``group`` of a
    live handle, in the pool's format (dense K/V, or its quantized blocks' codes bit for
    bit)."""
    layers = record_layers(pool.spec, group)
    kvs = codec_for(pool.spec.format).read(pool, handle, layers, start, stop)
    return encode_block(token_ids[start:stop], kvs, key, context)


def encode_state(
    num_tokens: int, states: Sequence[LayerState], key: bytes | None = None, context: bytes = b""
) -> bytes:
    """The record of the state after ``num_tokens`` tokens (every recurrent layer, in order):
    a session's end state or a snapshot."""
    parts: list[bytes | memoryview] = []
    for st in states:
        assert st.num_tokens == num_tokens, f"layer {st.layer}: a state of {st.num_tokens} tokens"
        parts.extend(np.ascontiguousarray(a).data.cast("B") for a in st.arrays)
    rest = b"".join(parts)
    return _HEAD.pack(_STATE_MAGIC, num_tokens, len(states), _checksum(rest, key, context)) + rest


def decode_state(
    record: bytes,
    spec: ModelCacheSpec,
    num_tokens: int,
    what: str,
    key: bytes | None = None,
    context: bytes = b"",
) -> tuple[LayerState, ...]:
    """Check and split a record of :func:`encode_state` for a session of ``num_tokens``
    tokens of a ``spec`` pool; CacheCorruptionError naming ``what`` on any mismatch."""
    layers = _state_layers(spec)
    if len(record) < _HEAD.size:
        raise CacheCorruptionError(f"{what}: a state record of {len(record)} bytes is truncated")
    magic, n, n_layers, digest = _HEAD.unpack_from(record)
    if magic != _STATE_MAGIC or n != num_tokens or n_layers != len(layers):
        raise CacheCorruptionError(
            f"{what}: not the state record of {num_tokens} tokens and {len(layers)} layers "
            f"(magic {magic!r}, {n} tokens, {n_layers} layers)"
        )
    shapes = [
        [
            (st.shape, np.dtype(HOST_OF_TAG[SAFETENSORS_DTYPES[st.dtype]]))
            for st in spec.layers[i].states
        ]
        for i in layers
    ]
    expected = _HEAD.size + sum(int(np.prod(sh)) * dt.itemsize for a in shapes for sh, dt in a)
    if len(record) != expected:
        raise CacheCorruptionError(
            f"{what}: a state record of {len(record)} bytes, expected {expected}"
        )
    if not hmac.compare_digest(_checksum(memoryview(record)[_HEAD.size :], key, context), digest):
        kind = "MAC (written without this server's --cache-secret?)" if key else "checksum"
        raise CacheCorruptionError(f"{what}: the state fails its blake2b {kind}")
    offset, out = _HEAD.size, []
    for i, arrays in zip(layers, shapes, strict=True):
        got = []
        for shape, dt in arrays:
            count = int(np.prod(shape))
            got.append(np.frombuffer(record, dtype=dt, count=count, offset=offset).reshape(shape))
            offset += count * dt.itemsize
        out.append(LayerState(i, num_tokens, tuple(got)))
    return tuple(out)


def read_state(
    pool: BlockPool, handle: CacheHandle, key: bytes | None = None, context: bytes = b""
) -> bytes:
    """The record of a live handle's end state (every recurrent layer)."""
    states = pool.read_states(handle, _state_layers(pool.spec))
    return encode_state(handle.total_tokens, states, key, context)


def read_snapshot(
    pool: BlockPool,
    handle: CacheHandle,
    length: int,
    key: bytes | None = None,
    context: bytes = b"",
) -> bytes | None:
    """The record of the snapshot the pool holds after the first ``length`` tokens of a live
    handle (below its end: a block boundary or a prompt's end); None if it holds none
    (evicted)."""
    states = pool.read_snapshot(handle, length, _state_layers(pool.spec))
    return None if states is None else encode_state(length, states, key, context)


def read_window(
    pool: BlockPool,
    handle: CacheHandle,
    group: int,
    j: int,
    key: bytes | None = None,
    context: bytes = b"",
) -> bytes | None:
    """The record of whole block ``j`` of sliding-window group ``group``'s layers from the
    block the pool holds for it under the block key of a live handle's tokens (a window
    block a published prefix left behind), in the pool's format; None if it holds none."""
    kvs = pool.read_window(handle, group, j, record_layers(pool.spec, group))
    if kvs is None:
        return None
    size = pool.spec.block_tokens
    return encode_block(handle.token_ids[j * size : (j + 1) * size], kvs, key, context)
