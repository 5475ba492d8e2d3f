"""Quantized linears and experts of the torch runner (``moec.kernels.quant_matmul``) against ``dequant``."""

from __future__ import annotations

import pytest
import torch

from moec.backend.torch_runner import TorchRunner
from moec.errors import BackendError
from moec.frontend.blocks import ExpertsSpec
from moec.kernels.quant import QuantizedWeight, quantize_matrix
from moec.kernels.quant_matmul import (
    QuantizedExperts,
    auto_kernel,
    dequant_linear,
    int4pack_available,
    int4pack_linear,
    prepare_linear,
)
from tests.passes.moe_programs import SMALL_MOE, program_of, small_moe_weights

needs_int4pack = pytest.mark.skipif(not int4pack_available(), reason="torch's packed int4 CPU GEMM is not usable here")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@needs_int4pack
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [32, 64])
def test_int4pack_takes_every_width_up_to_four_bits(bits, group):
    generator = torch.Generator().manual_seed(bits * group)
    matrix = quantize_matrix(torch.randn(96, 256, generator=generator), bits, group)
    bias = torch.randn(96, generator=generator)
    x = torch.randn(5, 256, generator=generator).bfloat16().float()  # the kernel's inputs are bfloat16
    want = dequant_linear(matrix, bias)(x)
    got = int4pack_linear(matrix, bias)(x)
    # a bfloat16 result, bfloat16 scales and offsets (8 significant bits): measured 4e-3 to 5.4e-3
    assert relative_error(got, want) < 1e-2


@needs_int4pack
def test_auto_picks_int4pack_up_to_four_bits_and_dequant_above():
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=generator)
    x = torch.randn(3, 128, generator=generator)
    for bits in (2, 3, 4):
        matrix = quantize_matrix(w, bits, 32)
        assert torch.equal(prepare_linear(matrix)(x), int4pack_linear(matrix)(x))
    matrix = quantize_matrix(w, 8, 32)
    assert torch.equal(prepare_linear(matrix)(x), dequant_linear(matrix)(x))


def test_auto_picks_int4pack_on_the_cpu_only(monkeypatch):
    monkeypatch.setattr("moec.kernels.quant_matmul.int4pack_available", lambda: True)
    assert auto_kernel(4, torch.device("cpu")) == "int4pack"
    assert auto_kernel(8, torch.device("cpu")) == "dequant"
    assert auto_kernel(4, torch.device("cuda", 0)) == "dequant"  # torch has no GPU kernel for int4pack's CPU ops


def test_runner_refuses_an_unknown_quant_kernel_when_built():
    with pytest.raises(BackendError, match="quant_kernel='fast' is not one of auto, dequant, int4pack"):
        TorchRunner(program_of(SMALL_MOE, small_moe_weights()), quant_kernel="fast")


def test_runner_refuses_int4pack_for_eight_bit_matrices_when_built():
    """Asking for int4pack on a plan with an 8-bit expert is one error naming the weight, before any run."""
    text = (SMALL_MOE.replace("f32[s0, 8]", "f32[s0, 32]").replace("f32[4, 8]", "f32[4, 32]")
            .replace("f32[4, 32, 8]", "quant<f32[4, 32, 32], bits=[4, 4, 4, 8], group=32>")
            .replace("f32[4, 8, 16]", "f32[4, 32, 16]").replace("hidden=8", "hidden=32"))
    generator = torch.Generator().manual_seed(0)
    w_in = torch.randn(4, 32, 32, generator=generator)
    matrices = [quantize_matrix(w_in[e], bits, 32) for e, bits in enumerate((4, 4, 4, 8))]
    weights = {"gate": torch.randn(4, 32, generator=generator), "w_out": torch.randn(4, 32, 16, generator=generator),
               **QuantizedWeight.from_matrices("f32", (4, 32, 32), matrices).storage("w_in")}
    program = program_of(text, weights)
    with pytest.raises(BackendError, match=r"quant_kernel='int4pack' runs CPU matrices of at most 4 bits with rows in "
                                           r"multiples of 16, and weight @w_in has 8-bit matrices; use "
                                           r"quant_kernel='auto' .* or 'dequant'"):
        TorchRunner(program, quant_kernel="int4pack")
    x = torch.randn(5, 32, generator=generator)
    assert TorchRunner(program).run([x])[0].shape == (5, 32)  # auto runs the 8-bit expert on dequant


def test_int4pack_refuses_eight_bits_naming_the_kernel_to_use():
    with pytest.raises(ValueError, match="at most 4 bits, got 8 bits; use the dequant kernel"):
        int4pack_linear(quantize_matrix(torch.randn(8, 64), 8, 32))


def test_int4pack_needs_rows_in_whole_tiles_and_auto_runs_other_matrices_on_dequant():
    """torch's int4 CPU layout packs rows in tiles of 16: a matrix of 24 rows (a plan another tool wrote) is
    refused by int4pack by name, and ``auto`` runs it on dequant."""
    generator = torch.Generator().manual_seed(0)
    matrix = quantize_matrix(torch.randn(24, 64, generator=generator), 4, 32)
    with pytest.raises(ValueError, match="rows are a multiple of 16, got 24; use the dequant kernel"):
        int4pack_linear(matrix)
    x = torch.randn(3, 64, generator=generator)
    assert torch.equal(prepare_linear(matrix)(x), dequant_linear(matrix)(x))
    assert auto_kernel(4, torch.device("cpu"), 24) == "dequant"


@needs_int4pack
def test_experts_of_mixed_widths_agree_with_dequant():
    generator = torch.Generator().manual_seed(3)
    experts, hidden, ffn = 4, 64, 96
    spec = ExpertsSpec(num_experts=experts, hidden=hidden, intermediate=ffn, act="silu", gated=True)
    widths = (2, 3, 4, 8)
    w_in = torch.randn(experts, 2 * ffn, hidden, generator=generator) * 0.1
    w_out = torch.randn(experts, hidden, ffn, generator=generator) * 0.1
    q_in = QuantizedWeight.from_matrices("f32", tuple(w_in.shape), [quantize_matrix(w_in[e], b, 32) for e, b in enumerate(widths)])
    q_out = QuantizedWeight.from_matrices("f32", tuple(w_out.shape), [quantize_matrix(w_out[e], b, 32) for e, b in enumerate(widths)])
    x = torch.randn(12, hidden, generator=generator).bfloat16().float()
    weights, indices = torch.softmax(torch.randn(12, experts, generator=generator), -1).topk(2, dim=-1)
    want = QuantizedExperts(q_in, q_out, None, None, spec, "dequant")(x, indices, weights)
    got = QuantizedExperts(q_in, q_out, None, None, spec)(x, indices, weights)
    assert relative_error(got, want) < 2e-2

