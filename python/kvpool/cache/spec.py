"""ModelCacheSpec: the shape of one model's KV cache, as the pool stores it.

No MLX import at module level: specs are plain data, built by hand in unit
tests and by :meth:`ModelCacheSpec.from_model` from a loaded mlx-lm model.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvpool.cache.format import DEFAULT_GROUP_SIZE, DTYPE_BYTES, BlockFormat
from kvpool.errors import InvalidRequestError, UnsupportedModelError

BLOCK_TOKENS = 256
"""Tokens per block, the pool's unit of allocation."""

__all__ = [
    "BLOCK_TOKENS",
    "DTYPE_BYTES",
    "AttentionKind",
    "BlockFormat",
    "LayerGroup",
    "LayerSpec",
    "ModelCacheSpec",
    "StateSpec",
]


class AttentionKind(enum.Enum):
    """How a layer sees the past: every earlier token, a sliding window of them, or a
    recurrent state (mlx-lm's ``ArraysCache``: conv and SSM states, not split by token)."""

    GLOBAL = "global"
    SLIDING = "sliding"
    RECURRENT = "recurrent"


@dataclass(frozen=True, slots=True)
class StateSpec:
    """One array of a recurrent layer's state: its shape without the batch axis, its dtype."""

    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        if not self.shape or min(self.shape) < 1:
            raise InvalidRequestError(f"a state array needs dimensions >= 1, got {self.shape}")
        if self.dtype not in DTYPE_BYTES:
            raise InvalidRequestError(
                f"state dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}"
            )

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """One layer's cache geometry.

    ``window`` is the number of tokens a sliding layer's cache keeps
    (mlx-lm's ``RotatingKVCache.max_size``); it is None for global layers.
    A recurrent layer has no K/V (dimensions 0) and ``states``: the arrays of its
    ``ArraysCache`` (e.g. conv state ``(3, 384)`` and SSM state ``(4, 32, 32)``).
    """

    kind: AttentionKind
    n_kv_heads: int
    k_head_dim: int
    v_head_dim: int
    window: int | None = None
    states: tuple[StateSpec, ...] = ()

    @classmethod
    def recurrent(cls, states: tuple[StateSpec, ...]) -> LayerSpec:
        """A recurrent layer holding ``states``."""
        return cls(AttentionKind.RECURRENT, 0, 0, 0, None, states)

    def __post_init__(self) -> None:
        if self.kind is AttentionKind.RECURRENT:
            if not self.states or (self.n_kv_heads, self.k_head_dim, self.v_head_dim) != (0, 0, 0):
                raise InvalidRequestError(
                    f"a recurrent layer has states and no K/V dimensions, got {self}"
                )
        elif self.states:
            raise InvalidRequestError(f"only recurrent layers have states, got {self}")
        elif min(self.n_kv_heads, self.k_head_dim, self.v_head_dim) < 1:
            raise InvalidRequestError(f"layer dimensions must be >= 1, got {self}")
        if (self.kind is AttentionKind.SLIDING) != (self.window is not None):
            raise InvalidRequestError(f"a window is required for sliding layers only, got {self}")
        if self.window is not None and self.window < 1:
            raise InvalidRequestError(f"window must be >= 1, got {self.window}")


@dataclass(frozen=True, slots=True)
class LayerGroup:
    """Layers that share one attention kind and window (indices ascending), and the
    :class:`BlockFormat` their blocks hold K/V in."""

    kind: AttentionKind
    window: int | None
    layers: tuple[int, ...]
    format: BlockFormat


@dataclass(frozen=True, slots=True)
class ModelCacheSpec:
    """Every layer's cache geometry, the storage dtype, the block size and the format at rest.

    ``kv_bits`` (None, 8 or 4) and ``kv_group_size`` (64 or 32) choose the
    :class:`BlockFormat` of every group's blocks (:attr:`format`): dense in ``dtype``, or
    affine-quantized in MLX's layout with scales and biases in ``dtype``. A quantized spec
    needs every head dim to be a multiple of the group size (InvalidBlockFormatError, so a
    pool can never be built for it). Layers are grouped by attention kind and window
    (:attr:`groups`); each group has its own blocks and block tables, and a block of
    group ``g`` holds
    ``block_tokens`` consecutive positions of every layer of ``g``
    (:meth:`group_bytes_per_block`). ``bytes_per_block`` sums over all layers:
    the bytes of one block in every group.
    """

    layers: tuple[LayerSpec, ...]
    dtype: str = "float16"
    block_tokens: int = BLOCK_TOKENS
    kv_bits: int | None = None  # None: dense blocks; 8 or 4: affine-quantized at rest
    kv_group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self) -> None:
        if not self.layers:
            raise InvalidRequestError("a ModelCacheSpec needs at least one layer")
        if self.dtype not in DTYPE_BYTES:
            raise InvalidRequestError(
                f"dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}"
            )
        if self.block_tokens < 1:
            raise InvalidRequestError(f"block_tokens must be >= 1, got {self.block_tokens}")
        fmt = self.format  # validates bits and group size
        for i, layer in enumerate(self.layers):
            if layer.kind is AttentionKind.RECURRENT:
                continue  # states stay dense: quantized formats apply to K/V blocks
            fmt.check_head_dim(layer.k_head_dim, f"layer {i}: k head dim")
            fmt.check_head_dim(layer.v_head_dim, f"layer {i}: v head dim")

    @property
    def format(self) -> BlockFormat:
        """The format every group's blocks hold K/V in."""
        return BlockFormat(self.dtype, self.kv_bits, self.kv_group_size)

    def with_format(self, bits: int | None, group_size: int = DEFAULT_GROUP_SIZE) -> ModelCacheSpec:
        """This geometry with blocks in another format (``bits`` None: dense)."""
        return dataclasses.replace(self, kv_bits=bits, kv_group_size=group_size)

    @classmethod
    def uniform(
        cls,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        dtype: str = "float16",
        block_tokens: int = BLOCK_TOKENS,
    ) -> ModelCacheSpec:
        """A spec of ``n_layers`` identical global-attention layers."""
        if n_layers < 1:
            raise InvalidRequestError(f"n_layers must be >= 1, got {n_layers}")
        layer = LayerSpec(AttentionKind.GLOBAL, n_kv_heads, head_dim, head_dim)
        return cls((layer,) * n_layers, dtype, block_tokens)

    @classmethod
    def from_model(cls, model: Any, *, block_tokens: int = BLOCK_TOKENS) -> ModelCacheSpec:
        """Read the geometry from a loaded mlx-lm model.

        Runs one token through a fresh cache and reads the K/V shapes back, so
        any architecture whose caches are ``KVCache``, ``RotatingKVCache``
        (keep 0) or ``ArraysCache`` works; anything else raises
        :class:`UnsupportedModelError`.
        """
        from kvpool.mlx.mlx_lm import probe_layers

        layers = []
        dtypes = set()
        for i, probed in enumerate(probe_layers(model)):
            if probed.cache_type == "ArraysCache":
                if not probed.states:
                    raise UnsupportedModelError(f"layer {i}: an ArraysCache with no state")
                layers.append(LayerSpec.recurrent(probed.states))
                continue
            if probed.cache_type == "KVCache":
                kind, window = AttentionKind.GLOBAL, None
            elif probed.cache_type == "RotatingKVCache":
                if probed.keep != 0:
                    raise UnsupportedModelError(
                        f"layer {i}: RotatingKVCache with keep={probed.keep} is not supported"
                    )
                kind, window = AttentionKind.SLIDING, probed.window
            else:
                raise UnsupportedModelError(
                    f"layer {i}: cache type {probed.cache_type} cannot be held in blocks "
                    "(supported: KVCache, RotatingKVCache)"
                )
            layers.append(
                LayerSpec(kind, probed.n_kv_heads, probed.k_head_dim, probed.v_head_dim, window)
            )
            dtypes.add(probed.dtype)
        if not dtypes:  # every layer recurrent: the dtype names the (absent) K/V blocks
            dtypes = {layers[0].states[0].dtype}
        if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPE_BYTES:
            raise UnsupportedModelError(f"cache dtypes {sorted(dtypes)} are not supported")
        return cls(tuple(layers), dtypes.pop(), block_tokens)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def itemsize(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def _token_bytes(self, layers: Any) -> int:
        fmt = self.format
        return sum(
            s.n_kv_heads * (fmt.row_bytes(s.k_head_dim) + fmt.row_bytes(s.v_head_dim))
            for s in layers
        )

    def layers_bytes_per_token(self, layers: Sequence[int]) -> int:
        """Bytes of K and V one position takes at rest in ``layers`` (indices)."""
        return self._token_bytes([self.layers[i] for i in layers])

    @property
    def bytes_per_token(self) -> int:
        """Bytes of K and V one position takes at rest over all layers (in :attr:`format`)."""
        return self._token_bytes(self.layers)

    @property
    def bytes_per_block(self) -> int:
        """Bytes of K and V that one block holds over all layers (in :attr:`format`)."""
        return self.bytes_per_token * self.block_tokens

    @property
    def groups(self) -> tuple[LayerGroup, ...]:
        """Layers grouped by (kind, window), in order of first appearance."""
        order: dict[tuple[AttentionKind, int | None], list[int]] = {}
        for i, layer in enumerate(self.layers):
            order.setdefault((layer.kind, layer.window), []).append(i)
        fmt = self.format
        return tuple(
            LayerGroup(kind, window, tuple(ids), fmt) for (kind, window), ids in order.items()
        )

    def group_bytes_per_block(self, group: int) -> int:
        """Bytes of K and V one block of layer group ``group`` holds at rest (its layers);
        for a recurrent group, the bytes of one state of every layer (a block is a state)."""
        layers = [self.layers[i] for i in self.groups[group].layers]
        if self.groups[group].kind is AttentionKind.RECURRENT:
            return sum(s.nbytes for layer in layers for s in layer.states)
        return self._token_bytes(layers) * self.block_tokens

    @property
    def state_bytes(self) -> int:
        """Bytes of one sequence's recurrent states over all layers (0 without recurrent layers)."""
        return sum(s.nbytes for layer in self.layers for s in layer.states)

    def group_of_layer(self) -> tuple[int, ...]:
        """For each layer, the index of its group in :attr:`groups`."""
        out = [0] * self.n_layers
        for g, group in enumerate(self.groups):
            for i in group.layers:
                out[i] = g
        return tuple(out)

    @property
    def max_window(self) -> int | None:
        """The widest sliding window, or None when every layer is global."""
        windows = [layer.window for layer in self.layers if layer.window is not None]
        return max(windows) if windows else None

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` positions."""
        return -(-num_tokens // self.block_tokens)

    @property
    def has_recurrent(self) -> bool:
        """True if some layer keeps a recurrent state."""
        return any(layer.kind is AttentionKind.RECURRENT for layer in self.layers)

    @property
    def has_window(self) -> bool:
        """True if some layer group attends a sliding window (keeps only its last blocks)."""
        return any(group.window is not None for group in self.groups)

    def describe(self) -> str:
        kinds = Counter(layer.kind.value for layer in self.layers)
        parts = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        states = f", {self.state_bytes / 2**20:.2f} MiB/state" if self.has_recurrent else ""
        return (
            f"{self.n_layers} layers ({parts}), {self.format.name}, "
            f"{self.block_tokens} tokens/block, "
            f"{self.bytes_per_block / 2**20:.2f} MiB/block{states}"
        )
