"""Hugging Face experts modules: under a router moec does not model, the experts become ``moe.experts`` and
the router stays the model's own code; under a router it models, the whole block becomes ``moe.route`` +
``moe.experts``; experts moec cannot model are captured as Hugging Face's generic ``batched_mm`` code, with
a warning."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import transformers
from torch import nn
from transformers.integrations.moe import use_experts_implementation

import moec
from moec.analysis.calibration import calibrate
from moec.analysis.traces import collect_trace
from moec.api import parity
from moec.frontend.recognize import recognize
from moec.frontend.spec_checks import registered_probe_problem
from moec.frontend.zoo import tiny_decoder
from moec.ir import ExpertsOp, RouteOp

HIDDEN, WIDTH, EXPERTS = 16, 24, 4


@use_experts_implementation
class ToyExperts(nn.Module):
    """Stacked experts as Hugging Face writes them (its decorator picks the implementation from the config)."""

    def __init__(self, config: transformers.PretrainedConfig, act_fn: nn.Module) -> None:
        super().__init__()
        self.num_experts = EXPERTS
        self.gate_up_proj = nn.Parameter(torch.randn(EXPERTS, 2 * WIDTH, HIDDEN) / HIDDEN**0.5)
        self.down_proj = nn.Parameter(torch.randn(EXPERTS, HIDDEN, WIDTH) / WIDTH**0.5)
        self.act_fn = act_fn

    def forward(self, hidden_states, top_k_index, top_k_weights):  # replaced by the decorator's dispatch
        raise NotImplementedError


class SquaredSigmoidMoE(nn.Module):
    """A router moec has no spec for: top-2 of squared sigmoid scores, renormalized."""

    def __init__(self, act_fn: nn.Module) -> None:
        super().__init__()
        config = transformers.PretrainedConfig()
        config._experts_implementation = "grouped_mm"  # what PreTrainedModel sets up for a real model
        self.router = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = ToyExperts(config, act_fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, HIDDEN)
        weights, chosen = torch.topk(torch.sigmoid(self.router(rows)) ** 2, 2, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        return x + self.experts(rows, chosen, weights).reshape(x.shape)


class NotQuiteSiLU(nn.SiLU):
    """Passes for SiLU by its class, computes ReLU: only the probe can tell."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)


def _toy(act_fn: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return SquaredSigmoidMoE(act_fn).eval()


def _assert_parity(model: nn.Module, compiled: moec.CompiledModel, shapes: list[tuple[int, ...]]) -> None:
    for shape in shapes:
        x = torch.randn(*shape, HIDDEN)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-5)


def test_experts_under_an_unmodelled_router_become_a_moe_experts_op():
    model = _toy(nn.SiLU())
    (spec,) = recognize(model)
    assert (spec.kind, spec.family, spec.module) == ("experts", "ToyExperts", "experts")
    assert spec.weights == {"w_in": "experts.gate_up_proj", "w_out": "experts.down_proj"}
    compiled = moec.compile(model, (torch.randn(2, 5, HIDDEN),))
    graph = compiled.program.graph
    assert len(graph.ops_of(ExpertsOp)) == 1 and not graph.ops_of(RouteOp)
    assert "aten.topk" in compiled.ir and "aten.sigmoid" in compiled.ir  # the router is the model's own code
    _assert_parity(model, compiled, [(2, 5), (1, 1), (3, 7)])
    (row,) = [row for row in compiled.summary() if row["op"] == "moe.experts"]
    assert row["top_k"] == 2 and "routed by the model's own code" in row["detail"]


def test_calibration_and_traces_see_the_choice_of_the_models_own_router():
    model = _toy(nn.SiLU())
    compiled = moec.compile(model, (torch.randn(2, 5, HIDDEN),))
    samples = [(torch.randn(2, 5, HIDDEN),) for _ in range(3)]
    stats = calibrate(compiled.program, samples, progress=False).moe["experts"]
    with torch.no_grad():  # the choice the model's router makes on the same rows
        rows = torch.cat([x.reshape(-1, HIDDEN) for (x,) in samples])
        _, chosen = torch.topk(torch.sigmoid(model.router(rows)) ** 2, 2, dim=-1)
    assert torch.equal(stats.indices, chosen) and stats.num_experts == EXPERTS
    trace = collect_trace(compiled.program, [list(sample) for sample in samples])
    assert trace.layers == ("experts",) and torch.equal(trace.experts[:, 0], chosen)


def test_expert_pruning_refuses_a_router_it_cannot_rewrite():
    with pytest.raises(moec.PassError, match="layer experts is routed by the model's own code"):
        moec.compile(_toy(nn.SiLU()), (torch.randn(2, 5, HIDDEN),), recipe={"passes": [{"expert-prune": {"keep": 2}}]},
                     calibration=[(torch.randn(2, 5, HIDDEN),)])


def test_experts_the_probe_rejects_are_captured_generic_with_a_warning():
    model = _toy(NotQuiteSiLU())
    assert recognize(model) == []
    with pytest.warns(UserWarning, match=r"does not model the experts of 1 module\(s\): 'experts' \(ToyExperts\)"):
        compiled = moec.compile(model, (torch.randn(2, 5, HIDDEN),))
    assert not compiled.program.graph.ops_of(ExpertsOp)
    _assert_parity(model, compiled, [(2, 5), (3, 7)])
    assert model.experts.config._experts_implementation == "grouped_mm"  # the capture put it back


def test_phimoe_experts_run_on_moec_under_its_sparsemixer_router(preset):
    model, example = preset("tiny-phimoe")
    assert [(spec.kind, spec.family) for spec in recognize(model)] == [("experts", "PhimoeExperts")] * 2
    compiled = moec.compile(model, example)
    assert len(compiled.program.graph.ops_of(ExpertsOp)) == 2 and not compiled.program.graph.ops_of(RouteOp)
    ids = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(1))
    assert parity(model, compiled, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}) <= 1e-4


def unfused_exports(compiled: moec.CompiledModel, folder) -> dict[str, list[str]]:
    """Export with both lowerings, each passing parity with no fused MoE op; each one's fallback warnings."""
    fallbacks = {}
    for lowering in ("portable", "ort"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled.export_onnx(folder / f"{lowering}.onnx", lowering=lowering)
        report = compiled.report["onnx"]
        assert max(report["parity_max_abs_diff"].values()) <= 1e-4 and report["fused_moe_ops"] == 0
        fallbacks[lowering] = [str(w.message) for w in caught if "portable MoE lowering" in str(w.message)]
    return fallbacks


@pytest.mark.slow
def test_phimoe_exports_to_onnx_with_its_router_as_portable_ops(preset, tmp_path):
    model, example = preset("tiny-phimoe")
    fallbacks = unfused_exports(moec.compile(model, example), tmp_path)
    assert not fallbacks["portable"] and len(fallbacks["ort"]) == 2
    # sparsemixer's weights and choices are not a plain softmax of a top-k, so nothing proves them fit
    assert all("not provably >= 0" in text or "twice" in text for text in fallbacks["ort"])


# The model to build for families without a causal LM (multimodal models' text parts, a token classifier).
MODEL_CLASSES = {
    "deepseek_ocr2": "DeepseekOcr2TextModel", "unlimited_ocr": "UnlimitedOcrTextModel",
    "mistral_large4": "MistralLarge4TextModel", "step3p7": "Step3p7TextModel", "qwen3_vl_moe": "Qwen3VLMoeTextModel",
    "qwen3_omni_moe": "Qwen3OmniMoeThinkerTextModel",
    "openai_privacy_filter": "OpenAIPrivacyFilterForTokenClassification", "glm4v_moe": "Glm4vMoeTextModel",
    "hy_v4_vl": "HYV4VLTextModel", "glm5_next": "Glm5NextTextModel", "ernie4_5_vl_moe": "Ernie4_5_VLMoeTextModel",
}


def tiny_family(family: str, options: dict) -> tuple[nn.Module, dict]:
    """The family's causal LM (or its ``MODEL_CLASSES`` model) from a tiny config (the ``options`` its config
    class takes)."""
    package = __import__(f"transformers.models.{family}", fromlist=["_"])
    names = [MODEL_CLASSES[family]] if family in MODEL_CLASSES else [n for n in dir(package) if n.endswith("ForCausalLM")]
    model_class = getattr(package, names[0])
    unknown = set(options) - set(inspect.signature(model_class.config_class.__init__).parameters)
    assert not unknown, f"{model_class.config_class.__name__} takes no {sorted(unknown)}"
    return tiny_decoder(model_class, model_class.config_class, **options)


# Families whose MoE block moec has no recognizer for, with tiny configs; their experts are recognized.
FAMILIES = {
    "nemotron_h": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,  # squared-ReLU experts
                       moe_shared_expert_intermediate_size=32, n_group=1, topk_group=1, moe_latent_size=16),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_families_with_unmodelled_routers_keep_parity(family):
    model, example = tiny_family(family, FAMILIES[family])
    assert any(spec.kind == "experts" for spec in recognize(model))
    compiled = moec.compile(model, example)
    assert compiled.program.graph.ops_of(ExpertsOp)
    ids = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(1))
    assert parity(model, compiled, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}) <= 1e-4


# Families whose whole MoE block moec recognizes (its router as a moe.route, its experts by the probe): tiny
# config options (a scaling factor other than 1 where the router scales, so that a wrong one shows), and
# whether the router has a score-correction bias; a "family:variant" key tests another setting of the family.
_FULL_ATTENTION = dict(layer_types=["full_attention"] * 2)  # no linear attention: its reference code is slow
_DBRX_ATTENTION = dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0)  # its attention fails without a clip
_MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=8)  # DeepSeek-V2-style latent attention at the tiny size
ROUTED_FAMILIES = {
    "qwen3_next": (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                        shared_expert_intermediate_size=32, head_dim=8, **_FULL_ATTENTION), False),
    "qwen3_5_moe": (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                         shared_expert_intermediate_size=32, head_dim=8, **_FULL_ATTENTION), False),
    "qwen4_exp": (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32, norm_topk_prob=True, head_dim=8), False),
    "hunyuan_v1_moe": (dict(num_experts=4, moe_topk=2, head_dim=8), False),
    "minimax_m2": (dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8), True),
    "ernie4_5_moe": (dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=1),
                     True),  # its bias stored (1, E)
    "exaone_moe": (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32), True),
    "solar_open": (dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2,
                        topk_group=1, head_dim=8), True),
    "glm4_moe_lite": (dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2,
                           topk_group=1, routed_scaling_factor=2.5, **_MLA), True),
    "kimi_linear": (dict(num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2, topk_group=1,
                         routed_scaling_factor=2.5, pad_token_id=0, mlp_layer_types=["sparse"] * 2,
                         **_FULL_ATTENTION, **_MLA), True),
    "bailing_hybrid": (dict(num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2,
                            topk_group=1, routed_scaling_factor=2.5, pad_token_id=0, first_k_dense_replace=0,
                            **_FULL_ATTENTION, **_MLA), True),
    "hy_v4": (dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2, topk_group=1,
                   routed_scaling_factor=2.5, pad_token_id=0, mlp_layer_types=["sparse"] * 2, **_MLA), True),
    "deepseek_v2": (dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                         first_k_dense_replace=0, routed_scaling_factor=2.5, **_MLA), False),
    "deepseek_v2:grouped": (dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,  # by best
                                 first_k_dense_replace=0, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                 routed_scaling_factor=2.5, **_MLA), False),
    "mistral4": (dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2,
                      topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5, **_MLA), False),
    "mimo_v2_flash": (dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2,
                           topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5, head_dim=8), True),
    "mellum": (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True), False),
    "lara_mini": (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32, norm_topk_prob=True, **_FULL_ATTENTION), False),
    "granitemoe_swa": (dict(num_local_experts=4, num_experts_per_tok=2), False),
    "aria": (dict(moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1), False),
    "kolibri1": (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True), True),
    "hy_v3": (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32), True),
    "afmoe": (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, route_scale=2.5), True),
    "laguna": (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                    shared_expert_intermediate_size=32, moe_routed_scaling_factor=2.5), True),
    "lfm2_moe": (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, num_dense_layers=0,
                      use_expert_bias=True, norm_topk_prob=True, routed_scaling_factor=2.0,
                      layer_types=["full_attention", "conv"]), True),  # experts call F.silu, a plain function
    "cohere2_moe": (dict(num_experts=4, num_experts_per_tok=2, num_shared_experts=1,
                         shared_expert_combination_strategy="sum"), False),
    "cohere2_moe:sigmoid": (dict(num_experts=4, num_experts_per_tok=2, num_shared_experts=1,
                                 shared_expert_combination_strategy="sum", expert_selection_fn="sigmoid",
                                 norm_topk_prob=True), False),
    "dbrx": (dict(d_model=32, attn_config=_DBRX_ATTENTION, ffn_config=dict(  # the p-norm with p = 1: renormalized
        ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2, moe_normalize_expert_weights=1.0)), False),
    "deepseek_v32": (dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2,
                          topk_group=1, routed_scaling_factor=2.5, mlp_layer_types=["sparse"] * 2, **_MLA), True),
    "dots3_note": (dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                        shared_experts_intermediate_size=32, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                        mlp_layer_types=["sparse"] * 2, head_dim=8, pad_token_id=0, **_MLA), True),
    "axk1": (dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2, topk_group=1,
                  routed_scaling_factor=2.5, mlp_layer_types=["sparse"] * 2, **_MLA), True),  # a norm on its output
    "axk2": (dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, routed_scaling_factor=2.5,
                  mlp_layer_types=["sparse"] * 2, **_MLA), True),  # no expert groups: num_group None
    "beam": (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2, topk_group=1,
                  routed_scaling_factor=2.5, head_dim=8, mlp_layer_types=["sparse"] * 2), True),
    "deepseek_ocr2": (dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                           topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=2.5,
                           mlp_layer_types=["sparse"] * 2), False),
    "unlimited_ocr": (dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                           routed_scaling_factor=2.5, mlp_layer_types=["sparse"] * 2), False),
    "mistral_large4": (dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2,
                            topk_group=1, routed_scaling_factor=2.5, first_k_dense_replace=0, index_topk=4,
                            index_head_dim=8, index_n_heads=2, head_dim=16, num_key_value_heads=4, kv_lora_rank=16,
                            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8), False),
    "nemotron_h": (dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,  # shared: not gated
                        moe_shared_expert_intermediate_size=32, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                        norm_topk_prob=True, layers_block_type=["moe", "full_attention", "moe"], head_dim=8), True),
    "longcat_flash": (dict(n_routed_experts=4, moe_topk=2, expert_ffn_hidden_size=32, ffn_hidden_size=64,
                           zero_expert_num=0, routed_scaling_factor=2.5, q_lora_rank=16,
                           kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, head_dim=8,
                           num_key_value_heads=4), True),
    "step3p7": (dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, share_expert_dim=32,
                     head_dim=8, moe_router_scaling_factor=2.5, mlp_layer_types=["sparse"] * 2, pad_token_id=0,
                     sliding_window=16), True),
    "qwen3_vl_moe": (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=8), False),
    "qwen3_omni_moe": (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32), False),
    "openai_privacy_filter": (dict(num_local_experts=4, num_experts_per_tok=3, intermediate_size=32, head_dim=8,
                                   pad_token_id=0, eos_token_id=0, sliding_window=4), False),
    "glm4v_moe": (dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2, topk_group=1,
                       routed_scaling_factor=2.5, first_k_dense_replace=0,
                       rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5,
                                            mrope_section=[1, 1])), True),
    "glm_moe_dsa": (dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2, topk_group=1,
                         routed_scaling_factor=2.5, first_k_dense_replace=0, index_topk=4, index_head_dim=8,
                         index_n_heads=2, head_dim=8, **_MLA), True),
    "hy_v4_vl": (dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2, topk_group=1,
                      routed_scaling_factor=2.5, pad_token_id=0, mlp_layer_types=["sparse"] * 2, head_dim=8,
                      index_topk=4, index_head_dim=8, index_n_heads=2, hc_mult=2,
                      rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1]), **_MLA),
                 True),
    "ernie4_5_vl_moe": (dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=[32, 16], moe_num_shared_experts=1,
                             mlp_layer_types=["sparse"] * 2, rope_parameters=dict(
                                 rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 2])), True),
    "flint": (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                   norm_topk_prob=True, head_dim=8, mlp_only_layers=[]), False),
    "granitemoehybrid": (dict(num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=32,
                              layer_types=["attention"] * 2, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16), False),
    "granitemoeshared": (dict(num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=32), False),
    "jamba": (dict(num_experts=4, num_experts_per_tok=2, expert_layer_period=1, expert_layer_offset=0,
                   attn_layer_period=1, attn_layer_offset=0), False),  # attention only: Mamba pins the length
    "llama4": (dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, intermediate_size_mlp=48,
                    interleave_moe_layer_step=2, head_dim=8), False),  # weights on the experts' input; a dense layer
}


IDLE_ON_TEXT = {"ernie4_5_vl_moe": "vision_moe"}  # its vision experts' blocks, for image tokens only


# Eight cases run by default, covering the commonest routing features among them (a shared expert's gate,
# a bias on a sigmoid choice, renormalization, groups, top-k of logits then sigmoid, a shared expert that is
# not gated, gate and up weights stored apart); every other case, at 5-17 s each, and Qwen4-Exp (its linear
# attention's reference code, about a minute) run in the slow run.
DEFAULT_CASES = ("qwen3_next", "minimax_m2", "ernie4_5_moe", "deepseek_v2:grouped", "lfm2_moe", "llama4",
                 "nemotron_h", "dbrx")


@pytest.mark.parametrize("case", [
    pytest.param(case, marks=() if case in DEFAULT_CASES else pytest.mark.slow) for case in ROUTED_FAMILIES])
def test_families_with_modelled_routers_keep_parity(case):
    options, biased = ROUTED_FAMILIES[case]
    family = case.partition(":")[0]
    model, example = tiny_family(family, options)
    specs = [spec for spec in recognize(model) if spec.experts is not None]
    assert specs and all(spec.kind == "moe" and spec.family == family for spec in specs)
    assert all(spec.route.has_bias == biased for spec in specs)
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    biases = [state[spec.weights["router_bias"]] for spec in specs if spec.route.has_bias]
    with torch.no_grad():
        for bias in biases:  # initialized to zero: make them change the choice
            bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    compiled = moec.compile(model, example)
    idle = IDLE_ON_TEXT.get(family)  # blocks text-only inputs never reach: capture drops their ops
    assert len(compiled.program.graph.ops_of(RouteOp)) == len([s for s in specs if not idle or idle not in s.module])
    ids = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert parity(model, compiled, inputs) <= 1e-4
    if biased:  # the biases matter on these inputs: removing them changes the model's output
        with torch.no_grad():
            before = model(**inputs, use_cache=False)[0]  # logits, or a base model's last hidden state
            for bias in biases:
                bias.zero_()
            assert (model(**inputs, use_cache=False)[0] - before).abs().max() > 1e-4


# Routing settings moec does not model: the block is left to the experts-only path (its router stays the
# model's code), never recognized with the setting dropped.
# Their experts stay a moe.experts op where the probe takes them, else the model's code too.
UNMODELLED_SETTINGS = {
    "laguna": dict(moe_router_logit_softcapping=3.0),
    "cohere2_moe": dict(num_shared_experts=1, shared_expert_combination_strategy="average"),
    "step3p7": dict(swiglu_limits=[0.5, 0.5]),  # clamped after the activation
    "dbrx": dict(ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2,
                                 moe_normalize_expert_weights=2.0)),  # weights divided by their 2-norm
    "axk2": dict(n_group=2, topk_group=1),  # groups left out get a choice value of 0, not -inf
}


@pytest.mark.parametrize("family", list(UNMODELLED_SETTINGS))
def test_unmodelled_routing_settings_leave_the_router_to_the_model(family):
    model, _ = tiny_family(family, {**ROUTED_FAMILIES[family][0], **UNMODELLED_SETTINGS[family]})
    kinds = {spec.kind for spec in recognize(model) if spec.experts is not None}
    assert kinds == ({"experts"} if family in ("laguna", "cohere2_moe", "dbrx", "axk2") else set())


# Blocks whose forward a probe cannot compare with the reference kernels: they return a tuple (hidden states
# and router output), or end with a norm of their own that the swapped block applies after moec's op.
NOT_PROBED = {"openai_privacy_filter", "ernie4_5_vl_moe", "llama4", "axk1"}


@pytest.mark.parametrize("case", [case for case in ROUTED_FAMILIES if case.partition(":")[0] not in NOT_PROBED])
def test_every_modelled_router_computes_its_block_on_random_rows(case):
    """Every routed family in the default run, block by block without export (the parity test above runs most
    of them in the slow run only): the recognized spec, run by the reference kernels on random rows, computes
    what the block's forward does, score-correction biases made to change the choice."""
    options, _ = ROUTED_FAMILIES[case]
    model, _ = tiny_family(case.partition(":")[0], options)
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    specs = [spec for spec in recognize(model) if spec.kind == "moe"]
    assert specs
    for spec in specs:
        weights = {role: state[name] for role, name in spec.weights.items()}
        if "router_bias" in weights:
            with torch.no_grad():
                weights["router_bias"].normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
        assert registered_probe_problem(model.get_submodule(spec.module), spec, weights) is None, spec.module


def test_grouped_axk2_routing_differs_from_deepseek_v3s_where_a_biased_score_is_negative():
    """Why A.X-K2 with expert groups is left to the model: its router gives the groups left out a choice value
    of 0, so it can choose across groups, which DeepSeek-V3's routing (-inf there) never does."""
    from moec.frontend.hf_blocks import _DEEPSEEK_V3_ROUTE
    from moec.kernels import reference

    model, _ = tiny_family("axk2", {**ROUTED_FAMILIES["axk2"][0], **UNMODELLED_SETTINGS["axk2"]})
    block = next(m for m in model.modules() if type(m).__name__ == "AXK2MoE")
    route, roles = _DEEPSEEK_V3_ROUTE(block, 4)
    with torch.no_grad():
        block.gate.e_score_correction_bias.copy_(torch.tensor([0.0, -2.0, 0.0, -2.0]))  # experts 1, 3 below 0
        x = torch.randn(16, block.gate.weight.shape[1], generator=torch.Generator().manual_seed(0))
        _, _, chosen = block.gate(x)
        ours, _ = reference.route(x, block.gate.weight, block.gate.e_score_correction_bias, route)
    assert all(len(set((row // 2).tolist())) == 1 for row in ours)  # one group (of 2 experts), as topk_group=1 asks
    assert all(len(set((row // 2).tolist())) == 2 for row in chosen)  # across groups: a masked 0 beats -2 + score


@pytest.mark.slow  # about 10 s
def test_longcat_flash_identity_experts_stay_with_the_model():
    """LongCat-Flash's zero-compute (identity) experts are not modelled. From transformers 5.25 the block
    handles them before calling its experts module, so that module alone runs on moec under the model's
    router; before, the experts module handled them itself and the whole block stays with the model."""
    model, example = tiny_family("longcat_flash", {**ROUTED_FAMILIES["longcat_flash"][0], "zero_expert_num": 2})
    block_routes_identities = any(hasattr(m, "zero_expert_num") and hasattr(m, "router") for m in model.modules())
    kinds = {spec.kind for spec in recognize(model) if spec.experts is not None}
    assert kinds == ({"experts"} if block_routes_identities else set())
    compiled = moec.compile(model, example)
    assert not compiled.program.graph.ops_of(RouteOp)
    assert len(compiled.program.graph.ops_of(ExpertsOp)) == (len(model.model.layers) if block_routes_identities else 0)
    ids = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(1))
    assert parity(model, compiled, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}) <= 1e-4


@pytest.mark.slow  # about 8 s
def test_dbrx_experts_under_its_2_norm_router_run_on_moec():
    """DBRX's experts (gate and up stored apart, the experts along their rows) are a moe.experts op under the
    router moec leaves to the model; the joined w_in replaces the parts in the program."""
    model, example = tiny_family("dbrx", {**ROUTED_FAMILIES["dbrx"][0], **UNMODELLED_SETTINGS["dbrx"]})
    compiled = moec.compile(model, example)
    assert len(compiled.program.graph.ops_of(ExpertsOp)) == 2 and not compiled.program.graph.ops_of(RouteOp)
    assert "aten.linalg_vector_norm" in compiled.ir  # the model's own p-norm
    names = set(compiled.program.weights)
    assert "transformer.blocks.0.ffn.experts.w_in" in names and not any(".mlp.w1" in n or ".mlp.v1" in n for n in names)
    ids = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(1))
    assert parity(model, compiled, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}) <= 1e-4


# MoE blocks moec leaves to the model, whose export then fails on their router naming it. Switch Transformers
# drops the tokens past each expert's capacity in a sequence (64 in its configs: longer sequences lose some),
# which moe.route does not model. NLLB-MoE's experts module (transformers 5) one-hot encodes the router's
# top-1 mask, so every token runs expert_1 with its top-1 weight and expert_0 with its top-2 weight: not a
# routing moec's ops express.
def _tiny_switch_transformers() -> tuple[nn.Module, dict]:
    config = transformers.SwitchTransformersConfig(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                   num_heads=4, num_experts=4, expert_capacity=4, encoder_sparse_step=1)
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    return transformers.SwitchTransformersEncoderModel(config).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _tiny_nllb_moe() -> tuple[nn.Module, dict]:
    config = transformers.NllbMoeConfig(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2,
                                        encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=4,
                                        decoder_attention_heads=4, num_experts=4, encoder_sparse_step=1,
                                        decoder_sparse_step=1, max_position_embeddings=64)
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    return transformers.NllbMoeModel(config).eval(), {"input_ids": ids, "decoder_input_ids": ids[:, :5]}


@pytest.mark.parametrize("build", [_tiny_switch_transformers, _tiny_nllb_moe])
def test_blocks_moec_does_not_model_stay_the_models_and_their_export_error_names_the_router(build):
    model, example = build()
    assert recognize(model) == []
    with pytest.raises(moec.CaptureError, match=r"cannot export \w+: module 'encoder\.\w+\.0\..*router\.classifier'"
                       r"(.|\n)*converts its own parameters while it runs"):
        moec.compile(model, example)


# ---- experts with clamped gating (GPT-OSS, DeepSeek-V4) --------------------------------------------

CLAMPED = {  # family: (tiny config options, expected (act, limit, up_offset), transposed and interleaved, kind)
    "gpt_oss": (dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, head_dim=8),
                ("quick_gelu", 7.0, 1.0), True, "moe"),  # its router too (a logit bias) is moec's
    "deepseek_v4": (dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=8),
                    ("silu", 10.0, 0.0), False, "experts"),
    "hy_v4": ({**ROUTED_FAMILIES["hy_v4"][0], "swiglu_limit": 0.5}, ("silu", 0.5, 0.0), False, "moe"),  # no act_fn
    "minimax_m3_vl": (dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, shared_intermediate_size=32,
                           dense_intermediate_size=64, routed_scaling_factor=2.5, head_dim=8, rotary_dim=4),
                      ("quick_gelu", 7.0, 1.0), False, "experts"),  # alpha in swiglu_alpha; its clamped shared MLP
}


def clamped_family(family: str) -> tuple[nn.Module, tuple]:
    """The tiny model with its experts' weights scaled up 30x, so that their clamps bind."""
    model, example = tiny_family(family, CLAMPED[family][0])
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if ".experts." in name:
                weight.mul_(30)
    return model, example


@pytest.mark.parametrize("family", [
    "gpt_oss", pytest.param("hy_v4", marks=pytest.mark.slow), pytest.param("deepseek_v4", marks=pytest.mark.slow),
    pytest.param("minimax_m3_vl", marks=pytest.mark.slow),
])
def test_experts_with_clamped_gating_run_on_moec(family, tmp_path):
    model, example = clamped_family(family)
    _, gating, stored_transposed, kind = CLAMPED[family]
    specs = [spec for spec in recognize(model) if spec.experts is not None]
    assert len(specs) == 2 and all(spec.kind == kind for spec in specs)
    for spec in specs:
        assert (spec.experts.act, spec.experts.limit, spec.experts.up_offset) == gating
        assert bool(spec.transposed) == bool(spec.interleaved) == stored_transposed
    compiled = moec.compile(model, example)
    assert len(compiled.program.graph.ops_of(ExpertsOp)) == 2
    assert f"limit={gating[1]}" in compiled.ir
    offset = f", up + {gating[2]:g}" if gating[2] else ""
    assert all(f"clamped at {gating[1]:g}{offset}," in row["detail"]
               for row in compiled.summary() if row["op"] == "moe.experts")
    ids = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert parity(model, compiled, inputs) <= 1e-4
    compiled.save(tmp_path / "plan")
    assert parity(model, moec.load(tmp_path / "plan"), inputs) <= 1e-4
    with torch.no_grad():  # the clamps bind on these inputs: lifting them changes the model's output
        clamped = model(**inputs, use_cache=False).logits
        for module in model.modules():
            if type(module).__name__.endswith("Experts"):
                setattr(module, "swiglu_limit" if hasattr(module, "swiglu_limit") else "limit", 1e9)
        assert (model(**inputs, use_cache=False).logits - clamped).abs().max() > 1e-3


@pytest.mark.slow  # about 30 s; the default run exports Mixtral and DeepSeek-V3
def test_llama4_exports_to_onnx_with_both_lowerings(tmp_path):
    """Llama 4: complex rotary embeddings (carried as real pairs) and experts that take the routing weight on
    their input, which com.microsoft.MoE cannot express (so the ort lowering falls back to portable experts)."""
    model, example = tiny_family("llama4", ROUTED_FAMILIES["llama4"][0])
    fallbacks = unfused_exports(moec.compile(model, example), tmp_path)
    assert not fallbacks["portable"] and len(fallbacks["ort"]) == 1
    assert "routing weight on their input" in fallbacks["ort"][0]


GLM5_NEXT = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2, topk_group=1,
                 routed_scaling_factor=2.5, mlp_layer_types=["sparse"] * 2, layer_types=["full_attention"] * 2,
                 pad_token_id=0, index_topk=4, index_kpool=2, index_head_dim=8, index_n_heads=2, hc_mult=2,
                 hc_sinkhorn_iters=3, linear_head_dim=8, linear_num_heads=2, num_key_value_heads=4, kv_lora_rank=16,
                 q_lora_rank=16, qk_rope_head_dim=0, qk_nope_head_dim=16, v_head_dim=8, swiglu_limit=0.5)


@pytest.mark.slow  # about 40 s: GLM-5-Next's indexer attention
def test_a_clamped_shared_expert_is_a_clamped_shared_expert_op():
    """GLM-5-Next clamps its experts and its shared expert at swiglu_limit: the whole block is moec's, and
    the clamps bind on these inputs (weights scaled up 30x)."""
    model, example = tiny_family("glm5_next", GLM5_NEXT)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if ".experts." in name or ".shared_experts." in name:
                weight.mul_(30)
    specs = [spec for spec in recognize(model) if spec.experts is not None]
    assert len(specs) == 2 and all(spec.kind == "moe" for spec in specs)
    assert all(spec.experts.limit == spec.shared.limit == 0.5 for spec in specs)
    compiled = moec.compile(model, example)
    ids = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert parity(model, compiled, inputs) <= 1e-4
    with torch.no_grad():
        clamped = model(**inputs, use_cache=False)[0]
        for module in model.modules():
            if hasattr(module, "swiglu_limit") and "Experts" not in type(module).__name__:
                module.swiglu_limit = 1e9  # the shared experts' clamp only
        assert (model(**inputs, use_cache=False)[0] - clamped).abs().max() > 1e-3
