"""Dynamic expert skipping (online pruning), the math: which (token, slot) pairs are dropped.

A token's pair ``j`` is dropped when its routing weight is below ``threshold`` times the token's largest
routing weight. The top pair is never dropped (its ratio is 1 and thresholds are below 1); the kept
weights are not renormalized, so skipping only removes small terms of the combined sum.
"""

from __future__ import annotations

import torch


def skipped_pairs(weights: torch.Tensor, threshold: float) -> torch.Tensor:
    """A bool mask [..., k]: True where a pair is dropped. ``weights`` [..., k] are the routing weights."""
    top = weights.abs().amax(dim=-1, keepdim=True)
    return weights.abs() < threshold * top
