"""The dequantizing grouped GEMMs: experts whose weights are packed 2/3/4/8-bit codes with float16 group scales
and uint8 zero points (moec's quantized weight format, version 1), against the reference experts run on the
weights those codes stand for. The packing here is written from the format's description, bit by bit, so
the kernels' bit extraction is checked against an independent reading of the format."""

from __future__ import annotations

import pytest
import torch

from moec.frontend.blocks import ExpertsSpec
from moec.ir.quant import QuantizedType
from moec.kernels import reference
from moec.kernels import triton_ops as ops
from moec.kernels.quant import QuantizedWeight


def pack_row(codes: list[int], bits: int) -> list[int]:
    """Code i occupies bits [i*bits, (i+1)*bits) of the row; bit j is bit j % 8 of byte j // 8."""
    out = [0] * (len(codes) * bits // 8)
    for i, code in enumerate(codes):
        for b in range(bits):
            if code >> b & 1:
                j = i * bits + b
                out[j // 8] |= 1 << (j % 8)
    return out


def random_quantized(num_experts: int, rows: int, cols: int, bits: tuple[int, ...], group: int, seed: int):
    """(QuantizedWeight, the float32 [E, R, C] it stands for)."""
    generator = torch.Generator().manual_seed(seed)
    packed, scales, zeros, dense = [], [], [], []
    for width in bits:
        codes = torch.randint(0, 2**width, (rows, cols), generator=generator)
        scale = (torch.rand(rows, cols // group, generator=generator) * 0.05 + 0.01).half()
        zero = torch.randint(0, 2**width, (rows, cols // group), generator=generator).to(torch.uint8)
        for row in codes.tolist():
            packed += pack_row(row, width)
        scales.append(scale)
        zeros.append(zero)
        widen = group  # each group's scale/zero covers `group` consecutive columns
        dense.append((codes.float() - zero.float().repeat_interleave(widen, 1)) * scale.float().repeat_interleave(widen, 1))
    qtype = QuantizedType("f32", (num_experts, rows, cols), bits, group)
    weight = QuantizedWeight(qtype, torch.tensor(packed, dtype=torch.uint8), torch.stack(scales), torch.stack(zeros))
    return weight, torch.stack(dense)


@pytest.mark.parametrize("w_in_bits,w_out_bits,top_k,dtype,tolerance,block_k", [
    # the common case, one width for all experts (whole-byte loads): 4-bit gate/up, 8-bit down; tiles
    # narrower than a group, as wide, and two groups wide (the down GEMM's 32 columns are then half a tile)
    ((4, 4, 4, 4), (8, 8, 8, 8), 2, torch.float32, 1e-4, 16),
    ((4, 4, 4, 4), (8, 8, 8, 8), 2, torch.float32, 1e-4, 32),
    ((4, 4, 4, 4), (8, 8, 8, 8), 2, torch.float32, 1e-4, 64),
    # a width per expert, every supported one (3-bit codes straddle bytes), bfloat16 activations
    ((4, 8, 2, 3), (3, 2, 8, 4), 1, torch.bfloat16, 3e-2, 32),
])
def test_quantized_experts_match_reference_on_dequantized_weights(w_in_bits, w_out_bits, top_k, dtype, tolerance,
                                                                  block_k, device):
    spec = ExpertsSpec(num_experts=4, hidden=64, intermediate=32, act="silu", gated=True)
    w_in, dense_in = random_quantized(4, 2 * spec.intermediate, spec.hidden, w_in_bits, group=32, seed=0)
    w_out, dense_out = random_quantized(4, spec.hidden, spec.intermediate, w_out_bits, group=32, seed=1)
    tokens = 21
    generator = torch.Generator().manual_seed(2)
    x = (torch.randn(tokens, spec.hidden, generator=generator) * 0.5).to(dtype)
    indices = torch.stack([torch.randperm(3, generator=generator)[:top_k] for _ in range(tokens)])  # expert 3 idle
    routing = torch.rand(tokens, top_k, generator=generator)
    tiles = ops.TileConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=block_k, GROUP_M=2)
    on_device = [QuantizedWeight(w.type, w.qweight.to(device), w.scales.to(device), w.zeros.to(device)) for w in (w_in, w_out)]
    got = ops.experts(x.to(device), indices.to(device), routing.to(device), *on_device, None, None, spec, tiles).cpu()
    expected = reference.experts(x, indices, routing, dense_in.to(dtype), dense_out.to(dtype), None, None, spec)
    scale = expected.float().abs().max().item()
    torch.testing.assert_close(got.float() / scale, expected.float() / scale, rtol=tolerance, atol=tolerance)
