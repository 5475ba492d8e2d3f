"""``moec.register_moe_block``: a registered spec is checked against its module (its form, then what it computes
on a few random rows), and a registered block compiles wherever it sits in the model.

Tolerances: the probe lets a float32 block differ from moec's reference by 1e-4 of each row's largest output (a
16-bit one by 2e-2, plus the rounding of its router logits); a spec that misdescribes the block differs by more
than 3e-2 in every case below. Compiled float32 blocks match the module to 1e-5.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import moec
from moec import BlockSpec, CaptureError, ExpertsSpec, RouteSpec
from moec.frontend.recognize import recognize, register_moe_block


class RoutedMoE(nn.Module):
    """A user's MoE block: top-k routing with the scoring, renormalization and gated activation it is built with,
    stacked experts ``w_in`` (E, 2F, H), gate rows first, and ``w_out`` (E, H, F); every expert computed densely."""

    def __init__(self, hidden: int = 8, ffn: int = 6, num_experts: int = 4, top_k: int = 2, scoring: str = "softmax",
                 renormalize: bool = True, act: str = "silu"):
        super().__init__()
        self.hidden, self.ffn, self.num_experts, self.top_k = hidden, ffn, num_experts, top_k
        self.scoring, self.renormalize, self.act = scoring, renormalize, act
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(num_experts, 2 * ffn, hidden) / hidden**0.5)
        self.w_out = nn.Parameter(torch.randn(num_experts, hidden, ffn) / ffn**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x).float()
        scores = logits.softmax(dim=-1) if self.scoring == "softmax" else logits.sigmoid()
        weights, chosen = scores.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        routing = torch.zeros_like(scores).scatter(-1, chosen, weights).to(x.dtype)  # [..., E]
        gate, up = torch.einsum("...h,efh->...ef", x, self.w_in).chunk(2, dim=-1)
        outputs = torch.einsum("...ef,ehf->...eh", getattr(F, self.act)(gate) * up, self.w_out)  # [..., E, H]
        return torch.einsum("...e,...eh->...h", routing, outputs)


def routed_moe_spec(module: RoutedMoE) -> BlockSpec:
    """The README's spec: softmax top-k, renormalized, SiLU-gated experts, whatever the module computes."""
    return BlockSpec(
        kind="moe", family="routed-moe", module="",
        weights={"router": "router.weight", "w_in": "w_in", "w_out": "w_out"},
        route=RouteSpec(num_experts=module.num_experts, top_k=module.top_k),
        experts=ExpertsSpec(num_experts=module.num_experts, hidden=module.hidden, intermediate=module.ffn,
                            act="silu", gated=True),
    )


class Residual(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.moe = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.moe(x)


@pytest.mark.parametrize("wrap", [lambda block: block, Residual], ids=["alone", "residual"])
def test_a_registered_block_fed_the_model_input_compiles(isolated_registry, wrap):
    """The model input's dims are all dynamic; the block's hidden size is pinned by its op, batch and sequence
    stay dynamic."""
    register_moe_block(RoutedMoE, routed_moe_spec)
    torch.manual_seed(0)
    model = wrap(RoutedMoE()).eval()
    compiled = moec.compile(model, (torch.randn(2, 5, 8),))
    x = torch.randn(3, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_spec_that_fits_its_block_passes_the_probe_in_every_dtype(isolated_registry, dtype):
    """Many experts and sharp routers: rounding in 16-bit routing must not read as a wrong spec."""
    register_moe_block(RoutedMoE, routed_moe_spec)
    for seed, router_scale in enumerate([0.1, 1.0, 10.0]):
        torch.manual_seed(seed)
        block = RoutedMoE(hidden=32, ffn=16, num_experts=16, top_k=4).to(dtype)
        with torch.no_grad():
            block.router.weight *= router_scale
        assert [spec.family for spec in recognize(Residual(block))] == ["routed-moe"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("computes", "differing"), [
    ({"renormalize": False}, "renormalize"),
    ({"act": "gelu"}, "act"),
    ({"scoring": "sigmoid"}, "scoring"),
])
def test_a_spec_that_computes_otherwise_than_its_block_is_refused(isolated_registry, dtype, computes, differing):
    register_moe_block(RoutedMoE, routed_moe_spec)
    torch.manual_seed(0)
    with pytest.raises(CaptureError) as info:
        recognize(Residual(RoutedMoE(**computes).to(dtype)))
    message = str(info.value)
    assert message.startswith("block 'moe': routed_moe_spec, registered for RoutedMoE with moec.register_moe_block, "
                              "returned a spec that computes other outputs than RoutedMoE.forward")
    assert "the largest difference is" in message and differing in message


class TupleMoE(RoutedMoE):
    """Old Hugging Face style: returns (hidden states, router logits)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return super().forward(x), self.router(x)


class UsesRouterLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.moe = TupleMoE()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y, _logits = self.moe(h)
        return h + y


def test_a_registered_block_that_returns_a_tuple_is_refused(isolated_registry):
    register_moe_block(TupleMoE, routed_moe_spec)
    with pytest.raises(CaptureError, match=r"block 'moe': routed_moe_spec, registered for TupleMoE with "
                                           r"moec.register_moe_block, describes a block whose forward returns a "
                                           r"tuple, not one tensor of its input's shape"):
        moec.compile(UsesRouterLogits().eval(), (torch.randn(2, 5, 8),))


class RowsMoE(RoutedMoE):
    """A block whose forward takes only flattened rows [T, H], as models that flatten before their MoE call it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"expected rows [T, H], got {x.dim()} dims")
        return super().forward(x)


class FlattensForItsMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.moe = RowsMoE()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.moe(h.reshape(-1, h.shape[-1])).reshape(h.shape)


def test_a_registered_block_that_takes_only_rows_compiles(isolated_registry):
    """The probe tries batched hidden states [2, 4, H], then rows [8, H]."""
    register_moe_block(RowsMoE, routed_moe_spec)
    torch.manual_seed(0)
    model = FlattensForItsMoE().eval()
    compiled = moec.compile(model, (torch.randn(2, 5, 8),))
    assert [block["family"] for block in compiled.program.metadata["blocks"]] == ["routed-moe"]
    x = torch.randn(3, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_forward_that_fails_on_every_probe_names_the_first_call(isolated_registry):
    class Broken(RoutedMoE):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ValueError("not today")

    register_moe_block(Broken, routed_moe_spec)
    with pytest.raises(CaptureError, match=r"Broken.forward\(hidden_states \[2, 4, 8\]\) raised ValueError: not today"):
        recognize(Residual(Broken()))


def _route(spec: BlockSpec, **changes) -> BlockSpec:
    return dataclasses.replace(spec, route=dataclasses.replace(spec.route, **changes))


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: dataclasses.replace(s, kind="ffn"), "returned a kind='ffn' spec without 'ffn', which that kind needs"),
    (lambda s: dataclasses.replace(s, route=None), "returned a kind='moe' spec without 'route', which that kind needs"),
    (lambda s: dataclasses.replace(s, route={"num_experts": 4, "top_k": 2}), "gives route as a dict; it must be a "
                                                                              "moec.RouteSpec"),
    (lambda s: dataclasses.replace(s, kind="experts"), "returned a kind='experts' spec with 'route', which that kind "
                                                       "does not use"),
    (lambda s: dataclasses.replace(s, kind="experts", route=None, weights={"w_in": "w_in", "w_out": "w_out"}),
     r"describes a block whose forward fails on random hidden states: RoutedMoE.forward\(hidden_states \[8, 8\], "
     r"top_k_index, top_k_weights\) \(kind='experts'\) raised TypeError"),
    (lambda s: dataclasses.replace(s, kind="banana"), "returned kind='banana'; it must be 'moe'"),
    (lambda s: dataclasses.replace(s, kind="MoE"), "returned kind='MoE'; it must be 'moe'"),
    (lambda s: dataclasses.replace(s, weights={**s.weights, "bias_x": "w_out"}),
     r"gives weight role\(s\) \['bias_x'\], which a kind='moe' block with these settings does not take"),
    (lambda s: dataclasses.replace(s, weights={"router": "router.weight", "w_in": "w_in"}),
     r"gives no weight for the role\(s\) \['w_out'\]"),
    (lambda s: dataclasses.replace(s, transposed=("w_inn",)),
     r"lists \['w_inn'\] in transposed, which are not roles of its weights"),
    (lambda s: _route(s, num_experts="4"), "gives route.num_experts='4' \\(str\\); it must be int"),
    (lambda s: _route(s, renormalize=1), "gives route.renormalize=1 \\(int\\); it must be bool"),
    (lambda s: _route(s, scoring="Softmax"), "gives route.scoring='Softmax'; it must be one of 'softmax', 'sigmoid'"),
    (lambda s: _route(s, top_k=5), r"gives a route whose 'top_k' is 5; it must be in 1\.\.4 \('num_experts'\)"),
], ids=["ffn-without-ffn", "moe-without-route", "route-as-dict", "experts-with-route", "experts-forward",
        "kind-banana", "kind-MoE", "unknown-role", "missing-role", "unknown-transposed-role", "num-experts-str",
        "renormalize-int", "scoring-capitalized", "top-k-over-experts"])
def test_a_malformed_spec_is_named_with_its_field(isolated_registry, change, message):
    def malformed_spec(module: RoutedMoE) -> BlockSpec:
        return change(routed_moe_spec(module))

    register_moe_block(RoutedMoE, malformed_spec)
    with pytest.raises(CaptureError, match=r"block 'moe': test_a_malformed_spec_is_named_with_its_field.<locals>."
                                           rf"malformed_spec, registered for RoutedMoE with moec.register_moe_block, "
                                           rf"{message}"):
        recognize(Residual(RoutedMoE()))


class StackedExperts(nn.Module):
    """Routed experts given the router's choice, as Hugging Face's experts modules are called: ReLU experts
    ``w_in`` (E, F, H) and ``w_out`` (E, H, F)."""

    def __init__(self, hidden: int = 8, ffn: int = 6, num_experts: int = 4):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(num_experts, ffn, hidden))
        self.w_out = nn.Parameter(torch.randn(num_experts, hidden, ffn))

    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for slot in range(top_k_index.shape[-1]):
            chosen = top_k_index[:, slot]
            hidden = torch.relu(torch.einsum("th,tfh->tf", x, self.w_in[chosen]))
            out = out + top_k_weights[:, slot, None] * torch.einsum("tf,thf->th", hidden, self.w_out[chosen])
        return out


def stacked_experts_spec(module: StackedExperts) -> BlockSpec:
    num_experts, hidden, ffn = module.w_out.shape
    return BlockSpec(kind="experts", family="stacked-experts", module="", weights={"w_in": "w_in", "w_out": "w_out"},
                     experts=ExpertsSpec(num_experts=num_experts, hidden=hidden, intermediate=ffn, act="relu",
                                         gated=False))


class OwnRouter(nn.Module):
    """Its router stays the model's code; only the experts are registered."""

    def __init__(self):
        super().__init__()
        self.router, self.experts = nn.Linear(8, 4, bias=False), StackedExperts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, 8)
        weights, chosen = self.router(rows).softmax(dim=-1).topk(2, dim=-1)
        return x + self.experts(rows, chosen, weights).reshape(x.shape)


def test_a_registered_experts_module_compiles_with_the_models_router(isolated_registry):
    register_moe_block(StackedExperts, stacked_experts_spec)
    torch.manual_seed(0)
    model = OwnRouter().eval()
    compiled = moec.compile(model, (torch.randn(2, 5, 8),))
    assert "moe.experts" in compiled.ir and "moe.route" not in compiled.ir
    x = torch.randn(3, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
