"""onnxruntime's ``com.microsoft.MatMulNBits`` on moec's quantized matrices: the operands, the node, and the
int8 activations it computes with at accuracy level 4 (or float32 ones at level 1).

Layout (checked against onnxruntime 1.32's schema): B is uint8 ``[N, K / block, block / 2]``, each block's
4-bit codes packed LSB-first, low nibble first, which is moec's own order (``moec.kernels.quant``), so 4-bit
codes are only reshaped; 2- and 3-bit codes are repacked as 4-bit codes (``(q - z) * s`` holds for any code
width, and the zero points are stored whole). Scales are float32 ``[N, K / block]`` (widened exactly from
moec's float16); zero points take a nibble each, ``[N, ceil(K / block / 2)]``.

``accuracy_level=4`` makes onnxruntime's CPU kernel quantize each row of activations to int8 per block of
``block`` columns (symmetric: scale ``max|x| / 127``, round half to even) and run integer dot products
(VNNI/AMX where the CPU has them). Its result is then exactly ``dequantize(W)`` applied to those rounded
activations (``int8_block_rounded``); ``int8_activations_available`` checks that on this host, since a CPU
without the integer kernel falls back to float activations. Measured on a 2-core Intel Xeon, one 7168 x
1024 4-bit matrix: 1.5-2x faster than torch's packed int4 GEMM at 1-16 rows (docs/BENCHMARKS.md).
``accuracy_level=1`` keeps the activations float32: exact to ``dequantize(W)`` up to float32 rounding, and
on the 4-bit MoE block of that bench within 5% of the int8 path at 512 tokens (128 rows per expert) and
faster from 1024 tokens on.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import TensorProto, helper

from moec.kernels.quant import QuantizedMatrix, pack_codes, quantize_matrix

NBITS = 4  # the width every matrix is fed at; narrower codes fit unchanged
INT8_ACCURACY_LEVEL = 4  # MatMulNBits' accuracy_level for int8 activations
FLOAT_ACCURACY_LEVEL = 1  # and for float32 ones
INT8_MAX = 127


def matmul_nbits_operands(matrix: QuantizedMatrix) -> dict[str, torch.Tensor]:
    """MatMulNBits' B, scales and zero points for ``matrix`` [N, K] of at most 4 bits, keyed
    ``qweight``/``scales``/``zeros``."""
    if matrix.bits > NBITS:
        raise ValueError(f"MatMulNBits is fed matrices of at most {NBITS} bits here, got {matrix.bits} bits")
    rows, blocks = matrix.scales.shape
    packed = matrix.packed if matrix.bits == NBITS else pack_codes(matrix.codes(), NBITS)
    zeros = matrix.zeros
    if blocks % 2:  # one zero point a nibble: pad the row to whole bytes (the pad is never read)
        zeros = torch.cat([zeros, torch.zeros_like(zeros[:, :1])], dim=1)
    return {"qweight": packed.reshape(rows, blocks, -1).contiguous(), "scales": matrix.scales.float().contiguous(),
            "zeros": (zeros[:, 0::2] | (zeros[:, 1::2] << 4)).contiguous()}


def matmul_nbits_node(x: str, prefix: str, matrix: QuantizedMatrix, y: str, int8_activations: bool) -> onnx.NodeProto:
    """``y = x @ W.T`` for ``matrix`` W [N, K], reading initializers ``{prefix}_qweight``/``_scales``/``_zeros``,
    on int8 activations or float32 ones."""
    level = INT8_ACCURACY_LEVEL if int8_activations else FLOAT_ACCURACY_LEVEL
    return helper.make_node("MatMulNBits", [x, f"{prefix}_qweight", f"{prefix}_scales", f"{prefix}_zeros"], [y],
                            domain="com.microsoft", K=matrix.columns, N=matrix.scales.shape[0], bits=NBITS,
                            block_size=matrix.group, accuracy_level=level)


def int8_block_rounded(x: torch.Tensor, block: int) -> torch.Tensor:
    """float32 ``x`` [M, K] rounded as MatMulNBits rounds its activations at accuracy level 4: each block of
    ``block`` columns of a row to ``round(x / s) * s`` with ``s = max|x| / 127`` (an all-zero block stays 0)."""
    blocks = x.float().reshape(*x.shape[:-1], -1, block)
    scale = blocks.abs().amax(dim=-1, keepdim=True) / INT8_MAX
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    return (torch.round(blocks * inverse).clamp(-INT8_MAX, INT8_MAX) * scale).reshape(x.shape)


def single_matmul_session(matrix: QuantizedMatrix, int8_activations: bool,
                          threads: int = 1) -> onnxruntime.InferenceSession:
    """A session computing ``x @ W.T`` for ``matrix`` with one MatMulNBits node (input ``x``, output ``y``)."""
    initializers = [onnx.numpy_helper.from_array(t.numpy(), f"w_{role}")
                    for role, t in matmul_nbits_operands(matrix).items()]
    graph = helper.make_graph(
        [matmul_nbits_node("x", "w", matrix, "y", int8_activations)], "moec_matmul_nbits",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", matrix.columns])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", matrix.scales.shape[0]])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # torch runs on the same cores
    return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@functools.cache
def int8_activations_available() -> bool:
    """Whether MatMulNBits at accuracy level 4 computes exactly on ``int8_block_rounded`` activations here
    (on a small probe, every group size moec stores); a CPU without its integer kernel fails this."""
    generator = torch.Generator().manual_seed(0)
    try:
        for group in (32, 64, 128):
            matrix = quantize_matrix(torch.randn(48, 256, generator=generator), 4, group)
            x = torch.randn(3, 256, generator=generator)
            got = single_matmul_session(matrix, int8_activations=True).run(None, {"x": x.numpy()})[0]
            want = (int8_block_rounded(x, group).double() @ matrix.dequantize().double().T).numpy()
            if np.abs(got - want).max() > 1e-5 * np.abs(want).max():
                return False
    except (RuntimeError, onnxruntime.capi.onnxruntime_pybind11_state.Fail):
        return False
    return True
