"""MoE layers as the expert-compression passes see them: a ``moe.route`` op and the ``moe.experts`` op it
feeds, their weights, their size, and their routed output on calibration rows.

``expert_prune`` and ``expert_merge`` find layers with ``moe_layers``, decide on the layer's tensors, and
write the result back with ``MoELayer.rewrite``; shared experts and every other op are left alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moec.errors import PassError
from moec.ir.ops import ExpertsOp, RouteOp
from moec.ir.program import Program
from moec.ir.types import TensorType
from moec.kernels import reference
from moec.passes.base import check_float_weights

ROUTE_ROLES = ("router", "router_bias", "router_logit_bias")
EXPERT_ROLES = ("w_in", "w_out", "b_in", "b_out")


@dataclass
class MoELayer:
    """One routed MoE layer: ``route`` chooses among its router's experts, ``experts`` runs them."""

    route: RouteOp
    experts: ExpertsOp

    @property
    def block(self) -> str:
        return self.route.block

    @property
    def name(self) -> str:
        """The layer's name in reports: its block, else its router weight."""
        return self.block or self.route.required_weight("router").name

    def weight_names(self) -> list[str]:
        return [ref.name for ref in (*self.route.weight_refs, *self.experts.weight_refs)]

    def tensors(self, program: Program) -> dict[str, torch.Tensor]:
        """The layer's weights by role (``router``, ``w_in`` ...), as stored."""
        found = {}
        for op, roles in ((self.route, ROUTE_ROLES), (self.experts, EXPERT_ROLES)):
            for role in roles:
                ref = op.weight(role)
                if ref is not None:
                    found[role] = program.weights[ref.name]
        return found

    def size(self, program: Program) -> tuple[int, int]:
        """(parameters, bytes) of the layer's weights as stored."""
        tensors = [program.weights[name] for name in self.weight_names()]
        return sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)

    def routing(self, tensors: dict[str, torch.Tensor], rows: torch.Tensor,
                expert_map: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(stored expert ids [N, k], routing weights [N, k] f32) of ``rows`` [N, H] under the router in
        ``tensors``, which may have fewer rows than the op's (a pruned or group router)."""
        route_spec = self.route.spec
        if tensors["router"].shape[0] != route_spec.num_experts:
            route_spec = type(route_spec)(**{**route_spec.__dict__, "num_experts": tensors["router"].shape[0]})
        indices, weights = reference.route(rows.float(), tensors["router"].float(), tensors.get("router_bias"),
                                           route_spec, tensors.get("router_logit_bias"))
        return reference.remap_experts(indices, expert_map), weights

    def routed_output(self, tensors: dict[str, torch.Tensor], rows: torch.Tensor,
                      expert_map: list[int] | None = None, num_experts: int | None = None) -> torch.Tensor:
        """The layer's routed-experts output [N, H] (float32) on ``rows`` [N, H] with the given weights."""
        experts_spec = self.experts.spec
        stored = num_experts if num_experts is not None else tensors["w_in"].shape[0]
        experts_spec = type(experts_spec)(**{**experts_spec.__dict__, "num_experts": stored})
        rows = rows.float()
        floats = {role: t.float() for role, t in tensors.items()}
        indices, weights = self.routing(floats, rows, expert_map)
        return reference.experts(rows, indices, weights, floats["w_in"], floats["w_out"], floats.get("b_in"),
                                 floats.get("b_out"), experts_spec)

    def rewrite(self, program: Program, tensors: dict[str, torch.Tensor], route_experts: int,
                stored_experts: int, expert_map: list[int] | None) -> None:
        """Store new weights (same names, new shapes) and set both ops' expert counts and the expert map."""
        graph = program.graph
        for role, tensor in tensors.items():
            op = self.route if role in ROUTE_ROLES else self.experts
            name = op.required_weight(role).name
            program.weights[name] = tensor.contiguous()
            graph.weights[name] = TensorType.of(tensor)
        route_kwargs = {**self.route.kwargs, "num_experts": route_experts}
        self.route.set_args(self.route.args, route_kwargs)
        experts_kwargs = {key: v for key, v in self.experts.kwargs.items() if key != "expert_map"}
        experts_kwargs["num_experts"] = stored_experts
        if expert_map is not None:
            experts_kwargs["expert_map"] = list(expert_map)
        self.experts.set_args(self.experts.args, experts_kwargs)


def moe_layers(program: Program, pass_name: str) -> list[MoELayer]:
    """Every ``moe.experts`` op fed by a ``moe.route`` op on the same input, in program order.

    Raises ``PassError`` when a layer's weights are quantized, when they are also read by another op (rewriting them in place would
    change that op too), when its router does not see the experts' input, or when it is routed by the
    model's own code rather than a ``moe.route``.
    """
    graph = program.graph
    readers: dict[str, int] = {}
    for op in graph.ops:
        for ref in op.weight_refs:
            readers[ref.name] = readers.get(ref.name, 0) + 1
    layers = []
    for experts in graph.ops_of(ExpertsOp):
        route = experts.args[1].owner
        if not isinstance(route, RouteOp):
            raise PassError(f"{pass_name}: layer {experts.block or 'moe.experts'} is routed by the model's own "
                            "code (moec has no spec for its router), so its router cannot be rewritten; "
                            "register the block with moec.register_moe_block to compress its experts")
        layer = MoELayer(route, experts)
        if route.args[0] is not experts.args[0]:
            raise PassError(f"{pass_name}: layer {layer.name} routes on another input than its experts run on; "
                            "only layers whose router and experts read the same hidden states can be compressed")
        check_float_weights(program, pass_name, layer.name, layer.weight_names())
        shared = [name for name in layer.weight_names() if readers[name] > 1]
        if shared:
            raise PassError(f"{pass_name}: layer {layer.name} shares weights {shared} with other ops; "
                            "untie them before compressing experts")
        layers.append(layer)
    return layers


def unmerged_moe_layers(program: Program, pass_name: str, advice: str) -> list[MoELayer]:
    """``moe_layers``, refusing (with ``advice``) a layer already merged: its experts carry an expert_map,
    so expert ids no longer name one stored expert each."""
    layers = moe_layers(program, pass_name)
    for layer in layers:
        if layer.experts.expert_map is not None:
            raise PassError(f"{pass_name}: layer {layer.name} is already merged (its experts have an "
                            f"expert_map); {advice}")
    return layers


def output_change(before: torch.Tensor, after: torch.Tensor) -> tuple[float, float]:
    """How a layer's [N, H] routed output changed: the mean over rows of the cosine similarity (1.0 for
    identical rows; blind to scale) and the ratio of the mean row norms (1.0 for an unchanged scale)."""
    before, after = before.float(), after.float()
    cosine = F.cosine_similarity(before, after, dim=-1, eps=1e-12).mean().item()
    norm_ratio = (after.norm(dim=-1).mean() / before.norm(dim=-1).mean().clamp_min(1e-30)).item()
    return cosine, norm_ratio


def target_count(pass_name: str, layer: MoELayer, keep: int | None, keep_ratio: float | None, grouped: bool) -> int:
    """The number of experts a layer keeps (at most the layer's experts), checked before any calibration: at
    least its top-k and, when ``grouped`` and the layer routes in groups, a count its groups can share (see
    ``routing_groups``). Errors name the option given and the counts the layer takes."""
    route = layer.route.spec
    total = route.num_experts
    count = keep if keep is not None else round(total * keep_ratio)
    given = f"keep={keep}" if keep is not None else f"keep_ratio={keep_ratio} ({count} of its {total} experts)"
    if count < route.top_k:
        raise PassError(f"{pass_name}: {given} is fewer experts than layer {layer.name} routes each token to "
                        f"(top_k={route.top_k}); keep at least {route.top_k}")
    if count >= total:
        return total
    if grouped and route.n_group > 1:
        per_group = count // route.n_group
        if count % route.n_group or per_group < 2 or route.top_k > route.topk_group * per_group:
            valid = [c for c in range(route.n_group, total + 1, route.n_group)
                     if c // route.n_group >= 2 and route.top_k <= route.topk_group * (c // route.n_group)]
            raise PassError(f"{pass_name}: {given} does not fit layer {layer.name}, which routes in {route.n_group} "
                            f"equal groups (top_k={route.top_k} from the best {route.topk_group}): each group must "
                            f"keep the same number of experts, at least 2 and enough for top_k; keep one of "
                            f"{', '.join(map(str, valid))}")
    return count


def keep_by_score(score: torch.Tensor, groups: torch.Tensor, per_group: int) -> list[int]:
    """The ``per_group`` best-scoring experts of every routing group, in expert order."""
    kept: list[int] = []
    for group in groups.unique().tolist():
        members = (groups == group).nonzero().reshape(-1)
        best = members[torch.argsort(score[members], descending=True, stable=True)[:per_group]]
        kept += best.tolist()
    return sorted(kept)


def routing_groups(layer: MoELayer, count: int) -> tuple[torch.Tensor, int]:
    """The routing group of every router expert [E] and how many experts each group keeps, so that a layer
    that routes in groups (``n_group > 1``, DeepSeek-V3) keeps equal groups that can still serve top-k
    (``count`` as checked by ``target_count``)."""
    route = layer.route.spec
    groups = torch.arange(route.num_experts) // (route.num_experts // route.n_group)
    return groups, count // route.n_group


def check_target_options(pass_name: str, keep: int | None, keep_ratio: float | None) -> None:
    if (keep is None) == (keep_ratio is None):
        raise PassError(f"{pass_name}: give exactly one of keep (experts per layer) or keep_ratio (a fraction)")
    if keep is not None and (not isinstance(keep, int) or keep < 1):
        raise PassError(f"{pass_name}: keep={keep!r} must be a positive number of experts per layer")
    if keep_ratio is not None and not 0 < keep_ratio <= 1:
        raise PassError(f"{pass_name}: keep_ratio={keep_ratio!r} must be in (0, 1]")


ORIGINS = "expert_origins"  # program.metadata: layer name -> for each stored expert, the model's experts it holds


def expert_origins(program: Program, layer: MoELayer) -> list[list[int]]:
    """For each expert ``layer`` stores now, the ids (as the model numbered them) of the experts it stands for:
    itself, or those an earlier merge joined into it; earlier prunes and merges keep this up to date, so that
    every report names the model's experts."""
    known = program.metadata.get(ORIGINS, {}).get(layer.name)
    return [list(ids) for ids in known] if known is not None else [[e] for e in range(layer.experts.spec.num_experts)]


def set_expert_origins(program: Program, layer: MoELayer, origins: list[list[int]]) -> None:
    program.metadata.setdefault(ORIGINS, {})[layer.name] = origins


def model_ids(origins: list[list[int]], stored: Iterable[int]) -> list[int]:
    """The model's expert ids that the ``stored`` experts stand for, in their order (a merged expert's
    dominant one first)."""
    return [e for index in stored for e in origins[index]]


def kept_whole_record(program: Program, layer: MoELayer) -> dict:
    """The report row of a layer that keeps every expert (the target is at least its expert count)."""
    whole = (layer.route.spec.num_experts, *layer.size(program))
    return layer_record(layer.name, whole, whole, (1.0, 1.0))


def nothing_to_do_note(keep: int | None, keep_ratio: float | None, layers: list[MoELayer], done: str) -> str:
    """The note of a pass whose target keeps every expert of every layer (``done``: "pruned", "merged")."""
    target = f"keep={keep}" if keep is not None else f"keep_ratio={keep_ratio}"
    most = max(layer.route.spec.num_experts for layer in layers)
    return (f"{target} keeps every expert (a layer has at most {most}), so nothing was {done}; "
            f"keep fewer experts than a layer has")


def layer_record(name: str, before: tuple[int, int, int], after: tuple[int, int, int],
                 change: tuple[float, float]) -> dict:
    """One row of a compression report: experts, parameters and bytes before/after, and the routed output's
    change (``output_change``: cosine and norm ratio)."""
    return {
        "layer": name,
        "experts_before": before[0], "experts_after": after[0],
        "params_before": before[1], "params_after": after[1],
        "bytes_before": before[2], "bytes_after": after[2],
        "output_cosine": round(change[0], 6), "output_norm_ratio": round(change[1], 6),
    }
