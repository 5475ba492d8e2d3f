"""GPTQ-style error-compensating quantization of one matrix (Frantar et al., 2022), in plain torch.

Columns of ``w`` [R, C] are quantized left to right; each column's rounding error is spread over the
columns not yet quantized, weighted by the inverse Hessian ``H = 2 X^T X / N`` of the layer's inputs
``X`` [N, C], so the layer's output ``X @ w.T`` moves as little as possible. Group scales and zero points
are chosen (round-to-nearest style) when the first column of each group is reached, on the already
updated weights. The result is in moec's storage format (``moec.kernels.quant``).
"""

from __future__ import annotations

import torch

from moec.kernels.quant import QuantizedMatrix, affine_params, check_bits, pack_codes

BLOCK = 128  # columns per lazy-update batch
DAMPING = 0.01  # fraction of the mean Hessian diagonal added to it, for a stable Cholesky factor


def gptq_quantize(w: torch.Tensor, inputs: torch.Tensor, bits: int, group: int) -> QuantizedMatrix:
    """Quantize ``w`` [R, C] given calibration ``inputs`` [N, C] of the linear ``x @ w.T``."""
    check_bits(bits)
    work = w.float().clone()
    x = inputs.double()  # the Hessian and its factors in float64: inputs can be badly conditioned
    hessian = 2.0 * x.T @ x / max(1, x.shape[0])
    dead = hessian.diagonal() == 0  # inputs that never fire: their weights cannot matter
    hessian[dead, dead] = 1.0
    work[:, dead] = 0.0
    hessian += DAMPING * hessian.diagonal().mean() * torch.eye(hessian.shape[0], dtype=hessian.dtype)
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True).float()

    rows, columns = w.shape
    max_code = (1 << bits) - 1
    codes = torch.empty(rows, columns, dtype=torch.uint8)
    scales = torch.empty(rows, columns // group, dtype=torch.float16)
    zeros = torch.empty(rows, columns // group, dtype=torch.uint8)
    # Lazy batches: errors update the rest of a block column by column, and the columns after the block
    # once per block with one matmul. Every supported group size divides the block, so groups never straddle.
    for start in range(0, columns, BLOCK):
        stop = min(start + BLOCK, columns)
        block = work[:, start:stop].clone()
        block_errors = torch.zeros_like(block)
        block_inverse = inverse[start:stop, start:stop]
        for i in range(stop - start):
            c = start + i
            if c % group == 0:
                g = c // group
                scales[:, g : g + 1], zeros[:, g : g + 1] = affine_params(block[:, i : i + group].float(), bits, group)
                scale, zero = scales[:, g].to(work.dtype), zeros[:, g].to(work.dtype)
            q = torch.round(block[:, i] / scale + zero).clamp(0, max_code)
            codes[:, c] = q.to(torch.uint8)
            error = (block[:, i] - (q - zero) * scale) / block_inverse[i, i]
            block[:, i + 1 :] -= error.unsqueeze(1) * block_inverse[i, i + 1 :].unsqueeze(0)
            block_errors[:, i] = error
        work[:, stop:] -= block_errors @ inverse[start:stop, stop:]
    return QuantizedMatrix(pack_codes(codes, bits), scales, zeros, bits)
