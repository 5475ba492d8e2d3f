"""Every Triton MoE kernel against its plain-torch reference, in the interpreter, on small shapes chosen to
hit the edges: token counts that do not divide the tile, experts no token chose, top-1 and top-4."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moec.frontend.blocks import ExpertsSpec, RouteSpec
from moec.kernels import reference, triton_reference
from moec.kernels import triton_ops as ops  # after the conftest set TRITON_INTERPRET

# (tokens, experts, top_k): 37 and 5 are not multiples of BLOCK_M=16; top-1 and top-4.
CASES = [(37, 8, 2), (5, 6, 1), (19, 8, 4), (1, 4, 1)]


def to(device: torch.device, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [t.to(device) if t is not None else None for t in tensors]


def on_cpu(alignment: ops.Alignment) -> ops.Alignment:
    return ops.Alignment(alignment.sorted_pairs.cpu(), alignment.block_experts.cpu(), alignment.padded_total.cpu(),
                         alignment.num_pairs, alignment.block_m)


def choose_experts(tokens: int, num_experts: int, top_k: int, seed: int = 0) -> torch.Tensor:
    """Distinct experts per token drawn from all but the last expert, so at least one expert gets no tokens."""
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(num_experts - 1, generator=generator)[:top_k] for _ in range(tokens)]
    return torch.stack(rows).to(torch.int64)


@pytest.mark.parametrize("tokens,num_experts,top_k", CASES)
@pytest.mark.parametrize("block_m", [16, 32])
def test_align_matches_reference(tokens, num_experts, top_k, block_m, device):
    indices = choose_experts(tokens, num_experts, top_k)
    got = on_cpu(ops.align(indices.to(device), num_experts, block_m))
    sorted_pairs, block_experts = triton_reference.align(indices, num_experts, block_m)
    used = int(got.padded_total)
    assert used == sorted_pairs.numel()
    assert torch.equal(got.sorted_pairs[:used], sorted_pairs)
    assert torch.equal(got.block_experts[: used // block_m], block_experts)


ROUTERS = [
    ("softmax", "score_then_topk", False, False),  # Mixtral
    ("softmax", "score_then_topk", True, False),  # OLMoE/Qwen2 with norm_topk_prob
    ("sigmoid", "score_then_topk", True, True),  # DeepSeek-V3 without groups
    ("softmax", "topk_then_score", False, False),
    ("sigmoid", "topk_then_score", True, False),
]


@pytest.mark.parametrize("scoring,order,renormalize,with_bias,tokens,num_experts,top_k",
                         [router + case for router in ROUTERS for case in (CASES[0], CASES[2])]
                         + [ROUTERS[0] + CASES[1], ROUTERS[3] + CASES[3]])
def test_router_matches_reference(scoring, order, renormalize, with_bias, tokens, num_experts, top_k, device):
    generator = torch.Generator().manual_seed(1)
    hidden = 40  # not a multiple of the 32-wide hidden tile
    x = torch.randn(tokens, hidden, generator=generator)
    router = torch.randn(num_experts, hidden, generator=generator)
    bias = torch.randn(num_experts, generator=generator) if with_bias else None
    spec = RouteSpec(num_experts, top_k, scoring, order, renormalize, renorm_eps=1e-20 if renormalize else 0.0,
                     scaling=2.5 if with_bias else 1.0, has_bias=with_bias)
    indices, weights = ops.route(*to(device, x, router, bias), spec)
    indices, weights = indices.cpu(), weights.cpu()
    ref_indices, ref_weights = reference.route(x, router, bias, spec)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)


def test_router_with_logit_bias_matches_reference(device):
    """GPT-OSS routing: the router's own bias on the logits, top-k, softmax over the chosen k."""
    generator = torch.Generator().manual_seed(3)
    x, router = torch.randn(37, 40, generator=generator), torch.randn(8, 40, generator=generator)
    logit_bias = torch.randn(8, generator=generator) * 3
    spec = RouteSpec(8, 2, order="topk_then_score", renormalize=False, has_logit_bias=True)
    indices, weights = ops.route(*to(device, x, router), None, spec, logit_bias=logit_bias.to(device))
    ref_indices, ref_weights = reference.route(x, router, None, spec, logit_bias)
    assert torch.equal(indices.cpu(), ref_indices)
    torch.testing.assert_close(weights.cpu(), ref_weights, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ref_indices, reference.route(x, router, None, spec)[0])  # the bias changes choices


@pytest.mark.parametrize("order", ["score_then_topk", "topk_then_score"])
def test_router_rounding_its_logits_to_bfloat16_matches_reference(order, device):
    """Hugging Face routers that run their linear in bf16: the kernel rounds the logits as the reference does
    (logits of about 8, where bf16 steps by 1/16). Rounding keeps the logits' order but makes ties, which
    decide choices: rows whose best k + 1 rounded logits are not all distinct are left out, as torch's top-k
    breaks exact ties by no fixed rule and the kernel by index."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(512, 40, generator=generator).bfloat16()
    router = (torch.randn(8, 40, generator=generator) * 1.5).bfloat16()
    logit_bias = torch.randn(8, generator=generator).bfloat16()
    spec = RouteSpec(8, 2, order=order, renormalize=False, has_logit_bias=True, round_logits=True)
    indices, weights = ops.route(*to(device, x, router), None, spec, logit_bias=logit_bias.to(device))
    ref_indices, ref_weights = reference.route(x, router, None, spec, logit_bias)
    logits = F.linear(x.float(), router.float(), logit_bias.float()).bfloat16().float()
    best = logits.topk(spec.top_k + 1, dim=-1).values
    distinct = (best[:, :-1] != best[:, 1:]).all(dim=-1)
    assert distinct.float().mean() > 0.9
    assert torch.equal(indices.cpu()[distinct], ref_indices[distinct])
    torch.testing.assert_close(weights.cpu()[distinct], ref_weights[distinct], rtol=1e-5, atol=1e-6)
    unrounded = reference.route(x, router, None, dataclasses.replace(spec, round_logits=False), logit_bias)[1]
    assert (weights.cpu() - unrounded)[distinct].abs().max() > 1e-3  # rounding moves the weights


def expert_weights(spec: ExpertsSpec, dtype: torch.dtype, seed: int = 2):
    generator = torch.Generator().manual_seed(seed)
    f_in = 2 * spec.intermediate if spec.gated else spec.intermediate

    def rand(*shape):
        return (torch.randn(*shape, generator=generator) * 0.2).to(dtype)

    w_in, w_out = rand(spec.num_experts, f_in, spec.hidden), rand(spec.num_experts, spec.hidden, spec.intermediate)
    if not spec.has_bias:
        return w_in, w_out, None, None
    return w_in, w_out, rand(spec.num_experts, f_in), rand(spec.num_experts, spec.hidden)


TILES = ops.TileConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=2)


@pytest.mark.parametrize("act,gated,has_bias,tokens,num_experts,top_k", [
    ("silu", True, False, *CASES[0]),
    ("gelu_tanh", False, True, *CASES[1]),
    ("gelu", True, True, *CASES[2]),
    ("relu", False, False, *CASES[0]),
    ("relu2", False, True, *CASES[1]),
    ("quick_gelu", True, False, *CASES[3]),
])
def test_gate_up_and_down_match_references(act, gated, has_bias, tokens, num_experts, top_k, device):
    spec = ExpertsSpec(num_experts, hidden=48, intermediate=40, act=act, gated=gated, has_bias=has_bias)
    w_in, w_out, b_in, b_out = expert_weights(spec, torch.float32)
    x = torch.randn(tokens, spec.hidden, generator=torch.Generator().manual_seed(3))
    indices = choose_experts(tokens, num_experts, top_k)
    routing = torch.rand(tokens, top_k, generator=torch.Generator().manual_seed(4))
    alignment = ops.align(indices.to(device), num_experts, TILES.BLOCK_M)

    h = ops.gate_up(*to(device, x, w_in, b_in), alignment, spec, top_k, TILES)
    torch.testing.assert_close(h.cpu(), triton_reference.gate_up(x, indices, w_in, b_in, spec), rtol=1e-5, atol=1e-5)
    y = ops.down(h, *to(device, w_out, b_out, routing), alignment, spec, TILES)
    expected = triton_reference.down(h.cpu(), indices, routing, w_out, b_out)
    torch.testing.assert_close(y.cpu(), expected, rtol=1e-5, atol=1e-5)


def test_clamped_gating_matches_reference(device):
    """GPT-OSS's gating: quick_gelu(min(gate, limit)) * (clamp(up, -limit, limit) + 1); the weights are
    large enough that both clamps bind."""
    spec = ExpertsSpec(4, hidden=48, intermediate=40, act="quick_gelu", gated=True, has_bias=True, limit=1.5,
                       up_offset=1.0)
    w_in, w_out, b_in, b_out = expert_weights(spec, torch.float32)
    tokens, top_k = 19, 2
    x = 4 * torch.randn(tokens, spec.hidden, generator=torch.Generator().manual_seed(3))
    indices = choose_experts(tokens, spec.num_experts, top_k)
    alignment = ops.align(indices.to(device), spec.num_experts, TILES.BLOCK_M)
    h = ops.gate_up(*to(device, x, w_in, b_in), alignment, spec, top_k, TILES)
    want = triton_reference.gate_up(x, indices, w_in, b_in, spec)
    unclamped = triton_reference.gate_up(x, indices, w_in, b_in, dataclasses.replace(spec, limit=None))
    assert (want - unclamped).abs().max() > 0.1  # the clamp matters on these rows
    torch.testing.assert_close(h.cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("tokens,num_experts,top_k", CASES)
def test_experts_match_reference(dtype, tolerance, tokens, num_experts, top_k, device):
    """The whole op (align, gate/up, down, combine) against the reference the torch runner is checked with.
    bfloat16: the kernels keep float32 between the GEMMs where the reference rounds to bfloat16."""
    spec = ExpertsSpec(num_experts, hidden=32, intermediate=48, act="silu", gated=True)
    w_in, w_out, _, _ = expert_weights(spec, dtype)
    x = torch.randn(tokens, spec.hidden, generator=torch.Generator().manual_seed(5)).to(dtype)
    indices = choose_experts(tokens, num_experts, top_k)
    routing = torch.rand(tokens, top_k, generator=torch.Generator().manual_seed(6))
    got = ops.experts(*to(device, x, indices, routing, w_in, w_out), None, None, spec, TILES).cpu()
    expected = reference.experts(x, indices, routing, w_in, w_out, None, None, spec)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("tokens,num_experts,top_k", [(37, 8, 2), (1, 4, 1)])
def test_experts_weighing_their_input_match_reference(tokens, num_experts, top_k, device):
    """Llama 4's experts: each pair's row is scaled by its routing weight before the expert, not after."""
    spec = ExpertsSpec(num_experts, hidden=32, intermediate=48, act="silu", gated=True, weighted_input=True)
    w_in, w_out, _, _ = expert_weights(spec, torch.float32)
    x = torch.randn(tokens, spec.hidden, generator=torch.Generator().manual_seed(5))
    indices = choose_experts(tokens, num_experts, top_k)
    routing = torch.rand(tokens, top_k, generator=torch.Generator().manual_seed(6))
    got = ops.experts(*to(device, x, indices, routing, w_in, w_out), None, None, spec, TILES).cpu()
    expected = reference.experts(x, indices, routing, w_in, w_out, None, None, spec)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    on_outputs = reference.experts(x, indices, routing, w_in, w_out, None, None,
                                   dataclasses.replace(spec, weighted_input=False))
    assert (on_outputs - expected).abs().max() > 1e-3


def test_pairs_with_a_negative_expert_are_skipped(device):
    """Skipped pairs (index -1) cost nothing and add nothing: as if their routing weight were zero."""
    tokens, num_experts, top_k = 37, 8, 2
    spec = ExpertsSpec(num_experts, hidden=32, intermediate=48, act="silu", gated=True)
    w_in, w_out, _, _ = expert_weights(spec, torch.float32)
    x = torch.randn(tokens, spec.hidden, generator=torch.Generator().manual_seed(7))
    indices = choose_experts(tokens, num_experts, top_k)
    routing = torch.rand(tokens, top_k, generator=torch.Generator().manual_seed(8))
    skipped = torch.rand(tokens, top_k, generator=torch.Generator().manual_seed(9)) < 0.4
    with_skips = indices.masked_fill(skipped, -1)

    alignment = on_cpu(ops.align(with_skips.to(device), num_experts, TILES.BLOCK_M))
    used = int(alignment.padded_total)
    assert not set(alignment.sorted_pairs[:used].tolist()) & set(torch.nonzero(skipped.flatten()).flatten().tolist())
    got = ops.experts(*to(device, x, with_skips, routing, w_in, w_out), None, None, spec, TILES).cpu()
    expected = reference.experts(x, indices, routing.masked_fill(skipped, 0.0), w_in, w_out, None, None, spec)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_experts_with_no_tokens_is_empty(device):
    spec = ExpertsSpec(4, hidden=16, intermediate=16, act="silu", gated=True)
    w_in, w_out, _, _ = expert_weights(spec, torch.float32)
    x, indices, routing = torch.empty(0, 16), torch.empty(0, 2, dtype=torch.int64), torch.empty(0, 2)
    out = ops.experts(*to(device, x, indices, routing, w_in, w_out), None, None, spec)
    assert out.shape == (0, 16)


def test_router_refuses_group_limited_routing():
    spec = RouteSpec(8, 2, "sigmoid", n_group=4, topk_group=2)
    with pytest.raises(ValueError, match="n_group"):
        ops.route(torch.randn(3, 16), torch.randn(8, 16), None, spec)
