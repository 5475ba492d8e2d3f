"""``expert-prune``: remove routed experts from every MoE layer, keeping the most useful ones.

Options: ``keep`` (experts per layer) or ``keep_ratio`` (a fraction of each layer's experts, rounded), and
``criterion``:

1. ``frequency``: keep the experts chosen for the most calibration tokens (ties: more routing weight).
2. ``weight_mass``: keep the experts that received the most routing weight on calibration tokens.
3. ``similarity`` (STUN-style behaviour similarity): repeatedly take the two most similar remaining experts
   and remove the one with less routing weight, until ``keep`` remain. ``similarity_of`` says what is
   compared: ``output`` (cosine of the experts' outputs on the same calibration rows) or ``router`` (cosine
   of their router rows, needing no expert evaluation); with another criterion it is refused.

Requires: a verified graph; calibration data (``PassContext.statistics``) for every criterion. Layers already
merged (``moe.experts`` with an ``expert_map``) are refused: prune before merging; so are quantized layers:
prune before quantizing.
Ensures: each layer keeps the chosen experts in their original order; the router's rows (and score bias) of
removed experts are dropped, so ``moe.route`` chooses ``top_k`` among the kept ones and a softmax scores over
them only (without renormalization, as OLMoE routes, every kept weight grows); ``keep >= top_k``.
A layer with no more experts than the target is left as it is, and when that is every layer the pass
calibrates nothing and says so in its note (the summary's ``note``, and a warning).
With grouped routing (``n_group > 1``, DeepSeek-V3) every group keeps ``keep / n_group`` experts so groups stay
equal. Shared experts and all other ops are untouched. The summary reports per layer experts, parameters and
bytes before/after, the original ids of the experts ``kept`` and ``removed``, and ``output_cosine`` and
``output_norm_ratio``: the mean per-token cosine of the layer's routed output before and after, and the ratio
of its mean row norms, on the calibration rows.
In place (weights keep their names and get new shapes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moec.errors import PassError
from moec.ir.program import Program
from moec.kernels.reference import experts
from moec.passes.base import Pass, PassContext, PassResult, register_pass
from moec.passes.moe_layers import (
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

CRITERIA = ("frequency", "weight_mass", "similarity")
SIMILARITIES = ("output", "router")


def expert_outputs(tensors: dict[str, torch.Tensor], rows: torch.Tensor, layer: MoELayer) -> torch.Tensor:
    """[E, N*H]: every expert's output on the same calibration rows, one flattened row per expert."""
    floats = {role: t.float() for role, t in tensors.items()}
    rows = rows.float()
    every_token = torch.ones(rows.shape[0], 1)
    outputs = [
        experts(rows, torch.full((rows.shape[0], 1), expert), every_token, floats["w_in"], floats["w_out"],
                floats.get("b_in"), floats.get("b_out"), layer.experts.spec).reshape(-1)
        for expert in range(floats["w_in"].shape[0])
    ]
    return torch.stack(outputs)


def cosine_matrix(features: torch.Tensor) -> torch.Tensor:
    """[E, E] pairwise cosine similarity of the rows of ``features``."""
    unit = F.normalize(features.double(), dim=-1)
    return unit @ unit.T


def keep_by_similarity(similarity: torch.Tensor, mass: torch.Tensor, groups: torch.Tensor, per_group: int) -> list[int]:
    """Greedy STUN-style removal: in a group holding more than ``per_group`` experts, take the most similar
    pair and drop its expert with less routing weight (the higher id on a tie); repeat."""
    remaining = list(range(len(mass)))
    group_of = groups.tolist()
    while True:
        sizes = {g: sum(group_of[e] == g for e in remaining) for g in set(group_of)}
        pairs = [(i, j) for i in remaining for j in remaining
                 if i < j and group_of[i] == group_of[j] and sizes[group_of[i]] > per_group]
        if not pairs:
            return remaining
        i, j = max(pairs, key=lambda pair: similarity[pair].item())
        remaining.remove(j if mass[j] <= mass[i] else i)


@register_pass
@dataclass(frozen=True)
class ExpertPrune(Pass):
    name = "expert-prune"
    approximate = True
    keep: int | None = None
    keep_ratio: float | None = None
    criterion: str = "frequency"
    similarity_of: str = "output"

    def __post_init__(self) -> None:
        check_target_options(self.name, self.keep, self.keep_ratio)
        if self.criterion not in CRITERIA:
            raise PassError(f"{self.name}: criterion={self.criterion!r} is not one of {', '.join(CRITERIA)}")
        if self.similarity_of not in SIMILARITIES:
            raise PassError(f"{self.name}: similarity_of={self.similarity_of!r} is not one of {', '.join(SIMILARITIES)}")
        if self.similarity_of != SIMILARITIES[0] and self.criterion != "similarity":
            raise PassError(f"{self.name}: similarity_of={self.similarity_of!r} says what criterion 'similarity' "
                            f"compares, and criterion={self.criterion!r} compares nothing; leave it out, or use "
                            "criterion 'similarity'")

    def needs_calibration(self) -> bool:
        return True

    def run(self, program: Program, context: PassContext) -> PassResult:
        layers = unmerged_moe_layers(program, self.name, "prune before merging")
        if not layers:
            return PassResult(False, {"layers": []}, note="the program has no routed MoE layers to prune")
        counts = [target_count(self.name, layer, self.keep, self.keep_ratio, grouped=True) for layer in layers]
        if all(count == layer.route.spec.num_experts for layer, count in zip(layers, counts, strict=True)):
            return PassResult(False, {"layers": [self.kept_whole(program, layer) for layer in layers]},
                              note=nothing_to_do_note(self.keep, self.keep_ratio, layers, "pruned"))
        statistics = context.statistics(program, needed_by=f"pass {self.name!r}")
        records = []
        for layer, count in zip(layers, counts, strict=True):
            route = layer.route.spec
            if count == route.num_experts:
                records.append(self.kept_whole(program, layer))
                continue
            kept = self.choose(layer, program, statistics.moe[layer.block], count)
            origins = expert_origins(program, layer)
            before_size, tensors = layer.size(program), layer.tensors(program)
            rows = statistics.moe[layer.block].inputs
            before_out = layer.routed_output(tensors, rows)
            index = torch.tensor(kept)
            pruned = {role: t.index_select(0, index) for role, t in tensors.items()}
            after_out = layer.routed_output(pruned, rows)
            layer.rewrite(program, pruned, len(kept), len(kept), None)
            record = layer_record(layer.name, (route.num_experts, *before_size), (len(kept), *layer.size(program)),
                                  output_change(before_out, after_out))
            removed = [expert for expert in range(route.num_experts) if expert not in kept]
            set_expert_origins(program, layer, [origins[expert] for expert in kept])
            records.append(record | {"kept": model_ids(origins, kept), "removed": model_ids(origins, removed)})
        return PassResult(True, {"layers": records})

    @staticmethod
    def kept_whole(program: Program, layer: MoELayer) -> dict:
        """The report row of a layer that keeps every expert."""
        origins = expert_origins(program, layer)
        return kept_whole_record(program, layer) | {"kept": model_ids(origins, range(len(origins))), "removed": []}

    def choose(self, layer: MoELayer, program: Program, stats, count: int) -> list[int]:
        """The experts a layer keeps, in expert order."""
        groups, per_group = routing_groups(layer, count)
        mass = stats.weight_mass.double()
        if self.criterion == "frequency":
            return keep_by_score(stats.counts.double() + mass / (mass.max() + 1), groups, per_group)
        if self.criterion == "weight_mass":
            return keep_by_score(mass, groups, per_group)
        tensors = layer.tensors(program)
        if self.similarity_of == "router":
            features = tensors["router"].float()
        else:
            features = expert_outputs(tensors, stats.inputs, layer)
        return keep_by_similarity(cosine_matrix(features), mass, groups, per_group)
