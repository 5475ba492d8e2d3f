"""The torch runner checks what a model's own code hands its MoE ops before any kernel reads it."""

from __future__ import annotations

import pytest
import torch

from moec.backend.torch_runner import TorchRunner
from moec.errors import BackendError
from tests.passes.moe_programs import program_of, small_moe_weights


def test_expert_ids_outside_the_layer_are_one_error_naming_the_block():
    """An 'experts' block takes the model's own router's choice: an id outside 0..E-1 would make the one-token
    kernel read another expert silently (-1 is the last one) and the others fail inside torch or onnxruntime."""
    text = """\
graph @main(%x: f32[s0, 8], %ids: i64[s0, 2], %w: f32[s0, 2]) {
  weight @w_in: f32[4, 32, 8]
  weight @w_out: f32[4, 8, 16]
  %0 = moe.experts(%x, %ids, %w, w_in=@w_in, w_out=@w_out, num_experts=4, hidden=8, intermediate=16, act="silu", \
gated=true, block="moe") : f32[s0, 8]
  return %0
}
"""
    weights = small_moe_weights()
    runner = TorchRunner(program_of(text, {"w_in": weights["w_in"], "w_out": weights["w_out"]}))
    x, routing = torch.randn(1, 8), torch.full((1, 2), 0.5)
    assert runner.run([x, torch.tensor([[0, 3]]), routing])[0].shape == (1, 8)
    for bad in ([[0, -1]], [[4, 1]]):
        with pytest.raises(BackendError, match=r"MoE block 'moe' was handed expert ids .* outside 0\.\.3"):
            runner.run([x, torch.tensor(bad), routing])
