"""Scaled dot-product attention for the torch runner: a captured mask that needs no mask runs without one.

Run eagerly on a batch without padding, Hugging Face's models call SDPA with no mask (``is_causal=True`` for
causal LMs), which skips the masked half of the work, or all of the masking. Traced for export they cannot look
at the padding, so the graph builds the boolean mask of causality and padding and hands it to SDPA on every
call. ``read_mask_sdpa`` runs the captured op and reads its mask first: a mask equal to the lower triangle
(no token padded) runs as ``is_causal=True``, a mask of all True (an encoder's, unpadded) as no mask, any other
mask as given. The read covers the whole mask, once per call of the model (the layers share one mask
tensor), and only on the CPU: under CUDA graphs a branch on a tensor's values would be recorded once and
replayed. (``moec.backend.causal_mask`` goes further: it leaves the mask's ops out once their inputs show what
the mask holds.)
"""

from __future__ import annotations

import weakref
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["MaskKind", "mask_kind", "read_mask_sdpa", "sdpa_as"]

MaskKind = Literal["causal", "unmasked"]  # a mask SDPA runs as is_causal=True, and one it runs as no mask

# (the mask last read, its version counter, its kind): the layers of one call pass the same tensor, so it is
# read once per call; the weak reference never mistakes a new tensor at a reused id for it. An inference
# tensor has no version counter (None): the graph's ops never write to a mask in place.
_last_read: tuple[weakref.ref, int | None, MaskKind | None] | None = None


def read_mask_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                   dropout_p: float = 0.0, is_causal: bool = False, *, scale: float | None = None,
                   enable_gqa: bool = False) -> torch.Tensor:
    """``aten.scaled_dot_product_attention`` (same arguments and result), with a boolean ``attn_mask`` that
    holds exactly the lower triangle (queries and keys the same tokens) replaced by ``is_causal=True`` and one
    of all True left out."""
    kind = mask_kind(attn_mask, query, key) if attn_mask is not None and not is_causal else None
    return sdpa_as(kind, query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)


def sdpa_as(kind: MaskKind | None, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False, *,
            scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """SDPA with its mask replaced as ``kind`` says (None: as given); ``attn_mask`` is not read."""
    if kind is not None:
        attn_mask, is_causal = None, kind == "causal"
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


def mask_kind(mask: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> MaskKind | None:
    """``"causal"`` for a boolean CPU mask [..., L, L] for L queries over the same L keys that allows each query
    exactly the keys up to its own position, ``"unmasked"`` for a boolean CPU mask of all True no larger
    than the attention scores [..., queries, keys], else None."""
    global _last_read
    if mask.dtype != torch.bool or mask.device.type != "cpu" or mask.dim() < 2:
        return None
    version = None if mask.is_inference() else mask._version
    last = _last_read
    if last is not None and last[0]() is mask and last[1] == version:
        return last[2]
    length = query.shape[-2]
    kind: MaskKind | None = None
    if key.shape[-2] == length and tuple(mask.shape[-2:]) == (length, length):
        if torch.equal(mask, torch.ones(length, length, dtype=torch.bool).tril_().expand(mask.shape)):
            kind = "causal"
    scores = (*query.shape[:-1], key.shape[-2])
    within_scores = mask.dim() <= len(scores) and all(
        size in (1, limit) for size, limit in zip(mask.shape, scores[len(scores) - mask.dim():], strict=True))
    if kind is None and within_scores and bool(mask.all()):
        kind = "unmasked"
    _last_read = (weakref.ref(mask), version, kind)
    return kind
