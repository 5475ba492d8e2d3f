"""A torch module that evaluates a moec program with export-friendly rules, for ``torch.onnx.export``.

Generic ops call the ATen op they name (torch's exporter knows how to turn those into ONNX), complex-valued
ones on (real, imaginary) pairs (``moec.backend.onnx.complex_pairs``);
``ffn.dense`` and ``moe.shared_expert`` run moec's reference FFN; ``moe.route`` and ``moe.experts`` run
the lowering chosen in ``plan_moe`` (see ``moec.backend.onnx.moe``). Weights become buffers under their
program names, so ONNX initializers keep the model's parameter names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moec.backend.onnx.complex_pairs import run_on_pairs, touches_complex
from moec.backend.onnx.moe import (
    PackedExperts,
    choice_logits,
    experts_portable,
    interleave_gate_up,
    ort_experts,
    ort_experts_support,
    ort_moe_support,
    qmoe_operands,
    qmoe_support,
    route_portable,
)
from moec.backend.onnx.quant import dequantize, matmul_nbits, matmul_nbits_operands, uses_matmul_nbits
from moec.errors import BackendError
from moec.ir.core import Operation, Value, WeightRef, map_leaves
from moec.ir.ops import AtenOp, DenseFFNOp, ExpertsOp, RouteOp, SharedExpertOp
from moec.ir.program import Program
from moec.ir.quant import QuantizedType, storage_names
from moec.ir.routing_facts import has_distinct_choices, is_nonnegative
from moec.ir.targets import resolve_target
from moec.kernels import reference
from moec.kernels.quant import QuantizedWeight
from moec.kernels.skip import skipped_pairs

INTERLEAVED_SUFFIX = "_swiglu_interleaved"


@dataclass(frozen=True)
class FusedExperts:
    """A ``moe.experts`` op that becomes one com.microsoft.MoE: with ``route``, the op computes that
    router's routing itself from logits (``normalize``: renormalizing the chosen weights); without, it
    gets the routing already chosen as logits (``choice_logits``)."""

    route: RouteOp | None = None
    normalize: bool = False


@dataclass
class MoEPlan:
    """Which experts ops become one com.microsoft.MoE, and why the others do not."""

    fused: dict[int, FusedExperts] = field(default_factory=dict)  # id(ExpertsOp) -> how it is fused
    fallbacks: dict[str, str] = field(default_factory=dict)  # block -> why the fused op cannot run it

    def is_fused_route(self, op: RouteOp) -> bool:
        """Whether a fused op does this router's work (else the router runs and hands its choice on)."""
        return any(fused.route is op for fused in self.fused.values())


def plan_moe(program: Program, lowering: str) -> MoEPlan:
    """Decide, per ``moe.experts``, whether the ``ort`` lowering fuses it, and with its router or not.

    The op routes itself for a softmax ``moe.route`` that feeds only these experts, when the experts
    neither remap (``expert_map``) nor skip (``skip_threshold``) the router's choice; any other routing
    (a ``moe.route`` beyond the op's softmax, the model's own router ops, a remapped or skipping one) is
    handed over as the chosen experts, which needs weights >= 0 and distinct experts per token
    (``moec.ir.routing_facts``).
    """
    plan = MoEPlan()
    if lowering != "ort":
        return plan
    for experts in program.graph.ops_of(ExpertsOp):
        block = experts.block or f"moe.experts #{program.graph.ops.index(experts)}"
        weight_types = [quantized_type(program, experts.weight(role)) for role in ("w_in", "w_out")]
        packed = any(t is not None for t in weight_types)
        unsupported = ort_experts_support(experts.spec) or qmoe_support(*weight_types)
        if not unsupported and int(experts.top_k) > experts.spec.num_experts:
            unsupported = (f"top-{experts.top_k} routing over {experts.spec.num_experts} stored experts (the op "
                           "picks k distinct experts)")
        if not unsupported:
            route = own_route(experts)
            support = None if route is None else ort_moe_support(route.spec, experts.spec, packed)
            changes_routing = experts.expert_map is not None or experts.skip_threshold > 0
            if support is not None and support.ok and support.routes_itself and not changes_routing:
                plan.fused[id(experts)] = FusedExperts(route, support.normalize)
            elif not is_nonnegative(experts.args[2]):
                unsupported = "routing weights not provably >= 0 (the op weighs experts by probabilities)"
            elif not has_distinct_choices(experts.args[1]):
                unsupported = "a routing that may choose one expert twice for a token (the op chooses distinct experts)"
            else:
                plan.fused[id(experts)] = FusedExperts()
        if unsupported:
            plan.fallbacks[block] = f"com.microsoft.{'QMoE' if packed else 'MoE'} cannot express {unsupported}"
    return plan


def own_route(experts: ExpertsOp) -> RouteOp | None:
    """The ``moe.route`` that computes exactly these experts' routing for their own input and nothing else."""
    route = experts.args[1].owner
    if not isinstance(route, RouteOp) or route.results != [experts.args[1], experts.args[2]]:
        return None
    if route.args[0] is not experts.args[0] or any(len(v.uses) != 1 for v in route.results):
        return None
    return route


def quantized_type(program: Program, ref: WeightRef | None) -> QuantizedType | None:
    weight_type = None if ref is None else program.graph.weights[ref.name]
    return weight_type if isinstance(weight_type, QuantizedType) else None


class ProgramModule(nn.Module):
    """The module torch.export traces: ``forward(*inputs)`` runs the program's graph (``ProgramRules``) and
    returns its outputs. Its buffers are the program's weights at their program names; beside them it holds
    nothing but ``_rules``, so no weight name (``weight``, ``linear``, ``program``...) meets an attribute."""

    def __init__(self, rules: ProgramRules) -> None:
        super().__init__()
        self._rules = rules

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._rules.forward(*inputs)


class ProgramRules:
    """The export-friendly rule of each op, reading weights from ``module``'s buffers (which torch.export
    replaces by its own while tracing)."""

    def __init__(self, program: Program, lowering: str) -> None:
        self.program = program
        self.moe_plan = plan_moe(program, lowering)
        self.module = ProgramModule(self)
        self.weight_names: set[str] = set()
        for op in program.graph.ops:
            for ref in op.weight_refs:
                weight_type = quantized_type(program, ref)
                if isinstance(op, ExpertsOp) and id(op) in self.moe_plan.fused and weight_type is not None:
                    stored = QuantizedWeight.from_storage(ref.name, weight_type, program.weights)
                    operands = qmoe_operands(stored, gated_rows=op.spec.gated and ref is op.weight("w_in"))
                    for part, storage_name in storage_names(ref.name).items():
                        self.add_weight(storage_name, operands[part])
                else:
                    self.add_program_weight(ref.name)
        for experts in program.graph.ops_of(ExpertsOp):
            if id(experts) in self.moe_plan.fused and experts.spec.gated:
                for role in ("w_in", "b_in"):
                    fc1_ref = experts.weight(role)
                    if fc1_ref is not None and quantized_type(program, fc1_ref) is None:
                        interleaved = interleave_gate_up(program.weights[fc1_ref.name])
                        self.add_weight(fc1_ref.name + INTERLEAVED_SUFFIX, interleaved)

    def add_program_weight(self, name: str) -> None:
        """A float weight as is; a quantized one as its storage, in MatMulNBits' layout where it is one."""
        weight_type = self.program.graph.weights[name]
        if not isinstance(weight_type, QuantizedType):
            self.add_weight(name, self.program.weights[name])
            return
        stored = QuantizedWeight.from_storage(name, weight_type, self.program.weights)
        if uses_matmul_nbits(weight_type):
            operands = matmul_nbits_operands(stored)
        else:
            operands = {"qweight": stored.qweight, "scales": stored.scales, "zeros": stored.zeros}
        for part, storage_name in storage_names(name).items():
            self.add_weight(storage_name, operands[part])

    def add_weight(self, name: str, tensor: torch.Tensor) -> None:
        """Register ``tensor`` as a buffer at the dotted path ``name`` (submodules made as needed)."""
        if name in self.weight_names:
            return
        owner: nn.Module = self.module
        *path, leaf = name.split(".")
        try:
            for part in path:
                child = owner._modules.get(part)
                if child is None:
                    child = nn.Module()
                    owner.add_module(part, child)
                owner = child
            owner.register_buffer(leaf, tensor.detach(), persistent=True)
        except KeyError as err:  # a part named like an attribute of torch's nn.Module
            raise BackendError(f"weight @{name} cannot be an ONNX initializer of that name: {err.args[0]} on a torch "
                               "module; rename that part of the model") from None
        self.weight_names.add(name)

    def weight(self, name: str) -> torch.Tensor:
        """The float weight ``name``; a quantized one dequantized in the graph."""
        weight_type = self.program.graph.weights.get(name)
        if not isinstance(weight_type, QuantizedType):
            return self.module.get_buffer(name)
        if uses_matmul_nbits(weight_type):
            raise BackendError(f"@{name} is read as a MatMulNBits operand only; use ``linear``")
        parts = storage_names(name)
        return dequantize(self.module.get_buffer(parts["qweight"]), self.module.get_buffer(parts["scales"]),
                          self.module.get_buffer(parts["zeros"]), list(weight_type.bits), weight_type.group,
                          list(weight_type.shape))

    def fused_experts_weight(self, ref: WeightRef, suffix: str) -> torch.Tensor | PackedExperts:
        """A fused expert weight: float (interleaved buffers carry ``suffix``), or QMoE's packed operands."""
        weight_type = quantized_type(self.program, ref)
        if weight_type is None:
            return self.weight(ref.name + suffix)
        parts = {part: self.module.get_buffer(name) for part, name in storage_names(ref.name).items()}
        return PackedExperts(**parts, bits=weight_type.bits[0], group=weight_type.group)

    def linear(self, x: torch.Tensor, name: str, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W.T (+ bias)`` for the weight ``name``: MatMulNBits where it is 4-bit, else a MatMul."""
        weight_type = self.program.graph.weights[name]
        if not (isinstance(weight_type, QuantizedType) and uses_matmul_nbits(weight_type)):
            return F.linear(x, self.weight(name), bias)
        parts = storage_names(name)
        y = matmul_nbits(x, self.module.get_buffer(parts["qweight"]), self.module.get_buffer(parts["scales"]),
                         self.module.get_buffer(parts["zeros"]), weight_type.bits[0], weight_type.group)
        return y if bias is None else y + bias

    def ffn(self, op: DenseFFNOp | SharedExpertOp, x: torch.Tensor) -> torch.Tensor:
        """``reference.ffn`` with each linear through ``linear`` (so quantized ones stay packed)."""
        def linear(value: torch.Tensor, role: str) -> torch.Tensor:
            bias = op.kwargs.get("b" + role[1:])
            return self.linear(value, op.kwargs[role].name, None if bias is None else self.weight(bias.name))

        up = linear(x, "w_up")
        if op.spec.gated:
            hidden = reference.gated_activation(linear(x, "w_gate"), up, op.spec)
        else:
            hidden = reference.activation(op.spec.act)(up)
        y = linear(hidden, "w_down")
        gate = op.kwargs.get("gate")
        if gate is not None:
            y = torch.sigmoid(F.linear(x, self.weight(gate.name))) * y
        return y

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The graph's outputs on ``inputs``."""
        graph = self.program.graph
        env: dict[int, Any] = {id(v): x for v, x in zip(graph.inputs, inputs, strict=True)}

        def read(leaf):
            if isinstance(leaf, Value):
                return env[id(leaf)]
            if isinstance(leaf, WeightRef):
                return self.weight(leaf.name)
            return leaf

        for op in graph.ops:
            out = self.run_op(op, read)
            if out is None:
                continue
            if len(op.results) == 1 and not isinstance(out, (list, tuple)):
                env[id(op.results[0])] = out
            else:  # several results, or a list of one (unbind of a dim of size 1)
                for value, item in zip(op.results, out, strict=True):
                    env[id(value)] = item
        return tuple(env[id(v)] for v in graph.outputs)

    def run_op(self, op: Operation, read):
        """The op's result(s); None for a router whose work the fused MoE op does."""
        def role(name: str) -> torch.Tensor | None:
            ref = op.kwargs.get(name)
            return None if ref is None else self.weight(ref.name)

        def required(name: str) -> torch.Tensor:
            return self.weight(op.kwargs[name].name)

        if isinstance(op, AtenOp):
            if touches_complex(op.args, op.results):  # complex values travel as (real, imaginary) pairs
                return run_on_pairs(op.target, op.args, map_leaves(op.args, read))
            return resolve_target(op.target)(*map_leaves(op.args, read), **map_leaves(op.kwargs, read))
        if isinstance(op, (DenseFFNOp, SharedExpertOp)):
            if any(isinstance(self.program.graph.weights[ref.name], QuantizedType) for ref in op.weight_refs):
                return self.ffn(op, read(op.args[0]))
            return reference.ffn(read(op.args[0]), role("w_gate"), required("w_up"), required("w_down"),
                                 role("b_gate"), role("b_up"), role("b_down"), role("gate"), op.spec)
        if isinstance(op, RouteOp):
            if self.moe_plan.is_fused_route(op):
                return None
            return route_portable(read(op.args[0]), required("router"), role("router_bias"), op.spec,
                                  role("router_logit_bias"))
        if isinstance(op, ExpertsOp):
            fused = self.moe_plan.fused.get(id(op))
            if fused is None:
                x, indices, routing = (read(a) for a in op.args)
                return experts_portable(x, indices, routing, required("w_in"), required("w_out"),
                                        role("b_in"), role("b_out"), op.spec, op.expert_map, op.skip_threshold)
            suffix = INTERLEAVED_SUFFIX if op.spec.gated else ""
            b_in = op.weight("b_in")
            fc1_bias = None if b_in is None else self.weight(b_in.name + suffix)
            weights = (self.fused_experts_weight(op.required_weight("w_in"), suffix), fc1_bias,
                       self.fused_experts_weight(op.required_weight("w_out"), ""), role("b_out"))
            x = read(op.args[0])
            tokens = x.reshape(-1, x.shape[-1])
            if fused.route is not None:
                logit_bias = fused.route.weight("router_logit_bias")
                logits = F.linear(tokens.float(), self.weight(fused.route.required_weight("router").name).float(),
                                  None if logit_bias is None else self.weight(logit_bias.name).float())
                return ort_experts(x, logits, *weights, op.spec, fused.route.spec.top_k, fused.normalize)
            top_k = int(op.top_k)
            indices, routing_weights = (read(a).reshape(tokens.shape[0], top_k) for a in op.args[1:3])
            indices, routing_weights = reference.remap_experts(indices, op.expert_map), routing_weights.float()
            if op.skip_threshold:
                routing_weights = routing_weights.masked_fill(skipped_pairs(routing_weights, op.skip_threshold), 0.0)
            logits, scale = choice_logits(indices, routing_weights, op.spec.num_experts)
            y = ort_experts(x, logits, *weights, op.spec, top_k, normalize=False)
            return y * scale.reshape(*x.shape[:-1], 1).to(y.dtype)
        raise BackendError(f"the ONNX exporter has no rule for {op.op_name}")
