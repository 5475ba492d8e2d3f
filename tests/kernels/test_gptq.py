"""GPTQ-style quantization lowers a linear's output error against round-to-nearest."""

from __future__ import annotations

import torch

from moec.kernels.gptq import gptq_quantize
from moec.kernels.quant import quantize_matrix


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(64, 64, generator=generator)
    inputs = torch.randn(512, 64, generator=generator) @ mixing  # correlated features, as real activations
    w = torch.randn(32, 64, generator=generator)
    reference = inputs @ w.T
    for bits in (2, 3, 4):
        rtn = (inputs @ quantize_matrix(w, bits, 32).dequantize().T - reference).pow(2).mean()
        gptq_matrix = gptq_quantize(w, inputs, bits, 32)
        gptq = (inputs @ gptq_matrix.dequantize().T - reference).pow(2).mean()
        assert gptq < 0.8 * rtn, (bits, float(gptq), float(rtn))
        assert int(gptq_matrix.codes().max()) < (1 << bits)
