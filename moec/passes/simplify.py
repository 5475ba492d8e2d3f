"""``simplify``: remove generic ops that return their input unchanged.

Captured models carry such ops: dropout in eval mode exports as a ``clone``, position ids as ``x + 0``,
slicing code as ``x[:, 0:]`` over a whole dimension, scaling code as ``x * 1``. Each costs a dispatch
(a few microseconds) on every call and, for a clone, a copy. The rules (each says why it does not fire):

1. ``clone``:       ``aten.clone.default(x)`` without a memory format, where ``x`` is a fresh dense tensor
                    (from a GEMM, a norm, an elementwise op, a moec op) or a view that keeps one dense
                    (``view``, ``transpose``, ``unsqueeze`` ...): the clone of a dense tensor has its
                    strides, so every later view reads the clone and ``x`` alike.
2. ``add-zero``:    ``aten.add.Tensor(x, 0)`` / ``aten.sub.Tensor(x, 0)`` without ``alpha``.
3. ``mul-one``:     ``aten.mul.Tensor(x, 1)`` / ``aten.div.Tensor(x, 1)``.
4. ``whole-slice``: ``aten.slice.Tensor(x, dim, 0, end)`` with step 1 and ``end`` at or past the
                    dimension's end (torch.export writes the largest int64).

Requires: a verified, functional graph (no op writes into a value, as torch.export produces). Ensures: each
removed op's readers read its input instead, whose type (dtype and shape) equals the removed result's; a
graph output is never replaced (so an output never becomes an alias of an input or a weight). In place;
ops made unused are left to ``dead-code``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from moec.ir.core import Operation, Value
from moec.ir.ops import AtenOp
from moec.ir.program import Program
from moec.ir.types import TensorType
from moec.passes.base import Pass, PassContext, PassResult, register_pass

INT64_MAX = 2**63 - 1
SLICE_DEFAULTS = (None, 0, None, None, 1)  # aten.slice.Tensor(self, dim, start, end, step)

# Generic ops whose result is a new tensor, dense and non-overlapping (moec's own ops are too), and views
# that keep a dense tensor dense (they reorder or regroup its dims over the same memory).
FRESH_DENSE_TARGETS = frozenset({
    "aten.linear.default", "aten.addmm.default", "aten.mm.default", "aten.bmm.default", "aten.matmul.default",
    "aten.layer_norm.default", "aten.add.Tensor", "aten.sub.Tensor", "aten.mul.Tensor", "aten.div.Tensor",
    "aten.gelu.default", "aten.silu.default", "aten.relu.default", "aten.tanh.default", "aten.sigmoid.default",
    "aten.softmax.int", "aten._softmax.default", "aten.scaled_dot_product_attention.default",
})
DENSE_VIEW_TARGETS = frozenset({
    "aten.view.default", "aten._unsafe_view.default", "aten.reshape.default", "aten.transpose.int",
    "aten.permute.default", "aten.t.default", "aten.unsqueeze.default", "aten.squeeze.dim", "aten.alias.default",
})

Rule = Callable[[AtenOp], "Value | str"]  # the value that replaces the op's result, or why it does not fire


def clone_of_dense_tensor(op: AtenOp) -> Value | str:
    if op.target != "aten.clone.default":
        return "not aten.clone.default"
    if op.kwargs:
        return f"it sets {', '.join(op.kwargs)}"
    value = op.args[0]
    while isinstance(value, Value) and isinstance(value.owner, AtenOp) and value.owner.target in DENSE_VIEW_TARGETS:
        value = value.owner.args[0]
    producer = value.owner if isinstance(value, Value) else None
    if producer is None:
        return "its input is (a view of) a graph input or a weight, which the caller may change after the call"
    if isinstance(producer, AtenOp) and producer.target not in FRESH_DENSE_TARGETS:
        return f"its input comes from {producer.target}, which may return a view with gaps or overlaps"
    return op.args[0]


def _identity_arithmetic(targets: tuple[str, ...], neutral: int) -> Rule:
    def rule(op: AtenOp) -> Value | str:
        if op.target not in targets:
            return f"not {' or '.join(targets)}"
        if op.kwargs:
            return f"it sets {', '.join(op.kwargs)}"
        operand, other = op.args
        if isinstance(other, bool) or other != neutral or not isinstance(operand, Value):
            return f"its second operand is not the constant {neutral}"
        return operand

    return rule


def whole_slice(op: AtenOp) -> Value | str:
    if op.target != "aten.slice.Tensor":
        return "not aten.slice.Tensor"
    if op.kwargs:
        return f"it sets {', '.join(op.kwargs)} by keyword"
    source, dim, start, end, step = tuple(op.args) + SLICE_DEFAULTS[len(op.args):]
    if not isinstance(source, Value) or not isinstance(source.type, TensorType) or not isinstance(dim, int):
        return "its input is not a tensor value sliced along a constant dim"
    if start not in (0, None) or step != 1:
        return "it does not start at 0 with step 1"
    size = source.type.shape[dim] if -source.type.rank <= dim < source.type.rank else None
    if not (end is None or end == INT64_MAX or (isinstance(end, int) and isinstance(size, int) and end >= size)):
        return "it may end before the dimension does"
    return source


RULES: dict[str, Rule] = {
    "clone": clone_of_dense_tensor,
    "add-zero": _identity_arithmetic(("aten.add.Tensor", "aten.sub.Tensor"), 0),
    "mul-one": _identity_arithmetic(("aten.mul.Tensor", "aten.div.Tensor"), 1),
    "whole-slice": whole_slice,
}


def why_not(op: Operation, outputs: set[int]) -> dict[str, str] | tuple[str, Value]:
    """The rule that removes ``op`` and the value replacing its result, or why each rule does not fire."""
    if not isinstance(op, AtenOp) or len(op.results) != 1:
        return {"all": "only generic ops of one result are simplified"}
    result = op.results[0]
    if id(result) in outputs:
        return {"all": "its result is a graph output"}
    reasons = {}
    for name, rule in RULES.items():
        found = rule(op)
        if isinstance(found, str):
            reasons[name] = found
        elif found.type != result.type:
            reasons[name] = f"its input's type {found.type} differs from its result's {result.type}"
        else:
            return name, found
    return reasons


@register_pass
@dataclass(frozen=True)
class Simplify(Pass):
    name = "simplify"

    def run(self, program: Program, context: PassContext) -> PassResult:
        graph = program.graph
        outputs = {id(value) for value in graph.outputs}
        removed: dict[str, int] = {}
        for op in list(graph.ops):
            found = why_not(op, outputs)
            if isinstance(found, dict):
                continue
            rule, replacement = found
            op.results[0].replace_all_uses_with(replacement)
            graph.erase(op)
            removed[rule] = removed.get(rule, 0) + 1
        return PassResult(bool(removed), {"ops_removed": sum(removed.values()), **{f"removed_{k}": v for k, v in removed.items()}})
