"""Recognizers: which blocks each family yields, what their specs say, and the user registration API."""

from __future__ import annotations

import collections
import dataclasses
import sys
import types

import pytest
import torch
import transformers
from torch import nn
from transformers.models.llama.modeling_llama import LlamaMLP

import moec
from moec.errors import CaptureError
from moec.frontend import recognize as recognize_module
from moec.frontend import zoo
from moec.frontend.blocks import BlockSpec, ExpertsSpec, RouteSpec
from moec.frontend.recognize import recognize, register_moe_block
from moec.frontend.swap import swap_blocks
from moec.frontend.zoo import load_model_spec
from moec.ir import DenseFFNOp
from moec.kernels import reference

EXPECTED_BLOCKS = {
    "tiny-mixtral": {("moe", "mixtral"): 2},
    "tiny-qwen2-moe": {("moe", "qwen2_moe"): 2},
    "tiny-qwen3-moe": {("ffn", "qwen3_moe"): 1, ("moe", "qwen3_moe"): 1},
    "tiny-olmoe": {("moe", "olmoe"): 2},
    "tiny-deepseek-v3": {("ffn", "deepseek_v3"): 1, ("moe", "deepseek_v3"): 1},
    "tiny-gpt-oss": {("moe", "gpt_oss"): 2},
    "tiny-llama": {("ffn", "llama"): 2},
    "tiny-gpt2": {("ffn", "gpt2"): 2},
    "tiny-bert": {("ffn", "bert"): 2},
    "minilm": {("ffn", "bert"): 6},
}


@pytest.mark.parametrize("name", list(EXPECTED_BLOCKS))
def test_block_count_per_family(preset, name):
    model, _ = preset(name)
    specs = recognize(model)
    assert collections.Counter((spec.kind, spec.family) for spec in specs) == EXPECTED_BLOCKS[name]


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    return dict(model.named_parameters()).get(name, dict(model.named_buffers()).get(name))


@pytest.mark.parametrize("name", [n for n in EXPECTED_BLOCKS if n != "minilm"])
def test_weights_follow_moec_layouts(preset, name):
    model, _ = preset(name)
    for spec in recognize(model):
        weights = {role: _weight(model, path) for role, path in spec.weights.items()}
        assert None not in weights.values(), spec.weights
        weights = {role: w.transpose(-2, -1) if role in spec.transposed else w for role, w in weights.items()}
        if spec.kind == "moe":
            e, f, h = spec.experts.num_experts, spec.experts.intermediate, spec.experts.hidden
            assert weights["router"].shape == (e, h)
            assert weights["w_in"].shape == (e, 2 * f if spec.experts.gated else f, h)
            assert weights["w_out"].shape == (e, h, f)
            assert ("router_bias" in weights) == spec.route.has_bias
        ffn, prefix = (spec.ffn, "") if spec.kind == "ffn" else (spec.shared, "shared_")
        if ffn is not None:
            assert weights[prefix + "w_up"].shape == (ffn.intermediate, ffn.hidden)
            assert weights[prefix + "w_down"].shape == (ffn.hidden, ffn.intermediate)
            assert (prefix + "gate" in weights) == ffn.has_output_gate


def test_spec_json_round_trip_keeps_role_order(preset):
    model, _ = preset("tiny-deepseek-v3")
    for spec in recognize(model):
        again = BlockSpec.from_json(spec.to_json())
        assert again == spec and again.roles == spec.roles


def test_deepseek_v3_spec(preset):
    model, _ = preset("tiny-deepseek-v3")
    moe = recognize(model)[1]
    assert moe.route.scoring == "sigmoid" and moe.route.n_group == 2 and moe.route.topk_group == 1
    assert moe.route.scaling == model.config.routed_scaling_factor
    assert moe.weights["router_bias"] == "model.layers.1.mlp.gate.e_score_correction_bias"


@pytest.mark.parametrize("hidden_act, act", [("mish", None), ("relu2", "relu2")])
def test_a_llama_mlp_is_recognized_only_with_an_activation_moec_models(hidden_act, act):
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        hidden_act=hidden_act,
    )
    assert [spec.ffn.act for spec in recognize(transformers.LlamaForCausalLM(config))] == ([act] if act else [])


class TinyMoE(nn.Module):
    """A user's own MoE layer: softmax top-1 routing over two ReLU experts, weights as separate tensors."""

    def __init__(self, hidden: int = 8, width: int = 12, num_experts: int = 2):
        super().__init__()
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.up = nn.Parameter(torch.randn(num_experts, width, hidden))
        self.down = nn.Parameter(torch.randn(num_experts, hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.router(x), dim=-1)
        weight, expert = probs.max(dim=-1)
        hidden = torch.relu(torch.einsum("...h,...fh->...f", x, self.up[expert]))
        return weight.unsqueeze(-1) * torch.einsum("...f,...hf->...h", hidden, self.down[expert])


def tiny_moe_spec(module: TinyMoE) -> BlockSpec:
    num_experts, hidden, width = module.down.shape
    return BlockSpec(
        kind="moe",
        family="tiny-moe",
        module="",
        weights={"router": "router.weight", "w_in": "up", "w_out": "down"},
        route=RouteSpec(num_experts=num_experts, top_k=1, renormalize=False),
        experts=ExpertsSpec(
            num_experts=num_experts, hidden=hidden, intermediate=width, act="relu", gated=False
        ),
    )


def test_register_moe_block_user_module(isolated_registry):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), TinyMoE(), nn.Linear(8, 8))
    register_moe_block(TinyMoE, tiny_moe_spec)
    (spec,) = recognize(model)
    assert spec.module == "1"
    assert spec.weights == {"router": "1.router.weight", "w_in": "1.up", "w_out": "1.down"}
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        expected = model(x)
        with swap_blocks(model, [spec]):
            swapped = model(x)
    torch.testing.assert_close(swapped, expected, rtol=1e-5, atol=1e-5)


class TupleMoE(TinyMoE):
    """Returns (output, aux) where its spec says a tensor: moec's swapped block breaks its caller."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return super().forward(x), None


class UnpacksTuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.moe = TupleMoE()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.moe(x)
        return y


def test_a_block_moec_cannot_stand_in_for_is_named_as_moecs_error(isolated_registry):
    """The model runs as is; only with the swapped block does it fail, and the error says so (not that the
    model fails on its inputs). A built-in recognizer (registered by import path, so not probed) is wrong."""
    recognize_module._REGISTRY.append((f"{TupleMoE.__module__}.{TupleMoE.__qualname__}", tiny_moe_spec))
    with pytest.raises(moec.CaptureError, match=r"(?s)runs on the example inputs, but not with moec's ops in place of "
                                                r"its recognized blocks \(tiny-moe\).*moec recognizer error"):
        moec.compile(UnpacksTuple(), (torch.randn(3, 5, 8),))


class MaskedMoE(TinyMoE):
    """A registered block whose forward also takes a mask: once swapped, moec calls it with the hidden states."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = super().forward(x)
        return y if mask is None else y * mask[..., None]


class PassesAMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.moe = MaskedMoE()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.moe(x, mask)


def test_a_registered_block_whose_forward_takes_more_than_moec_gives_is_named_as_the_users(isolated_registry):
    register_moe_block(MaskedMoE, tiny_moe_spec)
    with pytest.raises(moec.CaptureError, match=r"(?s)not with moec's ops in place.*registered with "
                                                r"moec.register_moe_block \(MaskedMoE\).*must take those and nothing"):
        moec.compile(PassesAMask(), (torch.randn(3, 5, 8), torch.ones(3, 5)))


def test_a_to_spec_that_raises_is_named_with_its_block(isolated_registry):
    def broken_spec(module: TinyMoE) -> BlockSpec:
        return module.no_such_attribute

    register_moe_block(TinyMoE, broken_spec)
    model = nn.Sequential(nn.Linear(8, 8), TinyMoE())
    with pytest.raises(moec.CaptureError, match=r"block '1': .*broken_spec, registered for TinyMoE with "
                                                r"moec.register_moe_block, raised AttributeError"):
        moec.compile(model, (torch.randn(3, 5, 8),))


@pytest.mark.parametrize(("module_class", "to_spec", "message"), [
    (TinyMoE(), tiny_moe_spec, "module_class must be a torch.nn.Module subclass, got an instance of TinyMoE"),
    (tiny_moe_spec, tiny_moe_spec, "module_class must be a torch.nn.Module subclass, got <function tiny_moe_spec"),
    (int, tiny_moe_spec, "module_class must be a torch.nn.Module subclass, got <class 'int'>"),
    (TinyMoE, "tiny_moe_spec", "to_spec must be a function taking a TinyMoE .* got 'tiny_moe_spec'"),
])
def test_register_moe_block_checks_its_arguments(isolated_registry, module_class, to_spec, message):
    with pytest.raises(TypeError, match=message):
        register_moe_block(module_class, to_spec)
    assert recognize_module._REGISTRY == isolated_registry


def narrow_experts_spec(module: TinyMoE) -> BlockSpec:
    """Says the experts are half as wide as they are: the stacked weights do not fit."""
    spec = tiny_moe_spec(module)
    return dataclasses.replace(spec, experts=dataclasses.replace(spec.experts, intermediate=6))


def test_a_registered_block_whose_spec_does_not_fit_is_named(isolated_registry):
    register_moe_block(TinyMoE, narrow_experts_spec)
    model = nn.Sequential(nn.Linear(8, 8), TinyMoE(), nn.Linear(8, 8))
    with pytest.raises(moec.VerifyError) as info:
        moec.compile(model, (torch.randn(3, 5, 8),))
    assert info.value.block == "1"
    message = str(info.value)
    assert message.startswith("block '1' (TinyMoE, described by narrow_experts_spec through moec.register_moe_block)")
    assert "weight 'w_in' ('@1.up') has shape [2, 12, 8], expected [2, 6, 8]" in message


@pytest.mark.parametrize(("to_spec", "message"), [
    (lambda m: {"kind": "moe"}, "returned a dict; it must return a moec.BlockSpec"),
    (lambda m: dataclasses.replace(tiny_moe_spec(m), weights={"router": "router.weight", "w_in": "upp",
                                                                "w_out": "down"}),
     "gives weight 'w_in' as 'upp', which is not a parameter or buffer of that module"),
])
def test_a_registered_spec_function_that_returns_a_wrong_spec_is_named(isolated_registry, to_spec, message):
    register_moe_block(TinyMoE, to_spec)
    with pytest.raises(CaptureError, match=rf"<lambda>, registered for TinyMoE with moec.register_moe_block, {message}"):
        recognize(nn.Sequential(TinyMoE()))


class ClampedMLP(nn.Module):
    """A gated MLP that clamps gate and up at ``swiglu_limit`` (GLM-5-Next, DeepSeek-V4), or, with
    ``clamps=False``, keeps the attribute and does not clamp."""

    def __init__(self, clamps: bool = True):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(8, 16, bias=False), nn.Linear(8, 16, bias=False)
        self.down_proj, self.act_fn = nn.Linear(16, 8, bias=False), nn.SiLU()
        self.swiglu_limit, self.clamps = 2.0, clamps

    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.clamps:
            gate, up = gate.clamp(max=self.swiglu_limit), up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
        return self.down_proj(self.act_fn(gate) * up)


def test_a_clamped_mlp_is_a_clamped_ffn_op_when_the_probe_confirms_the_clamp(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(ClampedMLP(), nn.Linear(8, 8))
    (spec,) = recognize(model)
    assert (spec.kind, spec.ffn.limit) == ("ffn", 2.0)
    compiled = moec.compile(model, (torch.randn(3, 8),))
    assert "limit=2.0" in compiled.ir and "clamped at 2" in compiled.summary()[0]["detail"]
    compiled.save(tmp_path / "plan")
    x = torch.randn(5, 8) * 10  # pre-activations well past the clamp
    with torch.no_grad():
        for runner in (compiled, moec.load(tmp_path / "plan")):
            torch.testing.assert_close(runner(x), model(x), rtol=0, atol=1e-5)
        model[0].clamps = False
        assert (model(x) - compiled(x)).abs().max() > 1e-3  # the clamp binds
    assert recognize(nn.Sequential(ClampedMLP(clamps=False))) == []  # the attribute alone is not a clamp


def test_later_registration_wins(isolated_registry, preset):
    model, _ = preset("tiny-llama")
    register_moe_block(LlamaMLP, lambda mlp: None)
    assert recognize(model) == []


def test_reference_is_what_recognized_specs_compute(preset):
    """A recognized block's spec + weights, run through the reference, equals the HF module itself."""
    model, _ = preset("tiny-qwen2-moe")
    spec = recognize(model)[0]
    module = model.get_submodule(spec.module)
    weights = {role: model.get_parameter(name) for role, name in spec.weights.items()}
    x = torch.randn(2, 5, spec.experts.hidden)
    with torch.no_grad():
        torch.testing.assert_close(reference.moe_block(x, weights, spec), module(x), rtol=1e-5, atol=1e-5)


# ---- resolving a --model value, then recognizing its blocks ----------------------------------------


def test_load_model_spec_preset_and_folder():
    model, example = load_model_spec("tiny-gpt2")
    assert len(recognize(model)) == 2 and example["input_ids"].shape == (2, 8)
    model, example = load_model_spec(str(zoo.minilm_path()))
    assert len(recognize(model)) == 6
    assert set(example) >= {"input_ids", "attention_mask"}


def test_load_model_spec_factory(monkeypatch):
    user_models = types.ModuleType("user_models")
    user_models.with_example = lambda: (nn.Sequential(TinyMoE()), {"x": torch.randn(2, 8)})
    user_models.bare_model = lambda: zoo.build_preset("tiny-llama")[0]
    monkeypatch.setitem(sys.modules, "user_models", user_models)
    model, example = load_model_spec("user_models:with_example")
    assert isinstance(model[0], TinyMoE) and set(example) == {"x"}
    model, example = load_model_spec("user_models:bare_model")
    assert example["input_ids"].max() < model.config.vocab_size


@pytest.mark.parametrize("text", ["no-such-preset", "user_models_missing:factory"])
def test_load_model_spec_errors(text):
    with pytest.raises(CaptureError):
        load_model_spec(text)


# ---- gated MLPs of unlisted classes, recognized by a probe ------------------------------------------


class UnlistedGatedMLP(nn.Module):
    def __init__(self, swap_gate_and_up: bool = False):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(8, 16, bias=False), nn.Linear(8, 16, bias=False)
        self.down_proj = nn.Linear(16, 8, bias=False)
        self.act_fn = nn.SiLU()
        self.swap_gate_and_up = swap_gate_and_up

    def forward(self, x):
        gate, up = (self.up_proj, self.gate_proj) if self.swap_gate_and_up else (self.gate_proj, self.up_proj)
        return self.down_proj(self.act_fn(gate(x)) * up(x))


class TwoMLPs(nn.Module):
    def __init__(self, swap_gate_and_up: bool):
        super().__init__()
        self.first, self.second = UnlistedGatedMLP(), UnlistedGatedMLP(swap_gate_and_up)

    def forward(self, x):
        return self.second(self.first(x))


def test_an_unlisted_gated_mlp_is_recognized_only_when_the_probe_agrees():
    """Same parts, same attribute names; the second MLP gates with up_proj instead: not this block. Its
    ATen ops are then folded by pattern, with the weights in the roles the graph shows."""
    torch.manual_seed(0)
    model = TwoMLPs(swap_gate_and_up=True).eval()
    specs = recognize(model)
    assert [(spec.module, spec.family) for spec in specs] == [("first", "UnlistedGatedMLP")]
    compiled = moec.compile(model, (torch.randn(4, 8),))
    first, second = compiled.program.graph.ops_of(DenseFFNOp)
    assert first.weight("w_gate").name == "first.gate_proj.weight"
    assert second.weight("w_gate").name == "second.up_proj.weight"
    assert second.weight("w_up").name == "second.gate_proj.weight"
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-6)


class ClampedGatedMLP(UnlistedGatedMLP):
    """DeepSeek-V4's MLP: a gated MLP whose gate and up are clamped at 10, which small inputs never reach."""

    def forward(self, x):
        gate, up = self.gate_proj(x).clamp(max=10.0), self.up_proj(x).clamp(min=-10.0, max=10.0)
        return self.down_proj(self.act_fn(gate) * up)


def test_a_gated_mlp_with_a_clamp_is_not_taken_for_a_plain_one():
    torch.manual_seed(0)
    mlp = ClampedGatedMLP().eval()
    x = torch.randn(64, 8)
    assert torch.equal(mlp(x), UnlistedGatedMLP.forward(mlp, x))  # the clamp is invisible at this scale
    assert recognize(mlp) == []
    compiled = moec.compile(mlp, (x,))
    assert not compiled.program.graph.ops_of(DenseFFNOp)
    large = 40 * torch.randn(2, 5, 8)
    torch.testing.assert_close(compiled(large), mlp(large), rtol=0, atol=1e-5)


def test_olmo2_mlps_are_recognized_by_the_probe():
    model, _ = zoo.tiny_decoder(transformers.Olmo2ForCausalLM, transformers.Olmo2Config)
    assert [spec.family for spec in recognize(model)] == ["Olmo2MLP", "Olmo2MLP"]
