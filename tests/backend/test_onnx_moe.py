"""The MoE lowerings on their own: portable experts and com.microsoft.MoE's semantics against the reference."""

from __future__ import annotations

import pytest
import torch

from moec.backend.onnx.moe import (
    choice_logits,
    deinterleave_gate_up,
    experts_portable,
    interleave_gate_up,
    ort_moe,
    ort_moe_support,
)
from moec.frontend.blocks import ExpertsSpec, RouteSpec
from moec.kernels import reference
from moec.kernels.skip import skipped_pairs

TOLERANCE = 1e-5


def random_experts(gated: bool, act: str, bias: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    spec = ExpertsSpec(num_experts=4, hidden=16, intermediate=12, act=act, gated=gated, has_bias=bias)
    f_in = 2 * spec.intermediate if gated else spec.intermediate
    weights = {
        "w_in": torch.randn(4, f_in, 16, generator=generator) * 0.3,
        "w_out": torch.randn(4, 16, 12, generator=generator) * 0.3,
        "b_in": torch.randn(4, f_in, generator=generator) if bias else None,
        "b_out": torch.randn(4, 16, generator=generator) if bias else None,
    }
    x = torch.randn(2, 5, 16, generator=generator)
    return spec, weights, x


@pytest.mark.parametrize("gated, act, bias", [(True, "silu", False), (False, "gelu", True), (True, "gelu_tanh", True)])
def test_portable_experts_match_reference(gated, act, bias):
    spec, w, x = random_experts(gated, act, bias)
    router = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    indices, weights = reference.route(x, router, None, RouteSpec(num_experts=4, top_k=2))
    want = reference.experts(x, indices, weights, w["w_in"], w["w_out"], w["b_in"], w["b_out"], spec)
    got = experts_portable(x, indices, weights, w["w_in"], w["w_out"], w["b_in"], w["b_out"], spec)
    assert got.shape == x.shape
    assert (got - want).abs().max() <= TOLERANCE


def test_interleave_round_trip_and_layout():
    tensor = torch.arange(2 * 6 * 3).reshape(2, 6, 3)
    interleaved = interleave_gate_up(tensor)
    assert torch.equal(interleaved[:, 0], tensor[:, 0]) and torch.equal(interleaved[:, 1], tensor[:, 3])
    assert torch.equal(deinterleave_gate_up(interleaved), tensor)


@pytest.mark.parametrize("renormalize", [True, False])
def test_ort_moe_semantics_equal_route_plus_experts(renormalize):
    """The fused op (router logits in, interleaved swiglu weights) computes moe.route + moe.experts."""
    spec, w, x = random_experts(True, "silu", True)
    tokens = x.reshape(-1, 16)
    router = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    route_spec = RouteSpec(num_experts=4, top_k=2, renormalize=renormalize)
    indices, weights = reference.route(tokens, router, None, route_spec)
    want = reference.experts(tokens, indices, weights, w["w_in"], w["w_out"], w["b_in"], w["b_out"], spec)
    support = ort_moe_support(route_spec, spec)
    assert support.ok and support.normalize == renormalize
    got = ort_moe(tokens, tokens @ router.T, interleave_gate_up(w["w_in"]), interleave_gate_up(w["b_in"]),
                  w["w_out"], w["b_out"], 2, support.normalize, "swiglu", 1.0, 0.0, None)
    assert (got - want).abs().max() <= TOLERANCE


@pytest.mark.parametrize("route, why", [
    (RouteSpec(8, 2, scoring="sigmoid"), "sigmoid"),
    (RouteSpec(8, 2, n_group=2, topk_group=1), "grouped"),
    (RouteSpec(8, 2, has_bias=True), "bias"),
    (RouteSpec(8, 2, scaling=2.5), "scaled"),
    (RouteSpec(8, 2, renormalize=True, renorm_eps=1e-3), "eps 0.001"),
])
def test_routing_beyond_the_op_is_handed_over_as_a_choice(route, why):
    support = ort_moe_support(route, ExpertsSpec(8, 16, 8, "silu", True))
    assert support.ok and not support.routes_itself and why in support.reason


@pytest.mark.parametrize("route, experts, why", [
    (RouteSpec(8, 2), ExpertsSpec(8, 16, 8, "gelu", True), "gated gelu"),
    (RouteSpec(8, 2), ExpertsSpec(8, 16, 8, "gelu", False), "gelu"),
    (RouteSpec(8, 2, scaling=-1.0), ExpertsSpec(8, 16, 8, "silu", True), "scaled by -1.0"),
])
def test_ort_moe_refuses_what_it_cannot_compute(route, experts, why):
    support = ort_moe_support(route, experts)
    assert not support.ok and why in support.reason


@pytest.mark.parametrize("weight_scale", [1.0, 1e-12])
def test_choice_logits_make_the_op_compute_any_routing(weight_scale):
    """DeepSeek-style routing (sigmoid, choice bias, groups, scaling) through the op: the choice as logits,
    the output rescaled per token, equals moe.route + moe.experts; tiny weights too (log of small numbers)."""
    spec, w, x = random_experts(True, "silu", True)
    tokens = x.reshape(-1, 16)
    generator = torch.Generator().manual_seed(3)
    router, bias = torch.randn(4, 16, generator=generator), torch.randn(4, generator=generator) * 0.1
    route_spec = RouteSpec(num_experts=4, top_k=2, scoring="sigmoid", renormalize=True, renorm_eps=1e-20,
                           scaling=2.5 * weight_scale, n_group=2, topk_group=1, has_bias=True)
    indices, weights = reference.route(tokens, router, bias, route_spec)
    want = reference.experts(tokens, indices, weights, w["w_in"], w["w_out"], w["b_in"], w["b_out"], spec)
    logits, scale = choice_logits(indices, weights, 4)
    got = ort_moe(tokens, logits, interleave_gate_up(w["w_in"]), interleave_gate_up(w["b_in"]),
                  w["w_out"], w["b_out"], 2, False, "swiglu", 1.0, 0.0, None) * scale
    assert want.abs().max() > 0
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()  # relative to the output's largest magnitude


def test_topk_then_softmax_routing_is_normalized():
    support = ort_moe_support(RouteSpec(8, 2, order="topk_then_score", renormalize=False),
                              ExpertsSpec(8, 16, 8, "relu", False))
    assert support.ok and support.normalize


EXPERT_MAP = [0, 1, 1, 2, 3, 3]  # 6 router experts onto 4 stored ones, as expert-merge writes it


def merged_skipping_routing(x, threshold=0.3):
    """Top-3 of 6 router experts, then the op's ``expert_map`` and ``skip_threshold``, as the torch runner
    applies them: stored ids, and the skipped pairs' weights zeroed."""
    router = torch.randn(6, 16, generator=torch.Generator().manual_seed(4))
    indices, weights = reference.route(x, router, None, RouteSpec(num_experts=6, top_k=3))
    stored = reference.remap_experts(indices, EXPERT_MAP)
    skipped = skipped_pairs(weights, threshold)
    sorted_ids = stored.sort(dim=-1).values
    two_experts = (sorted_ids[..., 1:] == sorted_ids[..., :-1]).sum(dim=-1) == 1  # two pairs on one, one on another
    assert skipped.any() and (two_experts & ~skipped.any(dim=-1)).any()  # both cases occur
    return indices, weights, stored, weights.masked_fill(skipped, 0.0)


def test_portable_experts_apply_expert_map_and_skip():
    spec, w, x = random_experts(True, "silu", True)
    indices, weights, stored, kept = merged_skipping_routing(x)
    want = reference.experts(x, stored, kept, w["w_in"], w["w_out"], w["b_in"], w["b_out"], spec)
    got = experts_portable(x, indices, weights, w["w_in"], w["w_out"], w["b_in"], w["b_out"], spec,
                           expert_map=EXPERT_MAP, skip_threshold=0.3)
    assert (got - want).abs().max() <= TOLERANCE


def test_choice_logits_add_a_tokens_pairs_on_one_expert_and_drop_zero_weights():
    """Remapped choices may name one stored expert twice (the weights add); skipped pairs weigh exactly 0."""
    spec, w, x = random_experts(True, "silu", True)
    tokens = x.reshape(-1, 16)
    _, _, stored, kept = merged_skipping_routing(tokens)
    want = reference.experts(tokens, stored, kept, w["w_in"], w["w_out"], w["b_in"], w["b_out"], spec)
    logits, scale = choice_logits(stored, kept, 4)
    got = ort_moe(tokens, logits, interleave_gate_up(w["w_in"]), interleave_gate_up(w["b_in"]),
                  w["w_out"], w["b_out"], 3, False, "swiglu", 1.0, 0.0, None) * scale
    assert (got - want).abs().max() <= TOLERANCE


def test_unrenormalized_softmax_reaches_qmoe_as_a_choice():
    """onnxruntime's CPU QMoE renormalizes whatever normalize_routing_weights says; MoE does not."""
    route, experts = RouteSpec(8, 2, renormalize=False), ExpertsSpec(8, 16, 8, "silu", True)
    assert ort_moe_support(route, experts).routes_itself
    support = ort_moe_support(route, experts, packed=True)
    assert support.ok and not support.routes_itself and "QMoE renormalizes" in support.reason
    assert ort_moe_support(RouteSpec(8, 2, renormalize=True), experts, packed=True).routes_itself
