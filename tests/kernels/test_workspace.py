"""The experts kernels' kept scratch buffers: reuse, growth, one set per thread, and kernels that stay
exact when consecutive calls shrink and grow the buffers, in and out of inference mode.

Tolerance: 1e-5 relative to the output's largest magnitude, float32.
"""

from __future__ import annotations

import importlib.util
import threading

import pytest
import torch

from moec.frontend.blocks import ExpertsSpec
from moec.kernels import reference
from moec.kernels.moe_cpu import experts_forward
from moec.kernels.workspace import gathered_rows, release, scratch


def test_a_name_reuses_its_memory_and_grows_when_asked_for_more():
    release()
    first = scratch("rows", 4, 8, torch.float32)
    assert first.shape == (4, 8) and first.is_contiguous()
    smaller = scratch("rows", 2, 8, torch.float32)
    assert smaller.data_ptr() == first.data_ptr()
    other = scratch("other", 2, 8, torch.float32)
    assert other.data_ptr() != first.data_ptr()
    assert scratch("rows", 2, 8, torch.bfloat16).dtype == torch.bfloat16
    larger = scratch("rows", 16, 8, torch.float32)
    assert larger.shape == (16, 8) and scratch("rows", 4, 8, torch.float32).data_ptr() == larger.data_ptr()
    release()
    assert scratch("rows", 4, 8, torch.float32).data_ptr() != larger.data_ptr()


def test_gathered_rows_land_in_the_kept_buffer_unless_grad_is_needed():
    x, index = torch.randn(5, 3), torch.tensor([4, 0, 0, 2])
    rows = gathered_rows(x, index)
    assert torch.equal(rows, x[index])
    assert rows.data_ptr() == scratch("moe_rows", 4, 3, torch.float32).data_ptr()
    leaf = x.clone().requires_grad_()
    with_grad = gathered_rows(leaf, index)
    assert with_grad.requires_grad and with_grad.data_ptr() != rows.data_ptr()


def test_threads_get_their_own_buffers():
    pointers = []
    both_hold_one = threading.Barrier(2)  # a finished thread's buffers are freed: compare live ones

    def take():
        pointers.append(scratch("rows", 64, 64, torch.float32).data_ptr())
        both_hold_one.wait(timeout=30)

    threads = [threading.Thread(target=take) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(pointers)) == 2


def kernels(w_in, w_out, spec):
    """The CPU experts kernels that keep scratch buffers, by name."""
    found = {"torch": lambda x, i, w: experts_forward(x, i, w, w_in, w_out, None, None, spec)}
    if importlib.util.find_spec("onnxruntime"):
        from moec.kernels.moe_onnxruntime import OnnxruntimeExperts

        found["onnxruntime"] = OnnxruntimeExperts(w_in, w_out, None, None, spec)
    return found


@pytest.mark.parametrize("inference", [True, False])
def test_kernels_stay_exact_as_calls_shrink_and_grow_the_buffers(inference):
    generator = torch.Generator().manual_seed(0)
    spec = ExpertsSpec(num_experts=4, hidden=16, intermediate=8, act="silu", gated=True)
    w_in = torch.randn(4, 16, 16, generator=generator)
    w_out = torch.randn(4, 16, 8, generator=generator)
    for name, kernel in kernels(w_in, w_out, spec).items():
        for tokens in (50, 7, 50, 120, 3):
            x = torch.randn(tokens, 16, generator=generator)
            weights, indices = torch.randn(tokens, 4, generator=generator).softmax(-1).topk(2)
            want = reference.experts(x, indices, weights, w_in, w_out, None, None, spec)
            with torch.inference_mode(inference):
                got = kernel(x, indices, weights)
            assert float((got - want).abs().max() / want.abs().max()) < 1e-5, (name, tokens)
