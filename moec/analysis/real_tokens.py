"""Which rows of a sample are real tokens: statistics and traces leave out the padding an ``attention_mask``
marks, so that padding a batch changes none of them."""

from __future__ import annotations

import torch

from moec.ir.program import Program


def token_mask_of(program: Program, inputs: list[torch.Tensor]) -> torch.Tensor | None:
    """The sample's real-token mask (its ``attention_mask`` input, flattened to bool), or None without one."""
    names = program.graph.input_names
    return inputs[names.index("attention_mask")].reshape(-1).bool() if "attention_mask" in names else None


def real_token_rows(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` as rows ``[N, H]``, without the padding positions when ``token_mask`` has one entry a row (a
    block that sees other token counts than the sample's keeps all its rows)."""
    rows = x.reshape(-1, x.shape[-1])
    if token_mask is not None and token_mask.numel() == rows.shape[0]:
        rows = rows[token_mask]
    return rows
