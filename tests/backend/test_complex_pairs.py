"""Every rule of ``moec.backend.onnx.complex_pairs`` against torch's own complex op, on pairs."""

from __future__ import annotations

import pytest
import torch

from moec.backend.onnx.complex_pairs import PAIR_RULES
from moec.ir.targets import resolve_target

generator = torch.Generator().manual_seed(0)
A = torch.randn(2, 3, 4, dtype=torch.complex64, generator=generator)
B = torch.randn(3, 4, dtype=torch.complex64, generator=generator)
REAL = torch.randn(3, 4, generator=generator)
ONE_WIDE = torch.randn(2, 1, 4, dtype=torch.complex64, generator=generator)

# target -> (arguments, complex values as they are), with torch computing the expected result
CASES = {
    "aten.polar.default": (REAL.abs(), REAL),
    "aten.view_as_complex.default": (torch.view_as_real(A),),
    "aten.view_as_real.default": (A,),
    "aten.mul.Tensor": (A, B),
    "aten.add.Tensor": (A, B),
    "aten.sub.Tensor": (A, B),
    "aten.slice.Tensor": (A, -1, 1, 3),
    "aten.unsqueeze.default": (A, -1),
    "aten.squeeze.dim": (ONE_WIDE, -2),
    "aten.select.int": (A, -2, 1),
    "aten.transpose.int": (A, 0, -1),
    "aten.permute.default": (A, [2, 0, 1]),
    "aten.view.default": (A, [6, 4]),
    "aten.reshape.default": (A, [2, 12]),
    "aten._unsafe_view.default": (A, [24]),
    "aten.expand.default": (B, [2, 3, 4]),
    "aten.cat.default": ([A, A], -1),
    "aten.clone.default": (A,),
    "aten.alias.default": (A,),
}


def as_pairs(value):
    if isinstance(value, list):
        return [as_pairs(item) for item in value]
    return torch.view_as_real(value) if isinstance(value, torch.Tensor) and value.is_complex() else value


def is_complex(value) -> bool:
    return any(map(is_complex, value)) if isinstance(value, list) else (
        isinstance(value, torch.Tensor) and value.is_complex())


def test_every_rule_has_a_case():
    assert set(CASES) == set(PAIR_RULES)


@pytest.mark.parametrize("target", list(CASES))
def test_rule_matches_torch_on_pairs(target):
    args = CASES[target]
    expected = resolve_target(target)(*args)
    got = PAIR_RULES[target]([as_pairs(arg) for arg in args], [is_complex(arg) for arg in args])
    torch.testing.assert_close(got, as_pairs(expected), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("operands", [(A, REAL), (REAL, A), (A, 0.5)], ids=["complex*real", "real*complex", "scalar"])
def test_products_with_real_operands(operands):
    got = PAIR_RULES["aten.mul.Tensor"]([as_pairs(arg) for arg in operands], [is_complex(arg) for arg in operands])
    torch.testing.assert_close(got, torch.view_as_real(operands[0] * operands[1]), rtol=1e-6, atol=1e-6)
