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
