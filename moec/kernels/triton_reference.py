"""Plain-torch references for the stages of the Triton MoE kernels that have no counterpart in
:mod:`moec.kernels.reference` (the router and the whole experts op are checked against that module).

Shapes follow :mod:`moec.kernels.triton_ops`: pair ``p`` is token ``p // k``, slot ``p % k``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moec.frontend.blocks import ExpertsSpec
from moec.kernels.reference import activation, gated_activation


def align(indices: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_pairs int32 [padded_total], block_experts int32 [padded_total // block_m]).

    Pairs grouped by expert in ascending expert order, ascending pair id within an expert, each group padded
    with the sentinel ``num_pairs`` to a multiple of ``block_m``; experts with no pairs own no tiles.
    """
    flat = indices.reshape(-1)
    num_pairs = flat.numel()
    groups, experts = [], []
    for expert in range(num_experts):
        pairs = torch.nonzero(flat == expert).flatten().to(torch.int32)
        padded = -(-pairs.numel() // block_m) * block_m
        groups.append(F.pad(pairs, (0, padded - pairs.numel()), value=num_pairs))
        experts += [expert] * (padded // block_m)
    return torch.cat(groups), torch.tensor(experts, dtype=torch.int32)


def gate_up(x: torch.Tensor, indices: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None,
            spec: ExpertsSpec) -> torch.Tensor:
    """h [T*k, F]: pair p's ``act(gate) * up`` (gated) or ``act(up)`` for expert ``indices.flat[p]``, in float32."""
    top_k = indices.shape[-1]
    experts = indices.reshape(-1)
    rows = x.float().repeat_interleave(top_k, dim=0)  # [T*k, H], row p is token p // k
    hidden = torch.einsum("ph,pfh->pf", rows, w_in.float()[experts])
    if b_in is not None:
        hidden = hidden + b_in.float()[experts]
    if spec.gated:
        gate, up = hidden.chunk(2, dim=-1)
        return gated_activation(gate, up, spec)
    return activation(spec.act)(hidden)


def down(h: torch.Tensor, indices: torch.Tensor, routing: torch.Tensor, w_out: torch.Tensor,
         b_out: torch.Tensor | None) -> torch.Tensor:
    """y [T*k, H]: pair p's expert output ``w_out[e] @ h[p] + b_out[e]`` times its routing weight, in float32."""
    experts = indices.reshape(-1)
    y = torch.einsum("pf,phf->ph", h.float(), w_out.float()[experts])
    if b_out is not None:
        y = y + b_out.float()[experts]
    return y * routing.reshape(-1, 1).float()
