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


@pytest.mark.parametrize("kernel", ["torch", "torch-blas", "onnxruntime"])
def test_runner_runs_a_target_chosen_twice_once_per_token(monkeypatch, kernel):
    """Two chosen router experts of one target: the stored expert computes the token once, on the summed weight."""
    from moec.kernels import moe_cpu, moe_onnxruntime

    weights = merged_weights()
    program = program_of(MERGED, weights)
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(3))
    indices, _ = reference.route(x, weights["gate"], None, program.graph.ops[0].spec)
    distinct = sum(len(set((indices[t] % 2).tolist())) for t in range(x.shape[0]))
    assert distinct < indices.numel()  # some tokens chose both members of one target
    rows = []
    for module in (moe_cpu, moe_onnxruntime):
        gathered = module.gathered_rows
        monkeypatch.setattr(module, "gathered_rows", lambda x, index, g=gathered: rows.append(len(index)) or g(x, index))
    want = TorchRunner(program_of(MERGED, weights), expert_kernel="torch").run([x])[0]
    rows.clear()
    (y,) = TorchRunner(program, expert_kernel=kernel).run([x])
    assert rows == [distinct]
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


def test_decoding_a_token_that_chose_both_members_of_one_target_runs_it_once(monkeypatch):
    from moec.kernels import moe_cpu

    weights = merged_weights()
    program = program_of(MERGED, weights)
    gen = torch.Generator().manual_seed(0)
    candidates = torch.randn(200, 8, generator=gen)
    indices, _ = reference.route(candidates, weights["gate"], None, program.graph.ops[0].spec)
    x = candidates[(indices % 2)[:, 0] == (indices % 2)[:, 1]][:1]
    calls = []
    linear = moe_cpu.F.linear
    expert_shapes = (weights["w_in"].shape[1:], weights["w_out"].shape[1:])
    monkeypatch.setattr(moe_cpu.F, "linear", lambda x, w, *rest: calls.append(w.shape in expert_shapes) or linear(x, w, *rest))
    (y,) = TorchRunner(program, expert_kernel="torch-blas").run([x])
    assert sum(calls) == 2  # gate/up and down of the one stored expert
    torch.testing.assert_close(y, TorchRunner(program_of(MERGED, weights), expert_kernel="torch").run([x])[0])


def test_skip_statistics_count_a_target_chosen_twice_as_one_evaluation():
    from moec.passes.dynamic_skip import skip_statistics

    weights = merged_weights()
    skipping = MERGED.replace("expert_map=[0, 1, 0, 1])", "expert_map=[0, 1, 0, 1], skip_threshold=0.9)")
    program = program_of(skipping, weights)
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(3))
    indices, routing = reference.route(x, weights["gate"], None, program.graph.ops[0].spec)
    targets = indices % 2
    distinct = sum(len(set(targets[t].tolist())) for t in range(x.shape[0]))
    # A token with two targets drops its smaller one below 0.9 of the larger; one with a single target drops nothing.
    two = targets[:, 0] != targets[:, 1]
    dropped = int((routing[two].min(dim=-1).values < 0.9 * routing[two].max(dim=-1).values).sum())
    stats = skip_statistics(program, [[x]])
    assert (stats["evaluations"], stats["skipped"]) == (distinct, dropped)
    assert 0 < dropped < distinct < indices.numel()
