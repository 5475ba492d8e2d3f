"""A torch module that evaluates a moec program with export-friendly rules, for ``torch.onnx.export``.

Generic ops call the ATen op they name (torch's exporter knows how to turn those into ONNX);
``ffn.dense`` and ``moe.shared_expert`` run moec's reference FFN; ``moe.route`` and ``moe.experts`` run
the lowering chosen in ``plan_moe`` (see ``moec.backend.onnx.moe``). Weights become buffers under their
program names, so ONNX initializers keep the model's parameter names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moec.backend.onnx.moe import (
    experts_portable,
    interleave_gate_up,
    ort_experts,
    ort_moe_support,
    route_portable,
)
from moec.errors import BackendError
from moec.ir.core import Operation, Value, WeightRef, map_leaves
from moec.ir.ops import AtenOp, DenseFFNOp, ExpertsOp, RouteOp, SharedExpertOp
from moec.ir.program import Program
from moec.ir.targets import resolve_target
from moec.kernels import reference

FFN_ROLES = ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down", "gate")
INTERLEAVED_SUFFIX = "_swiglu_interleaved"


@dataclass
class MoEPlan:
    """Which route + experts pairs become one com.microsoft.MoE, and why the others do not."""

    fused: dict[int, RouteOp] = field(default_factory=dict)  # id(ExpertsOp) -> its RouteOp
    fallbacks: dict[str, str] = field(default_factory=dict)  # block -> reason

    def is_fused_route(self, op: RouteOp) -> bool:
        return any(route is op for route in self.fused.values())


def plan_moe(program: Program, lowering: str) -> MoEPlan:
    """Decide, per ``moe.experts``, whether the ``ort`` lowering can fuse it with its router."""
    plan = MoEPlan()
    if lowering != "ort":
        return plan
    for experts in program.graph.ops_of(ExpertsOp):
        route = experts.args[1].owner
        block = experts.block or f"moe.experts #{program.graph.ops.index(experts)}"
        if not isinstance(route, RouteOp) or route.results != [experts.args[1], experts.args[2]]:
            plan.fallbacks[block] = "its routing does not come straight from one moe.route"
            continue
        if route.args[0] is not experts.args[0] or any(len(v.uses) != 1 for v in route.results):
            plan.fallbacks[block] = "the router's results are used elsewhere or it routes another tensor"
            continue
        support = ort_moe_support(route.spec, experts.spec)
        if not support.ok:
            plan.fallbacks[block] = support.reason
            continue
        plan.fused[id(experts)] = route
    return plan


class ProgramModule(nn.Module):
    """``forward(*inputs)`` runs the program's graph on the graph's inputs and returns its outputs."""

    def __init__(self, program: Program, lowering: str) -> None:
        super().__init__()
        self.program = program
        self.moe_plan = plan_moe(program, lowering)
        self.weight_names: set[str] = set()
        for op in program.graph.ops:
            for ref in op.weight_refs:
                self.add_weight(ref.name, program.weights[ref.name])
        for route in self.moe_plan.fused.values():
            experts = route.results[0].uses[0].op
            if experts.spec.gated:
                for role in ("w_in", "b_in"):
                    ref = experts.weight(role)
                    if ref is not None:
                        interleaved = interleave_gate_up(program.weights[ref.name])
                        self.add_weight(ref.name + INTERLEAVED_SUFFIX, interleaved)

    def add_weight(self, name: str, tensor: torch.Tensor) -> None:
        """Register ``tensor`` as a buffer at the dotted path ``name`` (submodules made as needed)."""
        if name in self.weight_names:
            return
        owner: nn.Module = self
        *path, leaf = name.split(".")
        for part in path:
            child = owner._modules.get(part)
            if child is None:
                child = nn.Module()
                owner.add_module(part, child)
            owner = child
        owner.register_buffer(leaf, tensor.detach(), persistent=True)
        self.weight_names.add(name)

    def weight(self, name: str) -> torch.Tensor:
        return self.get_buffer(name)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        graph = self.program.graph
        env: dict[int, object] = {id(v): x for v, x in zip(graph.inputs, inputs, strict=True)}

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
            if len(op.results) == 1:
                env[id(op.results[0])] = out
            else:
                for value, item in zip(op.results, out, strict=True):
                    env[id(value)] = item
        return tuple(env[id(v)] for v in graph.outputs)

    def run_op(self, op: Operation, read):
        """The op's result(s); None for a router whose work the fused MoE op does."""
        def role(name: str) -> torch.Tensor | None:
            ref = op.kwargs.get(name)
            return None if ref is None else self.weight(ref.name)

        if isinstance(op, AtenOp):
            return resolve_target(op.target)(*map_leaves(op.args, read), **map_leaves(op.kwargs, read))
        if isinstance(op, (DenseFFNOp, SharedExpertOp)):
            return reference.ffn(read(op.args[0]), *(role(r) for r in FFN_ROLES), op.spec)
        if isinstance(op, RouteOp):
            if self.moe_plan.is_fused_route(op):
                return None
            return route_portable(read(op.args[0]), role("router"), role("router_bias"), op.spec)
        if isinstance(op, ExpertsOp):
            route = self.moe_plan.fused.get(id(op))
            if route is None:
                return experts_portable(*(read(a) for a in op.args), role("w_in"), role("w_out"),
                                        role("b_in"), role("b_out"), op.spec)
            gated = op.spec.gated
            suffix = INTERLEAVED_SUFFIX if gated else ""
            fc1 = self.weight(op.weight("w_in").name + suffix)
            fc1_bias = None if op.weight("b_in") is None else self.weight(op.weight("b_in").name + suffix)
            normalize = ort_moe_support(route.spec, op.spec).normalize
            return ort_experts(read(op.args[0]), self.weight(route.weight("router").name), fc1, fc1_bias,
                               role("w_out"), role("b_out"), route.spec, op.spec, normalize)
        raise BackendError(f"the ONNX exporter has no rule for {op.op_name}")
