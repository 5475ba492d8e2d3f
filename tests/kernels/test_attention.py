"""The torch runner's attention: a captured causal mask runs as ``is_causal``, every other mask as given.

Tolerance: 1e-6 absolute between the two SDPA paths on unit-scale inputs (they sum the same products in
another order); 1e-4 against Hugging Face for whole models, the runner's parity bound.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moec
from moec.frontend.zoo import build_preset
from moec.kernels import attention
from moec.kernels.attention import causal_sdpa

SDPA = F.scaled_dot_product_attention  # the reference, kept before a test records the calls to it


@pytest.fixture
def causal_flags(monkeypatch):
    """The ``is_causal`` of every SDPA call the runner makes."""
    flags: list[bool] = []
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda *args, **kwargs: flags.append(kwargs.get("is_causal", False)) or SDPA(*args, **kwargs))
    return flags


def qkv(length: int, keys: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(length)
    keys = keys or length
    return (torch.randn(2, 4, length, 8, generator=generator), torch.randn(2, 4, keys, 8, generator=generator),
            torch.randn(2, 4, keys, 8, generator=generator))


def test_a_lower_triangle_mask_runs_as_is_causal_with_the_same_result(causal_flags):
    q, k, v = qkv(7)
    mask = torch.ones(7, 7, dtype=torch.bool).tril().expand(2, 1, 7, 7)
    got = causal_sdpa(q, k, v, mask, scale=0.3)
    assert causal_flags == [True]
    assert (got - SDPA(q, k, v, attn_mask=mask, scale=0.3)).abs().max() <= 1e-6


@pytest.mark.parametrize("case", ["padded", "float mask", "other keys", "bidirectional"])
def test_any_other_mask_runs_as_given(causal_flags, case):
    q, k, v = qkv(6, keys=5 if case == "other keys" else None)
    mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril().expand(2, 1, -1, -1).clone()
    if case == "padded":
        mask[1, :, :, 0] = False  # the second sequence's first token is padding
    elif case == "float mask":
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    elif case == "bidirectional":
        mask = torch.ones_like(mask)
    got = causal_sdpa(q, k, v, mask)
    assert causal_flags == [False]
    assert torch.equal(got, SDPA(q, k, v, attn_mask=mask))


def test_a_mask_is_read_once_per_tensor_and_again_after_a_write(causal_flags):
    q, k, v = qkv(5)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    causal_sdpa(q, k, v, mask)
    causal_sdpa(q, k, v, mask)  # the next layer, same mask: the cached answer
    mask[4, 0] = False  # written in place: checked again
    causal_sdpa(q, k, v, mask)
    assert causal_flags == [True, True, False]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_a_compiled_causal_lm_runs_unpadded_batches_as_is_causal(causal_flags, name):
    """Causal LMs without padding take the fast path, with padding the captured mask; an encoder's
    bidirectional mask never is causal. Each agrees with the model."""
    model, example = build_preset(name)
    compiled = moec.compile(model, example)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    for padded in (False, True):
        mask = torch.ones_like(ids)
        mask[1, :2] = 0 if padded else 1
        causal_flags.clear()
        got = compiled(input_ids=ids, attention_mask=mask)[0]
        assert causal_flags and set(causal_flags) == {name == "tiny-llama" and not padded}
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask)[0]
        assert (got - want).abs().max() <= 1e-4
