"""Routing facts proved from the producing ops: weights >= 0 and distinct experts per token."""

from __future__ import annotations

import pytest

from moec.ir import parse_graph, verify
from moec.ir.ops import ExpertsOp
from moec.ir.routing_facts import has_distinct_choices, is_nonnegative

# A GPT-OSS-style router written in ATen ops (linear with bias, top-k, softmax over the chosen logits);
# ROUTING is replaced by each case's weight computation from %2 (values) / %3 (indices).
MODEL_ROUTER = """\
graph @main(%x: f32[s0, 8], %ids: i64[s0]) {
  weight @router.weight: f32[4, 8]
  weight @router.bias: f32[4]
  weight @table: i64[16, 2]
  weight @w_in: f32[4, 32, 8]
  weight @w_out: f32[4, 8, 16]
  %1 = aten.linear.default(%x, @router.weight, @router.bias) : f32[s0, 4]
  %2, %3 = aten.topk.default(%1, 2) : f32[s0, 2], i64[s0, 2]
ROUTING
  %9 = moe.experts(%x, INDICES, %8, w_in=@w_in, w_out=@w_out, num_experts=4, hidden=8, intermediate=16, \
act="silu", gated=true) : f32[s0, 8]
  return %9
}
"""


def routed_experts(routing: str, indices: str = "%3") -> ExpertsOp:
    graph = parse_graph(MODEL_ROUTER.replace("ROUTING", routing.strip("\n")).replace("INDICES", indices))
    verify(graph)
    (experts,) = graph.ops_of(ExpertsOp)
    return experts


@pytest.mark.parametrize("routing, nonnegative", [
    ("  %8 = aten.softmax.int(%2, 1, torch.float32) : f32[s0, 2]", True),  # GPT-OSS
    ("""  %4 = aten.softplus.default(%2) : f32[s0, 2]
  %5 = aten.sqrt.default(%4) : f32[s0, 2]
  %6 = aten.sum.dim_IntList(%5, [-1], true) : f32[s0, 1]
  %7 = aten.add.Tensor(%6, 1e-20) : f32[s0, 1]
  %10 = aten.div.Tensor(%5, %7) : f32[s0, 2]
  %8 = aten.mul.Tensor(%10, 1.5) : f32[s0, 2]""", True),  # DeepSeek-V4: sqrt(softplus), renormalized, scaled
    ("  %8 = aten.mul.Tensor(%2, 1.0) : f32[s0, 2]", False),  # raw logits may be negative
    ("  %8 = aten.softplus.default(%2, -1.0) : f32[s0, 2]", False),  # softplus with beta < 0 is <= 0
    ("""  %4 = aten.sigmoid.default(%2) : f32[s0, 2]
  %8 = aten.mul.Tensor(%4, -2.0) : f32[s0, 2]""", False),  # a negative scale
    ("""  %4 = aten.sigmoid.default(%2) : f32[s0, 2]
  %8 = aten.add.Tensor(%4, %4, alpha=-1) : f32[s0, 2]""", False),  # a subtraction in disguise
])
def test_weights_are_nonnegative_only_when_every_step_keeps_them_so(routing, nonnegative):
    experts = routed_experts(routing)
    assert is_nonnegative(experts.operands[2]) is nonnegative


@pytest.mark.parametrize("routing, indices, distinct", [
    ("", "%3", True),  # top-k indices
    ("  %5 = aten.view.default(%3, [-1, 2]) : i64[s0, 2]", "%5", True),  # reshaped rows
    ("  %5 = aten.index.Tensor(@table, [%ids]) : i64[s0, 2]", "%5", False),  # a per-token table may repeat
    ("  %5 = aten.clamp.default(%3, 0, 2) : i64[s0, 2]", "%5", False),  # clamping may merge two choices
])
def test_choices_are_distinct_only_when_they_come_from_a_top_k(routing, indices, distinct):
    experts = routed_experts(routing + "\n  %8 = aten.softmax.int(%2, 1, torch.float32) : f32[s0, 2]", indices)
    assert has_distinct_choices(experts.operands[1]) is distinct
