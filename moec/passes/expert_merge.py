"""``expert-merge``: merge each MoE layer's experts into fewer, MC-SMoE style, keeping the router.

Per layer, with ``keep`` (or ``keep_ratio``) merged experts:

1. **Dominant experts**: the ``keep`` experts chosen for the most calibration tokens (ties: more routing weight).
2. **Groups**: every other expert joins the dominant expert whose router logits on the calibration rows are
   most similar to its own (cosine of the [N] logit columns; a router's choice bias is added to its logits).
3. **Alignment** (``align``): each member's neurons are permuted to match the dominant expert's by Hungarian
   matching (``scipy.optimize.linear_sum_assignment``) on ``weight`` similarity (inner product of each
   neuron's input rows, bias and output column) or ``activation`` similarity (correlation of the neurons'
   hidden activations on the calibration rows); ``none`` skips it (the ablation).
4. **Averaging**: a group's weights are averaged with its members' routing frequencies as weights (uniform
   when no member was chosen).

Requires: a verified graph; calibration data (``PassContext.statistics``). Layers already merged are refused.
Ensures: the router is unchanged (same rows, same top-k over the original logits); ``moe.experts`` stores one
expert per group and gets ``expert_map`` sending every router expert to its group's merged expert, so two
chosen members of one group add their routing weights on the merged expert. Shared experts and all other ops
are untouched. The summary reports per layer experts, parameters and bytes before/after, ``output_cosine``
(mean per-token cosine of the layer's routed output before and after, on the calibration rows) and the groups.
In place (weights keep their names and get new shapes).
"""

from __future__ import annotations

from dataclasses import dataclass

import scipy.optimize
import torch
import torch.nn.functional as F

from moec.errors import PassError
from moec.frontend.blocks import ExpertsSpec
from moec.ir.program import Program
from moec.kernels.reference import activation
from moec.passes.base import Pass, PassContext, PassResult, register_pass
from moec.passes.moe_layers import (
    check_target_options,
    layer_record,
    mean_cosine,
    target_count,
    unmerged_moe_layers,
)

ALIGNMENTS = ("weight", "activation", "none")


@dataclass
class MergeGroup:
    """Router experts merged into one: ``members[0]`` is the dominant one. ``permutations[i][j]`` is the
    neuron of ``members[i]`` aligned with the dominant expert's neuron ``j``; ``weights`` sum to 1."""

    members: list[int]
    permutations: list[list[int]]
    weights: list[float]


def hidden_activations(tensors: dict[str, torch.Tensor], expert: int, rows: torch.Tensor,
                       spec: ExpertsSpec) -> torch.Tensor:
    """[N, F]: one expert's hidden activations (before ``w_out``) on ``rows``."""
    b_in = tensors.get("b_in")
    pre = F.linear(rows.float(), tensors["w_in"][expert].float(), None if b_in is None else b_in[expert].float())
    act = activation(spec.act)
    if spec.gated:
        gate, up = pre.chunk(2, dim=-1)
        return act(gate) * up
    return act(pre)


def neuron_features(tensors: dict[str, torch.Tensor], expert: int, spec: ExpertsSpec) -> torch.Tensor:
    """[F, *]: each neuron's weights: its input rows (gate and up when gated), input bias and output column."""
    w_in = tensors["w_in"][expert].float()
    parts = list(w_in.chunk(2, dim=0)) if spec.gated else [w_in]
    if "b_in" in tensors:
        parts += [b.unsqueeze(1) for b in tensors["b_in"][expert].float().chunk(2 if spec.gated else 1)]
    parts.append(tensors["w_out"][expert].float().T)
    return torch.cat(parts, dim=1)


def standardized(hidden: torch.Tensor) -> torch.Tensor:
    centered = hidden - hidden.mean(0)
    return centered / centered.norm(dim=0).clamp_min(1e-12)


def align_neurons(tensors: dict[str, torch.Tensor], dominant: int, member: int, rows: torch.Tensor,
                  spec: ExpertsSpec, align: str) -> list[int]:
    """The permutation of ``member``'s neurons that best matches ``dominant``'s (identity for ``none``)."""
    if align == "none" or member == dominant:
        return list(range(spec.intermediate))
    if align == "weight":
        similarity = neuron_features(tensors, dominant, spec) @ neuron_features(tensors, member, spec).T
    else:
        similarity = standardized(hidden_activations(tensors, dominant, rows, spec)).T @ standardized(
            hidden_activations(tensors, member, rows, spec))
    _, columns = scipy.optimize.linear_sum_assignment(similarity.double().numpy(), maximize=True)
    return columns.tolist()


def plan_layer(tensors: dict[str, torch.Tensor], counts: torch.Tensor, mass: torch.Tensor, rows: torch.Tensor,
               keep: int, spec: ExpertsSpec, align: str) -> list[MergeGroup]:
    """The merge groups of one layer, ordered by dominant expert id (see the module docstring)."""
    num_experts = counts.shape[0]
    usage = counts.double() + mass.double() / (mass.double().max() + 1)  # mass only breaks count ties
    dominants = sorted(torch.argsort(usage, descending=True, stable=True)[:keep].tolist())
    bias = tensors.get("router_bias")
    logits = F.linear(rows.float(), tensors["router"].float(), None if bias is None else bias.float())
    logits = F.normalize(logits.double().T, dim=1)  # [E, N]: each expert's logits (+ choice bias) on the rows
    similarity = logits @ logits.T
    members: dict[int, list[int]] = {d: [d] for d in dominants}
    for expert in range(num_experts):
        if expert not in members:
            best = max(dominants, key=lambda d: (similarity[expert, d].item(), -d))
            members[best].append(expert)
    groups = []
    for dominant in dominants:
        group = members[dominant]
        frequency = counts[group].double()
        weights = frequency / frequency.sum() if frequency.sum() > 0 else torch.full((len(group),), 1 / len(group))
        permutations = [align_neurons(tensors, dominant, m, rows, spec, align) for m in group]
        groups.append(MergeGroup(group, permutations, weights.tolist()))
    return groups


def merge_weights(tensors: dict[str, torch.Tensor], groups: list[MergeGroup], spec: ExpertsSpec) -> dict[str, torch.Tensor]:
    """Stacked merged expert weights (one per group); the router is returned unchanged."""
    merged: dict[str, list[torch.Tensor]] = {role: [] for role in tensors if role not in ("router", "router_bias")}
    for group in groups:
        sums: dict[str, torch.Tensor] = {}
        for member, permutation, weight in zip(group.members, group.permutations, group.weights, strict=True):
            neurons = torch.tensor(permutation)
            rows_in = torch.cat([neurons, neurons + spec.intermediate]) if spec.gated else neurons
            aligned = {"w_in": tensors["w_in"][member].double()[rows_in],
                       "w_out": tensors["w_out"][member].double()[:, neurons]}
            if "b_in" in tensors:
                aligned["b_in"] = tensors["b_in"][member].double()[rows_in]
            if "b_out" in tensors:
                aligned["b_out"] = tensors["b_out"][member].double()
            for role, tensor in aligned.items():
                sums[role] = sums.get(role, 0) + weight * tensor
        for role in merged:
            merged[role].append(sums[role].to(tensors[role].dtype))
    out = {role: torch.stack(parts) for role, parts in merged.items()}
    return out | {role: tensors[role] for role in ("router", "router_bias") if role in tensors}


@register_pass
@dataclass(frozen=True)
class ExpertMerge(Pass):
    name = "expert-merge"
    keep: int | None = None
    keep_ratio: float | None = None
    align: str = "weight"

    def __post_init__(self) -> None:
        check_target_options(self.name, self.keep, self.keep_ratio)
        if self.align not in ALIGNMENTS:
            raise PassError(f"{self.name}: align={self.align!r} is not one of {', '.join(ALIGNMENTS)}")

    def needs_calibration(self) -> bool:
        return True

    def run(self, program: Program, context: PassContext) -> PassResult:
        layers = unmerged_moe_layers(program, self.name, "merge once, to the final count")
        if not layers:
            return PassResult(False, {"layers": []})
        statistics = context.statistics(program, needed_by=f"pass {self.name!r}")
        records = []
        modified = False
        for layer in layers:
            route, experts_spec = layer.route.spec, layer.experts.spec
            count = target_count(self.name, layer, self.keep, self.keep_ratio, route.top_k)
            stats = statistics.moe[layer.block]
            tensors = layer.tensors(program)
            before_size = layer.size(program)
            before_out = layer.routed_output(tensors, stats.inputs)
            groups = plan_layer(tensors, stats.counts, stats.weight_mass, stats.inputs, count, experts_spec, self.align)
            expert_map = [0] * route.num_experts
            for index, group in enumerate(groups):
                for member in group.members:
                    expert_map[member] = index
            merged = merge_weights(tensors, groups, experts_spec)
            after_out = layer.routed_output(merged, stats.inputs, expert_map)
            if count < route.num_experts:
                layer.rewrite(program, merged, route.num_experts, count, expert_map)
                modified = True
            record = layer_record(layer.name, (route.num_experts, *before_size), (count, *layer.size(program)),
                                  mean_cosine(before_out, after_out))
            records.append(record | {"groups": [group.members for group in groups]})
        return PassResult(modified, {"layers": records})
