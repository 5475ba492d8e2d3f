"""``quantize``: weight-only group-wise integer quantization of expert and dense FFN weights.

Requires: a verified graph; for ``method="gptq"``, calibration samples in ``context``
(any form ``moec.compile`` takes; see ``PassContext.flat_samples``).
Ensures: every quantizable weight of the targeted ops (``moe.experts`` ``w_in``/``w_out``; with
``dense=True`` also ``ffn.dense`` and ``moe.shared_expert`` ``w_gate``/``w_up``/``w_down``) has a
``quant<...>`` type with ``bits`` per matrix and ``group``, and ``program.weights`` holds its packed
storage (``moec.ir.quant``) instead of the float tensor; routers, biases and other ops are untouched.
The summary reports bytes before and after, counted from the stored tensors. In place.

``method="rtn"`` rounds to nearest; ``"gptq"`` compensates rounding errors with calibration activations
(``moec.kernels.gptq``). The helpers here (units, activations per linear, ``quantize_units``) are shared
with the ``bit-allocation`` pass, which chooses a width per unit instead of one for all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moec.analysis.ffn_activations import FFNActivations, collect
from moec.errors import PassError
from moec.ir.ops import DenseFFNOp, ExpertsOp, SharedExpertOp
from moec.ir.program import Program
from moec.ir.quant import LOGICAL_DTYPES, SUPPORTED_BITS, SUPPORTED_GROUPS, QuantizedType, check_group
from moec.kernels.gptq import gptq_quantize
from moec.kernels.quant import QuantizedMatrix, QuantizedWeight, quantize_matrix
from moec.kernels.reference import activation, gated_activation
from moec.passes.base import Pass, PassContext, PassResult, register_pass
from moec.progress import progress_bar

METHODS = ("rtn", "gptq")
UNIT_KINDS = ("expert", "shared", "dense")
MIN_EXPERT_ROWS = 16  # below this many routed calibration rows, an expert's GPTQ uses all the layer's rows


@dataclass(frozen=True)
class Unit:
    """What gets one width: an expert (``expert`` set) or a dense FFN, all of ``roles``, of op ``op_index``."""

    op_index: int
    roles: tuple[str, ...]
    expert: int | None
    kind: str  # one of UNIT_KINDS
    block: str
    params: int


def op_of_unit(program: Program, unit: Unit) -> ExpertsOp | DenseFFNOp | SharedExpertOp:
    """The op ``unit`` belongs to (``quantizable_units`` makes units of these ops only)."""
    op = program.graph.ops[unit.op_index]
    if not isinstance(op, (ExpertsOp, DenseFFNOp, SharedExpertOp)):
        raise PassError(f"a quantization unit names op {unit.op_index}, a {op.op_name}, "
                        "not an FFN or experts op")
    return op


def quantizable_units(program: Program, dense: bool, per_linear: bool = False) -> list[Unit]:
    """The units of the graph's expert ops (one per expert) and, with ``dense``, of dense FFNs/shared experts."""
    units = []
    for index, op in enumerate(program.graph.ops):
        if isinstance(op, ExpertsOp):
            kind = "expert"
        elif isinstance(op, (DenseFFNOp, SharedExpertOp)) and dense:
            kind = "shared" if isinstance(op, SharedExpertOp) else "dense"
        else:
            continue
        roles = [role for role in op.quantizable_roles if role in op.kwargs]
        groups = [(role,) for role in roles] if per_linear else [tuple(roles)]
        experts = range(op.spec.num_experts) if kind == "expert" else [None]
        for expert in experts:
            for group in groups:
                params = sum(_matrix_numel(program, op.kwargs[role].name) for role in group)
                units.append(Unit(index, group, expert, kind, op.block, params))
    return units


def _matrix_numel(program: Program, name: str) -> int:
    shape = program.graph.weights[name].static_shape
    return shape[-1] * shape[-2]


def nothing_to_quantize(dense: bool) -> str:
    """The note of a quantizing pass that found no unit."""
    if dense:
        return "the program has no moe.experts, ffn.dense or moe.shared_expert ops to quantize"
    return "the program has no moe.experts ops to quantize (dense=False leaves dense FFNs and shared experts)"


def check_options(bits: int, group: int, method: str) -> None:
    if bits not in SUPPORTED_BITS:
        raise PassError(f"bits={bits} is not supported; use one of {list(SUPPORTED_BITS)}")
    try:
        check_group(group, group)
    except ValueError as err:
        raise PassError(str(err)) from None
    if method not in METHODS:
        raise PassError(f"method={method!r} is not one of {', '.join(METHODS)}")


def linear_inputs(program: Program, unit_op: int, role: str, expert: int | None,
                  activations: FFNActivations) -> torch.Tensor:
    """Calibration inputs [N, C] of one linear: the op's input rows, or the hidden activations for ``w_out``/``w_down``.

    For an expert, the rows routed to it (all the layer's rows when it got fewer than ``MIN_EXPERT_ROWS``).
    """
    rows = calibration_rows(program, activations, unit_op, expert)
    if role not in ("w_out", "w_down"):
        return rows
    return float_hidden(program, program.graph.ops[unit_op], expert, rows)


def calibration_rows(program: Program, activations: FFNActivations, op_index: int, expert: int | None) -> torch.Tensor:
    """The op's calibration input rows [N, H]; for an expert, those routed to it (all if fewer than
    ``MIN_EXPERT_ROWS``), each scaled by its routing weight when the experts weigh their input."""
    record = activations.ops[op_index]
    if expert is not None:
        assert record.indices is not None and record.weights is not None, "collect records every experts op's routing"
        slots = record.indices == expert  # [N, k]
        chosen = slots.any(dim=-1)
        if int(chosen.sum()) >= MIN_EXPERT_ROWS:
            rows = record.inputs[chosen]
            op = program.graph.ops[op_index]
            if isinstance(op, ExpertsOp) and op.spec.weighted_input:
                rows = rows * (record.weights[chosen] * slots[chosen]).sum(dim=-1, keepdim=True)
            return rows
    return record.inputs


def float_hidden(program: Program, op, expert: int | None, rows: torch.Tensor) -> torch.Tensor:
    """The float FFN's hidden activations (the input of its output linear) on ``rows``."""
    spec = op.spec
    act = activation(spec.act)

    def weight(role):
        ref = op.kwargs.get(role)
        if ref is None:
            return None
        tensor = program.weights[ref.name].float()
        return tensor if expert is None else tensor[expert]

    if isinstance(op, ExpertsOp):
        hidden = F.linear(rows, weight("w_in"), weight("b_in"))
        if spec.gated:
            gate, up = hidden.chunk(2, dim=-1)
            return gated_activation(gate, up, spec)
        return act(hidden)
    up = F.linear(rows, weight("w_up"), weight("b_up"))
    return gated_activation(F.linear(rows, weight("w_gate"), weight("b_gate")), up, spec) if spec.gated else act(up)


def quantize_one(w: torch.Tensor, bits: int, group: int, method: str, inputs: torch.Tensor | None) -> QuantizedMatrix:
    if method == "gptq":
        if inputs is None:
            raise PassError("method='gptq' needs calibration inputs")
        return gptq_quantize(w, inputs, bits, group)
    return quantize_matrix(w, bits, group)


def quantize_units(program: Program, units: list[Unit], bits: list[int], group: int, method: str,
                   activations: FFNActivations | None) -> None:
    """Quantize every role of every unit at its width and replace the float weights by packed storage
    (``units`` passed ``check_quantizable``)."""
    widths: dict[tuple[int, str], dict[int | None, int]] = {}
    for unit, width in zip(units, bits, strict=True):
        for role in unit.roles:
            widths.setdefault((unit.op_index, role), {})[unit.expert] = width
    graph = program.graph
    quantized: dict[str, QuantizedWeight] = {}
    steps = progress_bar(list(widths.items()), "GPTQ: rounding the weights", show=method == "gptq")
    for (op_index, role), by_expert in steps:  # all from the float weights, then all replaced
        name = graph.ops[op_index].kwargs[role].name
        weight_type = graph.weights[name]
        float_weight = program.weights[name].float()
        matrices = []
        for expert, width in sorted(by_expert.items(), key=lambda item: -1 if item[0] is None else item[0]):
            w = float_weight if expert is None else float_weight[expert]
            inputs = None
            if method == "gptq" and activations is not None:  # without them quantize_one refuses GPTQ
                inputs = linear_inputs(program, op_index, role, expert, activations)
            matrices.append(quantize_one(w, width, group, method, inputs))
        if len(matrices) != (weight_type.shape[0] if weight_type.rank == 3 else 1):
            raise PassError(f"weight @{name}: every expert needs a width")
        quantized[name] = QuantizedWeight.from_matrices(weight_type.dtype, weight_type.static_shape, matrices)
    for name, weight in quantized.items():
        graph.weights[name] = weight.type
        del program.weights[name]
        program.weights.update(weight.storage(name))


def check_quantizable(program: Program, units: list[Unit], group: int) -> None:
    """One ``PassError`` naming the first weight of ``units`` that is already quantized, not of a float dtype
    quantize takes, or whose reduced dimension ``group`` does not divide, and the group sizes that would
    (checked before any slow measurement or rounding)."""
    for unit in units:
        for role in unit.roles:
            name = program.graph.ops[unit.op_index].kwargs[role].name
            weight_type = program.graph.weights[name]
            if isinstance(weight_type, QuantizedType):
                raise PassError(f"weight @{name} is already quantized (by an earlier quantize or bit-allocation); "
                                "quantize each weight once")
            if weight_type.dtype not in LOGICAL_DTYPES:
                raise PassError(f"weight @{name} is {weight_type.torch_dtype}; quantize takes float32, float16 and "
                                "bfloat16 weights: compile the model in one of those (model.float())")
            columns = weight_type.static_shape[-1]
            if columns % group:
                raise PassError(f"weight @{name} {list(weight_type.shape)}: group size {group} does not divide the "
                                f"reduced dimension {columns}; "
                                f"{group_advice(columns, unit.kind, bool(program.graph.ops_of(ExpertsOp)))}")


def group_advice(columns: int, kind: str, routed_experts: bool) -> str:
    """What to do about a weight of ``kind`` (a ``UNIT_KINDS`` entry) whose reduced dimension ``columns``
    the chosen group size does not divide, in a program with or without ``routed_experts``."""
    fits = [str(group) for group in SUPPORTED_GROUPS if columns % group == 0]
    if fits:
        return f"set the pass's group option to {' or '.join(fits)}"
    advice = (f"no supported group size ({', '.join(map(str, SUPPORTED_GROUPS))}) divides it, so this weight "
              "cannot be quantized")
    if kind == "expert":  # dense-to-moe's experts are the FFN's width over its expert count wide
        return f"{advice}; if dense-to-moe made these experts, fewer of them (its experts option) makes each wider"
    if routed_experts:
        return f"{advice}; dense: false leaves dense FFNs and shared experts float"
    return f"{advice}, and the model has no routed experts to quantize instead (dense: false would leave nothing)"


def activations_for(program: Program, context: PassContext, needed_by: str) -> FFNActivations:
    """The FFN inputs and routing of ``program`` on the context's calibration samples."""
    return collect(program, context.flat_samples(program, needed_by))


@register_pass
@dataclass(frozen=True)
class Quantize(Pass):
    name = "quantize"
    approximate = True
    calibration_when = "with method gptq"

    bits: int = 4
    group: int = 64
    method: str = "rtn"
    dense: bool = True  # also quantize dense FFNs and shared experts

    def __post_init__(self) -> None:
        check_options(self.bits, self.group, self.method)

    def needs_calibration(self) -> bool:
        return self.method == "gptq"

    def run(self, program: Program, context: PassContext) -> PassResult:
        units = quantizable_units(program, self.dense)
        if not units:
            return PassResult(False, {"quantized_weights": 0}, note=nothing_to_quantize(self.dense))
        check_quantizable(program, units, self.group)
        before = sum(t.numel() * t.element_size() for t in program.weights.values())
        activations = activations_for(program, context, f"pass {self.name!r}") if self.needs_calibration() else None
        quantize_units(program, units, [self.bits] * len(units), self.group, self.method, activations)
        after = sum(t.numel() * t.element_size() for t in program.weights.values())
        summary = {"bits": self.bits, "group": self.group, "method": self.method, "units": len(units),
                   "weight_bytes_before": before, "weight_bytes_after": after}
        context.report.setdefault("quantize", summary)
        return PassResult(True, summary)
