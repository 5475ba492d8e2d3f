"""moec's onnxruntime experts kernel against the plain reference, and how the torch runner picks among its kernels.

Tolerance: 1e-5 relative to the output's largest magnitude, float32 (onnxruntime's GEMMs block and sum in
another order than torch's).
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from moec.backend import torch_runner
from moec.backend.torch_runner import TorchRunner, expert_kernel_key
from moec.errors import BackendError
from moec.frontend.blocks import ACTIVATIONS, ExpertsSpec
from moec.frontend.capture import capture
from moec.frontend.zoo import build_preset
from moec.ir.ops import ExpertsOp
from moec.ir.quant import storage_names
from moec.kernels import reference
from moec.kernels.kernel_choice import KernelChoice
from moec.kernels.moe_cpu import onednn_available

pytest.importorskip("onnxruntime")
from moec.kernels.moe_onnxruntime import OnnxruntimeExperts  # noqa: E402

RTOL = 1e-5


def random_experts(act: str, gated: bool, bias: bool, generator: torch.Generator, experts: int = 5):
    spec = ExpertsSpec(num_experts=experts, hidden=16, intermediate=12, act=act, gated=gated, has_bias=bias)
    f_in = 2 * spec.intermediate if gated else spec.intermediate
    w_in = torch.randn(experts, f_in, spec.hidden, generator=generator)
    w_out = torch.randn(experts, spec.hidden, spec.intermediate, generator=generator)
    b_in = torch.randn(experts, f_in, generator=generator) if bias else None
    b_out = torch.randn(experts, spec.hidden, generator=generator) if bias else None
    return spec, w_in, w_out, b_in, b_out


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(act: str, gated: bool, bias: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    spec, w_in, w_out, b_in, b_out = random_experts(act, gated, bias, generator)
    kernel = OnnxruntimeExperts(w_in, w_out, b_in, b_out, spec)
    for tokens in (1, 3, 40):  # 1 and 3 tokens leave some experts without rows
        x = torch.randn(tokens, spec.hidden, generator=generator)
        weights, indices = torch.randn(tokens, spec.num_experts, generator=generator).softmax(-1).topk(2)
        want = reference.experts(x, indices, weights, w_in, w_out, b_in, b_out, spec)
        got = kernel(x, indices, weights)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert float((got - want).abs().max() / want.abs().max()) < RTOL, (act, gated, bias, tokens)


@pytest.mark.parametrize("act,limit,up_offset", [("silu", 2.0, 0.0), ("quick_gelu", 2.0, 1.0), ("silu", None, 1.0)])
def test_clamped_gating_matches_reference(act: str, limit: float | None, up_offset: float) -> None:
    """DeepSeek-V4's and GPT-OSS's gating; unit-normal weights on 16 inputs put many pre-activations past 2."""
    generator = torch.Generator().manual_seed(0)
    plain, w_in, w_out, b_in, b_out = random_experts(act, True, True, generator)
    spec = dataclasses.replace(plain, limit=limit, up_offset=up_offset)
    kernel = OnnxruntimeExperts(w_in, w_out, b_in, b_out, spec)
    x = torch.randn(40, spec.hidden, generator=generator)
    weights, indices = torch.randn(40, spec.num_experts, generator=generator).softmax(-1).topk(2)
    want = reference.experts(x, indices, weights, w_in, w_out, b_in, b_out, spec)
    assert float((want - reference.experts(x, indices, weights, w_in, w_out, b_in, b_out, plain)).abs().max()) > 1.0
    got = kernel(x, indices, weights)
    assert float((got - want).abs().max() / want.abs().max()) < RTOL


def test_weights_are_shared_not_copied() -> None:
    """onnxruntime reads the torch tensors' memory: the kernel holds views of the stacked weights."""
    generator = torch.Generator().manual_seed(1)
    spec, w_in, w_out, _, _ = random_experts("silu", True, False, generator)
    kernel = OnnxruntimeExperts(w_in, w_out, None, None, spec)
    assert kernel.shared["w_in0"].data_ptr() == w_in.data_ptr()
    assert kernel.shared["w_out2"].data_ptr() == w_out[2].data_ptr()


def test_runner_expert_kernels_agree_and_auto_runs_the_one_it_measured_fastest(monkeypatch) -> None:
    choice = KernelChoice()
    monkeypatch.setattr(torch_runner, "EXPERT_KERNEL_CHOICE", choice)
    calls = []
    run = OnnxruntimeExperts.__call__
    monkeypatch.setattr(OnnxruntimeExperts, "__call__", lambda self, *args: calls.append(1) or run(self, *args))
    model, example = build_preset("tiny-mixtral")
    program = capture(model, (), example)
    inputs = program.flatten_inputs((), example)
    want = TorchRunner(program, expert_kernel="torch").run(inputs)[0]
    for kernel in ("torch-blas", "torch-grouped", "onnxruntime", "auto"):
        got = TorchRunner(program, expert_kernel=kernel).run(inputs)[0]
        assert float((got - want).abs().max() / want.abs().max()) < RTOL, kernel
    # Both experts ops have one shape: one race of every kernel for this size, remembered.
    ((key, timings),) = choice.timings.items()
    assert set(timings) == {"torch", "torch-grouped", "onnxruntime"} | ({"torch-blas"} if onednn_available() else set())
    experts_ops = len(program.graph.ops_of(ExpertsOp))
    for winner, onnxruntime_calls in (("onnxruntime", experts_ops), ("torch", 0)):
        choice.chosen[key] = winner
        calls.clear()
        TorchRunner(program).run(inputs)
        assert len(calls) == onnxruntime_calls, f"auto runs the remembered winner, {winner}"
    one_token = {name: tensor[:1, :1] for name, tensor in example.items()}
    calls.clear()
    TorchRunner(program).run(program.flatten_inputs((), one_token))
    assert len(choice.timings) == 2, "another token count is measured on its own"
    assert not calls and "onnxruntime" not in choice.timings[expert_kernel_key(key[0], key[1], 1)], \
        "one token races the torch kernels only"


@pytest.mark.slow  # about 8 s
def test_runner_refuses_onnxruntime_for_bfloat16_and_unknown_kernels(monkeypatch) -> None:
    model, example = build_preset("tiny-mixtral")
    program = capture(model.to(torch.bfloat16), (), example)
    with pytest.raises(BackendError, match="float32 experts on the CPU only"):
        TorchRunner(program, expert_kernel="onnxruntime").run(program.flatten_inputs((), example))
    choice = KernelChoice()
    monkeypatch.setattr(torch_runner, "EXPERT_KERNEL_CHOICE", choice)
    assert TorchRunner(program).run(program.flatten_inputs((), example))[0].dtype == torch.bfloat16
    ((key, timings),) = choice.timings.items()  # auto races the torch kernels on bfloat16 experts too
    assert key[-1] == "bfloat16" and {"torch", "torch-grouped"} <= set(timings) and "onnxruntime" not in timings
    with pytest.raises(BackendError, match="expert_kernel='fast' is not one of"):
        TorchRunner(program, expert_kernel="fast")


def test_a_fixed_grouped_kernel_is_refused_for_experts_grouped_mm_does_not_take() -> None:
    spec = ExpertsSpec(4, 24, 7, act="silu", gated=True)  # rows of 7 floats: 28 bytes
    x, indices = torch.randn(3, 24), torch.tensor([[0, 1], [2, 3], [1, 2]])
    w_in, w_out = torch.randn(4, 14, 24), torch.randn(4, 24, 7)
    with pytest.raises(BackendError, match=r"expert_kernel='torch-grouped' cannot run this plan: .* float32 on cpu "
                                           r"\(hidden 24, intermediate 7\); use expert_kernel='torch'"):
        torch_runner.float_experts("torch-grouped", x, indices, torch.rand(3, 2), w_in, w_out, None, None, spec,
                                   lambda: pytest.fail("no onnxruntime session"))


@pytest.mark.parametrize("quantized", [False, True])
def test_runner_rebuilds_a_prepared_kernel_when_its_weights_are_replaced(quantized) -> None:
    """Passes try weights out on one runner (bit allocation rounds one unit at a time): a kernel prepared
    from the old weights (an onnxruntime session, repacked quantized experts) must not keep serving them."""
    from moec.passes import PassContext, build_passes, run_passes

    model, example = build_preset("tiny-mixtral")
    program = capture(model, (), example)
    if quantized:
        run_passes(program, build_passes({"passes": [{"quantize": {"bits": 4, "group": 32, "dense": False}}]}),
                   PassContext())
    inputs = program.flatten_inputs((), example)
    runner = TorchRunner(program)
    before = runner.run(inputs)[0]
    name = program.graph.ops_of(ExpertsOp)[0].kwargs["w_out"].name
    zeroed = storage_names(name)["scales"] if quantized else name  # the experts' output weights become zero
    original = {n: program.weights[n] for n in (storage_names(name).values() if quantized else [name])}
    for n, tensor in original.items():  # every storage tensor replaced by a new object
        program.weights[n] = torch.zeros_like(tensor) if n == zeroed else tensor.clone()
    changed = runner.run(inputs)[0]
    assert not torch.allclose(changed, before)
    torch.testing.assert_close(changed, TorchRunner(program).run(inputs)[0])
    program.weights.update(original)
    torch.testing.assert_close(runner.run(inputs)[0], before)


def test_auto_does_not_race_an_empty_call(monkeypatch) -> None:
    choice = KernelChoice()
    monkeypatch.setattr(torch_runner, "EXPERT_KERNEL_CHOICE", choice)
    spec, w_in, w_out, _, _ = random_experts("silu", True, False, torch.Generator().manual_seed(2))
    empty = torch.zeros(0, 2, dtype=torch.long)
    y = torch_runner.float_experts("auto", torch.zeros(0, spec.hidden), empty, empty.float(), w_in, w_out, None, None,
                                   spec, lambda: pytest.fail("an empty call builds no onnxruntime session"))
    assert y.shape == (0, spec.hidden) and not choice.chosen


def test_a_weight_changed_in_place_rebuilds_the_session_that_packed_it() -> None:
    """A compiled model's weights are the model's own tensors, so loading a checkpoint into the model changes
    them in place; the onnxruntime session packed its own copy when built, and must not keep serving it while
    the torch kernels see the new weights."""
    model, example = build_preset("tiny-mixtral")
    program = capture(model, (), example)
    runner = TorchRunner(program, expert_kernel="onnxruntime")
    inputs = program.flatten_inputs((), example)
    runner.run(inputs)  # builds the sessions
    with torch.no_grad():
        model.load_state_dict({name: value * 1.5 if "experts" in name else value
                               for name, value in model.state_dict().items()})
        expected = model(**example).logits
    torch.testing.assert_close(runner.run(inputs)[0], expected, rtol=1e-4, atol=1e-4)


def test_threads_share_one_session_build_and_each_thread_count_keeps_its_own(monkeypatch) -> None:
    """Server threads calling a fresh model together build each session once (each built its own, a packed copy
    of the experts apiece); calls alternating between torch thread counts rebuild nothing (they rebuilt the
    sessions on every switch)."""
    model, example = build_preset("tiny-mixtral")
    program = capture(model, (), example)
    inputs = program.flatten_inputs((), example)
    built: list[int] = []
    real = torch_runner.onnxruntime_experts

    def counted(*args, **kwargs):
        built.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch_runner, "onnxruntime_experts", counted)
    layers = len(program.graph.ops_of(ExpertsOp))
    runner = TorchRunner(program, expert_kernel="onnxruntime")
    together = threading.Barrier(4)

    def first_call(_: int) -> torch.Tensor:
        together.wait()
        return runner.run(inputs)[0]

    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(first_call, range(4)))
    assert len(built) == layers
    for output in outputs[1:]:
        torch.testing.assert_close(output, outputs[0], rtol=0, atol=0)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 1, 2):
            torch.set_num_threads(count)
            runner.run(inputs)
    finally:
        torch.set_num_threads(threads)
    assert len(built) == layers * len({threads, 1, 2})


@pytest.mark.parametrize("available_gib", [1, 7])
def test_auto_leaves_onnxruntime_out_where_its_packed_copy_would_crowd_memory(monkeypatch, available_gib) -> None:
    """The onnxruntime kernel keeps a packed copy of each layer's experts: a model near the machine's memory
    compiled, then was killed on its first prompt of two tokens or more. ``auto`` races it only where a fifth of
    the memory stays available (here the machine has 8 GiB and the memory it reports is patched)."""
    model, example = build_preset("tiny-mixtral")
    program = capture(model, (), example)
    choice = KernelChoice()
    monkeypatch.setattr(torch_runner, "EXPERT_KERNEL_CHOICE", choice)
    monkeypatch.setattr(torch_runner, "_warned_low_memory", False)
    monkeypatch.setattr(torch_runner, "available_memory", lambda: (available_gib * 2**30, 8 * 2**30))
    built: list[int] = []
    real = torch_runner.onnxruntime_experts
    monkeypatch.setattr(torch_runner, "onnxruntime_experts", lambda *args, **kwargs: built.append(1) or real(*args, **kwargs))
    runner = TorchRunner(program)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        output = runner.run(program.flatten_inputs((), example))[0]
    crowded = [w for w in caught if "leaving less than 20% of this machine's memory available" in str(w.message)]
    ((_, timings),) = choice.timings.items()  # the layers share one shape: one race, which onnxruntime joins or not
    assert ("onnxruntime" in timings, bool(built), len(crowded)) == ((False, False, 1) if available_gib == 1 else
                                                                     (True, True, 0))
    with torch.no_grad():
        torch.testing.assert_close(output, model(**example).logits, rtol=1e-4, atol=1e-4)
