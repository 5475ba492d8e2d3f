"""Experts that take the routing weight on their input (Llama 4: ``sum_j expert_j(w_j * x)``) in every CPU
kernel, against the definition computed one (token, slot) at a time in float64.

Tolerance: 1e-5 relative to the output's largest magnitude, float32 (GEMMs block and sum in other orders).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moec.backend.onnx.moe import experts_portable
from moec.frontend.blocks import ExpertsSpec
from moec.kernels import reference
from moec.kernels.moe_cpu import experts_forward
from moec.kernels.moe_onnxruntime import OnnxruntimeExperts
from moec.kernels.quant_matmul import QuantizedExperts

RTOL = 1e-5
SPEC = ExpertsSpec(num_experts=6, hidden=16, intermediate=12, act="silu", gated=True, weighted_input=True)


def weights(generator: torch.Generator) -> tuple[torch.Tensor | None, ...]:
    w_in = torch.randn(SPEC.num_experts, 2 * SPEC.intermediate, SPEC.hidden, generator=generator)
    w_out = torch.randn(SPEC.num_experts, SPEC.hidden, SPEC.intermediate, generator=generator)
    return w_in, w_out, None, None  # such experts have no biases


def definition(x, indices, routing, w_in, w_out, *_) -> torch.Tensor:
    y = torch.zeros_like(x, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(indices.shape[1]):
            e = int(indices[t, j])
            g, u = (w_in[e].double() @ (float(routing[t, j]) * x[t].double())).chunk(2)
            y[t] += w_out[e].double() @ (F.silu(g) * u)
    return y


KERNELS = {
    "reference": lambda w: lambda x, i, r: reference.experts(x, i, r, *w, SPEC),
    "moe_cpu": lambda w: lambda x, i, r: experts_forward(x, i, r, *w, SPEC),
    "onnxruntime": lambda w: OnnxruntimeExperts(*w, SPEC),
    "quant_matmul (float weights)": lambda w: QuantizedExperts(*w, SPEC),
    "onnx portable": lambda w: lambda x, i, r: experts_portable(x, i, r, *w, SPEC),
}


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_every_kernel_weighs_the_input(kernel):
    generator = torch.Generator().manual_seed(0)
    w = weights(generator)
    run = KERNELS[kernel](w)
    for tokens in (1, 3, 40):  # one token takes moe_cpu's decode path
        x = torch.randn(tokens, SPEC.hidden, generator=generator)
        routing, indices = torch.randn(tokens, SPEC.num_experts, generator=generator).sigmoid().topk(2)
        want = definition(x, indices, routing, *w)
        got = run(x, indices, routing)
        assert got.dtype == torch.float32
        assert float((got.double() - want).abs().max() / want.abs().max()) < RTOL, (kernel, tokens)
        weighing_outputs = reference.experts(x, indices, routing, *w, dataclasses.replace(SPEC, weighted_input=False))
        assert float((weighing_outputs.double() - want).abs().max() / want.abs().max()) > 0.01  # the flag matters
