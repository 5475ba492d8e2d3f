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


def test_calibration_no_pass_needs_is_left_unused_with_a_warning_naming_the_passes():
    model, x = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32)), torch.randn(2, 3, 32)
    with pytest.warns(UserWarning, match="calibration is not used") as record:
        compiled = moec.compile(model, (x,), recipe={"passes": [{"quantize": {"group": 32}}]}, calibration=[(x,)])
    (warning,) = [w for w in record if "calibration is not used" in str(w.message)]
    assert str(warning.message) == (
        "calibration is not used: no pass of the recipe needs calibration data with its options (its passes: "
        "quantize); quantize uses it only with method gptq; leave it out")
    assert warning.filename == __file__ and compiled.calibration is None


def test_calibration_for_passes_that_never_use_it_names_the_passes_that_would():
    from moec.passes import build_passes
    from moec.passes.base import unused_calibration

    assert unused_calibration(build_passes({"passes": ["quantize", "quantize"]})).endswith(
        "; quantize uses it only with method gptq"), "a pass given twice is named once"

    assert unused_calibration(build_passes({"passes": ["dead-code"]})) == (
        "no pass of the recipe needs calibration data (its passes: dead-code); only bit-allocation, dense-to-moe "
        "(with router fitted, method coactivation or shared above 0), dynamic-skip, expert-merge, expert-placement "
        "(with method cp-sat), expert-prune, quantize (with method gptq) use it")
