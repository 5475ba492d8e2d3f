"""Complex-valued generic ops evaluated on (real, imaginary) pairs, for the ONNX export.

torch.onnx translates few complex ops, so the exporter carries a complex tensor ``c`` of shape [..., n] as
the real tensor ``view_as_real(c)`` of shape [..., n, 2] and runs each complex op as real arithmetic on it:
the export then holds real ops only. This covers rotary embeddings written with complex numbers
(DeepSeek-V2, Llama 4): ``polar``, ``view_as_complex``, ``view_as_real``, products, sums and the shape ops
between them. ``PAIR_RULES`` lists the targets; ``check_lowerable`` refuses complex values elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from moec.ir.core import Value
from moec.ir.types import DTYPES_BY_NAME, TensorType

Rule = Callable[[Sequence[Any], Sequence[bool]], torch.Tensor]  # (args read, which are complex) -> pairs


def is_complex(value: object) -> bool:
    """Whether an op argument is an IR value of a complex dtype."""
    return isinstance(value, Value) and isinstance(value.type, TensorType) and \
        DTYPES_BY_NAME[value.type.dtype].is_complex


def _polar(args: Sequence[Any], complex_args: Sequence[bool]) -> torch.Tensor:
    magnitude, angle = args
    return torch.stack([magnitude * torch.cos(angle), magnitude * torch.sin(angle)], dim=-1)


def _same(args: Sequence[Any], complex_args: Sequence[bool]) -> torch.Tensor:
    return args[0]  # view_as_complex of [..., n, 2] and view_as_real of pairs: the pairs themselves


def _real_factor(value: Any) -> Any:
    """A real operand broadcast against pairs: a tensor gets a trailing axis; a number stays one."""
    return value.unsqueeze(-1) if isinstance(value, torch.Tensor) else value


def _mul(args: Sequence[Any], complex_args: Sequence[bool]) -> torch.Tensor:
    a, b = args
    if complex_args[0] and complex_args[1]:
        ar, ai = a.unbind(-1)
        br, bi = b.unbind(-1)
        return torch.stack([ar * br - ai * bi, ar * bi + ai * br], dim=-1)
    return a * _real_factor(b) if complex_args[0] else _real_factor(a) * b


def _add(args: Sequence[Any], complex_args: Sequence[bool]) -> torch.Tensor:
    return args[0] + args[1]


def _sub(args: Sequence[Any], complex_args: Sequence[bool]) -> torch.Tensor:
    return args[0] - args[1]


def _dims(rank: int, dims: Sequence[int]) -> list[int]:
    """Dims of a complex tensor of ``rank`` made non-negative: the same dims of its pairs."""
    return [d % rank for d in dims]


def _rank(pairs: torch.Tensor) -> int:
    return pairs.dim() - 1


def _slice(args: Sequence[Any], complex_args: Sequence[bool]) -> torch.Tensor:
    pairs, dim, *rest = args
    return torch.ops.aten.slice.Tensor(pairs, _dims(_rank(pairs), [dim])[0], *rest)


def _unsqueeze(args: Sequence[Any], complex_args: Sequence[bool]) -> torch.Tensor:
    pairs, dim = args
    return pairs.unsqueeze(_dims(_rank(pairs) + 1, [dim])[0])


def _squeeze(args: Sequence[Any], complex_args: Sequence[bool]) -> torch.Tensor:
    pairs, dim = args
    return pairs.squeeze(_dims(_rank(pairs), [dim])[0])


def _select(args: Sequence[Any], complex_args: Sequence[bool]) -> torch.Tensor:
    pairs, dim, index = args
    return pairs.select(_dims(_rank(pairs), [dim])[0], index)


def _transpose(args: Sequence[Any], complex_args: Sequence[bool]) -> torch.Tensor:
    pairs, d0, d1 = args
    return pairs.transpose(*_dims(_rank(pairs), [d0, d1]))


def _permute(args: Sequence[Any], complex_args: Sequence[bool]) -> torch.Tensor:
    pairs, dims = args
    return pairs.permute(*_dims(_rank(pairs), dims), _rank(pairs))


def _reshape(args: Sequence[Any], complex_args: Sequence[bool]) -> torch.Tensor:
    pairs, shape = args
    return pairs.reshape(*shape, 2)


def _expand(args: Sequence[Any], complex_args: Sequence[bool]) -> torch.Tensor:
    pairs, shape = args
    return pairs.expand(*shape, 2)


def _cat(args: Sequence[Any], complex_args: Sequence[bool]) -> torch.Tensor:
    tensors, *dim = args
    return torch.cat(tensors, dim=_dims(_rank(tensors[0]), dim or [0])[0])


def _copy(args: Sequence[Any], complex_args: Sequence[bool]) -> torch.Tensor:
    return args[0].clone()


PAIR_RULES: dict[str, Rule] = {
    "aten.polar.default": _polar,
    "aten.view_as_complex.default": _same,
    "aten.view_as_real.default": _same,
    "aten.mul.Tensor": _mul,
    "aten.add.Tensor": _add,  # of two complex tensors
    "aten.sub.Tensor": _sub,
    "aten.slice.Tensor": _slice,
    "aten.unsqueeze.default": _unsqueeze,
    "aten.squeeze.dim": _squeeze,
    "aten.select.int": _select,
    "aten.transpose.int": _transpose,
    "aten.permute.default": _permute,
    "aten.view.default": _reshape,
    "aten.reshape.default": _reshape,
    "aten._unsafe_view.default": _reshape,
    "aten.expand.default": _expand,
    "aten.cat.default": _cat,
    "aten.clone.default": _copy,
    "aten.alias.default": _same,
}


def _complex_args(ir_args: Sequence[Any]) -> list[bool]:
    """For each IR argument, whether it is (or, for a list, holds) a complex value."""
    return [any(map(is_complex, arg)) if isinstance(arg, (list, tuple)) else is_complex(arg) for arg in ir_args]


def touches_complex(ir_args: Sequence[Any], results: Sequence[Value]) -> bool:
    """Whether an op reads or makes a complex value."""
    return any(_complex_args(ir_args)) or any(map(is_complex, results))


def pairs_unsupported(target: str, ir_args: Sequence[Any], kwargs: dict[str, Any]) -> str:
    """Why a complex-valued op cannot run on pairs ("" if it can)."""
    if target not in PAIR_RULES:
        return f"moec carries complex values through {', '.join(sorted(t.split('.')[1] for t in PAIR_RULES))} only"
    if kwargs:
        return f"keyword arguments {sorted(kwargs)} on a complex op"
    if target in ("aten.add.Tensor", "aten.sub.Tensor") and not all(_complex_args(ir_args)[:2]):
        return "a sum of a complex and a real tensor"
    return ""


def run_on_pairs(target: str, ir_args: Sequence[Any], args: Sequence[Any]) -> torch.Tensor:
    """The op ``target`` on pairs: ``ir_args`` are the op's IR arguments (to tell which are complex),
    ``args`` the same arguments read, complex ones as pairs."""
    return PAIR_RULES[target](args, _complex_args(ir_args))
