"""Captured zoo programs, shared by the analysis tests (capture is the slow part)."""

from __future__ import annotations

import dataclasses
import functools

import pytest

from moec.frontend.capture import capture
from moec.frontend.zoo import build_preset


@functools.cache
def _captured(name: str):
    model, example = build_preset(name)
    return model, example, capture(model, (), example)


@pytest.fixture
def captured():
    """``captured(name) -> (model, example, program)``; the program has its own weights dict, so a test
    may replace weights, but must not edit the graph."""

    def get(name: str):
        model, example, program = _captured(name)
        return model, example, dataclasses.replace(program, weights=dict(program.weights))

    return get
