"""Resolve a generic op's target name (``aten.linear.default``, ``py.mul``) to the callable it names."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from functools import cache

import torch

PY_OPS: dict[str, Callable] = {
    "py.add": operator.add,
    "py.sub": operator.sub,
    "py.mul": operator.mul,
    "py.floordiv": operator.floordiv,
    "py.truediv": operator.truediv,
    "py.mod": operator.mod,
    "py.pow": operator.pow,
    "py.neg": operator.neg,
    "py.eq": operator.eq,
    "py.ne": operator.ne,
    "py.lt": operator.lt,
    "py.le": operator.le,
    "py.gt": operator.gt,
    "py.ge": operator.ge,
    "py.sym_max": torch.sym_max,
    "py.sym_min": torch.sym_min,
    "py.sym_not": torch.sym_not,
    "py.sym_float": torch.sym_float,
    "py.sym_int": torch.sym_int,
    "py.ceil": math.ceil,
    "py.floor": math.floor,
}
PY_NAMES: dict[Callable, str] = {fn: name for name, fn in PY_OPS.items()}


@cache
def resolve_target(target: str) -> Callable:
    """The callable behind a generic op name; ``KeyError`` with a reason if there is none."""
    if target in PY_OPS:
        return PY_OPS[target]
    parts = target.split(".")
    if parts[0] != "aten" or len(parts) != 3:
        raise KeyError(f"{target!r} is neither aten.<op>.<overload> nor a known py.* op")
    try:
        return getattr(getattr(torch.ops.aten, parts[1]), parts[2])
    except AttributeError:
        raise KeyError(f"torch has no ATen op {target!r}") from None
