"""Facts about routing values that follow from the ops that produce them.

A ``moe.experts`` op whose router stays the model's own ATen ops (PhiMoE, DeepSeek-V4 ...) gets its
expert indices and routing weights as plain tensors. A backend that hands such a choice to a fused
kernel that weighs experts by probabilities needs two facts no type carries: the weights are never
negative, and a token never names the same expert twice. Both are proved here from the producing ops,
conservatively: ``False`` means "not proved", never "false".
"""

from __future__ import annotations

from moec.ir.core import Value
from moec.ir.ops import AtenOp, RouteOp

# Results that are >= 0 (or NaN) whatever the input.
NONNEGATIVE_OPS = frozenset({
    "aten.softmax.int", "aten._softmax.default", "aten.sigmoid.default", "aten.relu.default", "aten.exp.default", "aten.abs.default", "aten.sqrt.default",
})
# Ops whose first result is >= 0 where their first operand is (they move, select or sum its elements).
SIGN_PRESERVING_OPS = frozenset({
    "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.clone.default",
    "aten.contiguous.default", "aten._to_copy.default", "aten.to.dtype", "aten.expand.default",
    "aten.squeeze.dim", "aten.unsqueeze.default", "aten.slice.Tensor", "aten.gather.default",
    "aten.index.Tensor", "aten.topk.default", "aten.sum.dim_IntList", "aten.flatten.using_ints",
})
# Ops whose result is >= 0 where every operand (tensor or number) is.
NONNEGATIVE_COMBINATIONS = frozenset({"aten.mul.Tensor", "aten.div.Tensor", "aten.add.Tensor"})
# Ops that pass a token's row of indices through unchanged (reshaping the leading dimensions only).
ROW_PRESERVING_OPS = frozenset({
    "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.clone.default",
    "aten.contiguous.default", "aten._to_copy.default", "aten.to.dtype",
})


def is_nonnegative(value: Value | float | int) -> bool:
    """Whether every element of ``value`` is provably >= 0 (or NaN)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value >= 0
    if not isinstance(value, Value):
        return False
    op = value.owner
    if isinstance(op, RouteOp):  # scores are softmax or sigmoid probabilities, scaled
        return value.index == 1 and op.spec.scaling >= 0
    if not isinstance(op, AtenOp):
        return False
    if op.target in NONNEGATIVE_OPS:
        return True
    if op.target == "aten.softplus.default":  # log(1 + exp(beta * x)) / beta: >= 0 unless beta < 0
        return all(is_nonnegative(arg) for arg in op.args[1:2])
    if op.target in SIGN_PRESERVING_OPS:
        return value.index == 0 and bool(op.args) and is_nonnegative(op.args[0])
    if op.target in NONNEGATIVE_COMBINATIONS:
        scaled_by = op.kwargs.get("alpha", 1)  # add(x, y, alpha=-1) subtracts
        return len(op.args) == 2 and is_nonnegative(scaled_by) and all(is_nonnegative(arg) for arg in op.args)
    return False


def has_distinct_choices(indices: Value) -> bool:
    """Whether each row of ``indices`` [..., k] provably names k different experts (a top-k's indices)."""
    op = indices.owner
    while isinstance(op, AtenOp) and op.target in ROW_PRESERVING_OPS and op.args:
        source = op.args[0]
        if not isinstance(source, Value) or source.tensor_type.shape[-1:] != indices.tensor_type.shape[-1:]:
            return False
        indices, op = source, source.owner
    if isinstance(op, RouteOp):
        return indices.index == 0
    return isinstance(op, AtenOp) and op.target == "aten.topk.default" and indices.index == 1
