"""Programs compiled once per session and cloned per test (print -> parse keeps the graph, weights are shared)."""

from __future__ import annotations

import functools

import pytest

import moec
from moec.frontend.zoo import build_preset
from moec.ir import parse_graph, print_graph
from moec.ir.program import Program


@functools.cache
def _compiled(name: str):
    model, example = build_preset(name)
    return model, example, moec.compile(model, example).program


def clone(program: Program) -> Program:
    return Program(parse_graph(print_graph(program.graph)), dict(program.weights), program.in_spec, program.out_spec, {})


@pytest.fixture
def compiled_program():
    """``compiled_program(preset) -> (model, example_kwargs, fresh Program)``."""

    def get(name: str):
        model, example, program = _compiled(name)
        return model, example, clone(program)

    return get
