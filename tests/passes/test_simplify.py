"""``simplify``: generic ops that return their input unchanged are removed, and each rule says why it did
not fire where it must not."""

from __future__ import annotations

import torch

import moec
from moec.frontend.zoo import build_preset
from moec.ir import parse_graph, print_graph, verify
from moec.ir.program import Program
from moec.passes import PassContext, run_passes
from moec.passes.dead_code import DeadCode
from moec.passes.simplify import Simplify, why_not

BEFORE = """\
graph @main(%x: f32[4, 8], %ids: i64[4]) {
  weight @w: f32[8, 8]
  %0 = aten.linear.default(%x, @w) : f32[4, 8]
  %1 = aten.clone.default(%0) : f32[4, 8]
  %2 = aten.slice.Tensor(%1, 0, 0, 9223372036854775807) : f32[4, 8]
  %3 = aten.mul.Tensor(%2, 1) : f32[4, 8]
  %4 = aten.add.Tensor(%ids, 0) : i64[4]
  %5 = aten.clone.default(%x) : f32[4, 8]
  %6 = aten.select.int(%3, 1, 0) : f32[4]
  %7 = aten.clone.default(%6) : f32[4]
  %8 = aten.unsqueeze.default(%7, 1) : f32[4, 1]
  %9 = aten.slice.Tensor(%3, 1, 0, 4) : f32[4, 4]
  %10 = aten.cat.default([%9, %9], 1) : f32[4, 8]
  %11 = aten.add.Tensor(%10, %5) : f32[4, 8]
  %12 = aten.sub.Tensor(%11, 0, alpha=2) : f32[4, 8]
  %13 = aten.mul.Tensor(%12, %8) : f32[4, 8]
  %14 = aten.transpose.int(%3, 0, 1) : f32[8, 4]
  %15 = aten.clone.default(%14) : f32[8, 4]
  %16 = aten.transpose.int(%15, 0, 1) : f32[4, 8]
  %17 = aten.add.Tensor(%13, %16) : f32[4, 8]
  %18 = aten.add.Tensor(%17, 0) : f32[4, 8]
  %19 = aten.mul.Tensor(%4, 1) : i64[4]
  return %18, %19
}
"""

AFTER = """\
graph @main(%x: f32[4, 8], %ids: i64[4]) {
  weight @w: f32[8, 8]
  %0 = aten.linear.default(%x, @w) : f32[4, 8]
  %1 = aten.clone.default(%x) : f32[4, 8]
  %2 = aten.select.int(%0, 1, 0) : f32[4]
  %3 = aten.clone.default(%2) : f32[4]
  %4 = aten.unsqueeze.default(%3, 1) : f32[4, 1]
  %5 = aten.slice.Tensor(%0, 1, 0, 4) : f32[4, 4]
  %6 = aten.cat.default([%5, %5], 1) : f32[4, 8]
  %7 = aten.add.Tensor(%6, %1) : f32[4, 8]
  %8 = aten.sub.Tensor(%7, 0, alpha=2) : f32[4, 8]
  %9 = aten.mul.Tensor(%8, %4) : f32[4, 8]
  %10 = aten.transpose.int(%0, 0, 1) : f32[8, 4]
  %11 = aten.transpose.int(%10, 0, 1) : f32[4, 8]
  %12 = aten.add.Tensor(%9, %11) : f32[4, 8]
  %13 = aten.add.Tensor(%12, 0) : f32[4, 8]
  %14 = aten.mul.Tensor(%ids, 1) : i64[4]
  return %13, %14
}
"""


def program() -> Program:
    graph = parse_graph(BEFORE)
    verify(graph)
    return Program(graph, {"w": torch.randn(8, 8)}, "", "")


def test_identity_ops_are_removed_and_the_rest_kept():
    prog = program()
    inputs = [torch.randn(4, 8), torch.arange(4)]
    want = moec.backend.torch_runner.TorchRunner(prog).run(inputs)
    records = run_passes(prog, [Simplify(), DeadCode()], PassContext())
    verify(prog.graph)
    assert print_graph(prog.graph) == AFTER
    assert records[0]["summary"] == {"ops_removed": 5, "removed_clone": 2, "removed_whole-slice": 1,
                                     "removed_mul-one": 1, "removed_add-zero": 1}
    got = moec.backend.torch_runner.TorchRunner(prog).run(inputs)
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a, b) and a.stride() == b.stride()


def test_each_kept_op_says_why():
    graph = parse_graph(BEFORE)
    outputs = {id(value) for value in graph.outputs}
    ops = graph.ops
    assert why_not(ops[5], outputs)["clone"] == \
        "its input is (a view of) a graph input or a weight, which the caller may change after the call"
    assert why_not(ops[7], outputs)["clone"] == \
        "its input comes from aten.select.int, which may return a view with gaps or overlaps"
    assert why_not(ops[9], outputs)["whole-slice"] == "it may end before the dimension does"
    assert why_not(ops[12], outputs)["add-zero"] == "it sets alpha"
    assert why_not(ops[18], outputs) == {"all": "its result is a graph output"}
    assert why_not(ops[0], outputs)["mul-one"] == "not aten.mul.Tensor or aten.div.Tensor"


def test_compile_simplifies_what_models_carry_and_keeps_parity():
    model, example = build_preset("tiny-gpt2")
    compiled = moec.compile(model, example)
    text = str(compiled.ir)
    assert "aten.clone.default" not in text and ", 0, 9223372036854775807)" not in text
    assert compiled.program.metadata["passes"][0]["pass"] == "simplify"
    ids = torch.randint(0, model.config.vocab_size, (3, 5))
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    got = compiled(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
