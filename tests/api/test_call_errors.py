"""A compiled model called with arguments that do not fit gets a TypeError listing the inputs it takes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moec


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x, mask, scale=None):
        return self.proj(x) * mask


X, MASK = torch.randn(2, 3, 4), torch.ones(2, 3, 4)


@pytest.fixture(scope="module", params=["positional", "keyword"])
def compiled(request):
    example = (X, MASK) if request.param == "positional" else {"x": X, "mask": MASK}
    model = Masked()
    return model, moec.compile(model, example)


@pytest.mark.parametrize(("args", "kwargs", "problem"), [
    ((X,), {}, "got 1 positional argument: missing mask"),
    ((X, MASK, MASK, MASK), {}, "got 4 positional arguments: more positional arguments than it takes; "
                                "'scale' given by position, which the example did not give"),
    ((X, MASK, MASK), {}, "got 3 positional arguments: 'scale' given by position, which the example did not give"),
    ((X,), {"mask": MASK, "extra": 1}, "got 1 positional argument and keywords mask, extra: unknown keyword argument 'extra'"),
    ((), {"x": X}, "got keyword x: missing mask"),
    ((X,), {"x": X}, "got 1 positional argument and keyword x: 'x' given twice (by position and by keyword); missing mask"),
    ((), {}, "got no arguments: missing x, mask"),
    (((X, X), MASK), {}, "'x' is a tuple of 2 where the example gave a single value"),
])
def test_a_call_that_does_not_fit_names_the_inputs_and_the_problem(compiled, args, kwargs, problem):
    with pytest.raises(TypeError) as info:
        compiled[1](*args, **kwargs)
    assert str(info.value) == f"the compiled model takes (x, mask); {problem}"


def test_calls_that_fit_run_by_position_or_keyword(compiled):
    model, compiled_model = compiled
    x, mask = torch.randn(3, 5, 4), torch.rand(3, 5, 4)
    with torch.no_grad():
        expected = model(x, mask)
    for out in [compiled_model(x, mask), compiled_model(x, mask=mask), compiled_model(mask=mask, x=x)]:
        torch.testing.assert_close(out, expected)


def test_none_where_the_example_gave_a_tensor_names_the_input(compiled):
    with pytest.raises(TypeError, match=r"^input 'mask' is None, but the compiled model takes a tensor f32\[.*\] "
                                        r"there, as the example gave; pass a tensor$"):
        compiled[1](X, mask=None)


def test_a_numpy_array_where_the_example_gave_a_tensor_says_how_to_make_one(compiled):
    with pytest.raises(TypeError, match=r"^input 'mask' is a numpy.ndarray, but the compiled model takes a tensor "
                                        r"f32\[.*\] there, as the example gave; pass a tensor \(torch.from_numpy "
                                        r"makes one of it\)$"):
        compiled[1](X, mask=MASK.numpy())


@pytest.fixture(scope="module")
def compiled_decoder(preset):
    model, example = preset("tiny-mixtral")
    return moec.compile(model, example), example


def test_ids_outside_the_vocabulary_are_named(compiled_decoder):
    compiled, example = compiled_decoder
    with pytest.raises(ValueError, match=r"^input 'input_ids' holds ids 5..200, outside its embedding table's 128 "
                                         r"rows \(ids 0..127\), and the compiled model fails on it \(IndexError: .*\); "
                                         r"call it with ids the model's vocabulary has$"):
        compiled(input_ids=torch.tensor([[5, 200]]), attention_mask=torch.ones(1, 2, dtype=torch.long))


@pytest.mark.parametrize(("rows", "tokens", "message"), [
    (2, 0, r"^input 'input_ids' \[2, 0\] is empty along axis 1, which the compiled model does not take \(the model's "
           r"code held .* when it was captured\); give it at least one along each axis$"),
    (0, 8, r"^input 'input_ids' \[0, 8\] is empty along axis 0, and the compiled model fails on it \(RuntimeError: "
           r".*\); call it with at least one along each axis$"),
])
def test_an_empty_input_is_named(compiled_decoder, rows, tokens, message):
    compiled, _ = compiled_decoder
    with pytest.raises(ValueError, match=message):
        compiled(input_ids=torch.zeros(rows, tokens, dtype=torch.long),
                 attention_mask=torch.ones(rows, tokens, dtype=torch.long))
