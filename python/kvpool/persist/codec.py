"""Codec per block format: the tensors that hold one layer's K/V in a cache file.

A file holds blocks as they are at rest, never converted:

* dense blocks (every format version): ``layers.{i}.keys`` and ``layers.{i}.values``,
  ``[n_kv_heads, T, head_dim]`` in the cache dtype, read with ``read_layers`` (bit for bit);
* quantized blocks (version 2): for each of ``keys`` and ``values`` three tensors,
  ``.codes`` (U32 ``[n_kv_heads, T, head_dim * bits // 32]``), ``.scales`` and ``.biases``
  (cache dtype ``[n_kv_heads, T, head_dim // group_size]``), read with ``read_codes`` (bit
  for bit: a load gives back exactly the codes that were saved);
* a recurrent layer's end state (version 3), whatever the block format:
  ``layers.{i}.state.{e}``, one tensor per state array in its own dtype and shape, read with
  ``read_states`` (bit for bit; states are never quantized); version 4 adds snapshots, the
  same tensors after fewer tokens (``snapshots.{L}.layers.{i}.state.{e}``, persist.layout).

Records go back into a pool through :class:`~kvpool.cache.sequence.HostWrite`, which picks
``write_layers`` or ``write_codes`` by the record's type.

No MLX: codecs work on any :class:`~kvpool.cache.storage.KVStorage`, the fake included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from kvpool.cache.format import DTYPE_OF_TAG, SAFETENSORS_DTYPES, BlockFormat
from kvpool.cache.spec import AttentionKind, LayerSpec, ModelCacheSpec
from kvpool.cache.storage import HostArray, LayerCodes, LayerKV, LayerState, QuantizedRows
from kvpool.cache.tables import CacheHandle

if TYPE_CHECKING:
    from kvpool.pool import BlockPool

HOST_OF_TAG = {tag: d.host_le for tag, d in DTYPE_OF_TAG.items()}
"""safetensors dtype tag -> the little-endian numpy dtype holding it bit for bit."""

TAG_BYTES = {tag: d.nbytes for tag, d in DTYPE_OF_TAG.items()}

_QUANTIZED_PARTS = ("codes", "scales", "biases")


@dataclass(frozen=True, slots=True)
class Part:
    """One tensor of a layer: ``layers.{i}.{suffix}``, ``[n_kv_heads, T, last_dim]`` (or
    ``shape`` itself, for a state)."""

    suffix: str
    dtype: str  # safetensors tag
    last_dim: int
    shape: tuple[int, ...] | None = None  # a state's fixed shape (no token axis)


class LayerCodec(Protocol):
    """Moves one block format's layers between a pool and a file's tensors."""

    def parts(self, layer: LayerSpec) -> list[Part]:
        """The layer's tensors, in file order."""
        ...

    def read(
        self, pool: BlockPool, handle: CacheHandle, layers: Sequence[int], start: int, stop: int
    ) -> list[Any]:
        """Positions ``[start, stop)`` of ``layers`` of a live handle, as records."""
        ...

    def arrays(self, record: Any) -> list[HostArray]:
        """A record's host arrays in :meth:`parts` order."""
        ...

    def record(self, layer: int, start: int, arrays: Sequence[HostArray]) -> Any:
        """The record of ``arrays`` (in :meth:`parts` order, host dtypes)."""
        ...


@dataclass(frozen=True, slots=True)
class DenseCodec:
    format: BlockFormat

    def parts(self, layer: LayerSpec) -> list[Part]:
        tag = SAFETENSORS_DTYPES[self.format.dtype]
        return [Part("keys", tag, layer.k_head_dim), Part("values", tag, layer.v_head_dim)]

    def read(
        self, pool: BlockPool, handle: CacheHandle, layers: Sequence[int], start: int, stop: int
    ) -> list[Any]:
        return pool.read_layers(handle, layers, start, stop)

    def arrays(self, record: Any) -> list[HostArray]:
        assert isinstance(record, LayerKV)
        return [record.keys, record.values]

    def record(self, layer: int, start: int, arrays: Sequence[HostArray]) -> Any:
        keys, values = arrays
        return LayerKV(layer, start, keys, values)


@dataclass(frozen=True, slots=True)
class QuantizedCodec:
    format: BlockFormat

    def parts(self, layer: LayerSpec) -> list[Part]:
        fmt = self.format
        tag = SAFETENSORS_DTYPES[fmt.dtype]
        out = []
        for which, dim in (("keys", layer.k_head_dim), ("values", layer.v_head_dim)):
            out.append(Part(f"{which}.codes", "U32", fmt.codes_dim(dim)))
            out.append(Part(f"{which}.scales", tag, fmt.scales_dim(dim)))
            out.append(Part(f"{which}.biases", tag, fmt.scales_dim(dim)))
        return out

    def read(
        self, pool: BlockPool, handle: CacheHandle, layers: Sequence[int], start: int, stop: int
    ) -> list[Any]:
        return pool.read_codes(handle, layers, start, stop)

    def arrays(self, record: Any) -> list[HostArray]:
        assert isinstance(record, LayerCodes)
        return [getattr(rows, p) for rows in (record.keys, record.values) for p in _QUANTIZED_PARTS]

    def record(self, layer: int, start: int, arrays: Sequence[HostArray]) -> Any:
        return LayerCodes(layer, start, QuantizedRows(*arrays[:3]), QuantizedRows(*arrays[3:]))


@dataclass(frozen=True, slots=True)
class StateCodec:
    """A recurrent layer's end state: one tensor per state array (``start`` is the number
    of tokens the state is after)."""

    def parts(self, layer: LayerSpec) -> list[Part]:
        return [
            Part(f"state.{e}", SAFETENSORS_DTYPES[st.dtype], 0, st.shape)
            for e, st in enumerate(layer.states)
        ]

    def read(
        self, pool: BlockPool, handle: CacheHandle, layers: Sequence[int], start: int, stop: int
    ) -> list[Any]:
        return pool.read_states(handle, layers)

    def arrays(self, record: Any) -> list[HostArray]:
        assert isinstance(record, LayerState)
        return list(record.arrays)

    def record(self, layer: int, start: int, arrays: Sequence[HostArray]) -> Any:
        return LayerState(layer, start, tuple(arrays))


def codec_for(fmt: BlockFormat) -> LayerCodec:
    """The codec of blocks in ``fmt``."""
    return QuantizedCodec(fmt) if fmt.is_quantized else DenseCodec(fmt)


def layer_codec(spec: ModelCacheSpec, layer: int) -> LayerCodec:
    """The codec of layer ``layer`` of ``spec``: its state, or its K/V in the blocks' format."""
    if spec.layers[layer].kind is AttentionKind.RECURRENT:
        return StateCodec()
    return codec_for(spec.format)


def host_dtype_of_tag(tag: str) -> np.dtype[Any]:
    return np.dtype(HOST_OF_TAG[tag])
