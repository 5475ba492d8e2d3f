"""Plain-torch reference math for FFN and MoE blocks: the single source of truth for moec's numerics.

Every backend (the IR runner, generated kernels, ONNX export) is tested against these functions, and
these functions are tested against the Hugging Face modules they stand for. Weight layouts are the ones
documented in :mod:`moec.frontend.blocks`. Shapes: ``x`` is ``[..., H]``; routing results are
``[..., k]``; every block returns a tensor of ``x``'s shape and dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moec.frontend.blocks import (
    GATE_UP_PARTS,
    ROUTER_BIAS_ROLES,
    BlockSpec,
    ExpertsSpec,
    FFNSpec,
    RouteSpec,
    required_part,
)


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _relu2(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU (Primer; NemotronH's experts), as Hugging Face computes it."""
    return torch.square(F.relu(x))


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,  # erf form
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "quick_gelu": _quick_gelu,
    "relu2": _relu2,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The elementwise function for one of ``blocks.ACTIVATIONS``; raises KeyError for any other name."""
    return _ACTIVATIONS[name]


def _score(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    if scoring == "softmax":
        return torch.softmax(logits, dim=-1)
    if scoring == "sigmoid":
        return torch.sigmoid(logits)
    raise ValueError(f"unknown router scoring {scoring!r}")


def _mask_groups(choice: torch.Tensor, spec: RouteSpec) -> torch.Tensor:
    """Set to -inf the choice values of experts outside the ``topk_group`` best groups.

    A group's score is the sum of its two best choice values (DeepSeek-V3) or its best one (DeepSeek-V2).
    """
    lead = choice.shape[:-1]
    grouped = choice.reshape(*lead, spec.n_group, spec.num_experts // spec.n_group)
    if spec.group_score == "max":
        group_scores = grouped.amax(dim=-1)  # [..., G]
    else:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    best_groups = group_scores.topk(spec.topk_group, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(-1, best_groups, True)
    return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).reshape(choice.shape)


def route(
    x: torch.Tensor, router: torch.Tensor, router_bias: torch.Tensor | None, spec: RouteSpec,
    router_logit_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``spec.top_k`` experts per token.

    Args: ``x`` [..., H]; ``router`` (E, H); ``router_bias`` (E,) or None, added to the values experts
    are chosen by, never to the weights; ``router_logit_bias`` (E,) or None, the router's own bias,
    added to the logits (so to both the choice and the weights).
    Returns: ``indices`` int64 [..., k] and ``weights`` float32 [..., k]. Logits and scores are computed in
    float32, or in float64 for float64 activations (a float64 model's routing is not rounded to float32
    before its choice); with ``spec.round_logits`` the logits are rounded to ``x``'s dtype first. The choice is made on the scores (``score_then_topk``) or on the raw logits
    (``topk_then_score``, where only the chosen logits are then scored).
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    logit_bias = None if router_logit_bias is None else router_logit_bias.to(compute)
    logits = F.linear(x.to(compute), router.to(compute), logit_bias)  # [..., E]
    if spec.round_logits:
        logits = logits.to(x.dtype).to(compute)
    if spec.order == "score_then_topk":
        scores = _score(logits, spec.scoring)
        choice = scores
    elif spec.order == "topk_then_score":
        choice = logits
    else:
        raise ValueError(f"unknown routing order {spec.order!r}")
    if router_bias is not None:
        choice = choice + router_bias.to(compute)
    if spec.n_group > 1:
        choice = _mask_groups(choice, spec)
    indices = choice.topk(spec.top_k, dim=-1).indices
    if spec.order == "score_then_topk":
        weights = scores.gather(-1, indices)
    else:
        weights = _score(logits.gather(-1, indices), spec.scoring)
    if spec.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + spec.renorm_eps)
    if spec.scaling != 1.0:
        weights = weights * spec.scaling
    return indices, weights.float()


def remap_experts(indices: torch.Tensor, expert_map: list[int] | None) -> torch.Tensor:
    """Router expert ids -> stored expert ids through a ``moe.experts`` ``expert_map`` (None: unchanged)."""
    if expert_map is None:
        return indices
    return torch.tensor(expert_map, dtype=indices.dtype, device=indices.device)[indices]


def merge_repeated_experts(indices: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A token's slots that name one expert twice (router experts an ``expert_map`` sends to one stored expert)
    merged: each repeated expert's weights summed onto its first slot, its later slots' weights set to 0, which
    the kernels skip, so it runs once per token (its output is linear in the weight, so the sum is unchanged).
    Returns the merged ``weights`` [..., k] and a bool mask [..., k] of the repeated slots."""
    first = (indices.unsqueeze(-1) == indices.unsqueeze(-2)).to(torch.uint8).argmax(dim=-1)  # first slot of each id
    repeated = first != torch.arange(indices.shape[-1], device=indices.device)
    return torch.zeros_like(weights).scatter_add_(-1, first, weights), repeated


def gated_activation(gate: torch.Tensor, up: torch.Tensor, spec: ExpertsSpec | FFNSpec) -> torch.Tensor:
    """``act(gate) * up`` of gated experts or FFNs, with the clamp and offset ``spec`` may carry (GPT-OSS,
    DeepSeek-V4, GLM-5-Next): ``act(min(gate, limit)) * (clamp(up, -limit, limit) + up_offset)``."""
    if spec.limit is not None:
        gate = gate.clamp(max=spec.limit)
        up = up.clamp(min=-spec.limit, max=spec.limit)
    if spec.up_offset:
        up = up + spec.up_offset
    return activation(spec.act)(gate) * up


def _expert_ffn(
    rows: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    b_in: torch.Tensor | None,
    b_out: torch.Tensor | None,
    spec: ExpertsSpec,
) -> torch.Tensor:
    """One expert on its gathered rows [n, H]: w_in (F_in, H), w_out (H, F)."""
    hidden = F.linear(rows, w_in, b_in)
    if spec.gated:
        gate, up = hidden.chunk(2, dim=-1)
        hidden = gated_activation(gate, up, spec)
    else:
        hidden = activation(spec.act)(hidden)
    return F.linear(hidden, w_out, b_out)


@dataclass(frozen=True)
class ExpertGroups:
    """The T*k (token, slot) routing pairs sorted by expert id (stable, so by token within an expert)."""

    token_of: torch.Tensor  # [S] the token of each sorted pair
    weight: torch.Tensor  # [S] its routing weight
    counts: list[int]  # pairs per expert, host ints

    def slices(self) -> Iterator[tuple[int, slice]]:
        """``(expert, slice of the sorted pairs)`` for every expert that got pairs, in expert order."""
        start = 0
        for expert, count in enumerate(self.counts):
            if count:
                yield expert, slice(start, start + count)
            start += count


def group_by_expert(indices: torch.Tensor, weights: torch.Tensor, num_experts: int,
                    drop_zero_weight: bool = False) -> ExpertGroups:
    """Sort the pairs of ``indices``/``weights`` [..., k] by expert; optionally drop pairs of weight 0
    (pairs removed by dynamic skipping then cost nothing)."""
    top_k = indices.shape[-1]
    flat_experts = indices.reshape(-1)  # pair p is (token p // k, slot p % k)
    flat_weights = weights.reshape(-1)
    order = torch.argsort(flat_experts, stable=True)
    if drop_zero_weight:
        order = order[flat_weights[order] != 0]
    counts = torch.bincount(flat_experts[order], minlength=num_experts).tolist()
    return ExpertGroups(order // top_k, flat_weights.index_select(0, order), counts)


def weighted_rows(rows: torch.Tensor, weight: torch.Tensor, spec: ExpertsSpec) -> torch.Tensor:
    """The rows an expert computes on: its gathered token rows, scaled by their float32 routing ``weight``
    (cast to the rows' dtype first, as Llama 4 does) when the experts weigh their input
    (``spec.weighted_input``), else the rows themselves."""
    return rows * weight.to(rows.dtype).unsqueeze(-1) if spec.weighted_input else rows


def weighted_outputs(rows: torch.Tensor, weight: torch.Tensor, spec: ExpertsSpec) -> torch.Tensor:
    """The rows an expert adds to its tokens: its output ``rows`` [n, H] times their float32 routing ``weight``
    [n] (the product in float32, rounded once to the rows' dtype; float32 rows are scaled in place, so pass
    rows the caller owns), or the rows themselves when the weight went into the input
    (``spec.weighted_input``)."""
    if spec.weighted_input:
        return rows
    if rows.dtype == torch.float32:
        return rows.mul_(weight.unsqueeze(-1))
    return (rows.float() * weight.unsqueeze(-1)).to(rows.dtype)


def experts(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    b_in: torch.Tensor | None,
    b_out: torch.Tensor | None,
    spec: ExpertsSpec,
) -> torch.Tensor:
    """Run the routed experts and combine them: ``y[t] = sum_j weights[t, j] * expert_{indices[t, j]}(x[t])``
    (``sum_j expert_{indices[t, j]}(weights[t, j] * x[t])`` for experts that weigh their input).

    Computed grouped by expert: the (token, slot) pairs are sorted by expert id and each expert that got
    tokens runs once on all its rows. Expert outputs are scaled by the float32 routing weight, cast to
    ``x.dtype`` and summed in ascending expert order (as Hugging Face does).
    Shapes: x [..., H], indices/weights [..., k], w_in (E, F_in, H), w_out (E, H, F), b_in (E, F_in),
    b_out (E, H). Returns [..., H] in x's dtype.
    """
    tokens = x.reshape(-1, x.shape[-1])  # [T, H]
    groups = group_by_expert(indices, weights, spec.num_experts)
    out = torch.zeros_like(tokens)
    for expert, pairs in groups.slices():
        token_ids = groups.token_of[pairs]
        y = _expert_ffn(
            weighted_rows(tokens[token_ids], groups.weight[pairs], spec),
            w_in[expert],
            w_out[expert],
            None if b_in is None else b_in[expert],
            None if b_out is None else b_out[expert],
            spec,
        )
        out.index_add_(0, token_ids, weighted_outputs(y, groups.weight[pairs], spec).to(out.dtype))
    return out.reshape(x.shape)


def ffn(
    x: torch.Tensor,
    w_gate: torch.Tensor | None,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    b_gate: torch.Tensor | None,
    b_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    gate: torch.Tensor | None,
    spec: FFNSpec,
) -> torch.Tensor:
    """A dense FFN: ``down(act(gate(x)) * up(x))`` when gated (clamped as ``spec`` says), else
    ``down(act(up(x)))``.

    With an output ``gate`` (1, H) (shared experts), the result is multiplied by ``sigmoid(x @ gate.T)``.
    Shapes: x [..., H], w_gate/w_up (F, H), w_down (H, F). Returns [..., H].
    """
    up = F.linear(x, w_up, b_up)
    if spec.gated:
        if w_gate is None:
            raise ValueError("a gated FFN needs w_gate")
        hidden = gated_activation(F.linear(x, w_gate, b_gate), up, spec)
    else:
        hidden = activation(spec.act)(up)
    y = F.linear(hidden, w_down, b_down)
    if gate is not None:
        y = torch.sigmoid(F.linear(x, gate)) * y
    return y


def oriented_weight(w: torch.Tensor, role: str, spec: BlockSpec) -> torch.Tensor:
    """One weight in moec's layout: a role stored with its experts stacked along its rows gets them back as
    the leading dim, a role stored (in, out) gets its last two dims swapped, a gated role whose gate and up
    entries alternate (gate, up, gate, up ...) gets all its gate entries first, and a router bias stored
    (1, E) becomes (E,)."""
    if role in ROUTER_BIAS_ROLES:
        return w.reshape(-1)
    if role in spec.flattened:
        w = w.unflatten(0, (required_part(spec.experts, "experts", spec).num_experts, -1))
    if role in spec.transposed:
        w = w.transpose(-2, -1)
    if role in spec.interleaved:
        dim = -1 if role.startswith("b_") else -2  # biases (E, 2F), weights (E, 2F, H)
        gate, up = w.unflatten(dim, (-1, 2)).unbind(dim=dim)
        w = torch.cat([gate, up], dim=dim)
    return w


def joined_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """A gated ``w_in`` (E, 2F, H) from its gate and up parts (E, F, H), each in moec's layout."""
    return torch.cat([gate, up], dim=-2)


def _oriented(weights: Mapping[str, torch.Tensor], spec: BlockSpec) -> dict[str, torch.Tensor]:
    """The weights of a block in moec's layout (``oriented_weight``), a ``w_in`` stored as gate and up parts
    joined."""
    oriented = {role: oriented_weight(w, role, spec) for role, w in weights.items()}
    if all(part in oriented for part in GATE_UP_PARTS):
        oriented["w_in"] = joined_gate_up(*(oriented.pop(part) for part in GATE_UP_PARTS))
    return oriented


def _ffn_from_roles(
    x: torch.Tensor, weights: Mapping[str, torch.Tensor], spec: FFNSpec, prefix: str = ""
) -> torch.Tensor:
    def role(name: str) -> torch.Tensor | None:
        return weights.get(prefix + name)

    return ffn(
        x,
        role("w_gate"),
        weights[prefix + "w_up"],
        weights[prefix + "w_down"],
        role("b_gate"),
        role("b_up"),
        role("b_down"),
        role("gate"),
        spec,
    )


def ffn_block(x: torch.Tensor, weights: Mapping[str, torch.Tensor], spec: BlockSpec) -> torch.Tensor:
    """A whole ``kind='ffn'`` block; ``weights`` maps roles to tensors as the framework stores them."""
    return _ffn_from_roles(x, _oriented(weights, spec), required_part(spec.ffn, "ffn", spec))


def experts_block(x: torch.Tensor, indices: torch.Tensor, routing_weights: torch.Tensor,
                  weights: Mapping[str, torch.Tensor], spec: BlockSpec) -> torch.Tensor:
    """A ``kind='experts'`` block: the routed experts for a choice made by the model's own router."""
    w = _oriented(weights, spec)
    return experts(x, indices, routing_weights.float(), w["w_in"], w["w_out"], w.get("b_in"), w.get("b_out"),
                   required_part(spec.experts, "experts", spec))


def moe_block(x: torch.Tensor, weights: Mapping[str, torch.Tensor], spec: BlockSpec) -> torch.Tensor:
    """A whole ``kind='moe'`` block: route, routed experts, plus the shared expert (roles ``shared_*``)."""
    w = _oriented(weights, spec)
    indices, routing_weights = route(x, w["router"], w.get("router_bias"),
                                     required_part(spec.route, "route", spec), w.get("router_logit_bias"))
    y = experts(
        x, indices, routing_weights, w["w_in"], w["w_out"], w.get("b_in"), w.get("b_out"),
        required_part(spec.experts, "experts", spec),
    )
    if spec.shared is not None:
        y = y + _ffn_from_roles(x, w, spec.shared, prefix="shared_")
    return y
