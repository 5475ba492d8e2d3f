"""An op's ``spec`` follows its keyword arguments however they change (it is cached per distinct kwargs)."""

from __future__ import annotations

from moec.ir import parse_graph
from tests.ir.test_text_roundtrip import SMALL_MOE


def test_spec_follows_set_args_and_in_place_changes():
    route, experts, _ = parse_graph(SMALL_MOE).ops
    assert route.spec is route.spec and route.spec.top_k == 2  # built once for the same kwargs
    route.set_args(route.args, {**route.kwargs, "top_k": 3})
    assert route.spec.top_k == 3
    experts.kwargs["act"] = "gelu"  # an edit in place, which no pass should make, is still seen
    assert experts.spec.act == "gelu"
    experts.kwargs.pop("w_out")
    experts.kwargs["b_in"] = experts.kwargs["w_in"]
    assert experts.spec.has_bias
