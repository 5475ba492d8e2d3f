"""``expert-merge``: merge each MoE layer's experts into fewer (MC-SMoE recipe), then refit them.

Per layer, with ``keep`` (or ``keep_ratio``) merged experts:

1. **Dominant experts**: the ``keep`` experts chosen for the most calibration tokens (ties: more routing
   weight); with ``router="groups"`` on a layer that routes in groups (``n_group > 1``), ``keep / n_group``
   of every routing group, as ``expert-prune`` keeps them.
2. **Groups**: every other expert joins the dominant expert (of its routing group) whose router logits on the
   calibration rows are most similar to its own (cosine of the [N] logit columns; a router's choice bias is
   added to its logits).
3. **Alignment** (``align``): each member's neurons are permuted to match the dominant expert's by Hungarian
   matching (``scipy.optimize.linear_sum_assignment``) on ``weight`` similarity (inner product of each
   neuron's input rows, bias and output column), ``activation`` similarity (correlation of the neurons'
   hidden activations on the calibration rows) or, for ``select``, ``importance``: the pairing that lets
   selection keep the most importance (``importance_alignment``; for two members, the most important half of
   their neurons); ``none`` skips it (the ablation: neuron i meets neuron i). Default: ``importance`` for
   ``select``, ``weight`` for ``average``.
4. **Combining** (``combine``), aligned neuron by aligned neuron:
   ``select`` keeps, at each position, the neuron of the member that matters most there: the largest
   importance ``sum over the calibration rows routed to the member of |h_n(x) - mean(h_n)| * |w_out[:, n]|``
   (how much the neuron's output varies on the tokens it serves; its constant part is the refit bias's job).
   ``average`` is MC-SMoE's average with the members' routing frequencies as weights. Experts made by
   ``dense-to-moe`` are disjoint neuron clusters of one FFN, so the average of two aligned neurons computes
   neither; selecting keeps real neurons. Output biases are averaged with the frequencies in both cases.
5. **Routing** (``router``): ``groups`` keeps one router row per group, the dominant expert's (and its choice
   bias), so top-k picks k *distinct* merged experts and their weights are scored over the kept rows as the
   route op says (exactly as after pruning to the dominant experts; a converted MoE's weights stay 1).
   ``members`` keeps all router rows (MC-SMoE): ``moe.experts`` gets an ``expert_map`` sending every member
   to its group's merged expert, and two chosen members of one group add their weights on it (the token then
   runs fewer than top-k distinct experts).
6. **Refit** (``refit``): the merged experts' ``w_out`` (and ``b_out`` where the experts have one) are fitted
   jointly by least squares so that the layer's routed output under the new routing reproduces the unmerged
   layer's on the calibration rows. The ridge term pulls toward the combined weights (strength
   ``refit_ridge``, a positive finite number given only with ``refit``, times the mean diagonal of the normal
   equations), which keeps the fit from chasing the few
   calibration rows (a layer has ``keep * (F + 1)`` unknowns per output feature; the solve is dense, so very
   wide experts may want ``refit=False``).

With ``router="groups"``, the dominant experts' own weights and no refit, the result would be frequency pruning;
the default (``select``, ``groups``, refit) starts near it and uses the members' neurons and outputs.

Requires: a verified graph; calibration data (``PassContext.statistics``). Layers carrying an ``expert_map``
(merged with ``router="members"``) are refused, and so are quantized layers (merge before quantizing) and
experts that take the routing weight on their input (Llama 4).
Ensures: ``moe.experts`` stores one expert per group, in the order of the dominant experts' ids. With
``groups`` routing the router keeps the dominant experts' rows (same order) and ``moe.route`` chooses top-k
among them; with ``members`` routing the router is unchanged and ``expert_map`` maps router experts to
merged ones. Shared experts and all other ops are untouched. The summary reports per layer experts,
parameters and bytes before/after, ``output_cosine`` and ``output_norm_ratio`` (mean per-token cosine of the
layer's routed output before and after, and the ratio of its mean row norms, on the calibration rows the refit
saw) and the groups. A layer with no more experts than
the target is left as it is, and when that is every layer the pass calibrates nothing and says so in its
note (the summary's ``note``, and a warning).
In place (weights keep their names and get new shapes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import scipy.optimize
import torch
import torch.nn.functional as F

from moec.analysis.calibration import MoEStats
from moec.errors import PassError
from moec.frontend.blocks import ExpertsSpec
from moec.ir.program import Program
from moec.kernels.reference import activation, gated_activation
from moec.passes.base import Pass, PassContext, PassResult, register_pass
from moec.passes.moe_layers import (
    ROUTE_ROLES,
    MoELayer,
    check_target_options,
    expert_origins,
    keep_by_score,
    kept_whole_record,
    layer_record,
    model_ids,
    nothing_to_do_note,
    output_change,
    routing_groups,
    set_expert_origins,
    target_count,
    unmerged_moe_layers,
)

ALIGNMENTS = ("importance", "weight", "activation", "none")
COMBINES = ("select", "average")
ROUTERS = ("groups", "members")
REFIT_RIDGE = 0.1


@dataclass
class MergeGroup:
    """Router experts merged into one: ``members[0]`` is the dominant one. ``permutations[i][j]`` is the
    neuron of ``members[i]`` aligned with the dominant expert's neuron ``j``; ``weights`` (the members'
    routing frequencies, summing to 1) combine output biases; ``neuron_weights[i, j]`` is member i's share
    of merged neuron j (each column sums to 1)."""

    members: list[int]
    permutations: list[list[int]]
    weights: list[float]
    neuron_weights: torch.Tensor  # [M, F] f64


def hidden_activations(tensors: dict[str, torch.Tensor], expert: int, rows: torch.Tensor,
                       spec: ExpertsSpec) -> torch.Tensor:
    """[N, F]: one expert's hidden activations (before ``w_out``) on ``rows``."""
    b_in = tensors.get("b_in")
    pre = F.linear(rows.float(), tensors["w_in"][expert].float(), None if b_in is None else b_in[expert].float())
    if spec.gated:
        gate, up = pre.chunk(2, dim=-1)
        return gated_activation(gate, up, spec)
    return activation(spec.act)(pre)


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


def importance_alignment(importances: list[torch.Tensor]) -> list[list[int]]:
    """Permutations of each member's neurons (``importances[0]`` is the dominant expert's, kept in place)
    such that keeping the most important neuron at every position keeps as much importance as possible.

    Members are matched one after another by Hungarian matching on ``max(kept[j], importance[n])``, ``kept``
    being the importance already kept at position ``j``; exact for two members (the kept neurons are then the
    most important half of the pair's), greedy beyond.
    """
    kept = importances[0].clone()
    permutations = [list(range(kept.shape[0]))]
    for importance in importances[1:]:
        gain = torch.maximum(kept.unsqueeze(1), importance.unsqueeze(0))  # [position, member neuron]
        _, columns = scipy.optimize.linear_sum_assignment(gain.numpy(), maximize=True)
        permutations.append(columns.tolist())
        kept = torch.maximum(kept, importance[torch.from_numpy(columns)])
    return permutations


def neuron_importance(tensors: dict[str, torch.Tensor], expert: int, rows: torch.Tensor,
                      spec: ExpertsSpec) -> torch.Tensor:
    """[F] f64: how much each neuron's output varies on ``rows``, ``sum |h - mean h| * |w_out column|``."""
    if rows.shape[0] == 0:
        return torch.zeros(spec.intermediate, dtype=torch.float64)
    hidden = hidden_activations(tensors, expert, rows, spec).double()
    return (hidden - hidden.mean(0)).abs().sum(0) * tensors["w_out"][expert].double().norm(dim=0)


def neuron_shares(importances: list[torch.Tensor] | None, permutations: list[list[int]], weights: torch.Tensor,
                  spec: ExpertsSpec) -> torch.Tensor:
    """[M, F]: each member's share of each merged neuron: the members' ``weights`` at every position
    (``average``, ``importances`` None) or 1 for the most important aligned neuron (``select``)."""
    if importances is None:
        return weights.double().unsqueeze(1).expand(len(permutations), spec.intermediate).clone()
    importance = torch.stack([imp[torch.tensor(permutation)] for imp, permutation in zip(importances, permutations,
                                                                                         strict=True)])
    winners = importance.argmax(0, keepdim=True)  # ties: the first member, the dominant expert
    return torch.zeros_like(importance).scatter_(0, winners, 1.0)


def plan_layer(tensors: dict[str, torch.Tensor], stats: MoEStats, layer: MoELayer, routing_group: torch.Tensor,
               per_group: int, align: str, combine: str) -> list[MergeGroup]:
    """The merge groups of one layer, ordered by dominant expert id (see the module docstring).
    ``routing_group`` [E] is each router expert's routing group, of which ``per_group`` experts dominate."""
    spec, rows = layer.experts.spec, stats.inputs.float()
    mass = stats.weight_mass.double()
    dominants = keep_by_score(stats.counts.double() + mass / (mass.max() + 1), routing_group, per_group)
    logits = F.linear(rows, tensors["router"].float())
    for role in ("router_logit_bias", "router_bias"):
        if role in tensors:
            logits = logits + tensors[role].float()
    logits = F.normalize(logits.double().T, dim=1)  # [E, N]: each expert's logits (+ biases) on the rows
    similarity = logits @ logits.T
    members: dict[int, list[int]] = {d: [d] for d in dominants}
    for expert in range(len(routing_group)):
        if expert not in members:
            candidates = [d for d in dominants if routing_group[d] == routing_group[expert]]
            best = max(candidates, key=lambda d: (similarity[expert, d].item(), -d))
            members[best].append(expert)
    indices, _ = layer.routing(tensors, rows)
    served = torch.zeros(rows.shape[0], len(routing_group), dtype=torch.bool).scatter_(1, indices, True)
    groups = []
    for dominant in dominants:
        group = members[dominant]
        frequency = stats.counts[group].double()
        weights = frequency / frequency.sum() if frequency.sum() > 0 else torch.full((len(group),), 1 / len(group))
        importances = None if combine == "average" else [
            neuron_importance(tensors, member, rows[served[:, member]], spec) for member in group]
        if align == "importance":
            if importances is None:
                raise ValueError("align='importance' pairs neurons for combine='select' only")
            permutations = importance_alignment(importances)
        else:
            permutations = [align_neurons(tensors, dominant, m, rows, spec, align) for m in group]
        shares = neuron_shares(importances, permutations, weights, spec)
        groups.append(MergeGroup(group, permutations, weights.tolist(), shares))
    return groups


def merge_weights(tensors: dict[str, torch.Tensor], groups: list[MergeGroup], spec: ExpertsSpec) -> dict[str, torch.Tensor]:
    """Stacked merged expert weights (one per group), without the router."""
    merged: dict[str, list[torch.Tensor]] = {role: [] for role in tensors if role not in ROUTE_ROLES}
    for group in groups:
        sums: dict[str, torch.Tensor] = {}
        for i, (member, permutation) in enumerate(zip(group.members, group.permutations, strict=True)):
            neurons, share = torch.tensor(permutation), group.neuron_weights[i]
            rows_in = torch.cat([neurons, neurons + spec.intermediate]) if spec.gated else neurons
            share_in = torch.cat([share, share]) if spec.gated else share
            aligned = {"w_in": tensors["w_in"][member].double()[rows_in] * share_in.unsqueeze(1),
                       "w_out": tensors["w_out"][member].double()[:, neurons] * share}
            if "b_in" in tensors:
                aligned["b_in"] = tensors["b_in"][member].double()[rows_in] * share_in
            if "b_out" in tensors:
                aligned["b_out"] = tensors["b_out"][member].double() * group.weights[i]
            for role, tensor in aligned.items():
                sums[role] = sums.get(role, 0) + tensor
        for role in merged:
            merged[role].append(sums[role].to(tensors[role].dtype))
    return {role: torch.stack(parts) for role, parts in merged.items()}


def refit_outputs(layer: MoELayer, merged: dict[str, torch.Tensor], rows: torch.Tensor, target: torch.Tensor,
                  expert_map: list[int] | None, ridge: float) -> dict[str, torch.Tensor]:
    """New ``w_out`` (and ``b_out``) of the merged experts: the ridge least-squares fit, pulled toward the
    current ones, of the layer's routed output under ``merged``'s routing to ``target`` [N, H] on ``rows``."""
    spec = layer.experts.spec
    indices, weights = layer.routing(merged, rows, expert_map)
    count, width = merged["w_in"].shape[0], spec.intermediate
    columns = width + ("b_out" in merged)
    design = torch.zeros(rows.shape[0], count, columns, dtype=torch.float64)  # [N, G, F (+1)]
    for expert in range(count):
        chosen = indices == expert
        served = chosen.any(-1)
        weight = (weights * chosen).sum(-1)[served].double().unsqueeze(1)  # its summed routing weight per row
        design[served, expert, :width] = hidden_activations(merged, expert, rows[served].float(), spec).double() * weight
        if "b_out" in merged:
            design[served, expert, width:] = weight
    design = design.reshape(rows.shape[0], -1)
    current = merged["w_out"].double().transpose(1, 2)  # [G, F, H]
    if "b_out" in merged:
        current = torch.cat([current, merged["b_out"].double().unsqueeze(1)], dim=1)
    current = current.reshape(count * columns, -1)
    gram = design.T @ design
    strength = (ridge * gram.diagonal().mean()).clamp_min(1e-12)
    solution = torch.linalg.solve(gram + strength * torch.eye(len(gram), dtype=gram.dtype),
                                  design.T @ target.double() + strength * current)
    solution = solution.reshape(count, columns, -1)
    refitted = {"w_out": solution[:, :width].transpose(1, 2).to(merged["w_out"].dtype).contiguous()}
    if "b_out" in merged:
        refitted["b_out"] = solution[:, width].to(merged["b_out"].dtype).contiguous()
    return refitted


@register_pass
@dataclass(frozen=True)
class ExpertMerge(Pass):
    name = "expert-merge"
    approximate = True
    keep: int | None = None
    keep_ratio: float | None = None
    align: str | None = None  # None: "importance" for combine="select", "weight" for "average"
    combine: str = "select"
    router: str = "groups"
    refit: bool = True
    refit_ridge: float = REFIT_RIDGE

    def __post_init__(self) -> None:
        check_target_options(self.name, self.keep, self.keep_ratio)
        for option, value, allowed in (("align", self.alignment, ALIGNMENTS), ("combine", self.combine, COMBINES),
                                       ("router", self.router, ROUTERS)):
            if value not in allowed:
                raise PassError(f"{self.name}: {option}={value!r} is not one of {', '.join(allowed)}")
        if self.alignment == "importance" and self.combine != "select":
            raise PassError(f"{self.name}: align='importance' pairs neurons for combine='select'; "
                            f"with combine={self.combine!r} use align='weight', 'activation' or 'none'")
        if not 0 < self.refit_ridge < math.inf:
            raise PassError(f"{self.name}: refit_ridge={self.refit_ridge!r} must be a positive finite number "
                            f"(default {REFIT_RIDGE})")
        if self.refit_ridge != REFIT_RIDGE and not self.refit:
            raise PassError(f"{self.name}: refit_ridge={self.refit_ridge!r} weighs the refit, and refit=false "
                            "skips it; leave refit_ridge out, or set refit: true")

    @property
    def alignment(self) -> str:
        """``align``, or its default for ``combine``."""
        if self.align is not None:
            return self.align
        return "importance" if self.combine == "select" else "weight"

    def needs_calibration(self) -> bool:
        return True

    def run(self, program: Program, context: PassContext) -> PassResult:
        layers = unmerged_moe_layers(program, self.name, "merge once, to the final count")
        for layer in layers:
            if layer.experts.spec.weighted_input:
                raise PassError(f"{self.name}: layer {layer.name}'s experts take the routing weight on their input "
                                "(Llama 4), and merging refits outputs that the weight scales; use expert-prune "
                                "to shrink this layer")
        if not layers:
            return PassResult(False, {"layers": []}, note="the program has no routed MoE layers to merge")
        grouped = self.router == "groups"
        counts = [target_count(self.name, layer, self.keep, self.keep_ratio, grouped) for layer in layers]
        if all(count == layer.route.spec.num_experts for layer, count in zip(layers, counts, strict=True)):
            return PassResult(False, {"layers": [self.kept_whole(program, layer) for layer in layers]},
                              note=nothing_to_do_note(self.keep, self.keep_ratio, layers, "merged"))
        statistics = context.statistics(program, needed_by=f"pass {self.name!r}")
        records = []
        for layer, count in zip(layers, counts, strict=True):
            route = layer.route.spec
            if count == route.num_experts:
                records.append(self.kept_whole(program, layer))
                continue
            if self.router == "groups":
                routing_group, per_group = routing_groups(layer, count)
            else:
                routing_group, per_group = torch.zeros(route.num_experts, dtype=torch.long), count
            stats = statistics.moe[layer.block]
            tensors, rows = layer.tensors(program), stats.inputs.float()
            origins = expert_origins(program, layer)
            before_size = layer.size(program)
            before_out = layer.routed_output(tensors, rows)
            groups = plan_layer(tensors, stats, layer, routing_group, per_group, self.alignment, self.combine)
            merged, expert_map = self.merge(tensors, groups, layer, rows, before_out)
            after_out = layer.routed_output(merged, rows, expert_map)
            router_rows = count if expert_map is None else route.num_experts
            layer.rewrite(program, merged, router_rows, count, expert_map)
            record = layer_record(layer.name, (route.num_experts, *before_size), (count, *layer.size(program)),
                                  output_change(before_out, after_out))
            merged_origins = [model_ids(origins, group.members) for group in groups]
            set_expert_origins(program, layer, merged_origins)
            records.append(record | {"groups": merged_origins})
        return PassResult(True, {"layers": records})

    @staticmethod
    def kept_whole(program: Program, layer: MoELayer) -> dict:
        """The report row of a layer that keeps every expert: each expert its own group."""
        return kept_whole_record(program, layer) | {"groups": expert_origins(program, layer)}

    def merge(self, tensors: dict[str, torch.Tensor], groups: list[MergeGroup], layer: MoELayer, rows: torch.Tensor,
              target: torch.Tensor) -> tuple[dict[str, torch.Tensor], list[int] | None]:
        """The layer's new weights (router included) and expert map (None with ``groups`` routing)."""
        merged = merge_weights(tensors, groups, layer.experts.spec)
        routers = {role: tensors[role] for role in ROUTE_ROLES if role in tensors}
        if self.router == "groups":
            dominants = torch.tensor([group.members[0] for group in groups])
            merged |= {role: router.index_select(0, dominants) for role, router in routers.items()}
            expert_map = None
        else:
            merged |= routers
            expert_map = [0] * layer.route.spec.num_experts
            for index, group in enumerate(groups):
                for member in group.members:
                    expert_map[member] = index
        if self.refit:
            merged |= refit_outputs(layer, merged, rows, target, expert_map, self.refit_ridge)
        return merged, expert_map
