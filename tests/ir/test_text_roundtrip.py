"""print -> parse -> print is the identity, for hand-written and generated graphs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moec.errors import ParseError
from moec.frontend.blocks import ExpertsSpec, FFNSpec, RouteSpec
from moec.ir import (
    AtenOp,
    ExpertsOp,
    Graph,
    RouteOp,
    SharedExpertOp,
    TensorType,
    WeightRef,
    parse_graph,
    print_graph,
    verify,
)

SMALL_MOE = """\
graph @main(%x: f32[s0, s1, 8]) {
  weight @gate.weight: f32[4, 8]
  weight @experts.w_in: f32[4, 32, 8]
  weight @experts.w_out: f32[4, 8, 16]
  %0, %1 = moe.route(%x, router=@gate.weight, num_experts=4, top_k=2, scoring="softmax", order="score_then_topk", renormalize=true, renorm_eps=0.0, scaling=1.0, n_group=1, topk_group=1) : i64[s0, s1, 2], f32[s0, s1, 2]
  %2 = moe.experts(%x, %0, %1, w_in=@experts.w_in, w_out=@experts.w_out, num_experts=4, hidden=8, intermediate=16, act="silu", gated=true) : f32[s0, s1, 8]
  %3 = aten.view.default(%2, [-1, 8]) : f32[s0*s1, 8]
  return %3
}
"""


def test_hand_written_graph_round_trips_and_verifies():
    graph = parse_graph(SMALL_MOE)
    verify(graph)
    assert print_graph(graph) == SMALL_MOE
    route, experts, view = graph.ops
    assert isinstance(route, RouteOp) and route.spec.top_k == 2 and not route.spec.has_bias
    assert experts.operands[1] is route.results[0]
    assert [u.op for u in route.results[0].uses] == [experts]


def test_parse_errors_name_line_and_problem():
    broken = SMALL_MOE.replace("%0, %1 = moe.route(%x", "%0, %1 = moe.route(%y")
    with pytest.raises(ParseError, match=r"line 5.*%y is used before it is defined"):
        parse_graph(broken)
    line = next(i for i, text in enumerate(SMALL_MOE.splitlines(), 1) if "aten.view.default" in text)
    with pytest.raises(ParseError, match=rf"line {line}, column \d+: unknown op 'moe.nope'"):  # the op's own line
        parse_graph(SMALL_MOE.replace("aten.view.default", "moe.nope"))
    with pytest.raises(ParseError, match="unknown type 'f31'"):
        parse_graph(SMALL_MOE.replace("f32[s0*s1, 8]", "f31[4]"))


dims = st.one_of(st.integers(0, 64), st.sampled_from(["s0", "s1", "s0*s1", "Max(1,s0)", "s0-1", "2*s1"]))
dtypes = st.sampled_from(["f32", "bf16", "f16", "i64", "i32", "bool", "u8"])
tensor_types = st.builds(lambda d, shape: TensorType(d, tuple(shape)), dtypes, st.lists(dims, max_size=4))
constants = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(-(2**40), 2**40),
        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
        st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.strided, torch.contiguous_format,
                         torch.device("cpu"), torch.device("cuda", 1)]),
    ),
    lambda children: st.lists(children, max_size=3),
    max_leaves=6,
)
ATEN_TARGETS = ["aten.add.Tensor", "aten.view.default", "aten.linear.default", "aten.split.Tensor", "aten.sym_size.int"]


@st.composite
def graphs(draw):
    graph = Graph(draw(st.sampled_from(["main", "encoder"])))
    values = [graph.add_input(f"in{i}", draw(tensor_types)) for i in range(draw(st.integers(1, 3)))]
    for i in range(draw(st.integers(0, 3))):  # module keys may hold any character: ':', ' ', quotes, accents
        graph.weights[f"layers.{draw(st.text(min_size=1, max_size=6))}.{i}.w"] = draw(tensor_types)
    weights = [WeightRef(name) for name in graph.weights]
    operands = st.sampled_from(values) if values else st.nothing()
    for _ in range(draw(st.integers(0, 6))):
        args = draw(st.lists(st.one_of(operands, constants, st.sampled_from(weights) if weights else constants), max_size=4))
        kwargs = draw(st.dictionaries(st.sampled_from(["alpha", "dim", "dtype", "out_dtype"]), constants, max_size=2))
        results = draw(st.lists(st.one_of(tensor_types, st.just(TensorType("f32", ()))), max_size=3))
        op = graph.append(AtenOp(draw(st.sampled_from(ATEN_TARGETS)), tuple(args), kwargs, results))
        values.extend(op.results)
    graph.set_outputs(draw(st.lists(st.sampled_from(values), max_size=3)))
    return graph


@settings(max_examples=150, deadline=None)
@given(graphs())
def test_generated_graphs_round_trip(graph):
    text = print_graph(graph)
    parsed = parse_graph(text)
    assert print_graph(parsed) == text
    assert operands_of(parsed) == operands_of(graph)  # a lossy printer would still print its own text back


def operands_of(graph: Graph) -> list:
    """Each op's target, args and kwargs, values by their position in the graph and floats by ``repr`` (so
    that nan equals nan and -0.0 differs from 0.0), for comparing two graphs' constants exactly."""
    position = {id(value): index for index, value in enumerate([*graph.inputs, *(r for op in graph.ops
                                                                                   for r in op.results)])}

    def plain(item):
        if isinstance(item, (list, tuple)):
            return tuple(plain(x) for x in item)
        if isinstance(item, float):
            return ("float", repr(item))
        if isinstance(item, WeightRef):
            return ("weight", item.name)
        if id(item) in position:
            return ("value", position[id(item)])
        return item

    return [(op.target, plain(op.args), {key: plain(value) for key, value in op.kwargs.items()})
            for op in graph.ops]


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 8).flatmap(lambda e: st.tuples(st.just(e), st.integers(1, e))),
    st.sampled_from(["softmax", "sigmoid"]),
    st.booleans(),
    st.floats(0.1, 4.0),
    st.sampled_from(["silu", "gelu", "relu"]),
    st.booleans(),
    st.tuples(st.one_of(st.none(), st.floats(0.5, 20.0)), st.sampled_from([0.0, 1.0])),
    st.sets(st.sampled_from(["router_bias", "router_logit_bias"])),
    st.sampled_from(["top2_sum", "max"]),
    st.booleans(),
)
def test_moe_ops_round_trip_with_their_specs(experts_topk, scoring, renormalize, scaling, act, shared_gate, gating,
                                            router_biases, group_score, weighted_input):
    num_experts, top_k = experts_topk
    graph = Graph()
    x = graph.add_input("x", TensorType("f32", ("s0", 8)))
    graph.weights.update({
        "router": TensorType("f32", (num_experts, 8)),
        "w_in": TensorType("f32", (num_experts, 8, 8)),
        "w_out": TensorType("f32", (num_experts, 8, 4)),
        "up": TensorType("f32", (4, 8)), "down": TensorType("f32", (8, 4)), "gate": TensorType("f32", (1, 8)),
    } | {role: TensorType("f32", (num_experts,)) for role in router_biases})
    route_spec = RouteSpec(num_experts=num_experts, top_k=top_k, scoring=scoring, renormalize=renormalize, scaling=scaling,
                           group_score=group_score, has_bias="router_bias" in router_biases, has_logit_bias="router_logit_bias" in router_biases)
    route_weights = {"router": "router"} | {role: role for role in sorted(router_biases)}
    route = graph.append(RouteOp.build([x], route_weights, route_spec,
                                       [TensorType("i64", ("s0", top_k)), TensorType("f32", ("s0", top_k))]))
    limit, up_offset = gating  # clamped gating (GPT-OSS, DeepSeek-V4); written only when set
    experts_spec = ExpertsSpec(num_experts=num_experts, hidden=8, intermediate=4, act=act, gated=True, limit=limit,
                               up_offset=up_offset, weighted_input=weighted_input)
    routed = graph.append(ExpertsOp.build([x, *route.results], {"w_in": "w_in", "w_out": "w_out"}, experts_spec, [x.type]))
    shared_weights = {"w_up": "up", "w_down": "down"} | ({"gate": "gate"} if shared_gate else {})
    shared_spec = FFNSpec(hidden=8, intermediate=4, act=act, gated=False, has_output_gate=shared_gate)
    shared = graph.append(SharedExpertOp.build([x], shared_weights, shared_spec, [x.type]))
    graph.set_outputs([routed.result, shared.result])
    verify(graph)
    text = print_graph(graph)
    parsed = parse_graph(text)
    verify(parsed)
    assert print_graph(parsed) == text
    assert parsed.ops[0].spec == route_spec
    assert parsed.ops[1].spec == experts_spec
    assert ("group_score=" in text) == (group_score != "top2_sum")  # written only when not the default
    assert ("limit=" in text) == (limit is not None) and ("up_offset=" in text) == (up_offset != 0.0)
    assert ("weighted_input=" in text) == weighted_input
    assert parsed.ops[2].spec == shared_spec
    assert math.isclose(parsed.ops[0].spec.scaling, scaling)


QUANTIZED_MOE = SMALL_MOE.replace(
    "weight @experts.w_in: f32[4, 32, 8]", "weight @experts.w_in: quant<f32[4, 64, 64], bits=[4, 3, 2, 8], group=32>"
).replace("weight @experts.w_out: f32[4, 8, 16]", "weight @experts.w_out: quant<f32[4, 64, 32], bits=[4, 4, 4, 4], group=32>"
).replace("f32[s0, s1, 8]", "f32[s0, s1, 64]").replace("f32[4, 8]", "f32[4, 64]").replace("hidden=8, intermediate=16", "hidden=64, intermediate=32"
).replace("[-1, 8]) : f32[s0*s1, 8]", "[-1, 64]) : f32[s0*s1, 64]")


def test_quantized_weight_types_round_trip():
    from moec.ir.quant import QuantizedType

    graph = parse_graph(QUANTIZED_MOE)
    verify(graph)
    assert print_graph(graph) == QUANTIZED_MOE
    assert graph.weights["experts.w_in"] == QuantizedType("f32", (4, 64, 64), (4, 3, 2, 8), 32)
