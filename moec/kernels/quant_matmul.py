"""Linears and routed experts on quantized weights, for the torch runner (CPU).

Three kernels compute ``y = x @ dequantize(W).T (+ b)`` for one quantized matrix ``W`` [N, K]:

* ``dequant``: unpack and dequantize this one matrix to float32, then an fp32 ``F.linear``. The reference:
  exact up to float32 matmul rounding, any width, any dtype; dequantized weights live for one call only.
* ``int4pack``: torch's packed 4-bit CPU GEMM (``aten._weight_int4pack_mm_for_cpu``) on bfloat16
  activations, for 2-, 3- and 4-bit matrices. The codes are repacked once, at load, into torch's tile layout
  (a 2- or 3-bit code, moved to the middle of the 4-bit range, is a 4-bit code, so narrower matrices take
  4 bits per weight in memory while the plan keeps their narrow packing) and the zero point folded into a
  float offset: ``(q - z) * s == (q - 8) * s + (8 - z) * s`` for 4 bits. Not exact: its scales and offsets are
  rounded to bfloat16, so it departs from ``dequant`` (on bfloat16-rounded inputs) by about 0.3-0.6% of the
  output's largest value. Matrices with rows in whole tiles of 16 only.
* ``onnxruntime``: onnxruntime's MatMulNBits on int8 activations, for 2-, 3- and 4-bit CPU matrices
  (``moec.kernels.matmul_nbits``). Exact to its reference, ``dequant`` on ``int8_block_rounded`` inputs.

For a single linear, ``auto`` picks ``int4pack`` for CPU matrices of at most 4 bits whose rows come in whole
tiles of 16, when a probe on a small problem agrees with ``dequant``, and ``dequant`` otherwise (8 bits, other
row counts, weights on another device such as a GPU, or where the probe fails; ``auto_kernel``). Calls of 16 rows or more are timed instead, since which kernel
is faster depends on the host and the size: the torch runner races ``int4pack``, MatMulNBits and ``dequant``
for each dense linear (``moec.backend.torch_runner.quantized_linear``; on many rows the float32 GEMM after
dequantizing wins), and ``QuantizedExperts`` (on ``int4pack``) against ``OnnxruntimeExperts`` (on
MatMulNBits) for routed experts (``moec.backend.torch_runner.quantized_experts``). Measured side by side by
``tools/bench/quantize.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from moec.frontend.blocks import ExpertsSpec
from moec.kernels.quant import QuantizedMatrix, QuantizedWeight, quantize_matrix
from moec.kernels.reference import (
    activation,
    gated_activation,
    group_by_expert,
    weighted_outputs,
    weighted_rows,
)

KERNELS = ("auto", "dequant", "int4pack", "onnxruntime")
INT4_TILES = 1  # inner-k tiles of torch's CPU int4 layout (the CPU kernel ignores other values)
INT4_MAX_BITS = 4  # narrower codes fit the 4-bit tiles unchanged
INT4_ROW_MULTIPLE = 16  # torch's CPU int4 layout packs a matrix's rows (N) in tiles of 16

Linear = Callable[[torch.Tensor], torch.Tensor]


def dequant_linear(matrix: QuantizedMatrix, bias: torch.Tensor | None = None) -> Linear:
    def run(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, matrix.dequantize().to(x.dtype), None if bias is None else bias.to(x.dtype))

    return run


def int4pack_linear(matrix: QuantizedMatrix, bias: torch.Tensor | None = None) -> Linear:
    """The bfloat16 packed-int4 GEMM for a ``matrix`` [N, K] of at most 4 bits; ``x`` [M, K] of any float dtype."""
    if matrix.bits > INT4_MAX_BITS:
        raise ValueError(f"int4pack takes matrices of at most {INT4_MAX_BITS} bits, got {matrix.bits} bits; "
                         "use the dequant kernel")
    if matrix.rows % INT4_ROW_MULTIPLE:
        raise ValueError(f"int4pack takes matrices whose rows are a multiple of {INT4_ROW_MULTIPLE}, got "
                         f"{matrix.rows}; use the dequant kernel")
    # Narrower codes are shifted to the middle of the 4-bit range: q + c with c = 8 - 2**(bits-1), so that
    # (q - z) * s == (q + c - 8) * s + (2**(bits-1) - z) * s keeps both factors small and the bfloat16
    # rounding of the scale and the offset costs least.
    half_range = 1 << (matrix.bits - 1)
    codes = matrix.codes().to(torch.int32) + (8 - half_range)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INT4_TILES)
    scales = matrix.scales.float()
    offsets = (half_range - matrix.zeros.float()) * scales
    scales_and_zeros = torch.stack([scales, offsets], dim=-1).transpose(0, 1).contiguous().bfloat16()  # [K/g, N, 2]
    group = matrix.group

    def run(x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, group, scales_and_zeros)
        if bias is not None:
            y = y + bias.bfloat16()
        return y.to(x.dtype)

    return run


def onnxruntime_linear(matrix: QuantizedMatrix, bias: torch.Tensor | None = None,
                       int8_activations: bool = True) -> Linear:
    """onnxruntime's MatMulNBits on int8 (or float32) activations for a ``matrix`` [N, K] of at most 4 bits
    (``moec.kernels.matmul_nbits``); ``x`` [M, K] of any float dtype, computed in float32."""
    # Imported on first use: onnx and onnxruntime take about a second to import.
    from moec.kernels.matmul_nbits import single_matmul_session

    session = single_matmul_session(matrix, int8_activations, threads=torch.get_num_threads())

    def run(x: torch.Tensor) -> torch.Tensor:
        y = torch.from_numpy(session.run(None, {"x": x.float().contiguous().numpy()})[0])
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)

    return run


@functools.cache
def int4pack_available() -> bool:
    """Whether the packed-int4 CPU GEMM runs here and agrees with ``dequant`` on bfloat16-rounded inputs."""
    try:
        generator = torch.Generator().manual_seed(0)
        matrix = quantize_matrix(torch.randn(48, 128, generator=generator), 4, 32)
        x = torch.randn(3, 128, generator=generator).bfloat16().float()
        want = dequant_linear(matrix)(x)
        got = int4pack_linear(matrix)(x)
        return bool(((got - want).abs().max() / want.abs().max()) < 1e-2)
    except (RuntimeError, AttributeError):
        return False


def auto_kernel(bits: int, device: torch.device, rows: int = INT4_ROW_MULTIPLE) -> str:
    """The kernel ``auto`` picks for a matrix of ``bits`` and ``rows`` stored on ``device``: ``int4pack`` has CPU
    kernels only, for row counts in whole tiles."""
    if device.type == "cpu" and bits <= INT4_MAX_BITS and rows % INT4_ROW_MULTIPLE == 0 and int4pack_available():
        return "int4pack"
    return "dequant"


def prepare_linear(matrix: QuantizedMatrix, bias: torch.Tensor | None = None, kernel: str = "auto") -> Linear:
    """A function ``x [M, K] -> [M, N]`` computing the quantized linear with ``kernel`` (see the module docstring)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown quantized kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    if kernel == "auto":
        kernel = auto_kernel(matrix.bits, matrix.packed.device, matrix.rows)
    builders = {"int4pack": int4pack_linear, "onnxruntime": onnxruntime_linear, "dequant": dequant_linear}
    return builders[kernel](matrix, bias)


class QuantizedExperts:
    """Routed experts whose ``w_in``/``w_out`` may be quantized, prepared once; called like ``experts_forward``.

    Each expert's two linears are prepared as above (float weights are used as they are), so nothing
    dequantizes more than one expert matrix at a time. Semantics and shapes: ``moec.kernels.moe_cpu``.
    """

    def __init__(self, w_in: QuantizedWeight | torch.Tensor, w_out: QuantizedWeight | torch.Tensor,
                 b_in: torch.Tensor | None, b_out: torch.Tensor | None, spec: ExpertsSpec, kernel: str = "auto"):
        def linears(weight, bias) -> list[Linear]:
            out = []
            for e in range(spec.num_experts):
                b = None if bias is None else bias[e]
                if isinstance(weight, QuantizedWeight):
                    out.append(prepare_linear(weight.matrix(e), b, kernel))
                else:
                    out.append(functools.partial(F.linear, weight=weight[e], bias=b))
            return out

        self.spec = spec
        self.input_linears = linears(w_in, b_in)
        self.output_linears = linears(w_out, b_out)
        self.act = activation(spec.act)

    def __call__(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], indices/weights [T, k] -> [T, H]; a pair whose weight is exactly 0 is skipped."""
        groups = group_by_expert(indices, weights, self.spec.num_experts, drop_zero_weight=True)
        rows = x.index_select(0, groups.token_of)
        y = torch.zeros_like(x)
        for expert, pairs in groups.slices():
            weight = groups.weight[pairs]
            hidden = self.input_linears[expert](weighted_rows(rows[pairs], weight, self.spec))
            if self.spec.gated:
                gate, up = hidden.chunk(2, dim=-1)
                hidden = gated_activation(gate, up, self.spec)
            else:
                hidden = self.act(hidden)
            out = weighted_outputs(self.output_linears[expert](hidden).float(), weight, self.spec)
            y.index_add_(0, groups.token_of[pairs], out.to(y.dtype))
        return y
