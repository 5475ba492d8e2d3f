"""Quantized weights in an ONNX export: the file keeps them packed.

A quantized weight (``moec.ir.quant``: group-wise affine codes, LSB-first packing) reaches ONNX in one of
two ways, both as custom torch ops that torch.export keeps opaque and ``TRANSLATIONS`` turns into ONNX:

* ``matmul_nbits``: a 4-bit linear becomes one ``com.microsoft.MatMulNBits``, its operands laid out by
  ``moec.kernels.matmul_nbits`` (moec's byte order is onnxruntime's, so the packed codes are only
  reshaped). Dequantization is ``(q - zero) * scale`` as in moec; ``accuracy_level`` is left unset, so
  activations stay float32 and the export matches the dequantized model to float32 rounding.
* ``dequantize``: any width (2, 3, 4, 8 bits; experts may mix widths) is unpacked and dequantized with
  standard ops (Cast, Reshape, Mul, ReduceSum, Div, Mod, Sub), the same float32 arithmetic as
  ``moec.kernels.quant.dequantize_codes``, then used as a float weight (MatMul, or portable experts).
  ONNX's ``DequantizeLinear`` cannot read 2- or 3-bit codes and takes group-wise scales only from opset
  21 on, so the dequantization is written out; unpacking goes through int64 words (8 codes of ``b``
  bits fill ``b`` bytes) with Div and Mod, one formula for every width.

``keep_packed`` tells the exporter's constant folding to leave every node reading packed storage alone:
folding it would store the float weights in the file.
"""

from __future__ import annotations

import onnx_ir as ir
import torch
import torch.nn.functional as F
from onnxscript import opset18 as op

from moec.backend.onnx.moe import Translations, contrib_op
from moec.ir.quant import STORAGE_SUFFIXES, QuantizedType
from moec.kernels.matmul_nbits import matmul_nbits_operands as nbits_layout
from moec.kernels.quant import CODES_PER_CHUNK, QuantizedWeight, dequantize_codes, unpack_codes

MATMUL_NBITS_WIDTHS = (4,)  # widths exported as com.microsoft.MatMulNBits; the others are dequantized

MATMUL_NBITS = contrib_op(
    "MatMulNBits",
    inputs=[("A", "T"), ("B", "T1"), ("scales", "T"), ("zero_points", "T1")],
    attributes={"K": "int", "N": "int", "bits": "int", "block_size": "int"},
    types={"T": ["tensor(float)", "tensor(float16)"], "T1": ["tensor(uint8)"]},
)


# ----------------------------------------------------------------------------------------------
# the operands each path reads (buffers of the exported module, named after the stored tensors)
# ----------------------------------------------------------------------------------------------


def matmul_nbits_operands(weight: QuantizedWeight) -> dict[str, torch.Tensor]:
    """A 2-D 4-bit weight [N, K] in MatMulNBits' layout, keyed by storage suffix (``moec.kernels.matmul_nbits``)."""
    return nbits_layout(weight.matrix(0))


def uses_matmul_nbits(weight_type: QuantizedType) -> bool:
    return weight_type.rank == 2 and weight_type.bits[0] in MATMUL_NBITS_WIDTHS


# ----------------------------------------------------------------------------------------------
# torch ops: opaque to torch.export, eager bodies give their semantics
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("moec_onnx::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bits: int, group: int) -> torch.Tensor:
    """``x [..., K] @ W.T`` with W [N, K] in MatMulNBits' layout (``matmul_nbits_operands``)."""
    rows = packed.shape[0]
    codes = unpack_codes(packed.reshape(rows, -1), bits)
    zero_codes = unpack_codes(zeros, 4)[:, : scales.shape[1]]
    return F.linear(x, dequantize_codes(codes, scales, zero_codes).to(x.dtype))


@matmul_nbits.register_fake
def _(x, packed, scales, zeros, bits, group):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def matmul_nbits_onnx(x, packed, scales, zeros, bits: int, group: int):
    rows, blocks, blob = packed.shape
    return MATMUL_NBITS(x, packed, scales, zeros, K=blocks * blob * 8 // bits, N=rows, bits=bits, block_size=group)


@torch.library.custom_op("moec_onnx::dequantize", mutates_args=())
def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: list[int],
               group: int, shape: list[int]) -> torch.Tensor:
    """The float32 weight of logical ``shape`` from its stored tensors (``moec.ir.quant``)."""
    weight_type = QuantizedType("f32", tuple(shape), tuple(bits), group)
    return QuantizedWeight(weight_type, qweight, scales, zeros).dequantize()


@dequantize.register_fake
def _(qweight, scales, zeros, bits, group, shape):
    return qweight.new_empty(shape, dtype=torch.float32)


def dequantize_onnx(qweight, scales, zeros, bits: list[int], group: int, shape: list[int]):
    weight_type = QuantizedType("f32", tuple(shape), tuple(bits), group)
    rows, columns = weight_type.rows, weight_type.columns
    if len(set(bits)) == 1:  # one width: every matrix's rows in one unpack
        matrices = weight_type.num_matrices
        codes = unpack_onnx(qweight, bits[0], matrices * rows, columns)
    else:
        parts = []
        for index, width in enumerate(bits):
            start = weight_type.matrix_offset(index)
            part = op.Slice(qweight, ints([start]), ints([start + weight_type.matrix_bytes(index)]))
            parts.append(unpack_onnx(part, width, rows, columns))
        codes = op.Concat(*parts, axis=0)
    grouped = op.Reshape(codes, ints([*shape[:-1], columns // group, group]))
    # onnxscript types Cast's result as a union of every ONNX type (whatever ``to`` is), which no
    # constrained op input such as Unsqueeze's accepts.
    zero = op.Unsqueeze(op.Cast(zeros, to=ir.DataType.FLOAT), ints([-1]))  # type: ignore[type-var]
    scale = op.Unsqueeze(op.Cast(scales, to=ir.DataType.FLOAT), ints([-1]))  # type: ignore[type-var]
    return op.Reshape(op.Mul(op.Sub(grouped, zero), scale), ints(shape))


def unpack_onnx(packed, bits: int, rows: int, columns: int):
    """float32 codes [rows, columns] from ``rows`` packed rows (any shape holding them in order)."""
    if bits == 8:
        return op.Cast(op.Reshape(packed, ints([rows, columns])), to=ir.DataType.FLOAT)
    chunks = op.Cast(op.Reshape(packed, ints([rows, columns // CODES_PER_CHUNK, bits])), to=ir.DataType.INT64)
    words = op.ReduceSum(op.Mul(chunks, ints([256**i for i in range(bits)])), ints([-1]), keepdims=1)
    shifted = op.Div(words, ints([2 ** (i * bits) for i in range(CODES_PER_CHUNK)]))  # [rows, C/8, 8]
    codes = op.Mod(shifted, ints([2**bits]))
    return op.Cast(op.Reshape(codes, ints([rows, columns])), to=ir.DataType.FLOAT)


def ints(values: list[int]):
    return op.Constant(value_ints=values)


def keep_packed(node: ir.Node) -> bool | None:
    """Constant folding rule: never fold a node that reads packed storage (None: the default rules)."""
    for value in node.inputs:
        name = value.name if value is not None and value.is_initializer() else None
        if name is not None and name.rsplit(".", 1)[-1] in STORAGE_SUFFIXES:
            return False
    return None


TRANSLATIONS: Translations = {
    torch.ops.moec_onnx.matmul_nbits.default: matmul_nbits_onnx,
    torch.ops.moec_onnx.dequantize.default: dequantize_onnx,
}
