"""compile() on every family of the tiny zoo: parity with the original model at other shapes too."""

from __future__ import annotations

import pytest
import torch
import transformers

import moec
from moec.api import deviation, parity
from moec.frontend.recognize import recognize
from moec.frontend.zoo import build_preset, tiny_decoder
from moec.ir import DenseFFNOp, ExpertsOp, RouteOp, SharedExpertOp

FAMILIES = [
    "tiny-mixtral",
    "tiny-qwen2-moe",
    "tiny-qwen3-moe",
    "tiny-olmoe",
    "tiny-deepseek-v3",
    "tiny-gpt-oss",
    "tiny-llama",
    "tiny-gpt2",
    "tiny-bert",
]
TOLERANCE = 1e-4  # max abs difference on logits / hidden states, float32


def reshaped(example, batch, seq):
    """Inputs like the example's at another (batch, seq): token ids drawn afresh, masks all ones."""
    generator = torch.Generator().manual_seed(batch * 100 + seq)
    out = {}
    for key, value in example.items():
        if key == "input_ids":
            out[key] = torch.randint(0, int(value.max()) + 1, (batch, seq), generator=generator)
        elif isinstance(value, torch.Tensor):
            out[key] = torch.ones(batch, seq, dtype=value.dtype) if "mask" in key else torch.zeros(batch, seq, dtype=value.dtype)
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def compiled_family(request):
    model, example = build_preset(request.param)
    return request.param, model, example, moec.compile(model, example)


def assert_parity_at_example_and_other_shapes(model, compiled, example):
    assert parity(model, compiled, example) <= TOLERANCE
    for batch, seq in [(1, 11), (3, 5)]:
        diff = parity(model, compiled, reshaped(example, batch, seq))
        assert diff <= TOLERANCE, f"at batch {batch}, seq {seq}: {diff}"


def test_parity_at_example_and_other_shapes(compiled_family):
    name, model, example, compiled = compiled_family
    assert_parity_at_example_and_other_shapes(model, compiled, example)


def test_output_structure_matches_the_model(compiled_family):
    name, model, example, compiled = compiled_family
    out = compiled(**example)
    with torch.no_grad():
        expected = model(**example, **({"use_cache": False} if getattr(model.config, "use_cache", False) else {}))
    assert type(out) is type(expected)
    assert [k for k, v in expected.items() if v is not None] == list(out.keys())


EXPECTED_OPS = {
    # family: (ffn.dense, moe.route, moe.experts, moe.shared_expert)
    "tiny-mixtral": (0, 2, 2, 0),
    "tiny-qwen2-moe": (0, 2, 2, 2),
    "tiny-qwen3-moe": (1, 1, 1, 0),
    "tiny-olmoe": (0, 2, 2, 0),
    "tiny-deepseek-v3": (1, 1, 1, 1),
    "tiny-gpt-oss": (0, 2, 2, 0),
    "tiny-llama": (2, 0, 0, 0),
    "tiny-gpt2": (2, 0, 0, 0),
    "tiny-bert": (2, 0, 0, 0),
}


def test_blocks_become_moec_ops(compiled_family):
    name, model, example, compiled = compiled_family
    graph = compiled.program.graph
    counts = tuple(len(graph.ops_of(cls)) for cls in (DenseFFNOp, RouteOp, ExpertsOp, SharedExpertOp))
    assert counts == EXPECTED_OPS[name]
    if name == "tiny-qwen2-moe":
        assert all(op.spec.has_output_gate for op in graph.ops_of(SharedExpertOp))
    if name == "tiny-deepseek-v3":
        (route,) = graph.ops_of(RouteOp)
        assert route.spec.scoring == "sigmoid" and route.spec.has_bias and route.spec.n_group == 2
    if name == "tiny-gpt-oss":
        assert all(route.spec.has_logit_bias and route.spec.order == "topk_then_score"
                   for route in graph.ops_of(RouteOp))


def test_bfloat16_models_compile_and_match_loosely():
    model, example = build_preset("tiny-qwen2-moe", dtype=torch.bfloat16)
    compiled = moec.compile(model, example)
    assert compiled.program.graph.inputs[0].type.dtype == "i64"
    assert any(t.dtype == torch.bfloat16 for t in compiled.program.weights.values())
    # bf16 rounding differs between grouped and per-expert evaluation; logits are O(1)
    assert parity(model, compiled, example) <= 5e-2


@pytest.mark.parametrize(("name", "rounds"), [("tiny-mixtral", True), ("tiny-olmoe", True), ("tiny-gpt-oss", True),
                                              ("tiny-deepseek-v3", False)])
def test_bfloat16_moe_blocks_choose_the_experts_hugging_face_chooses(name, rounds):
    """A bf16 router whose linear runs in bf16 rounds its logits, which makes ties and so decides choices:
    moec rounds where the router does (DeepSeek-V3's computes in float32). On 4,096 tokens every row is then
    within bf16 rounding of the block (largest row difference measured 0.022 of the row's largest output); not
    rounding, 3 to 8 rows of these blocks chose another expert and differed by 1.4 to 2.2."""
    model, _ = build_preset(name, dtype=torch.bfloat16)
    block = next(layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts"))
    hidden = model.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    compiled = moec.compile(block, (torch.randn(2, 8, hidden, generator=generator).bfloat16(),))
    assert [route.spec.round_logits for route in compiled.program.graph.ops_of(RouteOp)] == [rounds]
    x = torch.randn(16, 256, hidden, generator=generator).bfloat16()
    with torch.no_grad():
        expected, got = block(x), compiled(x)
    expected, got = (t[0] if isinstance(t, tuple) else t for t in (expected, got))
    rows = (got.float() - expected.float()).reshape(-1, hidden)
    peaks = expected.float().reshape(-1, hidden).abs().amax(dim=-1)
    assert (rows.abs().amax(dim=-1) / peaks).max() <= 5e-2


def test_a_model_that_sets_a_buffer_for_each_call_compiles_and_is_left_as_it_was():
    """Phi-3's longrope (Phi-3-mini-128k, Phi-3.5) sets ``inv_freq`` for each call's length and caches
    ``long_inv_freq`` on its module while it runs: the graph returned the buffer's new value beside the logits
    (every call failed) and export left a fake tensor in the model (its own logits moved by 1.5e-3)."""
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4,
            "long_factor": [4.0, 8.0, 16.0, 32.0], "original_max_position_embeddings": 16}
    model, example = tiny_decoder(transformers.Phi3ForCausalLM, transformers.Phi3Config, intermediate_size=64,
                                  max_position_embeddings=64, original_max_position_embeddings=16, pad_token_id=0,
                                  rope_parameters=rope)
    fresh, _ = tiny_decoder(transformers.Phi3ForCausalLM, transformers.Phi3Config, intermediate_size=64,
                            max_position_embeddings=64, original_max_position_embeddings=16, pad_token_id=0,
                            rope_parameters=rope)
    compiled = moec.compile(model, example)
    assert not [name for module in model.modules() for name, value in vars(module).items()
                if isinstance(value, torch._subclasses.FakeTensor)]
    for batch, seq in [(2, 8), (1, 24)]:  # short and long factors
        inputs = reshaped(example, batch, seq)
        with torch.no_grad():
            expected = fresh(**inputs).logits
            torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(compiled(**inputs).logits, expected, rtol=1e-4, atol=1e-4)


class CountsItsCalls(torch.nn.Module):
    """State carried from call to call: each call reads the count the earlier ones wrote."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * self.calls


def test_a_model_whose_calls_depend_on_earlier_calls_is_refused():
    with pytest.raises(moec.CaptureError, match="writes buffer 'calls' in place and reads it"):
        moec.compile(CountsItsCalls(), (torch.randn(2, 3),))


def test_a_float32_moe_plan_runs_under_autocast_like_the_model():
    """Called inside ``torch.autocast`` (bf16 inference on the CPU), the experts kernel summed bf16 rows into
    float32 ones and failed; the experts now compute in the plan's dtype, and the rest follows autocast as the
    model does."""
    model, example = build_preset("tiny-mixtral")
    compiled = moec.compile(model, example)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(**example).logits
        got = compiled(**example).logits
    assert got.dtype == expected.dtype == torch.bfloat16
    assert (got.float() - expected.float()).abs().max() <= 2e-2 * expected.float().abs().max()


def test_train_mode_model_is_compiled_for_inference_and_left_in_train_mode():
    model, example = build_preset("tiny-bert")
    model.config.hidden_dropout_prob = 0.5
    model.train()
    compiled = moec.compile(model, example)
    assert model.training
    out_a, out_b = compiled(**example), compiled(**example)
    assert torch.equal(out_a.last_hidden_state, out_b.last_hidden_state)  # no dropout
    assert parity(model, compiled, example) <= TOLERANCE
    assert model.training


@pytest.mark.slow  # about 8 s; keyword and positional calls are checked by default below
def test_positional_example_inputs():
    model, example = build_preset("tiny-llama")
    compiled = moec.compile(model, (example["input_ids"],))
    ids = torch.randint(0, 100, (2, 6))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    assert (compiled(ids).logits - expected).abs().max() <= TOLERANCE


def test_arguments_may_come_by_keyword_or_by_position_whatever_the_example_did(tmp_path):
    model, example = build_preset("tiny-llama")
    ids = torch.randint(0, 100, (2, 6))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = model(ids, mask, use_cache=False).logits
    by_position, by_keyword = moec.compile(model, (example["input_ids"], example["attention_mask"])), moec.compile(model, example)
    for compiled in (by_position, by_keyword):
        for args, kwargs in (((ids, mask), {}), ((ids,), {"attention_mask": mask}), ((), {"input_ids": ids, "attention_mask": mask})):
            assert (compiled(*args, **kwargs).logits - expected).abs().max() <= TOLERANCE
    again = moec.load(by_keyword.save(tmp_path / "plan"))  # the parameter names are in the plan
    assert (again(ids, mask).logits - expected).abs().max() <= TOLERANCE
    with pytest.raises(TypeError, match=r"takes \(input_ids, attention_mask\); got 1 positional argument: missing attention_mask"):
        by_keyword(ids)


def test_ids_and_masks_of_another_integer_or_bool_dtype_are_cast_to_the_captured_one():
    """Compiled with a bool mask, called with the usual int64 one (the model converted its mask on the branch
    the example took), and int32 ids."""
    model, example = build_preset("tiny-llama")
    compiled = moec.compile(model, {**example, "attention_mask": example["attention_mask"].bool()})
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        expected = model(ids, mask, use_cache=False).logits
    got = compiled(input_ids=ids.int(), attention_mask=mask).logits
    assert (got[1] - expected[1]).abs().max() <= TOLERANCE and (got[0, 2:] - expected[0, 2:]).abs().max() <= TOLERANCE


def test_example_inputs_given_as_one_tensor_stay_separate_inputs():
    """``labels=input_ids`` (the usual idiom) must not make the compiled model read its labels as ids."""
    model, example = build_preset("tiny-mixtral")
    compiled = moec.compile(model, {**example, "labels": example["input_ids"]})
    generator = torch.Generator().manual_seed(0)
    ids, labels = (torch.randint(0, 100, (2, 6), generator=generator) for _ in range(2))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        expected = model(**inputs)
    got = compiled(**inputs)
    assert (got.logits - expected.logits).abs().max() <= TOLERANCE
    assert abs(float(got.loss - expected.loss)) <= TOLERANCE


def test_router_logits_asked_for_by_the_config_are_left_out_and_the_setting_kept():
    model, example = build_preset("tiny-qwen2-moe")
    model.config.output_router_logits = True
    compiled = moec.compile(model, example)
    assert model.config.output_router_logits
    assert compiled(**example).router_logits is None
    assert parity(model, compiled, example) <= TOLERANCE


def test_deviation_leaves_padding_positions_out():
    """A causal model's outputs at real positions do not depend on the padding after them, so the deviation of
    a quantized compile on padded inputs equals the one on the same inputs cut before the padding."""
    model, example = build_preset("tiny-llama")
    compiled = moec.compile(model, example, recipe={"passes": [{"quantize": {"bits": 2, "group": 32}}]})
    ids = torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(0))
    padded = {"input_ids": ids, "attention_mask": torch.tensor([[1] * 5 + [0] * 4])}
    cut = {"input_ids": ids[:, :5], "attention_mask": torch.ones(1, 5, dtype=torch.int64)}
    on_padded, on_cut = deviation(model, compiled, padded), deviation(model, compiled, cut)
    assert on_padded.max_abs_diff > 1e-3 and 0.5 < on_padded.cosine < 0.9999  # 2 bits do move the logits
    assert on_padded.cosine == pytest.approx(on_cut.cosine, abs=1e-5)
    assert on_padded.max_abs_diff == pytest.approx(on_cut.max_abs_diff, abs=1e-5)
    exact = moec.compile(model, example)
    assert deviation(model, exact, padded).cosine == pytest.approx(1.0, abs=1e-6)


def one_fast(names, fast):
    """Parameters for per-family compile tests: ``fast`` in the default run, the others (recognized by the same
    code as a family compiled there) marked slow; ``test_every_family_is_recognized`` covers them all fast."""
    return [pytest.param(name, marks=() if name in fast else pytest.mark.slow) for name in names]


DENSE_GATED = {
    # family: (model class, config class); each MLP is gate/up/down with the config's activation
    "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig),
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config),
    "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config),
    "gemma": (transformers.GemmaForCausalLM, transformers.GemmaConfig),  # tanh GELU, scaled embeddings
}


@pytest.mark.parametrize("family", one_fast(DENSE_GATED, fast={"gemma"}))
def test_dense_gated_families_become_ffn_ops(family):
    model, example = tiny_decoder(*DENSE_GATED[family], head_dim=8)
    compiled = moec.compile(model, example)
    ffns = compiled.program.graph.ops_of(DenseFFNOp)
    assert len(ffns) == 2 and all(op.spec.gated for op in ffns)
    assert_parity_at_example_and_other_shapes(model, compiled, example)


_DEEPSEEK_STYLE = dict(
    head_dim=8, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    n_group=2, topk_group=1, first_k_dense_replace=1,
)
MORE_MOE = {
    # family: (model class, config class, options, expected (ffn.dense, moe.route, moe.experts, moe.shared_expert))
    "glm4_moe": (transformers.Glm4MoeForCausalLM, transformers.Glm4MoeConfig, _DEEPSEEK_STYLE, (1, 1, 1, 1)),
    "dots1": (transformers.Dots1ForCausalLM, transformers.Dots1Config, _DEEPSEEK_STYLE, (1, 1, 1, 1)),
    "flex_olmo": (  # OLMoE routing
        transformers.FlexOlmoForCausalLM,
        transformers.FlexOlmoConfig,
        dict(num_experts=8, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=1),
        (0, 2, 2, 0),
    ),
    "granitemoe": (  # top-k of the logits, then softmax over the chosen
        transformers.GraniteMoeForCausalLM,
        transformers.GraniteMoeConfig,
        dict(num_local_experts=4, num_experts_per_tok=2),
        (0, 2, 2, 0),
    ),
    "minimax": (  # Mixtral routing
        transformers.MiniMaxForCausalLM,
        transformers.MiniMaxConfig,
        dict(head_dim=8, num_local_experts=4, num_experts_per_tok=2),
        (0, 2, 2, 0),
    ),
}


@pytest.mark.parametrize("family", one_fast(MORE_MOE, fast={"glm4_moe"}))
def test_more_moe_families_become_moe_ops(family):
    model_class, config_class, options, expected_ops = MORE_MOE[family]
    model, example = tiny_decoder(model_class, config_class, **options)
    compiled = moec.compile(model, example)
    graph = compiled.program.graph
    assert tuple(len(graph.ops_of(cls)) for cls in (DenseFFNOp, RouteOp, ExpertsOp, SharedExpertOp)) == expected_ops
    assert_parity_at_example_and_other_shapes(model, compiled, example)


@pytest.mark.parametrize("feed_forward", ["relu", pytest.param("gated-gelu", marks=pytest.mark.slow)])
def test_encoder_decoder_models_compile_without_the_decoder_cache(feed_forward):
    """T5's decoder stack keeps its own config copy with use_cache=True; capture turns off every one of them
    (the cache object is not a tensor output) and restores them after. Both T5 FFN kinds become ffn.dense."""
    config = transformers.T5Config(vocab_size=128, d_model=32, d_ff=64, num_layers=1, num_heads=4, d_kv=8,
                                   feed_forward_proj=feed_forward)
    torch.manual_seed(0)
    model = transformers.T5Model(config).eval()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    example = {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    compiled = moec.compile(model, example)
    assert model.decoder.config.use_cache and model.config.use_cache
    ffns = compiled.program.graph.ops_of(DenseFFNOp)
    assert len(ffns) == 2 and all(op.spec.gated == (feed_forward == "gated-gelu") for op in ffns)
    assert parity(model, compiled, example) <= TOLERANCE
    other = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(1))
    assert parity(model, compiled, {"input_ids": other, "decoder_input_ids": other[:, :2]}) <= TOLERANCE


BERT_STYLE = {"roberta": "Roberta", "xlm_roberta": "XLMRoberta", "camembert": "Camembert", "electra": "Electra"}


def bert_style_encoder(family):
    prefix = BERT_STYLE[family]  # transformers' class name prefix
    config_class, model_class = getattr(transformers, f"{prefix}Config"), getattr(transformers, f"{prefix}Model")
    config = config_class(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=64, pad_token_id=1)
    torch.manual_seed(0)
    ids = torch.randint(2, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    return model_class(config).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("family", one_fast(BERT_STYLE, fast={"roberta"}))
def test_bert_style_encoders_become_ffn_ops(family):
    model, example = bert_style_encoder(family)
    compiled = moec.compile(model, example)
    assert len(compiled.program.graph.ops_of(DenseFFNOp)) == 2
    assert_parity_at_example_and_other_shapes(model, compiled, example)


PLAIN_MLPS = {
    # family: (model class, config); each MLP is up -> activation -> down
    "gpt_neox": (transformers.GPTNeoXForCausalLM, lambda: transformers.GPTNeoXConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)),
    "gptj": (transformers.GPTJForCausalLM, lambda: transformers.GPTJConfig(
        vocab_size=128, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64)),
    "falcon": (transformers.FalconForCausalLM, lambda: transformers.FalconConfig(  # no biases
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)),
    "clip": (transformers.CLIPTextModel, lambda: transformers.CLIPTextConfig(  # quick GELU
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)),
}


def plain_mlp_model(family):
    model_class, config = PLAIN_MLPS[family]
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    return model_class(config()).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("family", one_fast(PLAIN_MLPS, fast={"gpt_neox", "falcon"}))
def test_plain_mlp_families_become_ffn_ops(family):
    model, example = plain_mlp_model(family)
    compiled = moec.compile(model, example)
    ffns = compiled.program.graph.ops_of(DenseFFNOp)
    assert len(ffns) == 2 and not any(op.spec.gated for op in ffns)
    assert_parity_at_example_and_other_shapes(model, compiled, example)


FAMILY_MODELS = {
    **{name: lambda name=name: tiny_decoder(*DENSE_GATED[name], head_dim=8)[0] for name in DENSE_GATED},
    **{name: lambda name=name: tiny_decoder(*MORE_MOE[name][:2], **MORE_MOE[name][2])[0] for name in MORE_MOE},
    **{name: lambda name=name: bert_style_encoder(name)[0] for name in BERT_STYLE},
    **{name: lambda name=name: plain_mlp_model(name)[0] for name in PLAIN_MLPS},
}


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_every_family_is_recognized(family):
    """Each registration finds its model's blocks (the compile tests above check numerics)."""
    specs = recognize(FAMILY_MODELS[family]())
    assert len(specs) == 2 and {spec.family for spec in specs} == {family}


def test_the_gpt_oss_preset_has_a_coherent_yarn_rope():
    """transformers warns (several lines, on every build) where YaRN's factor is not the ratio of the context
    lengths: the preset's window is the one the factor extends to."""
    model, _ = build_preset("tiny-gpt-oss")
    rope = model.config.rope_parameters
    assert rope["rope_type"] == "yarn"
    assert model.config.max_position_embeddings / rope["original_max_position_embeddings"] == rope["factor"]
