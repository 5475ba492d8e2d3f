"""IR types: tensors with (possibly symbolic) shapes and dtypes, and symbolic integers.

Text forms: ``f32[s0, s1, 384]`` for a tensor, ``f32[]`` for a 0-d tensor, ``index`` for a symbolic
integer (a size computed at run time). A symbolic dim is any expression string over size symbols
(``s0``, ``s0*s1``, ``Max(1, s0)``); an int dim is static.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "f32",
    torch.float64: "f64",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "bool",
    torch.complex64: "c64",
}
DTYPES_BY_NAME: dict[str, torch.dtype] = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def check_dtype(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is one of the IR's dtype names."""
    if name not in DTYPES_BY_NAME:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPES_BY_NAME)}")

Dim = int | str


def static_shape(shape: tuple[Dim, ...]) -> tuple[int, ...]:
    """``shape`` as ints; raise ``ValueError`` if a dim is symbolic (weights have static shapes)."""
    dims = tuple(d for d in shape if isinstance(d, int))
    if len(dims) != len(shape):
        raise ValueError(f"shape {list(shape)} is not static")
    return dims


@dataclass(frozen=True)
class TensorType:
    """A tensor of a dtype name (``f32``...) and a shape whose dims are ints or symbolic expressions."""

    dtype: str
    shape: tuple[Dim, ...]

    def __post_init__(self) -> None:
        check_dtype(self.dtype)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def static_shape(self) -> tuple[int, ...]:
        return static_shape(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES_BY_NAME[self.dtype]

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"

    @staticmethod
    def of(tensor: torch.Tensor) -> TensorType:
        """The type of a concrete or fake tensor (symbolic sizes become their expression strings)."""
        return TensorType(dtype_name(tensor.dtype), tuple(dim_of(d) for d in tensor.shape))


@dataclass(frozen=True)
class IndexType:
    """A symbolic integer known only at run time (a tensor size, or arithmetic on sizes)."""

    def __str__(self) -> str:
        return "index"


Type = TensorType | IndexType


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} is not supported by the moec IR") from None


def dim_of(size: int | torch.SymInt) -> Dim:
    """An int for a static size, else the size's symbolic expression without spaces."""
    if isinstance(size, int):
        return size
    node_expr = size.node.expr
    if node_expr.is_Integer:
        return int(node_expr)
    return str(node_expr).replace(" ", "")
