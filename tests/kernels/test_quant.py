"""Packing and group-wise quantization (the storage format of ``moec.ir.quant``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moec.ir.quant import QuantizedType
from moec.kernels.quant import (
    QuantizedWeight,
    affine_params,
    check_storage,
    pack_codes,
    quantize_matrix,
    unpack_codes,
)

BITS = st.sampled_from([2, 3, 4, 8])


@settings(max_examples=60, deadline=None)
@given(bits=BITS, rows=st.integers(1, 5), chunks=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(bits, rows, chunks, seed):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, 8 * chunks), generator=generator, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, 8 * chunks * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


def test_packing_order_is_an_lsb_first_bit_stream():
    # 4 bits: code 2i in the low nibble of byte i; 2 bits: codes in bits 0-1, 2-3, 4-5, 6-7.
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    assert pack_codes(codes, 4).tolist() == [[0x21, 0x43, 0x65, 0x87]]
    assert pack_codes(torch.tensor([[1, 2, 3, 0, 0, 0, 0, 3]], dtype=torch.uint8), 2).tolist() == [[0b00111001, 0b11000000]]
    # 3 bits: code 2 (value 0b111) straddles bytes 0 and 1: bits 6-7 of byte 0 and bit 0 of byte 1.
    three = pack_codes(torch.tensor([[0, 0, 7, 0, 0, 0, 0, 0]], dtype=torch.uint8), 3)
    assert three.tolist() == [[0b11000000, 0b00000001, 0]]


@settings(max_examples=40, deadline=None)
@given(bits=BITS, group=st.sampled_from([32, 64, 128]), seed=st.integers(0, 2**31 - 1))
def test_quantization_error_is_at_most_one_step(bits, group, seed):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 256, generator=generator) * 0.1
    matrix = quantize_matrix(w, bits, group)
    assert matrix.group == group
    step = matrix.scales.float().repeat_interleave(group, dim=-1)
    error = (matrix.dequantize() - w).abs()
    # Half a step from rounding, up to half a step more at a group's ends because the zero point is an integer.
    assert bool((error <= step + 1e-6).all())
    assert error.mean() <= step.mean() / 2


def test_zero_groups_dequantize_to_zero():
    w = torch.zeros(2, 64)
    w[1, 32:] = torch.linspace(-1, 1, 32)
    matrix = quantize_matrix(w, 3, 32)
    assert torch.equal(matrix.dequantize()[0], torch.zeros(64))


@pytest.mark.parametrize("std", [0.002, 0.0003])
def test_small_range_groups_keep_the_resolution_of_their_width(std):
    """8-bit groups whose step is below float16's normal range (2**-14) get subnormal scales, rounded up so
    the range fits: the error stays within 2% of what float32 scales give (a normal-range floor gave 1.6x
    and 11x here)."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * std
    grouped = w.reshape(64, -1, 64)
    exact_step = (grouped.amax(-1).clamp(min=0) - grouped.amin(-1).clamp(max=0)) / 255
    matrix = quantize_matrix(w, 8, 64)
    assert bool((matrix.scales.float() >= exact_step).all())
    error = (matrix.dequantize() - w).pow(2).mean().sqrt()
    assert error <= 1.02 * (exact_step / 12**0.5).pow(2).mean().sqrt()


def test_more_bits_give_smaller_error():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    errors = [(quantize_matrix(w, bits, 64).dequantize() - w).pow(2).mean().item() for bits in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)


def test_stacked_weight_storage_round_trip_with_per_expert_bits():
    generator = torch.Generator().manual_seed(1)
    w = torch.randn(3, 8, 64, generator=generator)
    matrices = [quantize_matrix(w[e], bits, 32) for e, bits in enumerate((2, 3, 8))]
    weight = QuantizedWeight.from_matrices("f32", (3, 8, 64), matrices)
    assert weight.type == QuantizedType("f32", (3, 8, 64), (2, 3, 8), 32)
    assert weight.qweight.shape == (8 * 64 * (2 + 3 + 8) // 8,)
    storage = weight.storage("experts.w_in")
    check_storage("experts.w_in", weight.type, storage)
    again = QuantizedWeight.from_storage("experts.w_in", weight.type, storage)
    for e in range(3):
        assert torch.equal(again.matrix(e).dequantize(), matrices[e].dequantize())
    assert weight.type.storage_bytes == sum(t.numel() * t.element_size() for t in storage.values())


@pytest.mark.parametrize(("bits", "group", "message"), [(5, 32, "bit width 5"), (4, 48, "group size 48"), (4, 128, "does not divide")])
def test_bad_widths_and_groups_are_one_error(bits, group, message):
    with pytest.raises(ValueError, match=message):
        affine_params(torch.randn(4, 96), bits, group)
