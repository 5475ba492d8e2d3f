"""What the probes share, those of registered specs (``spec_checks``) and of Hugging Face modules
(``hf_blocks``): rows scaled to ``PROBE_PEAKS``, a random choice of experts, and how close a probed output
must come to moec's reference."""

from __future__ import annotations

from collections.abc import Callable

import torch


def random_choice(rows: int, num_experts: int, generator: torch.Generator,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A router's choice for a probe: ``rows`` x min(2, E) distinct random experts (int64) and their random
    float32 routing weights."""
    top_k = min(2, num_experts)
    indices = torch.rand(rows, num_experts, generator=generator).argsort(dim=-1)[:, :top_k]
    return indices.to(device), torch.rand(rows, top_k, generator=generator).to(device)


def probe_tolerance(dtype: torch.dtype) -> float:
    """How far a probed module's output may be from moec's reference, relative to its row's largest output:
    the rounding of float32 (and float64), 1e-4, else that of 16-bit floats, 2e-2."""
    return 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2


def row_errors(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Per row (the last dimension), the largest ``|actual - expected|`` relative to the row's largest output,
    of either (relative per row: their peaks differ). Float32, [rows], each at most 2."""
    actual, expected = (t.float().reshape(-1, t.shape[-1]) for t in (actual, expected))
    peak = torch.maximum(actual.abs().amax(dim=-1), expected.abs().amax(dim=-1)).clamp_min(1e-30)
    return (actual - expected).abs().amax(dim=-1) / peak


# The probes' rows are scaled so that their largest |pre-activation| takes each of these values in turn:
# from small to past the clamps some models put around their activation (GPT-OSS clamps at 7, DeepSeek-V4
# at 10), so that a clamp the modelled formula lacks shows as a difference. The largest stays small enough
# for float16's range after the gated product and the down projection.
PROBE_PEAKS = (0.1, 1.0, 10.0, 50.0)


def rows_reaching_probe_peaks(x: torch.Tensor, pre_activation: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``x`` with row i rescaled so that ``pre_activation``'s largest magnitude on it is about
    ``PROBE_PEAKS[i % len(PROBE_PEAKS)]`` (exactly so for a pre-activation without bias)."""
    peaks = pre_activation(x).float().abs().amax(dim=-1).clamp_min(1e-30)
    targets = torch.tensor(PROBE_PEAKS, device=x.device).repeat(len(x) // len(PROBE_PEAKS) + 1)[: len(x)]
    return (x.float() * (targets / peaks).unsqueeze(-1)).to(x.dtype)
