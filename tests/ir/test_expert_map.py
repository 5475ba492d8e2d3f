"""``moe.experts`` with an ``expert_map``: text round trip, verifier rules, and the runner's semantics."""

from __future__ import annotations

import pytest
import torch

from moec.backend.torch_runner import TorchRunner
from moec.errors import VerifyError
from moec.ir import parse_graph, print_graph, verify
from moec.kernels import reference
from tests.passes.moe_programs import SMALL_MOE, program_of, small_moe_weights

# Router experts 0 and 2 run stored expert 0, 1 and 3 run stored expert 1.
MERGED = (SMALL_MOE.replace("@w_in: f32[4, 32, 8]", "@w_in: f32[2, 32, 8]")
          .replace("@w_out: f32[4, 8, 16]", "@w_out: f32[2, 8, 16]")
          .replace("num_experts=4, hidden=8", "num_experts=2, hidden=8")
          .replace('gated=true, block="moe")', 'gated=true, block="moe", expert_map=[0, 1, 0, 1])'))


def merged_weights():
    weights = small_moe_weights()
    return weights | {"w_in": weights["w_in"][:2].clone(), "w_out": weights["w_out"][:2].clone()}


def test_expert_map_round_trips_and_verifies():
    graph = parse_graph(MERGED)
    verify(graph)
    assert print_graph(graph) == MERGED
    experts = graph.ops[1]
    assert experts.expert_map == [0, 1, 0, 1] and experts.routed_experts == 4 and experts.spec.num_experts == 2


@pytest.mark.parametrize(("bad_map", "message"), [
    ("[0, 1, 0, 2]", "must map onto every stored expert 0..1"),
    ("[0, 0, 0, 0]", "must map onto every stored expert 0..1"),
    ("[0, 1, 0]", "'expert_map' has 3 entries but its router .* chooses among 4 experts"),
    ('[0, "1", 0, 1]', "'expert_map' must be a list of ints"),
])
def test_bad_expert_maps_are_named(bad_map, message):
    with pytest.raises(VerifyError, match=message):
        verify(parse_graph(MERGED.replace("[0, 1, 0, 1]", bad_map)))


def test_runner_runs_the_mapped_expert_and_adds_weights_of_shared_targets():
    weights = merged_weights()
    program = program_of(MERGED, weights)
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(3))
    (y,) = TorchRunner(program).run([x])
    indices, routing = reference.route(x, weights["gate"], None, program.graph.ops[0].spec)
    expected = torch.zeros_like(x)
    for t in range(x.shape[0]):  # the definition, token by token: router expert r runs stored expert r % 2
        for slot in range(2):
            stored = int(indices[t, slot]) % 2
            w_in, w_out = weights["w_in"][stored], weights["w_out"][stored]
            gate, up = (w_in @ x[t]).chunk(2)
            expected[t] += routing[t, slot] * (w_out @ (torch.nn.functional.silu(gate) * up))
    both_to_one = ((indices % 2)[:, 0] == (indices % 2)[:, 1]).sum()
    assert both_to_one > 0  # some tokens chose two router experts with one target
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
