"""What quantization needs from calibration: each FFN/MoE op's inputs and each expert's routing statistics.

One run of the torch runner over calibration batches with an ``observe`` hook records, per op:

* ``inputs``: the op's input rows ``[N, H]``, for GPTQ and output errors: a uniform random sample (seeded, so
  a rerun keeps the same rows) of at most ``MAX_ROWS`` of the real tokens that reached it, over all batches;
* for ``moe.experts``: ``frequency[e]`` (fraction of tokens that chose expert ``e``) and ``mass[e]`` (mean
  routing weight expert ``e`` received per token), over every real token, the importance of each expert.

Real tokens: with an ``attention_mask`` input, the padding positions are left out, as in ``Calibration``.
Experts are the op's stored experts: after a merge whose router kept every row (``expert_map``), router
ids are mapped to the stored expert they run, so a stored expert gets the tokens of all its members.

Calibration batches are lists of flat graph inputs (``Program.flatten_inputs``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moec.analysis.calibration import SEED, run_sample
from moec.analysis.real_tokens import real_token_rows, token_mask_of
from moec.backend.torch_runner import TorchRunner
from moec.ir.core import Operation
from moec.ir.ops import DenseFFNOp, ExpertsOp, SharedExpertOp
from moec.ir.program import Program
from moec.kernels import reference

FFN_OPS = (ExpertsOp, DenseFFNOp, SharedExpertOp)
MAX_ROWS = 4096  # rows sampled per op: enough for GPTQ Hessians and error estimates at these widths


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


class RowSample:
    """A uniform random sample of at most ``limit`` rows from rows that arrive in parts: the rows with the
    smallest random keys so far (bottom-k), so memory stays bounded; ``rows()`` keeps their arrival order."""

    def __init__(self, limit: int, generator: torch.Generator) -> None:
        self.limit = limit
        self.generator = generator
        self.arrived = 0
        self.keys = torch.zeros(0)
        self.order = torch.zeros(0, dtype=torch.int64)  # arrival number of each kept row
        self.parts: tuple[torch.Tensor, ...] = ()

    def add(self, *parts: torch.Tensor) -> None:
        """Offer rows; ``parts`` are aligned tensors (the same rows' inputs, expert ids, weights)."""
        count = parts[0].shape[0]
        keys = torch.cat([self.keys, torch.rand(count, generator=self.generator)])
        order = torch.cat([self.order, torch.arange(self.arrived, self.arrived + count)])
        joined = tuple(torch.cat([old, new]) for old, new in zip(self.parts, parts, strict=True)) if self.parts else parts
        kept = torch.argsort(keys)[: self.limit]
        kept = kept[torch.argsort(order[kept])]
        self.keys, self.order, self.parts = keys[kept], order[kept], tuple(part[kept] for part in joined)
        self.arrived += count


def collect(program: Program, batches: list[list[torch.Tensor]]) -> FFNActivations:
    """Run ``batches`` through ``program`` and record FFN inputs and expert routing statistics of the real
    (not padding) tokens."""
    if not batches:
        raise ValueError("quantization needs calibration batches (a non-empty list of input lists)")
    position = {id(op): i for i, op in enumerate(program.graph.ops)}
    generator = torch.Generator().manual_seed(SEED)
    samples: dict[int, RowSample] = {}
    routing: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    token_mask: torch.Tensor | None = None

    def observe(op: Operation, args: list, result) -> None:
        if not isinstance(op, FFN_OPS):
            return
        key = position[id(op)]
        rows = real_token_rows(args[0], token_mask).float()
        sample = samples.setdefault(key, RowSample(MAX_ROWS, generator))
        if isinstance(op, ExpertsOp):
            stored = reference.remap_experts(real_token_rows(args[1], token_mask), op.expert_map)
            weights = real_token_rows(args[2], token_mask).float()
            routing.setdefault(key, []).append((stored, weights))
            sample.add(rows, stored, weights)
        else:
            sample.add(rows)

    runner = TorchRunner(program)
    for index, batch in enumerate(batches):
        token_mask = token_mask_of(program, batch)
        run_sample(runner, batch, index, observe)
    out = FFNActivations()
    for key, sample in samples.items():
        record = OpActivations(sample.parts[0])
        op = program.graph.ops[key]
        if isinstance(op, ExpertsOp):  # observed with its routing
            indices = torch.cat([i for i, _ in routing[key]])
            weights = torch.cat([w for _, w in routing[key]])
            num_experts = op.spec.num_experts
            tokens = indices.shape[0]
            record.frequency = torch.bincount(indices.reshape(-1), minlength=num_experts).float() / tokens
            record.mass = torch.zeros(num_experts).index_add_(0, indices.reshape(-1), weights.reshape(-1)) / tokens
            record.indices, record.weights = sample.parts[1], sample.parts[2]
        out.ops[key] = record
    return out
