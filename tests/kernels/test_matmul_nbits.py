"""onnxruntime's MatMulNBits on int8 (and float32) activations (``moec.kernels.matmul_nbits``), as a quantized
linear and as quantized routed experts, and how the torch runner races it against ``int4pack``.

Tolerance: 1e-5 relative to the output's largest magnitude against the reference that rounds activations as
the kernel does (``int8_block_rounded``) and multiplies by the dequantized weights in float64; the kernel's
integer dot products are exact, so what is left is float32 rounding of scales and sums.
"""

from __future__ import annotations

import pytest
import torch

from moec.backend import torch_runner
from moec.backend.torch_runner import TorchRunner, expert_kernel_key, kernel_choice_lines
from moec.errors import BackendError
from moec.frontend.blocks import ExpertsSpec
from moec.frontend.capture import capture
from moec.frontend.zoo import build_preset
from moec.ir.ops import ExpertsOp
from moec.kernels import reference
from moec.kernels.kernel_choice import KernelChoice
from moec.kernels.quant import QuantizedWeight, quantize_matrix
from moec.kernels.quant_matmul import auto_kernel, prepare_linear

pytest.importorskip("onnxruntime")
from moec.kernels.matmul_nbits import int8_activations_available, int8_block_rounded  # noqa: E402
from moec.kernels.moe_onnxruntime import OnnxruntimeExperts  # noqa: E402

pytestmark = pytest.mark.skipif(not int8_activations_available(),
                                reason="onnxruntime's MatMulNBits does not compute on int8 activations here")
RTOL = 1e-5


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


def rounded_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group: int) -> torch.Tensor:
    y = int8_block_rounded(x, group).double() @ weight.double().T
    return y if bias is None else y + bias.double()


def test_int8_block_rounding_keeps_each_value_within_half_a_step() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 128, generator=generator) * torch.tensor([1e-3, 1.0, 50.0]).unsqueeze(-1)
    x[1, 32:64] = 0  # an all-zero block stays zero
    rounded = int8_block_rounded(x, 32)
    step = x.reshape(3, 4, 32).abs().amax(-1, keepdim=True) / 127
    error = (rounded - x).reshape(3, 4, 32).abs()
    assert bool((error <= step / 2 * (1 + 1e-6)).all())
    assert bool((rounded[1, 32:64] == 0).all())
    assert len(torch.unique(rounded[0, :32])) <= 255  # int8 levels, symmetric
    assert not torch.equal(rounded, x)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_linear_is_exact_on_int8_rounded_activations(bits: int, group: int) -> None:
    generator = torch.Generator().manual_seed(bits * group)
    matrix = quantize_matrix(torch.randn(96, 384, generator=generator), bits, group)
    bias = torch.randn(96, generator=generator)
    x = torch.randn(5, 384, generator=generator)
    got = prepare_linear(matrix, bias, "onnxruntime")(x)
    want = rounded_linear(x, matrix.dequantize(), bias, group)
    assert relative_error(got, want) < RTOL
    float_activations = x.double() @ matrix.dequantize().double().T + bias.double()
    assert relative_error(got, float_activations) > 10 * RTOL, "the activations really are rounded to int8"


def quantized_experts(generator: torch.Generator, widths: tuple[int, ...], group: int = 32, bias: bool = True):
    experts, hidden, ffn = len(widths), 64, 96
    spec = ExpertsSpec(num_experts=experts, hidden=hidden, intermediate=ffn, act="silu", gated=True, has_bias=bias)
    w_in = torch.randn(experts, 2 * ffn, hidden, generator=generator) * 0.1
    w_out = torch.randn(experts, hidden, ffn, generator=generator) * 0.1
    q_in = QuantizedWeight.from_matrices("f32", tuple(w_in.shape), [quantize_matrix(w_in[e], b, group) for e, b in enumerate(widths)])
    q_out = QuantizedWeight.from_matrices("f32", tuple(w_out.shape), [quantize_matrix(w_out[e], b, group) for e, b in enumerate(widths)])
    b_in = torch.randn(experts, 2 * ffn, generator=generator) if bias else None
    b_out = torch.randn(experts, hidden, generator=generator) if bias else None
    return spec, q_in, q_out, b_in, b_out


def rounded_experts(x, indices, weights, q_in, q_out, b_in, b_out, spec, group: int | None) -> torch.Tensor:
    """The experts block pair by pair in float64 on the dequantized weights, each linear on activations rounded
    to int8 in blocks of ``group`` (kept as they are for ``group=None``); zero-weight pairs skipped."""
    w_in, w_out = q_in.dequantize(), q_out.dequantize()

    def linear(h, w, b):
        y = (h.double() if group is None else int8_block_rounded(h, group).double()) @ w.double().T
        return y if b is None else y + b.double()

    y = torch.zeros(x.shape, dtype=torch.float64)
    for t, j in zip(*torch.nonzero(weights).T.tolist(), strict=True):
        e = int(indices[t, j])
        pre = linear(x[t:t + 1], w_in[e], None if b_in is None else b_in[e]).float()
        hidden = reference.gated_activation(*pre.chunk(2, dim=-1), spec)
        y[t] += float(weights[t, j]) * linear(hidden, w_out[e], None if b_out is None else b_out[e])[0]
    return y


@pytest.mark.parametrize("bias", [True, False])
def test_experts_of_mixed_widths_are_exact_on_int8_rounded_activations(bias: bool) -> None:
    generator = torch.Generator().manual_seed(1)
    spec, q_in, q_out, b_in, b_out = quantized_experts(generator, (2, 3, 4, 4, 2), bias=bias)
    x = torch.randn(9, spec.hidden, generator=generator)
    weights, indices = torch.softmax(torch.randn(9, spec.num_experts, generator=generator), -1).topk(2, dim=-1)
    weights[0, 1] = weights[4, 0] = 0.0  # pairs dropped by dynamic skipping cost nothing and add nothing
    kernel = OnnxruntimeExperts(q_in, q_out, b_in, b_out, spec, drop_zero_weight=True)
    got = kernel(x, indices, weights)
    assert relative_error(got, rounded_experts(x, indices, weights, q_in, q_out, b_in, b_out, spec, 32)) < RTOL


def test_experts_on_float_activations_are_exact_to_the_dequantized_weights() -> None:
    generator = torch.Generator().manual_seed(3)
    spec, q_in, q_out, b_in, b_out = quantized_experts(generator, (2, 3, 4, 4, 2))
    x = torch.randn(9, spec.hidden, generator=generator)
    weights, indices = torch.softmax(torch.randn(9, spec.num_experts, generator=generator), -1).topk(2, dim=-1)
    kernel = OnnxruntimeExperts(q_in, q_out, b_in, b_out, spec, drop_zero_weight=True, int8_activations=False)
    got = kernel(x, indices, weights)
    assert relative_error(got, rounded_experts(x, indices, weights, q_in, q_out, b_in, b_out, spec, None)) < RTOL
    rounded = rounded_experts(x, indices, weights, q_in, q_out, b_in, b_out, spec, 32)
    assert relative_error(got, rounded) > 10 * RTOL, "the activations really are kept float32"


def test_experts_refuse_matrices_wider_than_four_bits() -> None:
    spec, q_in, q_out, b_in, b_out = quantized_experts(torch.Generator().manual_seed(2), (4, 8))
    with pytest.raises(ValueError, match=r"at most 4 bits, got widths \[4, 8\]"):
        OnnxruntimeExperts(q_in, q_out, b_in, b_out, spec)


@pytest.fixture(scope="module")
def quantized_mixtral():
    from moec.passes import PassContext, build_passes, run_passes

    model, example = build_preset("tiny-mixtral")
    program = capture(model, (), example)
    run_passes(program, build_passes({"passes": [{"quantize": {"bits": 4, "group": 32}}]}), PassContext())
    return program, program.flatten_inputs((), example)


def test_runner_races_int4pack_against_onnxruntime_for_quantized_experts(monkeypatch, quantized_mixtral) -> None:
    choice = KernelChoice()
    monkeypatch.setattr(torch_runner, "EXPERT_KERNEL_CHOICE", choice)
    calls = []
    run = OnnxruntimeExperts.__call__
    monkeypatch.setattr(OnnxruntimeExperts, "__call__", lambda self, *args: calls.append(1) or run(self, *args))
    program, inputs = quantized_mixtral
    want = TorchRunner(program, quant_kernel="dequant").run(inputs)[0]
    # 4-bit weights on int8 activations (or bfloat16 ones for int4pack): the weights' rounding is the same,
    # what differs is the activations' (about 1e-2 relative on these random layers).
    for kernel in ("int4pack", "onnxruntime", "auto"):
        got = TorchRunner(program, quant_kernel=kernel).run(inputs)[0]
        assert relative_error(got, want) < 3e-2, kernel
    ((key, timings),) = choice.timings.items()
    assert key[-1] == "quantized" and set(timings) == {auto_kernel(4, torch.device("cpu")), "onnxruntime"}
    assert any(line.startswith(f"{key[0].num_experts} quantized experts") for line in kernel_choice_lines())
    experts_ops = len(program.graph.ops_of(ExpertsOp))
    for winner, onnxruntime_calls in (("onnxruntime", experts_ops), (auto_kernel(4, torch.device("cpu")), 0)):
        choice.chosen[key] = winner
        calls.clear()
        TorchRunner(program).run(inputs)
        assert len(calls) == onnxruntime_calls, f"auto runs the remembered winner, {winner}"
    assert expert_kernel_key(key[0], key[1], 1, "quantized") not in choice.chosen


def test_runner_keeps_onnxruntime_out_of_small_quantized_calls(monkeypatch) -> None:
    """Below ``QUANTIZED_ONNXRUNTIME_MIN_TOKENS`` tokens ``auto`` runs int4pack without a race and never builds
    the onnxruntime session (it wins only with the experts in cache there)."""
    from moec.passes import PassContext, build_passes, run_passes

    choice = KernelChoice()
    monkeypatch.setattr(torch_runner, "EXPERT_KERNEL_CHOICE", choice)
    built = []
    monkeypatch.setattr(torch_runner, "onnxruntime_experts", lambda *args, **kwargs: built.append(1))
    model, example = build_preset("tiny-mixtral")
    short = {name: tensor[:, :4] for name, tensor in example.items()}  # 2 x 4 = 8 tokens
    assert 8 < torch_runner.QUANTIZED_ONNXRUNTIME_MIN_TOKENS
    program = capture(model, (), short)
    run_passes(program, build_passes({"passes": [{"quantize": {"bits": 4, "group": 32}}]}), PassContext())
    inputs = program.flatten_inputs((), short)
    want = TorchRunner(program, quant_kernel=auto_kernel(4, torch.device("cpu"))).run(inputs)[0]
    torch.testing.assert_close(TorchRunner(program).run(inputs)[0], want, rtol=0, atol=0)
    assert not built and not choice.chosen


def test_runner_keeps_activations_float32_on_onnxruntime_for_large_calls(monkeypatch, quantized_mixtral) -> None:
    """From ``QUANTIZED_FLOAT_ACTIVATIONS_MIN_TOKENS`` tokens on MatMulNBits computes on float32 activations:
    the plan then matches the dequantized weights to float32 rounding, where smaller calls round to int8."""
    program, _ = quantized_mixtral
    model, example = build_preset("tiny-mixtral")
    for tokens, agrees in ((torch_runner.QUANTIZED_FLOAT_ACTIVATIONS_MIN_TOKENS, True),
                           (torch_runner.QUANTIZED_FLOAT_ACTIVATIONS_MIN_TOKENS - 1, False)):
        generator = torch.Generator().manual_seed(tokens)
        ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=generator)
        inputs = program.flatten_inputs((), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        want = TorchRunner(program, quant_kernel="dequant").run(inputs)[0]
        got = TorchRunner(program, quant_kernel="onnxruntime").run(inputs)[0]
        assert (relative_error(got, want) < RTOL) == agrees, tokens


@pytest.fixture(scope="module")
def quantized_llama():
    from moec.passes import PassContext, build_passes, run_passes

    model, example = build_preset("tiny-llama")
    program = capture(model, (), example)
    run_passes(program, build_passes({"passes": [{"quantize": {"bits": 4, "group": 32}}]}), PassContext())
    return model, program


def llama_inputs(model, program, tokens: int) -> list:
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    return program.flatten_inputs((), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def test_runner_races_the_kernels_of_quantized_dense_linears(monkeypatch, quantized_llama) -> None:
    """From ``QUANTIZED_ONNXRUNTIME_MIN_TOKENS`` rows each quantized dense linear runs the fastest of int4pack,
    MatMulNBits (on int8 or float32 activations) and dequant for its matrix and size; below, int4pack without a
    race."""
    choice = KernelChoice()
    monkeypatch.setattr(torch_runner, "LINEAR_KERNEL_CHOICE", choice)
    model, program = quantized_llama
    inputs = llama_inputs(model, program, torch_runner.QUANTIZED_ONNXRUNTIME_MIN_TOKENS)
    want = TorchRunner(program, quant_kernel="dequant").run(inputs)[0]
    assert relative_error(TorchRunner(program).run(inputs)[0], want) < 3e-2  # int8 or bfloat16 activations
    hidden, ffn = model.config.hidden_size, model.config.intermediate_size
    assert {key[:2] for key in choice.chosen} == {(ffn, hidden), (hidden, ffn)}  # up and gate share a key
    everything = {"dequant", "int4pack", "onnxruntime-float32", "onnxruntime-int8"}  # int8 only below 512 rows
    assert all(set(timings) == everything for timings in choice.timings.values())
    assert sum(line.startswith("quantized linear ") for line in kernel_choice_lines()) == 2
    for key in choice.chosen:
        choice.chosen[key] = "dequant"
    torch.testing.assert_close(TorchRunner(program).run(inputs)[0], want, rtol=0, atol=0)  # the remembered winner
    choice.chosen.clear()
    short = llama_inputs(model, program, 8)
    want = TorchRunner(program, quant_kernel=auto_kernel(4, torch.device("cpu"))).run(short)[0]
    torch.testing.assert_close(TorchRunner(program).run(short)[0], want, rtol=0, atol=0)
    assert not choice.chosen


def test_onnxruntime_linears_keep_activations_float32_for_large_calls(quantized_llama) -> None:
    model, program = quantized_llama
    for tokens, agrees in ((torch_runner.QUANTIZED_FLOAT_ACTIVATIONS_MIN_TOKENS, True),
                           (torch_runner.QUANTIZED_FLOAT_ACTIVATIONS_MIN_TOKENS - 1, False)):
        inputs = llama_inputs(model, program, tokens)
        want = TorchRunner(program, quant_kernel="dequant").run(inputs)[0]
        got = TorchRunner(program, quant_kernel="onnxruntime").run(inputs)[0]
        assert (relative_error(got, want) < RTOL) == agrees, tokens


def test_runner_refuses_onnxruntime_for_eight_bit_matrices_when_built() -> None:
    from moec.passes import PassContext, build_passes, run_passes

    model, example = build_preset("tiny-mixtral")
    program = capture(model, (), example)
    run_passes(program, build_passes({"passes": [{"quantize": {"bits": 8, "group": 32}}]}), PassContext())
    with pytest.raises(BackendError, match=r"quant_kernel='onnxruntime' runs CPU matrices of at most 4 bits, and "
                                           r"weight @\S+ has 8-bit matrices"):
        TorchRunner(program, quant_kernel="onnxruntime")
