"""What quantization needs from calibration: each FFN/MoE op's inputs and each expert's routing statistics.

One run of the torch runner over calibration batches with an ``observe`` hook records, per op:

* ``inputs``: the op's input rows ``[N, H]`` (all tokens that reached it), for GPTQ and output errors;
* for ``moe.experts``: ``frequency[e]`` (fraction of tokens that chose expert ``e``) and ``mass[e]`` (mean
  routing weight expert ``e`` received per token), the importance of each expert.

Experts are the op's stored experts: after a merge whose router kept every row (``expert_map``), router
ids are mapped to the stored expert they run, so a stored expert gets the tokens of all its members.

This is deliberately small; when the project-wide ``Calibration`` lands, ``collect`` becomes a view of it.
Calibration batches are lists of flat graph inputs (``Program.flatten_inputs``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moec.analysis.calibration import run_sample
from moec.backend.torch_runner import TorchRunner
from moec.ir.core import Operation
from moec.ir.ops import DenseFFNOp, ExpertsOp, SharedExpertOp
from moec.ir.program import Program
from moec.kernels import reference

FFN_OPS = (ExpertsOp, DenseFFNOp, SharedExpertOp)
MAX_ROWS = 4096  # rows kept per op: enough for GPTQ Hessians and error estimates at these widths


@dataclass
class OpActivations:
    inputs: torch.Tensor  # [N, H] float32
    frequency: torch.Tensor | None = None  # [E], experts only
    mass: torch.Tensor | None = None  # [E]
    indices: torch.Tensor | None = None  # [N, k] stored expert ids of the kept rows, experts only
    weights: torch.Tensor | None = None  # [N, k]


@dataclass
class FFNActivations:
    """Per FFN/MoE op (by position in ``graph.ops``), its recorded calibration data."""

    ops: dict[int, OpActivations] = field(default_factory=dict)


def collect(program: Program, batches: list[list[torch.Tensor]]) -> FFNActivations:
    """Run ``batches`` through ``program`` and record FFN inputs and expert routing statistics."""
    if not batches:
        raise ValueError("quantization needs calibration batches (a non-empty list of input lists)")
    position = {id(op): i for i, op in enumerate(program.graph.ops)}
    rows: dict[int, list[torch.Tensor]] = {}
    routing: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def observe(op: Operation, args: list, result) -> None:
        if isinstance(op, FFN_OPS):
            key = position[id(op)]
            rows.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]).float())
            if isinstance(op, ExpertsOp):
                k = args[1].shape[-1]
                stored = reference.remap_experts(args[1].reshape(-1, k), op.expert_map)
                routing.setdefault(key, []).append((stored, args[2].reshape(-1, k).float()))

    runner = TorchRunner(program)
    for index, batch in enumerate(batches):
        run_sample(runner, batch, index, observe)
    out = FFNActivations()
    for key, parts in rows.items():
        inputs = torch.cat(parts)[:MAX_ROWS]
        record = OpActivations(inputs)
        op = program.graph.ops[key]
        if isinstance(op, ExpertsOp):  # observed with its routing
            indices = torch.cat([i for i, _ in routing[key]])
            weights = torch.cat([w for _, w in routing[key]])
            num_experts = op.spec.num_experts
            tokens = indices.shape[0]
            record.frequency = torch.bincount(indices.reshape(-1), minlength=num_experts).float() / tokens
            record.mass = torch.zeros(num_experts).index_add_(0, indices.reshape(-1), weights.reshape(-1)) / tokens
            record.indices, record.weights = indices[:MAX_ROWS], weights[:MAX_ROWS]
        out.ops[key] = record
    return out
