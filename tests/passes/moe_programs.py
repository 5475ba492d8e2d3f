"""Shared by the expert-compression tests: a hand-written MoE program, calibration samples, and the layer
inputs and outputs a program's MoE layers see when it runs."""

from __future__ import annotations

import functools

import torch
import torch.utils._pytree as pytree

from moec.backend.torch_runner import TorchRunner
from moec.frontend.capture import capture
from moec.frontend.zoo import build_preset
from moec.ir import parse_graph, print_graph, verify
from moec.ir.ops import ExpertsOp, RouteOp
from moec.ir.program import Program, dump_treespec

HIDDEN, FFN, EXPERTS = 8, 16, 4

SMALL_MOE = """\
graph @main(%x: f32[s0, 8]) {
  weight @gate: f32[4, 8]
  weight @w_in: f32[4, 32, 8]
  weight @w_out: f32[4, 8, 16]
  %0, %1 = moe.route(%x, router=@gate, num_experts=4, top_k=2, scoring="softmax", order="score_then_topk", \
renormalize=true, renorm_eps=0.0, scaling=1.0, n_group=1, topk_group=1, block="moe") : i64[s0, 2], f32[s0, 2]
  %2 = moe.experts(%x, %0, %1, w_in=@w_in, w_out=@w_out, num_experts=4, hidden=8, intermediate=16, act="silu", \
gated=true, block="moe") : f32[s0, 8]
  return %2
}
"""


def small_moe_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "gate": torch.randn(EXPERTS, HIDDEN, generator=generator),
        "w_in": torch.randn(EXPERTS, 2 * FFN, HIDDEN, generator=generator) / HIDDEN**0.5,
        "w_out": torch.randn(EXPERTS, HIDDEN, FFN, generator=generator) / FFN**0.5,
    }


def program_of(text: str, weights: dict[str, torch.Tensor]) -> Program:
    """A verified program from IR text taking one positional tensor and returning one tensor."""
    graph = parse_graph(text)
    verify(graph)
    example = torch.zeros(1, HIDDEN)
    in_spec = dump_treespec(pytree.tree_flatten(((example,), {}))[1])
    out_spec = dump_treespec(pytree.tree_flatten(example)[1])
    return Program(graph, dict(weights), in_spec, out_spec)


def token_samples(count: int = 4, rows: int = 64, seed: int = 1) -> list[tuple[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, HIDDEN, generator=generator),) for _ in range(count)]


def layer_io(program: Program, inputs: list[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For each MoE layer (by block): the rows its router saw and its routed-experts output, on one run."""
    seen: dict[str, list[torch.Tensor]] = {}

    def observe(op, args, result):
        if isinstance(op, RouteOp):
            seen[op.block] = [args[0].reshape(-1, args[0].shape[-1])]
        elif isinstance(op, ExpertsOp):
            seen[op.block].append(result.reshape(-1, result.shape[-1]))

    TorchRunner(program).run(inputs, observe=observe)
    return {block: (x, y) for block, (x, y) in seen.items()}


@functools.cache
def _captured(preset: str) -> Program:
    model, example = build_preset(preset)
    return capture(model, (), example), example


def captured(preset: str) -> tuple[Program, dict[str, torch.Tensor]]:
    """A fresh copy of a zoo preset's captured program (capture is the slow part), and its example inputs."""
    program, example = _captured(preset)
    copy = Program(parse_graph(print_graph(program.graph)), dict(program.weights), program.in_spec, program.out_spec)
    return copy, example
