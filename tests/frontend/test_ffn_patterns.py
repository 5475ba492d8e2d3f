"""FFN chains that no recognizer claimed are folded into ffn.dense after lowering (moec.frontend.ffn_patterns)."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import moec
from moec.api import parity
from moec.backend.torch_runner import TorchRunner
from moec.frontend.capture import capture
from moec.frontend.ffn_patterns import match_ffn
from moec.ir import DenseFFNOp, ExpertsOp
from moec.ir.ops import AtenOp
from moec.ir.verifier import verify

TOLERANCE = 1e-4  # max abs difference, float32 (the folded op runs the same ATen math: 0.0 in practice)


def ffn_ops(program):
    return program.graph.ops_of(DenseFFNOp)


def assert_same_function(model, program, *inputs):
    runner = TorchRunner(program)
    with torch.no_grad():
        for x in inputs:
            torch.testing.assert_close(runner.run([x])[0], model(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("act, name", [(nn.ReLU(), "relu"), (nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"),
                                       (nn.SiLU(), "silu")])
def test_plain_chain_with_eval_dropout_becomes_one_ffn(act, name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 24), act, nn.Dropout(0.1), nn.Linear(24, 8)).eval()
    program = capture(model, (torch.randn(4, 8),))
    (op,) = ffn_ops(program)
    assert (op.spec.act, op.spec.gated, op.spec.intermediate, op.spec.has_bias) == (name, False, 24, True)
    assert op.block == "0"  # no common module path: the up projection's module
    assert not [o for o in program.graph.ops if isinstance(o, AtenOp) and "linear" in o.target]
    assert program.metadata["blocks"] == [{"module": "0", "kind": "ffn", "family": "pattern"}]
    verify(program.graph)
    assert_same_function(model, program, torch.randn(3, 8), torch.randn(2, 5, 8))


class GatedMLP(nn.Module):
    """A Llama-style MLP under names no recognizer knows, multiplied up-first."""

    def __init__(self):
        super().__init__()
        self.w1, self.w3 = nn.Linear(8, 16, bias=False), nn.Linear(8, 16, bias=False)
        self.w2 = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        return self.w2(self.w3(x) * nn.functional.silu(self.w1(x)))


class FusedGatedMLP(nn.Module):
    """Phi-3's MLP: one projection computes gate and up, cut in two."""

    def __init__(self, bias: bool):
        super().__init__()
        self.gate_up_proj = nn.Linear(8, 32, bias=bias)
        self.down_proj = nn.Linear(16, 8, bias=bias)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * nn.functional.gelu(gate))


def test_gated_chain_becomes_a_gated_ffn_with_the_graphs_roles():
    torch.manual_seed(0)
    model = GatedMLP().eval()
    program = capture(model, (torch.randn(4, 8),))
    (op,) = ffn_ops(program)
    assert op.spec.gated and op.spec.act == "silu"
    assert [op.weight(role).name for role in ("w_gate", "w_up", "w_down")] == ["w1.weight", "w3.weight", "w2.weight"]
    assert_same_function(model, program, torch.randn(6, 8))


@pytest.mark.parametrize("bias", [False, True])
def test_fused_gate_up_projection_is_split_into_gate_and_up_weights(bias):
    torch.manual_seed(0)
    model = FusedGatedMLP(bias).eval()
    program = capture(model, (torch.randn(4, 8),))
    (op,) = ffn_ops(program)
    assert op.spec.gated and op.spec.act == "gelu" and op.spec.intermediate == 16
    assert op.weight("w_gate").name == "gate_up_proj.gate.weight"
    torch.testing.assert_close(program.weights["gate_up_proj.gate.weight"], model.gate_up_proj.weight[:16], rtol=0, atol=0)
    torch.testing.assert_close(program.weights["gate_up_proj.up.weight"], model.gate_up_proj.weight[16:], rtol=0, atol=0)
    assert "gate_up_proj.weight" not in program.weights and "gate_up_proj.weight" not in program.graph.weights
    assert (op.weight("b_up") is not None) == bias
    verify(program.graph)
    assert_same_function(model, program, torch.randn(2, 3, 8))


class WrittenOut(nn.Module):
    """An MLP whose activation is written out in elementwise ops (``gated``: as the gate of a gated MLP)."""

    FORMULAS = {
        "gelu_tanh": lambda x: x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))),  # BLOOM
        "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
        "silu": lambda x: x / (1 + torch.exp(-x)),
        "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / 2**0.5)),
        "relu2": lambda x: torch.relu(x) ** 2,  # Primer's squared ReLU
        "none of them": lambda x: x * torch.sigmoid(x) + 0.01 * x,
    }

    def __init__(self, formula: str, gated: bool = False):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)
        self.gate = nn.Linear(8, 16) if gated else None
        self.act = self.FORMULAS[formula]

    def forward(self, x):
        if self.gate is not None:
            return self.down(self.act(self.gate(x)) * self.up(x))
        return self.down(self.act(self.up(x)))


@pytest.mark.parametrize("formula, gated", [("gelu_tanh", False), ("quick_gelu", False), ("silu", False),
                                           ("gelu", False), ("relu2", False), ("silu", True)])
def test_activation_written_out_in_elementwise_ops_is_identified_by_probing(formula, gated):
    torch.manual_seed(0)
    model = WrittenOut(formula, gated).eval()
    program = capture(model, (torch.randn(4, 8),))
    (op,) = ffn_ops(program)
    assert (op.spec.act, op.spec.gated) == (formula, gated)
    assert not [o for o in program.graph.ops if isinstance(o, AtenOp)]  # the whole formula went into the op
    runner, x = TorchRunner(program), 4 * torch.randn(5, 8)
    torch.testing.assert_close(runner.run([x])[0], model(x), rtol=0, atol=1e-6)


def test_an_elementwise_formula_that_is_no_known_activation_stays_generic():
    model = WrittenOut("none of them").eval()
    program = capture(model, (torch.randn(4, 8),))
    assert not ffn_ops(program)
    down = next(op for op in program.graph.ops if isinstance(op, AtenOp) and op.weight_refs
                and op.weight_refs[0].name == "down.weight")
    assert "compute none of" in match_ffn(down, program)
    assert_same_function(model, program, torch.randn(3, 8))


class ReusedHidden(nn.Module):
    """The hidden activations are read twice: folding would hide them from the second reader."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        hidden = torch.relu(self.up(x))
        return self.down(hidden) + hidden.sum(-1, keepdim=True)


class Narrowing(nn.Module):
    """linear -> relu -> linear to another width: a head, not an FFN."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("model, reason", [(ReusedHidden(), "has 2 uses"), (Narrowing(), "an FFN keeps the shape")])
def test_chains_that_do_not_fold_say_why(model, reason):
    model.eval()
    program = capture(model, (torch.randn(4, 8),))
    assert not ffn_ops(program)
    (down,) = [op for op in program.graph.ops if isinstance(op, AtenOp) and op.target == "aten.linear.default"
               and op.weight_refs[0].name == "down.weight"]
    assert reason in match_ffn(down, program)
    assert_same_function(model, program, torch.randn(3, 8))


def token_inputs(batch, seq):
    return {"input_ids": torch.randint(2, 128, (batch, seq), generator=torch.Generator().manual_seed(batch * seq))}


def image_inputs(batch, _seq):
    return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch))}


T = transformers
HF_FAMILIES = {
    # family: (model class, config class, config options, inputs, expected (block, act, gated) of each folded FFN)
    "opt": (T.OPTModel, T.OPTConfig, dict(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32),
            token_inputs, [(f"decoder.layers.{i}", "relu", False) for i in range(2)]),
    "bart": (T.BartModel, T.BartConfig, dict(vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=1,
                                             encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=4,
                                             decoder_attention_heads=4, max_position_embeddings=64),
             token_inputs, [("encoder.layers.0", "gelu", False), ("decoder.layers.0", "gelu", False)]),
    "distilbert": (T.DistilBertModel, T.DistilBertConfig, dict(vocab_size=128, dim=32, hidden_dim=64, n_layers=2,
                                                               n_heads=4, max_position_embeddings=64),
                   token_inputs, [(f"transformer.layer.{i}.ffn", "gelu", False) for i in range(2)]),
    "vit": (T.ViTModel, T.ViTConfig, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, image_size=16, patch_size=8),
            image_inputs, [(f"layers.{i}.mlp", "gelu", False) for i in range(2)]),
    "phi3": (T.Phi3Model, T.Phi3Config, dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                             bos_token_id=1, eos_token_id=1),
             token_inputs, [(f"layers.{i}.mlp", "silu", True) for i in range(2)]),
    "bloom": (T.BloomModel, T.BloomConfig, dict(vocab_size=128, hidden_size=32, n_layer=2, n_head=4),
              token_inputs, [(f"h.{i}.mlp", "gelu_tanh", False) for i in range(2)]),  # GELU written out
}


@pytest.mark.parametrize("family", [pytest.param(name, marks=() if name == "opt" else pytest.mark.slow)
                                    for name in HF_FAMILIES])
def test_inline_and_unlisted_ffns_of_hf_models_are_folded(family):
    model_class, config_class, options, inputs, expected = HF_FAMILIES[family]
    torch.manual_seed(0)
    model = model_class(config_class(**options)).eval()
    compiled = moec.compile(model, inputs(2, 8))
    assert [(op.block, op.spec.act, op.spec.gated) for op in ffn_ops(compiled.program)] == expected
    for batch, seq in [(2, 8), (3, 5)]:
        assert parity(model, compiled, inputs(batch, seq)) <= TOLERANCE


def test_dense_to_moe_converts_a_folded_ffn():
    """A user's nn.Sequential MLP becomes an MoE block; with every expert active it computes the same function."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    recipe = {"passes": [{"dense_to_moe": {"experts": 4, "top_k": 4, "router": "centroid"}}]}
    compiled = moec.compile(model, (torch.randn(4, 8),), recipe=recipe)
    assert not ffn_ops(compiled.program) and len(compiled.program.graph.ops_of(ExpertsOp)) == 1
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-5)


def test_one_ffn_module_called_several_times_names_a_block_per_call(tmp_path):
    """ALBERT runs one shared layer three times: each call is its own FFN op with its own block (calibration
    keeps each call's statistics apart), and dense-to-moe converts every call."""
    from moec.analysis.calibration import calibrate

    torch.manual_seed(0)
    config = transformers.AlbertConfig(vocab_size=128, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                                       num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    model = transformers.AlbertModel(config).eval()
    ids = torch.randint(0, 128, (2, 8))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    program = capture(model, (), example)
    blocks = [op.block for op in ffn_ops(program)]
    assert len(blocks) == 3 and len(set(blocks)) == 3
    assert all(stats.tokens == 16 for stats in calibrate(program, [example], progress=False).dense.values())
    recipe = {"passes": [{"dense_to_moe": {"experts": 4, "top_k": 4}}]}
    compiled = moec.compile(model, example, recipe=recipe, calibration=[example])
    assert len(compiled.program.graph.ops_of(ExpertsOp)) == 3
    again = moec.load(compiled.save(tmp_path / "plan"))
    assert parity(model, again, example) <= TOLERANCE
