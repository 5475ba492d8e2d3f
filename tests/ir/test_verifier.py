"""The verifier names the op and the broken rule."""

from __future__ import annotations

import pytest

from moec.errors import VerifyError
from moec.ir import AtenOp, Graph, TensorType, WeightRef, parse_graph, verify
from tests.ir.test_text_roundtrip import SMALL_MOE


def broken(old: str, new: str):
    return parse_graph(SMALL_MOE.replace(old, new))


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("top_k=2", "top_k=5", r"'moe.route' \(op #0\): 'top_k' is 5; it must be in 1..4 \('num_experts'\)"),
        ("top_k=2", "top_k=2.0", r"'top_k' is 2.0; it must be an integer"),
        ("num_experts=4, top_k=2", "num_experts=0, top_k=2", r"'num_experts' is 0; it must be at least 1"),
        ("renormalize=true", "renormalize=1", r"'renormalize' is 1; it must be true or false"),
        ('scoring="softmax"', "scoring=2", r"'scoring' is 2; it must be a string"),
        ("gated=true)", 'gated=true, limit="7")', r"'limit' is \"7\"; it must be a number or none"),
        ('scoring="softmax"', 'scoring="tanh"', "'scoring' is \"tanh\"; it must be one of \"softmax\", \"sigmoid\""),
        ('act="silu"', 'act="swish2"', "'act' is \"swish2\"; it must be one of"),
        ("intermediate=16", "intermediate=12", r"weight 'w_in' \('@experts.w_in'\) has shape \[4, 32, 8\], expected \[4, 24, 8\]"),
        ("weight @experts.w_out: f32[4, 8, 16]\n", "", "weight '@experts.w_out' is not declared"),
        ("aten.view.default", "aten.no_such_op.default", "torch has no ATen op 'aten.no_such_op.default'"),
        ("gated=true)", "gated=true, colour=1)", "unknown attributes 'colour'"),
        ("num_experts=4, top_k=2", "top_k=2", "missing attributes 'num_experts'"),
        ("gated=true)", "gated=true, limit=-1.0)", "'limit' is -1.0; it must be a positive number"),
        ("gated=true)", "gated=false, up_offset=1.0)", "'limit' and 'up_offset' apply to gated experts and FFNs only"),
        ("w_out=@experts.w_out,", "w_out=@experts.w_out, b_out=@experts.w_in, weighted_input=true,",
         r"experts that take the routing weight on their input \('weighted_input'\) have no biases"),
    ],
)
def test_broken_rules_are_named(old, new, message):
    graph = broken(old, new)
    with pytest.raises(VerifyError, match=message):
        verify(graph)


def test_error_shows_the_ir_around_the_op():
    with pytest.raises(VerifyError) as info:
        verify(broken("top_k=2", "top_k=9"))
    assert "> " in str(info.value) and "moe.route(%x" in str(info.value)


def test_dominance_and_use_lists():
    graph = parse_graph(SMALL_MOE)
    route, experts, view = graph.ops
    graph.ops = [experts, route, view]  # experts now reads values defined after it
    with pytest.raises(VerifyError, match="operand #1 '%1' is used before it is defined"):
        verify(graph)
    graph = parse_graph(SMALL_MOE)
    graph.ops[1].operands[0].uses.clear()  # corrupt a use-list
    with pytest.raises(VerifyError, match="operand #0 '%x' is missing from its value's use-list"):
        verify(graph)


def relu_graph() -> tuple[Graph, AtenOp]:
    graph = Graph()
    x = graph.add_input("x", TensorType("f32", ("s0", 8)))
    relu = graph.append(AtenOp("aten.relu.default", (x,), {}, [x.type]))
    graph.set_outputs([relu.result])
    return graph, relu


def test_messages_quote_the_values_and_ops_they_cite():
    graph, relu = relu_graph()
    AtenOp("aten.neg.default", (relu.result,), {}, [relu.result.type])  # reads %0 but is not in the graph
    with pytest.raises(VerifyError, match="the use-list of '%0' names 'aten.neg.default' "
                                          r"\(an op outside the graph\), which does not read it as operand #0"):
        verify(graph)
    graph, relu = relu_graph()
    graph.add_input("x", TensorType("f32", (8,)))
    with pytest.raises(VerifyError, match="graph input '%x' is declared twice"):
        verify(graph)
    graph, relu = relu_graph()
    graph.add_input("bad name", TensorType("f32", (8,)))  # the text form could not print it back
    with pytest.raises(VerifyError, match="graph input '%bad name' is not an identifier"):
        verify(graph)
    graph, relu = relu_graph()
    graph.set_outputs([relu_graph()[1].result])  # a value of another graph
    with pytest.raises(VerifyError, match=r"graph output #0 \('%<undefined>'\) is not defined"):
        verify(graph)
    graph, relu = relu_graph()
    relu.set_args((graph.inputs[0], WeightRef("w")), {})
    with pytest.raises(VerifyError, match=r"^'aten.relu.default' \(op #0\): weight '@w' is not declared"):
        verify(graph)


def test_replace_all_uses_keeps_graph_valid():
    graph = parse_graph(SMALL_MOE)
    experts = graph.ops[1]
    relu = AtenOp("aten.relu.default", (graph.inputs[0],), {}, [graph.inputs[0].type])
    graph.insert_before(experts, relu)
    experts.results[0].replace_all_uses_with(relu.result)
    verify(graph)
    assert graph.ops[-1].operands[0] is relu.result and not experts.results[0].uses
    graph.erase(experts)
    verify(graph)
    assert TensorType("f32", ("s0", "s1", 8)) == relu.result.type


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("bits=[4, 3, 2, 8]", "bits=[4, 3, 5, 8]", r"weight '@experts.w_in': bit widths \[5\] are not supported"),
        ("bits=[4, 3, 2, 8]", "bits=[4, 3]", "'bits' has 2 entries, expected one per matrix"),
        ("bits=[4, 4, 4, 4], group=32", "bits=[4, 4, 4, 4], group=64", "group size 64 does not divide"),
        ("weight @gate.weight: f32[4, 64]", "weight @gate.weight: quant<f32[4, 64], bits=[4], group=32>",
         "'moe.route' .*quantized weight '@gate.weight' is passed as 'router', which cannot take one"),
    ],
)
def test_quantized_weight_rules(old, new, message):
    from tests.ir.test_text_roundtrip import QUANTIZED_MOE

    graph = parse_graph(QUANTIZED_MOE.replace(old, new))
    with pytest.raises(VerifyError, match=message):
        verify(graph)
