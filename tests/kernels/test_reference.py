"""The reference math against the Hugging Face modules it stands for, and against naive per-token loops.

Tolerances: float32 throughout; routing weights must match to 1e-6 and block outputs to 1e-5.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.activations import ACT2FN
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter
from transformers.models.mixtral.modeling_mixtral import MixtralExperts, MixtralTopKRouter
from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

from moec.frontend.blocks import BlockSpec, ExpertsSpec, FFNSpec, RouteSpec
from moec.kernels import reference

HIDDEN = 16


def _by_expert(indices: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each token's (index, weight) pairs by expert id, so unordered top-k results compare equal."""
    order = indices.argsort(dim=-1)
    return indices.gather(-1, order), weights.gather(-1, order)


def _assert_same_routing(ours, theirs):
    our_idx, our_w = _by_expert(*ours)
    their_idx, their_w = _by_expert(*theirs)
    assert torch.equal(our_idx, their_idx)
    assert our_w.dtype == torch.float32
    torch.testing.assert_close(our_w, their_w.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("hf_name", "act"),
    [
        ("silu", "silu"),
        ("swish", "silu"),
        ("gelu", "gelu"),
        ("gelu_new", "gelu_tanh"),
        ("gelu_pytorch_tanh", "gelu_tanh"),
        ("quick_gelu", "quick_gelu"),
        ("relu", "relu"),
        ("relu2", "relu2"),
    ],
)
def test_activation_matches_hf(hf_name, act):
    x = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(reference.activation(act)(x), ACT2FN[hf_name](x), rtol=0, atol=1e-6)


def _init_router(router: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        router.weight.normal_()
    return router


def test_route_matches_mixtral():
    config = transformers.MixtralConfig(hidden_size=HIDDEN, num_local_experts=8, num_experts_per_tok=2)
    router = _init_router(MixtralTopKRouter(config))
    x = torch.randn(40, HIDDEN)
    _, hf_weights, hf_indices = router(x)
    spec = RouteSpec(num_experts=8, top_k=2)
    _assert_same_routing(reference.route(x, router.weight, None, spec), (hf_indices, hf_weights))


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_route_matches_qwen2_moe_and_olmoe(family, norm_topk_prob):
    config_class, router_class = {
        "qwen2_moe": (transformers.Qwen2MoeConfig, Qwen2MoeTopKRouter),
        "olmoe": (transformers.OlmoeConfig, OlmoeTopKRouter),
    }[family]
    config = config_class(
        hidden_size=HIDDEN, num_experts=6, num_experts_per_tok=3, norm_topk_prob=norm_topk_prob
    )
    router = _init_router(router_class(config))
    x = torch.randn(40, HIDDEN)
    _, hf_weights, hf_indices = router(x)
    spec = RouteSpec(num_experts=6, top_k=3, renormalize=norm_topk_prob)
    _assert_same_routing(reference.route(x, router.weight, None, spec), (hf_indices, hf_weights))


@pytest.mark.parametrize(("n_group", "topk_group", "top_k"), [(1, 1, 2), (2, 1, 2), (4, 2, 3), (4, 3, 4)])
def test_route_matches_deepseek_v3(n_group, topk_group, top_k):
    config = transformers.DeepseekV3Config(
        hidden_size=HIDDEN,
        n_routed_experts=16,
        num_experts_per_tok=top_k,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=2.5,
    )
    router = _init_router(DeepseekV3TopkRouter(config))
    with torch.no_grad():
        router.e_score_correction_bias.normal_(0, 0.3)  # large enough to change choices
    x = torch.randn(64, HIDDEN)
    _, hf_weights, hf_indices = router(x)
    spec = RouteSpec(
        num_experts=16,
        top_k=top_k,
        scoring="sigmoid",
        renormalize=True,
        renorm_eps=1e-20,
        scaling=2.5,
        n_group=n_group,
        topk_group=topk_group,
        has_bias=True,
    )
    ours = reference.route(x, router.weight, router.e_score_correction_bias, spec)
    _assert_same_routing(ours, (hf_indices, hf_weights))


def test_route_matches_gpt_oss():
    """GPT-OSS's router has its own bias: top-k of the biased logits, softmax over the chosen k."""
    config = transformers.GptOssConfig(hidden_size=HIDDEN, num_local_experts=8, num_experts_per_tok=3)
    router = _init_router(GptOssTopKRouter(config))
    with torch.no_grad():
        router.bias.normal_(0, 2.0)  # large enough to change choices
    x = torch.randn(40, HIDDEN)
    _, hf_weights, hf_indices = router(x)
    spec = RouteSpec(num_experts=8, top_k=3, order="topk_then_score", renormalize=False, has_logit_bias=True)
    _assert_same_routing(reference.route(x, router.weight, None, spec, router.bias), (hf_indices, hf_weights))
    unbiased = reference.route(x, router.weight, None, spec)
    assert not torch.equal(unbiased[0], hf_indices)  # the bias matters on these inputs


def test_route_bias_steers_choice_not_weights():
    router = torch.randn(4, HIDDEN)
    x = torch.randn(10, HIDDEN)
    spec = RouteSpec(num_experts=4, top_k=1, scoring="sigmoid", renormalize=False, has_bias=True)
    indices, weights = reference.route(x, router, torch.tensor([0.0, 0.0, 0.0, 100.0]), spec)
    assert (indices == 3).all()
    torch.testing.assert_close(weights[:, 0], torch.sigmoid(x @ router[3]))


def test_topk_then_score_softmax_equals_renormalized_softmax():
    router, x = torch.randn(8, HIDDEN), torch.randn(3, 5, HIDDEN)
    late = reference.route(x, router, None, RouteSpec(8, 2, order="topk_then_score", renormalize=False))
    early = reference.route(x, router, None, RouteSpec(8, 2, order="score_then_topk", renormalize=True))
    assert late[0].shape == (3, 5, 2) and late[0].dtype == torch.int64
    _assert_same_routing(late, early)


def test_experts_match_hf_mixtral_experts():
    config = transformers.MixtralConfig(hidden_size=HIDDEN, intermediate_size=24, num_local_experts=6)
    hf_experts = MixtralExperts(config)
    torch.manual_seed(0)
    with torch.no_grad():
        hf_experts.gate_up_proj.normal_()
        hf_experts.down_proj.normal_()
    x = torch.randn(30, HIDDEN)
    indices, weights = reference.route(x, torch.randn(6, HIDDEN), None, RouteSpec(6, 2))
    spec = ExpertsSpec(num_experts=6, hidden=HIDDEN, intermediate=24, act="silu", gated=True)
    ours = reference.experts(
        x, indices, weights, hf_experts.gate_up_proj, hf_experts.down_proj, None, None, spec
    )
    torch.testing.assert_close(ours, hf_experts(x, indices, weights), rtol=1e-5, atol=1e-5)


def _naive_moe(x, indices, weights, w_in, w_out, b_in, b_out, act, gated):
    """One token and one slot at a time: the definition the grouped implementation must agree with."""
    tokens = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(tokens)
    for t in range(len(tokens)):
        for e, w in zip(indices[t].tolist(), weights[t], strict=True):
            h = w_in[e] @ tokens[t] + b_in[e]
            h = act(h.chunk(2)[0]) * h.chunk(2)[1] if gated else act(h)
            out[t] += w * (w_out[e] @ h + b_out[e])
    return out.reshape(x.shape)


@settings(max_examples=25, deadline=None)
@given(
    tokens=st.integers(1, 12),
    num_experts=st.integers(1, 6),
    data=st.data(),
    gated=st.booleans(),
    act=st.sampled_from(["silu", "gelu", "gelu_tanh", "relu", "quick_gelu", "relu2"]),
)
def test_grouped_experts_equal_per_token_loop(tokens, num_experts, data, gated, act):
    top_k = data.draw(st.integers(1, num_experts))
    generator = torch.Generator().manual_seed(tokens * 100 + num_experts)
    ffn_width = 5
    f_in = 2 * ffn_width if gated else ffn_width
    x = torch.randn(tokens, 3, generator=generator)
    indices = torch.rand(tokens, num_experts, generator=generator).argsort(dim=-1)[:, :top_k]
    weights = torch.rand(tokens, top_k, generator=generator)
    w_in, b_in = (
        torch.randn(num_experts, f_in, 3, generator=generator),
        torch.randn(num_experts, f_in, generator=generator),
    )
    w_out, b_out = (
        torch.randn(num_experts, 3, ffn_width, generator=generator),
        torch.randn(num_experts, 3, generator=generator),
    )
    spec = ExpertsSpec(num_experts, hidden=3, intermediate=ffn_width, act=act, gated=gated, has_bias=True)
    ours = reference.experts(x, indices, weights, w_in, w_out, b_in, b_out, spec)
    expected = _naive_moe(x, indices, weights, w_in, w_out, b_in, b_out, reference.activation(act), gated)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_experts_keep_input_dtype_and_shape():
    x = torch.randn(2, 3, HIDDEN, dtype=torch.bfloat16)
    indices, weights = reference.route(x, torch.randn(4, HIDDEN), None, RouteSpec(4, 2))
    spec = ExpertsSpec(4, HIDDEN, 8, "silu", gated=True)
    w_in, w_out = (
        torch.randn(4, 16, HIDDEN, dtype=torch.bfloat16),
        torch.randn(4, HIDDEN, 8, dtype=torch.bfloat16),
    )
    y = reference.experts(x, indices, weights, w_in, w_out, None, None, spec)
    assert y.shape == x.shape and y.dtype == torch.bfloat16


def test_ffn_with_output_gate():
    x = torch.randn(5, HIDDEN)
    w_gate, w_up, w_down, gate = (
        torch.randn(8, HIDDEN),
        torch.randn(8, HIDDEN),
        torch.randn(HIDDEN, 8),
        torch.randn(1, HIDDEN),
    )
    spec = FFNSpec(HIDDEN, 8, "silu", gated=True, has_output_gate=True)
    y = reference.ffn(x, w_gate, w_up, w_down, None, None, None, gate, spec)
    expected = torch.sigmoid(x @ gate.T) * (
        (torch.nn.functional.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T
    )
    torch.testing.assert_close(y, expected)


def test_moe_block_transposed_roles_and_shared_expert():
    torch.manual_seed(0)
    weights = {
        "router": torch.randn(4, HIDDEN),
        "w_in": torch.randn(4, 16, HIDDEN),
        "w_out": torch.randn(4, HIDDEN, 8),
        "shared_w_up": torch.randn(8, HIDDEN),
        "shared_w_down": torch.randn(HIDDEN, 8),
    }
    spec = BlockSpec(
        kind="moe",
        family="test",
        module="moe",
        weights={role: role for role in weights},
        route=RouteSpec(4, 2),
        experts=ExpertsSpec(4, HIDDEN, 8, "silu", gated=True),
        shared=FFNSpec(HIDDEN, 8, "relu", gated=False),
    )
    x = torch.randn(2, 3, HIDDEN)
    y = reference.moe_block(x, weights, spec)
    stored_in_out = {
        role: w.transpose(-2, -1) if role in ("w_in", "shared_w_up") else w for role, w in weights.items()
    }
    transposed_spec = dataclasses.replace(spec, transposed=("w_in", "shared_w_up"))
    torch.testing.assert_close(reference.moe_block(x, stored_in_out, transposed_spec), y)
    routed = reference.experts(
        x,
        *reference.route(x, weights["router"], None, spec.route),
        weights["w_in"],
        weights["w_out"],
        None,
        None,
        spec.experts,
    )
    shared = torch.relu(x @ weights["shared_w_up"].T) @ weights["shared_w_down"].T
    torch.testing.assert_close(y, routed + shared)


def test_float64_activations_are_routed_in_float64():
    # Logits 1 and 1 + 1e-12: equal in float32 (where the first expert wins the tie), not in float64.
    router = torch.tensor([[1.0, 0.0], [1.0, 1e-12]], dtype=torch.float64)
    x = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    spec = RouteSpec(num_experts=2, top_k=1, renormalize=False)
    indices, weights = reference.route(x, router, None, spec)
    assert indices.tolist() == [[1]] and weights.dtype == torch.float32
    assert reference.route(x.float(), router.float(), None, spec)[0].tolist() == [[0]]
