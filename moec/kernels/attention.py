"""Scaled dot-product attention for the torch runner: a captured causal mask runs as ``is_causal``.

Run eagerly on a batch without padding, Hugging Face's causal LMs call SDPA with ``is_causal=True`` and no
mask, which skips the masked half of the work. Traced for export they cannot look at the padding, so the
graph builds the boolean mask of causality and padding and hands it to SDPA on every call. ``causal_sdpa``
runs the captured op and checks its mask first: a mask equal to the lower triangle (no token padded) runs as
``is_causal=True``, any other mask as given. The check reads the whole mask, once per call of the model (the
layers share one mask tensor), and only on the CPU: under CUDA graphs a branch on a tensor's values would be
recorded once and replayed.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

__all__ = ["causal_sdpa"]

# (the mask last checked, its version counter, whether it was causal): the layers of one call pass the same
# tensor, so it is read once per call; the weak reference never mistakes a new tensor at a reused id for it.
# An inference tensor has no version counter (None): the graph's ops never write to a mask in place.
_last_checked: tuple[weakref.ref, int | None, bool] | None = None


def causal_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                dropout_p: float = 0.0, is_causal: bool = False, *, scale: float | None = None,
                enable_gqa: bool = False) -> torch.Tensor:
    """``aten.scaled_dot_product_attention`` (same arguments and result), with a boolean ``attn_mask`` that
    holds exactly the lower triangle (queries and keys the same tokens) replaced by ``is_causal=True``."""
    if attn_mask is not None and not is_causal and is_lower_triangle(attn_mask, query, key):
        attn_mask, is_causal = None, True
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


def is_lower_triangle(mask: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether ``mask`` is a boolean CPU mask [..., L, L] for L queries over the same L keys that allows each
    query exactly the keys up to its own position."""
    global _last_checked
    length = query.shape[-2]
    if (mask.dtype != torch.bool or mask.device.type != "cpu" or mask.dim() < 2 or key.shape[-2] != length
            or tuple(mask.shape[-2:]) != (length, length)):
        return False
    version = None if mask.is_inference() else mask._version
    last = _last_checked
    if last is not None and last[0]() is mask and last[1] == version:
        return last[2]
    lower = torch.ones(length, length, dtype=torch.bool).tril_()
    causal = torch.equal(mask, lower.expand(mask.shape))
    _last_checked = (weakref.ref(mask), version, causal)
    return causal
