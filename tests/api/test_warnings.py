"""Warnings moec emits point at the user's line that called into moec, not at a line inside moec."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moec


def test_a_warning_from_compile_names_the_callers_file():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.warns(UserWarning, match="changed nothing") as record:
        moec.compile(model, (torch.randn(2, 3, 4),), recipe={"passes": [{"dynamic-skip": {}}]})
    (warning,) = [w for w in record if "changed nothing" in str(w.message)]
    assert warning.filename == __file__
