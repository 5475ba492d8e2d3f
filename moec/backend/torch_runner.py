"""The torch runner: moec's reference interpreter, a table from op to rule.

Every other backend is tested against this one. Generic ops call the ATen op (or Python operator)
they name; MoE and FFN ops call ``moec.kernels``. A value is freed right after its last use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from moec.errors import BackendError
from moec.ir.core import Operation, Value, WeightRef, map_leaves
from moec.ir.ops import AtenOp, DenseFFNOp, ExpertsOp, RouteOp, SharedExpertOp
from moec.ir.program import Program
from moec.ir.targets import resolve_target
from moec.kernels import reference
from moec.kernels.moe_cpu import experts_forward

Rule = Callable[[Operation, Callable[[str], torch.Tensor | None], list[Any], dict[str, Any]], Any]


def run_route(op: RouteOp, weight, args, kwargs):
    return reference.route(args[0], weight("router"), weight("router_bias"), op.spec)


def run_experts(op: ExpertsOp, weight, args, kwargs):
    x, indices, routing = args
    indices = reference.remap_experts(indices, op.expert_map)
    k, hidden = indices.shape[-1], x.shape[-1]
    y = experts_forward(
        x.reshape(-1, hidden), indices.reshape(-1, k), routing.reshape(-1, k),
        weight("w_in"), weight("w_out"), weight("b_in"), weight("b_out"), op.spec,
    )
    return y.reshape(x.shape)


def run_ffn(op: DenseFFNOp | SharedExpertOp, weight, args, kwargs):
    roles = ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down", "gate")
    return reference.ffn(args[0], *(weight(role) for role in roles), op.spec)


Observer = Callable[[Operation, list[Any], Any], None]

RULES: dict[type[Operation], Rule] = {
    RouteOp: run_route,
    ExpertsOp: run_experts,
    DenseFFNOp: run_ffn,
    SharedExpertOp: run_ffn,
}


class TorchRunner:
    """Runs a program's graph on torch tensors (any device the weights are on)."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self.steps = [self.prepare(op) for op in program.graph.ops]
        self.last_use = self.compute_last_uses()

    def prepare(self, op: Operation) -> Callable[[list[Any], dict[str, Any]], Any]:
        weights = self.program.weights
        if isinstance(op, AtenOp):
            fn = resolve_target(op.target)
            return lambda args, kwargs: fn(*args, **kwargs)
        rule = RULES.get(type(op))
        if rule is None:
            raise BackendError(f"the torch runner has no rule for {op.op_name}")

        def weight(role: str) -> torch.Tensor | None:
            ref = op.kwargs.get(role)
            return weights[ref.name] if ref is not None else None

        return lambda args, kwargs: rule(op, weight, args, kwargs)

    def compute_last_uses(self) -> list[list[int]]:
        """For each step, the ids of values whose last reader it is (so they can be freed)."""
        last: dict[int, int] = {}
        for step, op in enumerate(self.program.graph.ops):
            for value in op.operands:
                last[id(value)] = step
        keep = {id(v) for v in self.program.graph.outputs}
        frees: list[list[int]] = [[] for _ in self.program.graph.ops]
        for value_id, step in last.items():
            if value_id not in keep:
                frees[step].append(value_id)
        return frees

    def run(self, inputs: list[torch.Tensor], observe: Observer | None = None) -> list[torch.Tensor]:
        """Run the graph on flat inputs; ``observe(op, args, result)`` sees every op as it runs
        (calibration and tracing use it to record activations and routing decisions)."""
        graph = self.program.graph
        if len(inputs) != len(graph.inputs):
            raise BackendError(f"the graph takes {len(graph.inputs)} inputs, got {len(inputs)}")
        env: dict[int, Any] = {id(v): x for v, x in zip(graph.inputs, inputs, strict=True)}
        weights = self.program.weights

        def read(leaf: Any) -> Any:
            if isinstance(leaf, Value):
                return env[id(leaf)]
            if isinstance(leaf, WeightRef):
                return weights[leaf.name]
            return leaf

        with torch.inference_mode():
            for op, step, frees in zip(graph.ops, self.steps, self.last_use, strict=True):
                args = map_leaves(op.args, read)
                out = step(args, map_leaves(op.kwargs, read))
                if observe is not None:
                    observe(op, args, out)
                if len(op.results) == 1:
                    env[id(op.results[0])] = out
                else:
                    for value, item in zip(op.results, out or (), strict=False):
                        env[id(value)] = item
                for value_id in frees:
                    env.pop(value_id, None)
            return [env[id(v)] for v in graph.outputs]
