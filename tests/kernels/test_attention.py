"""The torch runner's attention: a captured causal mask runs as ``is_causal``, an all-True one as no mask,
every other mask as given.

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
from moec.kernels.attention import read_mask_sdpa

SDPA = F.scaled_dot_product_attention  # the reference, kept before a test records the calls to it


@pytest.fixture
def sdpa_calls(monkeypatch):
    """``(is_causal, with a mask)`` of every SDPA call the runner makes."""
    calls: list[tuple[bool, bool]] = []

    def recorded(*args, **kwargs):
        calls.append((kwargs.get("is_causal", False), kwargs.get("attn_mask") is not None))
        return SDPA(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recorded)
    return calls


def qkv(length: int, keys: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(length)
    keys = keys or length
    return (torch.randn(2, 4, length, 8, generator=generator), torch.randn(2, 4, keys, 8, generator=generator),
            torch.randn(2, 4, keys, 8, generator=generator))


def test_a_lower_triangle_mask_runs_as_is_causal_with_the_same_result(sdpa_calls):
    q, k, v = qkv(7)
    mask = torch.ones(7, 7, dtype=torch.bool).tril().expand(2, 1, 7, 7)
    got = read_mask_sdpa(q, k, v, mask, scale=0.3)
    assert sdpa_calls == [(True, False)]
    assert (got - SDPA(q, k, v, attn_mask=mask, scale=0.3)).abs().max() <= 1e-6


@pytest.mark.parametrize("shape", [(2, 1, 7, 7), (1, 7), (2, 4, 7, 5)])
def test_an_all_true_mask_runs_as_no_mask_with_the_same_result(sdpa_calls, shape):
    q, k, v = qkv(7, keys=shape[-1])
    mask = torch.ones(shape, dtype=torch.bool)
    got = read_mask_sdpa(q, k, v, mask)
    assert sdpa_calls == [(False, False)]
    assert (got - SDPA(q, k, v, attn_mask=mask)).abs().max() <= 1e-6


@pytest.mark.parametrize("case", ["padded", "float mask", "other keys", "one key left out", "wider than the scores"])
def test_any_other_mask_runs_as_given(sdpa_calls, case):
    q, k, v = qkv(6, keys=5 if case == "other keys" else None)
    mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril().expand(2, 1, -1, -1).clone()
    if case == "padded":
        mask[1, :, :, 0] = False  # the second sequence's first token is padding
    elif case == "float mask":
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    elif case == "one key left out":
        mask = torch.ones_like(mask)
        mask[..., 3] = False
    elif case == "wider than the scores":  # all True, but it broadcasts the scores up: SDPA's error stays
        mask = torch.ones(3, 1, 6, 6, dtype=torch.bool)
    if case == "wider than the scores":
        with pytest.raises(RuntimeError):
            read_mask_sdpa(q, k, v, mask)
        assert sdpa_calls == [(False, True)]
        return
    got = read_mask_sdpa(q, k, v, mask)
    assert sdpa_calls == [(False, True)]
    assert torch.equal(got, SDPA(q, k, v, attn_mask=mask))


def test_a_mask_is_read_once_per_tensor_and_again_after_a_write(sdpa_calls):
    q, k, v = qkv(5)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    read_mask_sdpa(q, k, v, mask)
    read_mask_sdpa(q, k, v, mask)  # the next layer, same mask: the cached answer
    mask[4, 0] = False  # written in place: checked again
    read_mask_sdpa(q, k, v, mask)
    assert sdpa_calls == [(True, False), (True, False), (False, True)]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_a_compiled_model_runs_unpadded_batches_without_a_mask(sdpa_calls, name):
    """Without padding a causal LM runs as is_causal and an encoder with no mask; with padding each runs the
    captured mask. Each agrees with the model."""
    model, example = build_preset(name)
    compiled = moec.compile(model, example)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    for padded in (False, True):
        mask = torch.ones_like(ids)
        mask[1, :2] = 0 if padded else 1
        sdpa_calls.clear()
        got = compiled(input_ids=ids, attention_mask=mask)[0]
        assert sdpa_calls and set(sdpa_calls) == {(name == "tiny-llama" and not padded, padded)}
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask)[0]
        assert (got - want).abs().max() <= 1e-4
