"""Quantized weights in the IR: the ``quant<...>`` weight type and how its storage is laid out.

A quantized weight keeps its logical type (what the op sees after dequantization) and says how it is
stored. In the IR text it appears only in weight declarations::

    weight @layers.0.mlp.experts.w_in: quant<f32[4, 128, 32], bits=[4, 3, 4, 2], group=32>
    weight @layers.0.mlp.down_proj.weight: quant<f32[384, 1536], bits=[4], group=64>

Format (version 1, stable; other backends read it):

* **Shape.** The logical shape is ``[R, C]`` (one matrix) or ``[E, R, C]`` (stacked experts). ``C`` is the
  last dim, the one a linear reduces over (moec stores every linear as (out, in), see
  ``moec.frontend.blocks``). ``bits`` has one entry per matrix: one for ``[R, C]``, ``E`` for ``[E, R, C]``
  (so each expert has its own width). Widths are in ``SUPPORTED_BITS``; ``group`` is in
  ``SUPPORTED_GROUPS`` and divides ``C``.
* **Quantization.** Affine and group-wise along ``C``: the ``g``-th group of ``group`` consecutive
  values of row ``r`` shares one scale and one zero point, and

      w[r, c] = (q[r, c] - zero[r, c // group]) * scale[r, c // group]

  with the integer ``q`` in ``[0, 2**bits - 1]`` and the integer ``zero`` in the same range; the
  arithmetic is float32 (``scale`` is widened from float16 first).
* **Storage.** Three tensors in the plan's ``weights.safetensors`` per quantized weight ``NAME``:

  - ``NAME.qweight``: uint8, 1-D. The packed codes of every matrix, matrix after matrix (expert 0
    first); matrix ``e`` starts at byte ``sum(R * C * bits[e'] // 8 for e' < e)`` and holds its rows in
    order, ``C * bits[e] // 8`` bytes a row.
  - ``NAME.scales``: float16, ``[R, C // group]`` or ``[E, R, C // group]``.
  - ``NAME.zeros``: uint8 (one integer zero point per byte, not packed), same shape as ``scales``.
* **Packing order (a little-endian bit stream per row).** Code ``i`` of a row occupies bits
  ``[i * bits, (i + 1) * bits)`` of the row, and bit ``j`` of the row is bit ``j % 8`` (LSB first) of the
  row's byte ``j // 8``. So 8 bits is one code a byte; 4 bits puts code ``2i`` in the low nibble of
  byte ``i`` and code ``2i + 1`` in the high nibble (as ONNX MatMulNBits); 2 bits puts codes ``4i..4i+3``
  in bits 0-1, 2-3, 4-5, 6-7; 3 bits packs 8 codes into 3 bytes (code 2 straddles bytes 0 and 1).
  ``group * bits`` is a multiple of 8 for every supported pair, so groups and rows end on a byte.

The torch implementation of this format is ``moec.kernels.quant`` (pack, unpack, quantize, dequantize).
"""

from __future__ import annotations

from dataclasses import dataclass

from moec.ir.types import Dim, check_dtype, static_shape

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUPS = (32, 64, 128)
LOGICAL_DTYPES = ("f32", "f16", "bf16")  # what a quantized weight stands for
STORAGE_SUFFIXES = ("qweight", "scales", "zeros")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class QuantizedType:
    """A weight of logical type ``dtype[shape]`` stored as packed ``bits``-bit codes in groups of ``group``.

    ``bits`` has one width per matrix (one for a 2-D weight, one per expert for a 3-D one). The type is
    duck-compatible with ``TensorType`` for ``dtype``, ``shape``, ``static_shape`` and ``rank`` (the shape
    an op sees).
    """

    dtype: str
    shape: tuple[Dim, ...]
    bits: tuple[int, ...]
    group: int

    def __post_init__(self) -> None:
        check_dtype(self.dtype)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def static_shape(self) -> tuple[int, ...]:
        return static_shape(self.shape)

    @property
    def num_matrices(self) -> int:
        return self.static_shape[0] if self.rank == 3 else 1

    @property
    def rows(self) -> int:
        return self.static_shape[-2]

    @property
    def columns(self) -> int:
        return self.static_shape[-1]

    def check(self) -> None:
        """Raise ``ValueError`` naming the broken rule of the format (see the module docstring)."""
        if self.rank not in (2, 3) or not all(isinstance(d, int) for d in self.shape):
            raise ValueError(f"a quantized weight must have a static 2-D or 3-D shape, got {list(self.shape)}")
        if self.dtype not in LOGICAL_DTYPES:
            raise ValueError(f"a quantized weight's logical dtype must be one of {', '.join(LOGICAL_DTYPES)}, "
                             f"got {self.dtype}")
        if len(self.bits) != self.num_matrices:
            raise ValueError(f"'bits' has {len(self.bits)} entries, expected one per matrix ({self.num_matrices})")
        bad_bits = sorted({b for b in self.bits if b not in SUPPORTED_BITS})
        if bad_bits:
            raise ValueError(f"bit widths {bad_bits} are not supported; use {list(SUPPORTED_BITS)}")
        check_group(self.group, self.columns)

    def matrix_bytes(self, index: int) -> int:
        """Packed bytes of matrix ``index``."""
        return self.rows * self.columns * self.bits[index] // 8

    def matrix_offset(self, index: int) -> int:
        """Where matrix ``index`` starts in ``NAME.qweight``."""
        return sum(self.matrix_bytes(i) for i in range(index))

    @property
    def packed_bytes(self) -> int:
        return self.matrix_offset(self.num_matrices)

    @property
    def scale_shape(self) -> tuple[int, ...]:
        return (*self.static_shape[:-1], self.columns // self.group)

    @property
    def storage_bytes(self) -> int:
        """Bytes on disk: packed codes + float16 scales + uint8 zero points."""
        groups = 1
        for dim in self.scale_shape:
            groups *= dim
        return self.packed_bytes + groups * (2 + 1)

    @property
    def average_bits(self) -> float:
        return sum(self.bits) / len(self.bits)

    def with_bits(self, bits: tuple[int, ...]) -> QuantizedType:
        return QuantizedType(self.dtype, self.shape, tuple(bits), self.group)

    def __str__(self) -> str:
        shape = ", ".join(str(d) for d in self.shape)
        bits = ", ".join(str(b) for b in self.bits)
        return f"quant<{self.dtype}[{shape}], bits=[{bits}], group={self.group}>"


def check_group(group: int, columns: int) -> None:
    if group not in SUPPORTED_GROUPS:
        raise ValueError(f"group size {group} is not supported; use one of {list(SUPPORTED_GROUPS)}")
    if columns % group:
        raise ValueError(f"group size {group} does not divide the reduced dimension {columns}; "
                         f"use a group size that divides it")


def storage_names(name: str) -> dict[str, str]:
    """The safetensors names of a quantized weight's storage, by part (``qweight``, ``scales``, ``zeros``)."""
    return {suffix: f"{name}.{suffix}" for suffix in STORAGE_SUFFIXES}
