"""Quantized weights in the ONNX export: layouts of MatMulNBits / QMoE operands, the standard-op
dequantization, and whole exports that keep the weights packed and match the torch runner.

Parity is against the torch runner's exact ``dequant`` kernel at 1e-4 (float32): MatMulNBits and QMoE
dequantize to float32 and run float32 GEMMs (no int8 activations), so they differ from it by summation
order only (~1e-7 here).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import transformers
from onnx import TensorProto, helper, numpy_helper

import moec
from moec.backend.onnx.moe import (
    dequantize_qmoe,
    interleave_gate_up,
    ort_moe,
    ort_qmoe,
    qmoe_operands,
    qmoe_support,
)
from moec.backend.onnx.quant import dequantize_onnx, matmul_nbits, matmul_nbits_operands
from moec.cli import main
from moec.ir.quant import QuantizedType
from moec.kernels.quant import QuantizedWeight, quantize_matrix

TOLERANCE = 1e-4


def quantized(shape, bits, group=32, seed=0) -> QuantizedWeight:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if len(shape) == 2:
        return QuantizedWeight.from_matrices("f32", shape, [quantize_matrix(w, bits[0], group)])
    return QuantizedWeight.from_matrices("f32", shape, [quantize_matrix(w[e], b, group) for e, b in enumerate(bits)])


@pytest.mark.parametrize("bits", [[2, 2], [3, 3], [4, 4], [8, 8], [3, 8]])
def test_standard_op_dequantization_is_exact(bits):
    """The ONNX dequantization (evaluated op by op in onnxruntime) equals moec's, bit for bit."""
    weight = quantized((2, 8, 64), bits)
    out = dequantize_onnx(weight.qweight.numpy(), weight.scales.numpy(), weight.zeros.numpy(), bits, 32, [2, 8, 64])
    assert np.array_equal(out.value, weight.dequantize().numpy())


def test_matmul_nbits_reads_moec_packing(tmp_path):
    """One MatMulNBits node on ``matmul_nbits_operands``, with an odd number of blocks per row (padded zero points)."""
    n, k, group = 24, 96, 32
    weight = quantized((n, k), [4], group)
    operands = matmul_nbits_operands(weight)
    assert operands["zeros"].shape == (n, 2)  # 3 four-bit zero points a row, padded to whole bytes
    node = helper.make_node("MatMulNBits", ["x", "w", "s", "z"], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=group)
    initializers = [numpy_helper.from_array(operands[part].numpy(), name)
                    for part, name in (("qweight", "w"), ("scales", "s"), ("zeros", "z"))]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, n])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(1))
    want = x @ weight.dequantize().T
    got = session.run(None, {"x": x.numpy()})[0]
    assert np.abs(got - want.numpy()).max() <= 1e-5
    eager = matmul_nbits(x, operands["qweight"], operands["scales"], operands["zeros"], 4, group)
    assert (eager - want).abs().max() <= 1e-5


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("gated", [True, False])
def test_qmoe_operands_hold_the_same_weight(bits, gated):
    weight = quantized((4, 16, 96), [bits] * 4)
    operands = qmoe_operands(weight, gated_rows=gated)
    want = interleave_gate_up(weight.dequantize()) if gated else weight.dequantize()
    assert torch.equal(dequantize_qmoe(operands["qweight"], operands["scales"], operands["zeros"], bits), want)


def test_qmoe_semantics_match_onnxruntime_without_normalization():
    """One QMoE node with normalize_routing_weights=0: onnxruntime's CPU kernel renormalizes anyway, as
    ``ort_qmoe`` says (an unrenormalized routing would differ by about the size of the output here)."""
    experts, tokens, hidden, top_k = 4, 6, 32, 2
    fc1, fc2 = quantized((experts, 128, hidden), [4] * experts), quantized((experts, hidden, 64), [4] * experts, seed=1)
    operands = qmoe_operands(fc1, gated_rows=True), qmoe_operands(fc2, gated_rows=False)
    names = [(f"fc{i}", f"s{i}", f"z{i}") for i in (1, 2)]
    initializers = [numpy_helper.from_array(ops[part].numpy(), name) for ops, parts in zip(operands, names, strict=True)
                    for part, name in zip(("qweight", "scales", "zeros"), parts, strict=True)]
    node = helper.make_node("QMoE", ["x", "r", "fc1", "s1", "", "fc2", "s2", "", "", "", "", "z1", "z2"], ["y"],
                            domain="com.microsoft", k=top_k, normalize_routing_weights=0, activation_type="swiglu",
                            activation_alpha=1.0, activation_beta=0.0, swiglu_fusion=1, expert_weight_bits=4,
                            block_size=32)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [tokens, hidden]),
                                            helper.make_tensor_value_info("r", TensorProto.FLOAT, [tokens, experts])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [tokens, hidden])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(2)
    x, logits = torch.randn(tokens, hidden, generator=generator), torch.randn(tokens, experts, generator=generator)
    got = torch.from_numpy(session.run(None, {"x": x.numpy(), "r": logits.numpy()})[0])
    fc1_ops, fc2_ops = operands
    want = ort_qmoe(x, logits, fc1_ops["qweight"], fc1_ops["scales"], fc1_ops["zeros"], None, fc2_ops["qweight"],
                    fc2_ops["scales"], fc2_ops["zeros"], None, top_k, False, "swiglu", 1.0, 0.0, None, 4, 32)
    unnormalized = ort_moe(x, logits, dequantize_qmoe(fc1_ops["qweight"], fc1_ops["scales"], fc1_ops["zeros"], 4), None,
                           fc2.dequantize(), None, top_k, False, "swiglu", 1.0, 0.0, None)
    scale = want.abs().max()
    assert (got - want).abs().max() <= 1e-6 * scale and (got - unnormalized).abs().max() > 0.1 * scale


@pytest.mark.parametrize("w_in, w_out, why", [
    ((2, 2), (2, 2), "2-bit experts"),
    ((3, 3), (3, 3), "3-bit experts"),
    ((8, 8), (8, 8), "8-bit experts"),
    ((4, 2), (4, 4), "mixed widths"),
    ((4, 4), None, "one float and one quantized"),
])
def test_qmoe_refuses_what_onnxruntime_does_not_match(w_in, w_out, why):
    def weight_type(bits):
        return None if bits is None else QuantizedType("f32", (2, 16, 64), bits, 32)

    assert why in qmoe_support(weight_type(w_in), weight_type(w_out))
    assert qmoe_support(weight_type((4, 4)), weight_type((4, 4))) == ""


def packed_bytes(onnx_model, weight_name):
    return sum(len(init.raw_data) for init in onnx_model.graph.initializer if init.name.startswith(weight_name + "."))


def quantize_and_export(model, example, bits, lowering, path):
    compiled = moec.compile(model, example, recipe={"passes": [{"quantize": {"bits": bits, "group": 32}}]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled.export_onnx(path, lowering=lowering)
    report = compiled.report["onnx"]
    assert max(report["parity_max_abs_diff"].values()) <= TOLERANCE
    fallbacks = [str(w.message) for w in caught if "portable MoE lowering" in str(w.message)]
    return compiled, onnx.load(str(path)), fallbacks


def test_4bit_qwen2_moe_exports_qmoe_and_matmul_nbits(preset, tmp_path):
    """Routed experts become com.microsoft.QMoE, the shared experts' linears MatMulNBits; all stay packed."""
    compiled, onnx_model, fallbacks = quantize_and_export(*preset("tiny-qwen2-moe"), 4, "ort", tmp_path / "q.onnx")
    ops = [node.op_type for node in onnx_model.graph.node]
    assert ops.count("QMoE") == 2 and ops.count("MatMulNBits") == 6 and not fallbacks
    assert "MoE" not in ops and "NonZero" not in ops
    graph = compiled.program.graph
    for name, weight_type in graph.weights.items():
        if isinstance(weight_type, QuantizedType):  # 4 bits + scale and zero per 32: >= 5x below float32
            assert 5 * packed_bytes(onnx_model, name) < 4 * math.prod(weight_type.shape), name
    float_shapes = {tuple(init.dims) for init in onnx_model.graph.initializer if init.data_type == TensorProto.FLOAT}
    assert not any(tuple(t.shape) in float_shapes for t in graph.weights.values() if isinstance(t, QuantizedType))


@pytest.mark.slow  # about 20 s; QMoE is reached by default from Qwen2-MoE
def test_4bit_deepseek_routing_reaches_qmoe_as_a_choice(preset, tmp_path):
    """Sigmoid, biased, grouped routing: standard ops choose, QMoE runs the packed experts (parity checked)."""
    _, onnx_model, fallbacks = quantize_and_export(*preset("tiny-deepseek-v3"), 4, "ort", tmp_path / "q.onnx")
    ops = [node.op_type for node in onnx_model.graph.node]
    assert ops.count("QMoE") == 1 and "Sigmoid" in ops and "NonZero" not in ops and not fallbacks


@pytest.mark.slow  # about 20 s
def test_4bit_gpt_oss_clamped_experts_export_qmoe(tmp_path):
    """GPT-OSS's clamped SwiGLU (clamps binding: experts scaled 30x) in QMoE, routed by the op itself with
    the router's bias on its logits; parity with the torch runner's dequantized experts is checked."""
    from tests.frontend.test_hf_experts import clamped_family

    _, onnx_model, fallbacks = quantize_and_export(*clamped_family("gpt_oss"), 4, "ort", tmp_path / "q.onnx")
    qmoe = [node for node in onnx_model.graph.node if node.op_type == "QMoE"]
    assert len(qmoe) == 2 and not fallbacks
    assert "TopK" not in [node.op_type for node in onnx_model.graph.node]
    for node in qmoe:
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["swiglu_limit"] == 7.0 and attributes["activation_beta"] == 1.0


def expert_heavy_mixtral():
    """A Mixtral whose experts hold most of the weights (as in real MoE models), built in code."""
    config = transformers.MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    input_ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


@pytest.mark.slow  # about 25 s
def test_3bit_experts_fall_back_to_dequantized_portable_experts(tmp_path):
    """QMoE cannot take 3-bit experts on the CPU: one warning per block, portable experts on weights
    dequantized in the graph; the file stays several times smaller than the float32 weights alone."""
    model, example = expert_heavy_mixtral()
    float_bytes = sum(p.numel() * 4 for p in model.parameters())
    path = tmp_path / "q.onnx"
    compiled, onnx_model, fallbacks = quantize_and_export(model, example, 3, "ort", path)
    assert fallbacks == [f"model.layers.{i}.mlp uses the portable MoE lowering: com.microsoft.QMoE cannot express "
                         "3-bit experts (onnxruntime's CPU QMoE matches moec's dequantized experts for 4 bits only)"
                         for i in range(2)]
    ops = {node.op_type for node in onnx_model.graph.node}
    assert {"NonZero", "ScatterND", "Mod"} <= ops and "QMoE" not in ops
    # the weights as stored (packed codes and their scales) and the whole file, with the graph's structure,
    # which at this tiny size is a quarter of it (measured: 151 KB of initializers in a 212 KB file)
    assert 4 * sum(len(t.raw_data) for t in onnx_model.graph.initializer) < float_bytes
    assert 3 * path.stat().st_size < float_bytes


@pytest.mark.slow  # about 15 s
def test_4bit_olmoe_without_renormalization_exports_qmoe_from_the_cli(preset, tmp_path, capsys):
    """OLMoE's softmax top-k keeps its weights unrenormalized, which QMoE cannot compute itself: the portable
    router chooses (TopK in the file) and QMoE runs the packed experts; the CLI names the op it wrote."""
    model, example = preset("tiny-olmoe")
    assert not model.config.norm_topk_prob
    plan, path = tmp_path / "plan", tmp_path / "q.onnx"
    moec.compile(model, example, recipe={"passes": [{"quantize": {"bits": 4, "group": 32}}]}).save(plan)
    assert main(["export-onnx", str(plan), "-o", str(path), "--lowering", "ort"]) == 0
    assert "2 com.microsoft.QMoE ops" in capsys.readouterr().out
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("QMoE") == 2 and "TopK" in ops and "NonZero" not in ops
