"""Routed experts on the CPU through onnxruntime's prepacked GEMMs: one of the torch runner's float32
kernels (``moec.backend.torch_runner.float_experts`` times it against torch's matmuls on each host).

Why: an MoE layer's expert GEMMs are skinny (a few to a few dozen rows against a 7168 x 1024 weight), so
they are bound by how fast the weights stream from memory. MKL's ``sgemm`` (behind ``F.linear``) and
oneDNN's matmul pack the weight operand on every call, which reads and writes it again; measured on a
2-core AMD EPYC with 4 rows per expert they reach 2-6 GB/s where a matrix-vector product streams 10-12.
onnxruntime packs each constant GEMM operand once, when the session is built (MLAS prepacking), and then
runs these GEMMs at close to matrix-vector speed (``tools/bench/moe_block.py``, docs/BENCHMARKS.md).
Prepacked MKL (``cblas_sgemm_pack``) and oneDNN weights and inductor's C++ GEMM template were measured
against it at 1-64 rows there and none was faster from 2 rows on (``tools/bench/expert_gemm.py``); on an
Intel Xeon plain MKL beats it at 1-2 rows and prepacked oneDNN or MKL at 4-64, which is why the runner
times its kernels instead of assuming this one.

How: one session per ``moe.experts`` op, built on first use. For every expert ``e`` the graph has an input
``x_e`` [rows, H] and an output ``y_e`` [rows, H]: ``Gemm(x_e, w_in[e], transB) -> activation (-> gate * up)
-> Gemm(., w_out[e], transB)``. The weights are handed to onnxruntime as external initializers that
*share* the torch tensors' memory (nothing is serialized or copied); onnxruntime's packed copies are the
extra memory this path costs, about the experts' float32 size once more. A call sorts the (token, slot)
pairs by expert, gathers their rows into one buffer (``moec.kernels.workspace``: kept between calls), feeds
each expert its rows (an empty [0, H] array for an expert with none), runs the session once, collects the
outputs into a second kept buffer, scales them by their routing weights and adds them into ``y``.

Quantized experts (every matrix of at most 4 bits) run the same graph with ``com.microsoft.MatMulNBits`` in
place of each ``Gemm`` (``moec.kernels.matmul_nbits``): packed 4-bit weights that onnxruntime repacks once
at session build, on int8 activations (accuracy level 4) or float32 ones (level 1). One of the two kernels
``quant_kernel="auto"`` times for quantized experts (``moec.backend.torch_runner.quantized_experts``).

Same contract as ``moec.kernels.moe_cpu.experts_forward`` for float32 (shapes in its docstring); results
agree with it to float32 rounding (summation order differs), and quantized ones with the dequantized
weights, applied to ``int8_block_rounded`` activations unless ``int8_activations=False``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import TensorProto, helper

from moec.frontend.blocks import ExpertsSpec
from moec.kernels.matmul_nbits import NBITS, matmul_nbits_node, matmul_nbits_operands
from moec.kernels.quant import QuantizedWeight
from moec.kernels.reference import group_by_expert, weighted_outputs, weighted_rows
from moec.kernels.workspace import gathered_rows, scratch

__all__ = ["OnnxruntimeExperts"]

OPSET = 20  # Gelu with its ``approximate`` attribute


def _activation_nodes(name: str, pre: str, out: str) -> list[onnx.NodeProto]:
    """ONNX nodes computing ``out = act(pre)`` for an activation of ``blocks.ACTIVATIONS``."""
    if name == "relu":
        return [helper.make_node("Relu", [pre], [out])]
    if name == "relu2":
        return [helper.make_node("Relu", [pre], [f"{pre}_relu"]), helper.make_node("Mul", [f"{pre}_relu", f"{pre}_relu"], [out])]
    if name in ("gelu", "gelu_tanh"):
        return [helper.make_node("Gelu", [pre], [out], approximate="none" if name == "gelu" else "tanh")]
    if name == "silu":
        return [helper.make_node("Sigmoid", [pre], [f"{pre}_sig"]), helper.make_node("Mul", [pre, f"{pre}_sig"], [out])]
    if name == "quick_gelu":  # x * sigmoid(1.702 x)
        return [helper.make_node("Mul", [pre, "quick_gelu_scale"], [f"{pre}_scaled"]),
                helper.make_node("Sigmoid", [f"{pre}_scaled"], [f"{pre}_sig"]),
                helper.make_node("Mul", [pre, f"{pre}_sig"], [out])]
    raise ValueError(f"no ONNX lowering for activation {name!r}")


ONNX_TYPES = {torch.float32: TensorProto.FLOAT, torch.uint8: TensorProto.UINT8}


def _external(name: str, tensor: torch.Tensor) -> onnx.TensorProto:
    """A graph initializer that only names ``tensor``: its data is handed over at session build."""
    proto = TensorProto(name=name, data_type=ONNX_TYPES[tensor.dtype], dims=list(tensor.shape))
    proto.data_location = TensorProto.EXTERNAL
    length = tensor.numel() * tensor.element_size()
    for key, value in (("location", f"moec-shared/{name}"), ("offset", "0"), ("length", str(length))):
        entry = proto.external_data.add()
        entry.key, entry.value = key, value
    return proto


class OnnxruntimeExperts:
    """Runs one ``moe.experts`` op's float32 or quantized (at most 4 bits) experts with onnxruntime; call as
    ``experts_forward``'s ``(x, indices, weights)`` part. Keeps references to the tensors it shares with
    onnxruntime. ``drop_zero_weight``: pairs of routing weight exactly 0 are not computed (dynamic skipping).
    ``int8_activations``: quantized matrices round their activations to int8 (else they stay float32)."""

    def __init__(self, w_in: torch.Tensor | QuantizedWeight, w_out: torch.Tensor | QuantizedWeight,
                 b_in: torch.Tensor | None, b_out: torch.Tensor | None, spec: ExpertsSpec,
                 drop_zero_weight: bool = False, int8_activations: bool = True) -> None:
        for w in (w_in, w_out):
            if isinstance(w, QuantizedWeight):
                if max(w.type.bits) > NBITS or w.qweight.device.type != "cpu":
                    raise ValueError(f"OnnxruntimeExperts runs quantized CPU weights of at most {NBITS} bits, "
                                     f"got widths {sorted(set(w.type.bits))}")
            elif w.dtype != torch.float32 or w.device.type != "cpu":
                raise ValueError("OnnxruntimeExperts runs float32 CPU weights only")
        self.spec, self.drop_zero_weight = spec, drop_zero_weight
        self.shared: dict[str, torch.Tensor] = {}  # name -> contiguous tensor whose memory onnxruntime reads
        nodes: list[onnx.NodeProto] = []
        inputs, outputs, initializers = [], [], []
        f = spec.intermediate

        def linear(x: str, role: str, e: int, weight, bias, y: str) -> None:
            """``y = x @ weight[e].T (+ bias[e])``: a Gemm, or MatMulNBits (+ Add) for a quantized weight."""
            name = f"{role}{e}"
            if bias is not None:
                initializers.append(onnx.numpy_helper.from_array(bias[e].detach().float().numpy(), f"b_{name}"))
            if not isinstance(weight, QuantizedWeight):
                self.shared[f"w_{name}"] = weight[e].detach().contiguous()
                nodes.append(helper.make_node("Gemm", [x, f"w_{name}"] + ([f"b_{name}"] if bias is not None else []),
                                              [y], transB=1))
                return
            matrix = weight.matrix(e)
            for part, tensor in matmul_nbits_operands(matrix).items():
                self.shared[f"w_{name}_{part}"] = tensor
            product = f"{y}_product" if bias is not None else y
            nodes.append(matmul_nbits_node(x, f"w_{name}", matrix, product, int8_activations))
            if bias is not None:
                nodes.append(helper.make_node("Add", [product, f"b_{name}"], [y]))

        for e in range(spec.num_experts):
            x, pre, hidden, y = f"x{e}", f"pre{e}", f"hidden{e}", f"y{e}"
            linear(x, "in", e, w_in, b_in, pre)
            if spec.gated:
                nodes.append(helper.make_node("Split", [pre, "gate_up_sizes"], [f"gate{e}", f"up{e}"], axis=1))
                gate, up = f"gate{e}", f"up{e}"
                if spec.limit is not None:
                    nodes.append(helper.make_node("Clip", [gate, "", "limit"], [f"clipped_gate{e}"]))
                    nodes.append(helper.make_node("Clip", [up, "minus_limit", "limit"], [f"clipped_up{e}"]))
                    gate, up = f"clipped_gate{e}", f"clipped_up{e}"
                if spec.up_offset:
                    nodes.append(helper.make_node("Add", [up, "up_offset"], [f"offset_up{e}"]))
                    up = f"offset_up{e}"
                nodes += _activation_nodes(spec.act, gate, f"act{e}")
                nodes.append(helper.make_node("Mul", [f"act{e}", up], [hidden]))
            else:
                nodes += _activation_nodes(spec.act, pre, hidden)
            linear(hidden, "out", e, w_out, b_out, y)
            inputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, [f"rows{e}", spec.hidden]))
            outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, [f"rows{e}", spec.hidden]))
        initializers += [_external(name, tensor) for name, tensor in self.shared.items()]
        if spec.gated:
            initializers.append(helper.make_tensor("gate_up_sizes", TensorProto.INT64, [2], [f, f]))
        if spec.limit is not None:
            initializers.append(helper.make_tensor("limit", TensorProto.FLOAT, [], [spec.limit]))
            initializers.append(helper.make_tensor("minus_limit", TensorProto.FLOAT, [], [-spec.limit]))
        if spec.up_offset:
            initializers.append(helper.make_tensor("up_offset", TensorProto.FLOAT, [], [spec.up_offset]))
        if spec.act == "quick_gelu":
            initializers.append(helper.make_tensor("quick_gelu_scale", TensorProto.FLOAT, [], [1.702]))
        graph = helper.make_graph(nodes, "moec_experts", inputs, outputs, initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid("com.microsoft", 1)])

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        # Its worker threads must not spin between calls: torch runs the rest of the model on the same cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        names = list(self.shared)
        self._values = [onnxruntime.OrtValue.ortvalue_from_numpy(self.shared[n].numpy()) for n in names]
        options.add_external_initializers(names, self._values)
        self.session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                                    providers=["CPUExecutionProvider"])
        self._empty = np.zeros((0, spec.hidden), dtype=np.float32)

    def __call__(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``y[t] = sum_j weights[t, j] * expert_{indices[t, j]}(x[t])`` for x [T, H] float32 on the CPU (the
        weight scaling the expert's input instead for ``spec.weighted_input``)."""
        groups = group_by_expert(indices, weights, self.spec.num_experts, self.drop_zero_weight)
        rows = weighted_rows(gathered_rows(x, groups.token_of), groups.weight, self.spec)  # [S, H] sorted by expert
        rows_np = rows.numpy()
        feeds, start = {}, 0
        for e, count in enumerate(groups.counts):
            feeds[f"x{e}"] = rows_np[start:start + count] if count else self._empty
            start += count
        outputs = self.session.run(None, feeds)
        expert_rows = scratch("moe_expert_rows", len(rows_np), self.spec.hidden, x.dtype)  # [S, H], same order
        np.concatenate(outputs, out=expert_rows.numpy())
        return torch.zeros_like(x).index_add_(0, groups.token_of, weighted_outputs(expert_rows, groups.weight, self.spec))
