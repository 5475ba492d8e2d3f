"""``dynamic-skip``: online expert pruning; per token, routed experts with a small routing weight are not run.

Requires: a verified graph. Ensures: every ``moe.experts`` op whose tokens are routed to more than one expert
has ``skip_threshold=threshold``; at run time a token's (expert, weight) pair is dropped when its weight is
below ``threshold`` times the token's top weight (``moec.kernels.skip``; the top expert always runs, kept
weights are not renormalized), and the runner does no work for dropped pairs. Ops with top-1 routing are
left as they are (their one expert is the top one: nothing to skip), counted as ``top_1_ops`` in the
summary. Nothing else changes. In place.

Calibration is optional. The fraction of expert evaluations skipped depends on the inputs: when the context
holds calibration samples, the pass runs them once through the skipping program (``skip_statistics``) and
the summary gives, per layer and overall, the (real token, routed expert) evaluations and how many are
skipped, and the share of the routing weight the skipped pairs carried (what dropping them costs: the
kept weights are not renormalized). Padding positions (``attention_mask`` 0) are not counted. Without
samples the summary says the rate was not measured (``measured: false`` and why).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moec.analysis.calibration import Calibration
from moec.analysis.real_tokens import real_token_rows, token_mask_of
from moec.analysis.traces import RoutingTrace
from moec.backend.torch_runner import TorchRunner
from moec.errors import PassError
from moec.ir.ops import ExpertsOp
from moec.ir.program import Program
from moec.kernels.reference import merge_repeated_experts, remap_experts
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

    def uses_calibration(self) -> bool:
        return True  # optional: given samples, the pass measures its skip rate on them

    def run(self, program: Program, context: PassContext) -> PassResult:
        ops = program.graph.ops_of(ExpertsOp)
        skipping = [op for op in ops if op.top_k != 1]
        for op in skipping:
            op.set_args(op.args, {**op.kwargs, "skip_threshold": float(self.threshold)})
        summary = {"threshold": self.threshold, "expert_ops": len(skipping), "top_1_ops": len(ops) - len(skipping)}
        if skipping:
            summary |= self.measure(program, context)
            context.report["dynamic_skip"] = summary
        note = None
        if not ops:
            note = "the program has no moe.experts ops whose experts could be skipped"
        elif not skipping:
            note = "every moe.experts op routes each token to one expert (top-1), which always runs: nothing to skip"
        return PassResult(bool(skipping), summary, note=note)

    def refresh(self, program: Program, context: PassContext, summary: dict[str, Any], changed_by: list[str]) -> None:
        """The skip rate measured again on the final program, which later passes changed (a prune or merge
        changes which experts tokens choose), naming the last of them."""
        if summary.get("measured"):
            summary |= self.measure(program, context) | {"measured_after": changed_by[-1]}
            context.report["dynamic_skip"] = summary

    def measure(self, program: Program, context: PassContext) -> dict[str, Any]:
        """The skip rate on the context's calibration samples (``skip_statistics``), or why it was not measured."""
        if context.calibration is None:
            return {"measured": False, "not_measured_because": "no calibration samples were given"}
        if isinstance(context.calibration, RoutingTrace):
            return {"measured": False, "not_measured_because": "a routing trace holds no routing weights"}
        if isinstance(context.calibration, Calibration) and not context.calibration.flat_samples:
            return {"measured": False, "not_measured_because": "the given calibration stores no sample inputs"}
        samples = context.flat_samples(program, f"pass {self.name!r}")  # samples that do not fit: an error
        stats = skip_statistics(program, samples)
        return {"measured": True, "samples": len(samples), **stats}


def skip_statistics(program: Program, batches: list[list[torch.Tensor]]) -> dict[str, Any]:
    """Run ``batches`` (flat inputs) and count expert evaluations, (real token, routed expert) pairs, and how
    many the ops' skip thresholds drop; padding positions (``attention_mask`` 0) are left out.

    Returns ``evaluations``, ``skipped``, ``skipped_fraction`` and ``dropped_weight`` (the skipped pairs' share
    of the routing weight, |w| summed) over all layers, and the same per layer in ``layers`` (one row per
    ``moe.experts`` op, ``layer`` naming its block; the op's ``threshold``, None where it does not skip).
    """
    rows: dict[int, dict[str, Any]] = {}
    mask: list[torch.Tensor | None] = [None]

    def observe(op, args, result) -> None:
        if not isinstance(op, ExpertsOp):
            return
        routing = real_token_rows(args[2], mask[0]).float().abs()  # [tokens, k]
        dropped = (skipped_pairs(routing, op.skip_threshold) if op.skip_threshold
                   else torch.zeros_like(routing, dtype=torch.bool))
        row = rows.setdefault(id(op), {"layer": op.block or f"moe.experts {len(rows)}", "threshold": op.skip_threshold,
                                       "evaluations": 0, "skipped": 0, "weight": 0.0, "dropped": 0.0})
        if op.expert_map is None:
            row["evaluations"] += routing.numel()
            row["skipped"] += int(dropped.sum())
        else:  # the runner's rule (on |weights|): each stored expert computes once per token, unless every slot
            # naming it is dropped
            indices = remap_experts(real_token_rows(args[1], mask[0]), op.expert_map)
            kept, repeated = merge_repeated_experts(indices, routing.masked_fill(dropped, 0.0))
            evaluations = int((~repeated).sum())
            row["evaluations"] += evaluations
            row["skipped"] += evaluations - int(((kept != 0) & ~repeated).sum())
        row["weight"] += float(routing.sum())
        if op.skip_threshold:
            row["dropped"] += float(routing[dropped].sum())

    # Which pairs a threshold drops does not depend on the kernels: fixed ones, so that nothing is timed here.
    runner = TorchRunner(program, quant_kernel="dequant", expert_kernel="torch")
    for batch in batches:
        mask[0] = token_mask_of(program, batch)
        runner.run(batch, observe=observe)
    layers = [rate_row(row) for row in rows.values()]
    totals = {key: sum(row[key] for row in rows.values()) for key in ("evaluations", "skipped", "weight", "dropped")}
    return {**rate_row(totals), "layers": layers}


def rate_row(counts: dict[str, Any]) -> dict[str, Any]:
    """Counts with their ``skipped_fraction`` and ``dropped_weight`` (the raw weight sums left out)."""
    row = {key: value for key, value in counts.items() if key not in ("weight", "dropped")}
    row["skipped_fraction"] = counts["skipped"] / counts["evaluations"] if counts["evaluations"] else 0.0
    row["dropped_weight"] = counts["dropped"] / counts["weight"] if counts["weight"] else 0.0
    return row
