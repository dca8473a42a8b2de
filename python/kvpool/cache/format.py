"""BlockFormat: how one layer group's blocks hold K/V at rest, and the one dtype table.

No MLX. A block is either *dense* (the cache dtype, as mlx-lm computes it) or
*affine-quantized* in MLX's own layout (``mx.quantize(x, group_size, bits)``): every row of
``head_dim`` values is cut into groups of ``group_size``; each group keeps one scale and
one bias in the cache dtype and ``bits``-bit codes packed into uint32 words::

    dense row (head_dim = 128, float16)       128 x 2 B                    = 256 B
    q8, group 64:  codes  128 * 8 / 32 = 32 uint32   128 B
                   scales 128 / 64 = 2 float16        4 B
                   biases 2 float16                   4 B                  = 136 B (1.88x)
    q4, group 64:  codes  16 uint32 64 B + 4 B + 4 B                       =  72 B (3.56x)

A value is ``code * scale + bias``. Batch generators always see dense caches: quantization
is at rest only (the storage dequantizes inside its gather).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvpool.errors import InvalidRequestError


@dataclass(frozen=True, slots=True)
class Dtype:
    """One element type kvpool stores: its size, the numpy dtype that holds it bit for bit
    on the host (numpy has no bfloat16: its bits go as uint16), its safetensors tag."""

    name: str
    nbytes: int
    host: str  # numpy dtype name
    safetensors: str

    @property
    def host_le(self) -> str:
        """The little-endian numpy dtype string (files are little-endian)."""
        return "<" + {"float32": "f4", "float16": "f2", "uint16": "u2", "uint32": "u4"}[self.host]


DTYPES = {
    d.name: d
    for d in (
        Dtype("float32", 4, "float32", "F32"),
        Dtype("float16", 2, "float16", "F16"),
        Dtype("bfloat16", 2, "uint16", "BF16"),
        Dtype("uint32", 4, "uint32", "U32"),  # packed codes of quantized blocks
    )
}
"""The one dtype table: every other table below is derived from it."""

CACHE_DTYPES = ("float32", "float16", "bfloat16")
"""The dtypes a KV cache may have."""

DTYPE_BYTES = {n: DTYPES[n].nbytes for n in CACHE_DTYPES}
"""Bytes of one element of each cache dtype."""

HOST_DTYPES = {n: DTYPES[n].host for n in CACHE_DTYPES}
"""The numpy dtype name holding one element bit for bit (numpy has no bfloat16)."""

SAFETENSORS_DTYPES = {n: d.safetensors for n, d in DTYPES.items()}
"""safetensors dtype tags of the cache dtypes and of packed codes."""

DTYPE_OF_TAG = {d.safetensors: d for d in DTYPES.values()}
"""safetensors tag -> dtype."""

QUANT_BITS = (4, 8)
QUANT_GROUP_SIZES = (32, 64)
DEFAULT_GROUP_SIZE = 64
CODE_BYTES = 4  # codes are packed into uint32 words


class InvalidBlockFormatError(InvalidRequestError):
    """A block format that cannot be built: bad dtype, bits, group size or head dim."""


@dataclass(frozen=True, slots=True)
class BlockFormat:
    """Dense ``dtype`` (``bits`` None) or affine-quantized to ``bits`` with ``group_size``.

    >>> BlockFormat("float16").row_bytes(128), BlockFormat("float16", 4).row_bytes(128)
    (256, 72)
    """

    dtype: str = "float16"
    bits: int | None = None  # None: dense; else 4 or 8
    group_size: int = DEFAULT_GROUP_SIZE  # quantized only: 32 or 64

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise InvalidBlockFormatError(
                f"dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}"
            )
        if self.bits is not None and (isinstance(self.bits, bool) or self.bits not in QUANT_BITS):
            raise InvalidBlockFormatError(
                f"kv bits must be one of {list(QUANT_BITS)} (or None for dense), got {self.bits!r}"
            )
        if isinstance(self.group_size, bool) or self.group_size not in QUANT_GROUP_SIZES:
            raise InvalidBlockFormatError(
                f"kv group size must be one of {list(QUANT_GROUP_SIZES)}, got {self.group_size!r}"
            )

    @classmethod
    def dense(cls, dtype: str) -> BlockFormat:
        return cls(dtype)

    @classmethod
    def affine(cls, dtype: str, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> BlockFormat:
        return cls(dtype, bits, group_size)

    @property
    def is_quantized(self) -> bool:
        return self.bits is not None

    @property
    def itemsize(self) -> int:
        """Bytes of one element of the cache dtype (dense values, scales and biases)."""
        return DTYPE_BYTES[self.dtype]

    @property
    def name(self) -> str:
        """``"float16"`` or ``"q4g64-float16"``."""
        if self.bits is None:
            return self.dtype
        return f"q{self.bits}g{self.group_size}-{self.dtype}"

    def check_head_dim(self, head_dim: int, what: str = "head dim") -> None:
        """Raise InvalidBlockFormatError unless this format can hold rows of ``head_dim``."""
        if self.bits is not None and head_dim % self.group_size:
            raise InvalidBlockFormatError(
                f"{what} {head_dim} is not a multiple of the kv group size {self.group_size} "
                f"({self.bits}-bit blocks quantize groups of {self.group_size} values)"
            )

    def codes_dim(self, head_dim: int) -> int:
        """uint32 words of codes per row (quantized only)."""
        assert self.bits is not None, "a dense format has no codes: this indicates a bug"
        return head_dim * self.bits // 32

    def scales_dim(self, head_dim: int) -> int:
        """Scales (and biases) per row (quantized only)."""
        return head_dim // self.group_size

    def row_bytes(self, head_dim: int) -> int:
        """Bytes one row of ``head_dim`` values takes at rest."""
        if self.bits is None:
            return head_dim * self.itemsize
        return self.codes_dim(head_dim) * CODE_BYTES + 2 * self.scales_dim(head_dim) * self.itemsize

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "bits": self.bits, "group_size": self.group_size}

    def describe(self) -> str:
        if self.bits is None:
            return f"dense {self.dtype}"
        return f"{self.bits}-bit affine (group {self.group_size}, {self.dtype} scales)"
