"""``dynamic-skip``: online expert pruning; per token, routed experts with a small routing weight are not run.

Requires: a verified graph. Ensures: every ``moe.experts`` op whose tokens are routed to more than one expert
has ``skip_threshold=threshold``; at run time a token's (expert, weight) pair is dropped when its weight is
below ``threshold`` times the token's top weight (``moec.kernels.skip``; the top expert always runs, kept
weights are not renormalized), and the runner does no work for dropped pairs. Ops with top-1 routing are
left as they are (their one expert is the top one: nothing to skip), counted as ``top_1_ops`` in the
summary. Nothing else changes. In place.

The fraction of expert evaluations skipped depends on the inputs; ``skip_statistics`` measures it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moec.backend.torch_runner import TorchRunner
from moec.errors import PassError
from moec.ir.ops import ExpertsOp
from moec.ir.program import Program
from moec.kernels.skip import skipped_pairs
from moec.passes.base import Pass, PassContext, PassResult, register_pass


@register_pass
@dataclass(frozen=True)
class DynamicSkip(Pass):
    name = "dynamic-skip"
    approximate = True

    threshold: float = 0.3

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise PassError(f"{self.name}: threshold={self.threshold} must be in (0, 1): a fraction of each token's "
                            "top routing weight")

    def run(self, program: Program, context: PassContext) -> PassResult:
        ops = program.graph.ops_of(ExpertsOp)
        skipping = [op for op in ops if op.top_k != 1]
        for op in skipping:
            op.set_args(op.args, {**op.kwargs, "skip_threshold": float(self.threshold)})
        summary = {"threshold": self.threshold, "expert_ops": len(skipping), "top_1_ops": len(ops) - len(skipping)}
        if skipping:
            context.report["dynamic_skip"] = summary
        note = None
        if not ops:
            note = "the program has no moe.experts ops whose experts could be skipped"
        elif not skipping:
            note = "every moe.experts op routes each token to one expert (top-1), which always runs: nothing to skip"
        return PassResult(bool(skipping), summary, note=note)


def skip_statistics(program: Program, batches: list[list[torch.Tensor]]) -> dict[str, float]:
    """Run ``batches`` and count expert evaluations (token, chosen expert) and how many were skipped."""
    totals = {"evaluations": 0, "skipped": 0}

    def observe(op, args, result) -> None:
        if isinstance(op, ExpertsOp):
            totals["evaluations"] += args[2].numel()
            if op.skip_threshold:
                totals["skipped"] += int(skipped_pairs(args[2], op.skip_threshold).sum())

    runner = TorchRunner(program)
    for batch in batches:
        runner.run(batch, observe=observe)
    fraction = totals["skipped"] / totals["evaluations"] if totals["evaluations"] else 0.0
    return {**totals, "skipped_fraction": fraction}
