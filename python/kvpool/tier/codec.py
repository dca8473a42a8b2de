"""The block codec: one block's tokens and K/V as bytes at rest in a shared tier.

A block is positions ``[256 j, 256 j + n)`` of every layer (``n`` = 256, or fewer for a
session's last, partial block). Its record::

    magic b"KVB1" | u32 n | u32 n_layers | 32-byte blake2b of the rest | rest
    rest = u32 token ids [n] | for each layer: keys bytes, values bytes

K/V bytes are the pool's host arrays (``BlockPool.read_layers``: ``[n_kv_heads, n, head_dim]``,
C order, the spec's dtype bit for bit). :func:`block_format_id` names that encoding in block
keys, so a block written in another encoding (a quantized pool, a later version of this
codec) is never read as this one: to store blocks as at-rest codes, change
:func:`block_format_id`, :func:`encode_block` and :func:`decode_block` together.

:func:`decode_block` checks the checksum and every length before it returns anything;
a record that fails raises :class:`~kvpool.errors.CacheCorruptionError`.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvpool.errors import CacheCorruptionError
from kvpool.spec import ModelCacheSpec
from kvpool.storage import HostArray, LayerKV, host_dtype

__all__ = ["CODEC_VERSION", "DecodedBlock", "block_format_id", "decode_block", "encode_block"]

CODEC_VERSION = 1
_MAGIC = b"KVB1"
_HEAD = struct.Struct("<4sII32s")
_PERSON = b"kvpool.block.1"


def block_format_id(pool_or_spec: Any) -> str:
    """The encoding blocks of this pool are stored in: ``"dense-<dtype>-v1"``.

    The one place that names it (block keys carry it). Takes a pool or a spec.
    """
    spec: ModelCacheSpec = getattr(pool_or_spec, "spec", pool_or_spec)
    return f"dense-{spec.dtype}-v{CODEC_VERSION}"


def _checksum(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=32, person=_PERSON).digest()


@dataclass(frozen=True, slots=True)
class DecodedBlock:
    """A checked block: its token ids and each layer's K/V (``start`` = its first position)."""

    token_ids: tuple[int, ...]
    layers: tuple[LayerKV, ...]


def encode_block(token_ids: Sequence[int], kvs: Sequence[LayerKV]) -> bytes:
    """The record of one block: ``kvs`` holds every layer, in order, for ``token_ids``."""
    n = len(token_ids)
    parts: list[bytes | memoryview] = [np.asarray(token_ids, dtype="<u4").tobytes()]
    for kv in kvs:
        assert kv.num_tokens == n, f"layer {kv.layer}: {kv.num_tokens} rows for {n} tokens"
        for array in (kv.keys, kv.values):
            parts.append(np.ascontiguousarray(array).data.cast("B"))
    rest = b"".join(parts)
    return _HEAD.pack(_MAGIC, n, len(kvs), _checksum(rest)) + rest


def _layer_shapes(spec: ModelCacheSpec, n: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    return [
        ((layer.n_kv_heads, n, layer.k_head_dim), (layer.n_kv_heads, n, layer.v_head_dim))
        for layer in spec.layers
    ]


def decode_block(record: bytes, spec: ModelCacheSpec, start: int, what: str) -> DecodedBlock:
    """Check and split a record written by :func:`encode_block` for positions from ``start``.

    Raises CacheCorruptionError naming ``what`` (the key) on any mismatch. The arrays are
    views of ``record`` (read-only).
    """
    if len(record) < _HEAD.size:
        raise CacheCorruptionError(f"{what}: a block record of {len(record)} bytes is truncated")
    magic, n, n_layers, digest = _HEAD.unpack_from(record)
    if magic != _MAGIC:
        raise CacheCorruptionError(f"{what}: not a block record (magic {magic!r})")
    if n_layers != spec.n_layers or not 0 < n <= spec.block_tokens:
        raise CacheCorruptionError(
            f"{what}: a block of {n} tokens and {n_layers} layers, expected 1..{spec.block_tokens} "
            f"tokens and {spec.n_layers} layers"
        )
    dtype = host_dtype(spec.dtype)
    shapes = _layer_shapes(spec, n)
    expected = (
        _HEAD.size
        + 4 * n
        + sum((int(np.prod(k)) + int(np.prod(v))) * dtype.itemsize for k, v in shapes)
    )
    if len(record) != expected:
        raise CacheCorruptionError(
            f"{what}: a block record of {len(record)} bytes, expected {expected}"
        )
    rest = memoryview(record)[_HEAD.size :]
    if _checksum(rest) != digest:
        raise CacheCorruptionError(f"{what}: the block fails its blake2b checksum")
    tokens = np.frombuffer(record, dtype="<u4", count=n, offset=_HEAD.size)
    offset = _HEAD.size + 4 * n
    layers = []
    for i, (kshape, vshape) in enumerate(shapes):
        arrays: list[HostArray] = []
        for shape in (kshape, vshape):
            count = int(np.prod(shape))
            arrays.append(
                np.frombuffer(record, dtype=dtype, count=count, offset=offset).reshape(shape)
            )
            offset += count * dtype.itemsize
        layers.append(LayerKV(i, start, arrays[0], arrays[1]))
    return DecodedBlock(tuple(int(t) for t in tokens), tuple(layers))
