"""Swapping blocks for moec custom ops: same outputs as the original model, clean restore, exportable.

Tolerances: float32 models must match to 1e-5 (absolute and relative). bfloat16 models are compared by
relative L2 error of the output, which must stay under 1e-2 (seen: 0 to 4e-3): HF rounds logits and routing weights to
bf16 where the reference keeps float32, so a few near-tie tokens may pick another expert.
"""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim, export

import moec
from moec.frontend import zoo
from moec.frontend.recognize import recognize
from moec.frontend.swap import swap_blocks
from moec.kernels import reference

TINY = [name for name in zoo.PRESETS if name.startswith("tiny-")]


def _main_output(outputs) -> torch.Tensor:
    """Logits of a causal LM, the last hidden state of an encoder."""
    return outputs.logits if hasattr(outputs, "logits") else outputs.last_hidden_state


def _other_shape(example: dict[str, torch.Tensor], batch: int = 3, seq: int = 5) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": input_ids}
    if "attention_mask" in example:
        inputs["attention_mask"] = torch.ones_like(input_ids)
        inputs["attention_mask"][0, -2:] = 0  # some padding
    return inputs


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the reference block calls made by the eager custom ops."""
    calls = {"moe": 0, "ffn": 0, "experts": 0}

    def counting(kind, fn):
        def wrapped(*args, **kwargs):
            calls[kind] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(reference, "moe_block", counting("moe", reference.moe_block))
    monkeypatch.setattr(reference, "ffn_block", counting("ffn", reference.ffn_block))
    monkeypatch.setattr(reference, "experts_block", counting("experts", reference.experts_block))
    return calls


@pytest.mark.parametrize("name", [*TINY, "minilm"])
def test_swapped_model_matches_original_fp32(preset, op_calls, name):
    model, example = preset(name)
    specs = recognize(model)
    for inputs in (example, _other_shape(example)):
        with torch.no_grad():
            expected = _main_output(model(**inputs))
            with swap_blocks(model, specs):
                swapped = _main_output(model(**inputs))
        torch.testing.assert_close(swapped, expected, rtol=1e-5, atol=1e-5)
    assert sum(op_calls.values()) == 2 * len(specs)
    assert op_calls["moe"] == 2 * sum(spec.kind == "moe" for spec in specs)
    assert op_calls["experts"] == 2 * sum(spec.kind == "experts" for spec in specs)


@pytest.mark.parametrize("name", TINY)
def test_swapped_model_bf16(preset, name):
    model, example = preset(name, torch.bfloat16)
    with torch.no_grad():
        expected = _main_output(model(**example)).float()
        with swap_blocks(model, recognize(model)):
            swapped = _main_output(model(**example))
    assert swapped.dtype == torch.bfloat16
    relative_error = (swapped.float() - expected).norm() / expected.norm()
    assert relative_error < 1e-2


def test_swap_restores_forward_even_on_error(preset):
    model, example = preset("tiny-mixtral")
    specs = recognize(model)
    block = model.get_submodule(specs[0].module)
    assert "forward" not in vars(block)
    with pytest.raises(RuntimeError, match="boom"), swap_blocks(model, specs):
        assert "forward" in vars(block)
        raise RuntimeError("boom")
    assert "forward" not in vars(block)


def test_swap_restores_bert_feed_forward(preset):
    model, _ = preset("tiny-bert")
    specs = recognize(model)
    layer = model.get_submodule(specs[0].module)
    with swap_blocks(model, specs):
        assert "feed_forward_chunk" in vars(layer)
    assert "feed_forward_chunk" not in vars(layer)


def test_exported_graph_has_one_op_per_block_with_lifted_weights():
    model, example = zoo.build_preset("tiny-mixtral")  # private copy: export needs use_cache=False
    model.config.use_cache = False
    specs = recognize(model)
    dynamic_shapes = {name: {0: Dim.AUTO, 1: Dim.AUTO} for name in example}
    with swap_blocks(model, specs), torch.fx.experimental._config.patch(backed_size_oblivious=True):
        program = export(model, (), example, dynamic_shapes=dynamic_shapes, strict=False)

    op_nodes = [node for node in program.graph.nodes if node.target == torch.ops.moec.moe_block.default]
    assert len(op_nodes) == len(specs) == 2
    lifted = {spec.arg.name: spec.target for spec in program.graph_signature.input_specs}
    for node, spec in zip(op_nodes, specs, strict=True):
        x, weights, config = node.args
        assert config == spec.to_json()
        assert all(w.op == "placeholder" for w in weights)
        assert [lifted[w.name] for w in weights] == list(spec.weights.values())

    smaller = _other_shape(example, batch=1, seq=6)
    with torch.no_grad():
        torch.testing.assert_close(
            _main_output(program.module()(**smaller)), _main_output(model(**smaller)), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-llama"])
def test_a_block_compiled_alone_keeps_its_hidden_size(preset, name):
    """The block's input is the model's input, whose dims capture makes dynamic: the custom op pins H, so the
    IR's sizes check, and batch and sequence stay dynamic."""
    model, _ = preset(name)
    mlp = model.get_submodule("model.layers.0.mlp")
    hidden = model.config.hidden_size
    compiled = moec.compile(mlp, (torch.randn(2, 5, hidden),))
    x = torch.randn(3, 4, hidden)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), mlp(x), rtol=1e-5, atol=1e-5)
