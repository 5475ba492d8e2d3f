"""A graph run as one generated Python function: results, observation, early frees, tracebacks."""

from __future__ import annotations

import gc
import traceback
import weakref

import pytest
import torch

from moec.backend.graph_function import Callee, GraphFunction
from moec.backend.torch_runner import TorchRunner
from moec.ir import parse_graph, verify
from moec.ir.program import Program
from tests.ir.test_text_roundtrip import SMALL_MOE

CHAIN = """\
graph @main(%x: f32[4, 8]) {
  weight @w: f32[8, 8]
  %0 = aten.mm.default(%x, @w) : f32[4, 8]
  %1 = aten.relu.default(%0) : f32[4, 8]
  %2 = aten.view.default(%1, [2, 16]) : f32[2, 16]
  %3, %4 = aten.unbind.int(%2, 0) : f32[16], f32[16]
  %5 = aten.add.Tensor(%3, %4) : f32[16]
  return %5
}
"""


def chain_program() -> tuple[Program, torch.Tensor]:
    graph = parse_graph(CHAIN)
    verify(graph)
    weights = {"w": torch.randn(8, 8, generator=torch.Generator().manual_seed(0))}
    return Program(graph, weights, "", ""), torch.randn(4, 8)


def expected(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    rows = torch.relu(x @ w).view(2, 16)
    return rows[0] + rows[1]


def test_the_generated_function_computes_the_graph_and_reads_weights_when_it_runs():
    program, x = chain_program()
    runner = TorchRunner(program)
    torch.testing.assert_close(runner.run([x])[0], expected(x, program.weights["w"]), rtol=0, atol=1e-6)
    program.weights["w"] = torch.eye(8)  # a pass trying a weight out replaces it in the dict
    torch.testing.assert_close(runner.run([x])[0], expected(x, torch.eye(8)), rtol=0, atol=1e-6)


def test_an_observer_sees_every_op_in_order_with_its_arguments_and_result():
    program, x = chain_program()
    runner = TorchRunner(program)
    seen = []
    out = runner.run([x], observe=lambda op, args, result: seen.append((op, args, result)))[0]
    assert [op for op, _, _ in seen] == program.graph.ops
    mm_op, mm_args, mm_result = seen[0]
    assert mm_args[0] is x and mm_args[1] is program.weights["w"]
    assert seen[1][1][0] is mm_result  # relu read what mm returned
    assert isinstance(seen[3][2], (list, tuple)) and len(seen[3][2]) == 2  # unbind's two results together
    assert seen[-1][2] is out


def test_a_value_is_freed_right_after_its_last_use():
    """``%0`` is read last by op 1: when op 2 runs nothing may hold it any more."""
    graph = parse_graph(CHAIN)
    alive_at_op_2: list[bool] = []
    first: list[weakref.ref] = []

    def make(x, w):
        out = x @ w
        first.append(weakref.ref(out))
        return out

    def view(t, shape):
        gc.collect()
        alive_at_op_2.append(first[0]() is not None)
        return t.view(shape)

    callees = [Callee(make, spread=True), Callee(torch.relu, spread=True), Callee(view, spread=True),
               Callee(torch.unbind, spread=True), Callee(torch.add, spread=True)]
    function = GraphFunction(graph, callees)
    w = torch.randn(8, 8)
    out = function({"w": w}, None, [torch.randn(4, 8)])[0]
    assert alive_at_op_2 == [False] and out.shape == (16,)
    assert "del v0" in function.source


def test_list_constants_are_built_once_and_literals_are_written_out():
    program, x = chain_program()
    shapes = []
    callees = TorchRunner(program).callees
    callees[2] = Callee(lambda t, shape: shapes.append(shape) or t.view(shape), spread=True)
    function = GraphFunction(program.graph, callees)
    function(program.weights, None, [x])
    function(program.weights, None, [x])
    assert shapes[0] == [2, 16] and shapes[0] is shapes[1]
    assert "unbind_int_" in function.source and ", 0)" in function.source  # the dim, written as a literal


def test_a_list_returned_for_one_result_is_read_as_its_item():
    graph = parse_graph("""\
graph @main(%x: f32[1, 8]) {
  %0 = aten.unbind.int(%x, 0) : f32[8]
  return %0
}
""")
    x = torch.randn(1, 8)
    out = TorchRunner(Program(graph, {}, "", "")).run([x])[0]
    assert isinstance(out, torch.Tensor) and torch.equal(out, x[0])


def test_a_failing_op_shows_its_generated_line_in_the_traceback():
    program, _ = chain_program()
    with pytest.raises(RuntimeError) as info:
        TorchRunner(program).run([torch.randn(4, 3)])  # mm of [4, 3] by [8, 8]
    text = "".join(traceback.format_exception(info.value))
    assert "<moec graph" in text and "mm_default_" in text


def test_rules_run_as_steps_with_their_argument_list():
    program_graph = parse_graph(SMALL_MOE)
    generator = torch.Generator().manual_seed(0)
    weights = {"gate.weight": torch.randn(4, 8, generator=generator),
               "experts.w_in": torch.randn(4, 32, 8, generator=generator) * 0.1,
               "experts.w_out": torch.randn(4, 8, 16, generator=generator) * 0.1}
    runner = TorchRunner(Program(program_graph, weights, "", ""))
    assert [callee.spread for callee in runner.callees] == [False, False, True]
    assert "moe_route_" in runner.python_source and "([in0])" in runner.python_source
    x = torch.randn(2, 3, 8, generator=generator)
    assert runner.run([x])[0].shape == (6, 8)
