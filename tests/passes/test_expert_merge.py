"""expert-merge: alignment recovers permuted duplicates exactly, the merged IR, errors, and the zoo against a
token-by-token reference built from the pass's own merge plan."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moec.backend.torch_runner import TorchRunner
from moec.errors import PassError
from moec.ir import print_graph
from moec.kernels import reference
from moec.passes import PassContext, run_passes
from moec.passes.expert_merge import ExpertMerge, plan_layer
from moec.passes.moe_layers import moe_layers
from tests.passes.helpers import (
    FFN,
    SMALL_MOE,
    captured,
    layer_io,
    program_of,
    small_moe_weights,
    token_samples,
)


def merge(program, samples, **options):
    context = PassContext(calibration=samples, progress=False)
    (record,) = run_passes(program, [ExpertMerge(**options)], context)
    return record


def permuted_twin_weights():
    """Expert 2 is expert 0 with its neurons shuffled and the same router row: a perfect merge exists."""
    weights = small_moe_weights()
    shuffle = torch.randperm(FFN, generator=torch.Generator().manual_seed(7))
    weights["w_in"][2] = torch.cat([weights["w_in"][0][:FFN][shuffle], weights["w_in"][0][FFN:][shuffle]])
    weights["w_out"][2] = weights["w_out"][0][:, shuffle]
    weights["gate"][2] = weights["gate"][0]
    return weights


@pytest.mark.parametrize("align", ["weight", "activation"])
def test_alignment_merges_a_permuted_twin_exactly_and_no_alignment_does_not(align):
    weights = permuted_twin_weights()
    aligned = program_of(SMALL_MOE, {k: v.clone() for k, v in weights.items()})
    record = merge(aligned, token_samples(), keep=3, align=align)
    unaligned = program_of(SMALL_MOE, {k: v.clone() for k, v in weights.items()})
    ablation = merge(unaligned, token_samples(), keep=3, align="none")
    (layer,) = record["summary"]["layers"]
    assert [0, 2] in layer["groups"] or [2, 0] in layer["groups"]
    assert layer["output_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert ablation["summary"]["layers"][0]["output_cosine"] < 0.99
    x = torch.randn(40, 8)
    before = program_of(SMALL_MOE, weights)
    torch.testing.assert_close(TorchRunner(aligned).run([x])[0], TorchRunner(before).run([x])[0], atol=1e-5, rtol=1e-5)


def test_merged_ir_keeps_the_router_and_maps_router_experts():
    weights = permuted_twin_weights()
    program = program_of(SMALL_MOE, weights)
    record = merge(program, token_samples(), keep=2)
    text = print_graph(program.graph)
    assert "weight @gate: f32[4, 8]" in text and "weight @w_in: f32[2, 32, 8]" in text
    assert "num_experts=4, top_k=2" in text and "num_experts=2, hidden=8" in text
    (layer,) = record["summary"]["layers"]
    expert_map = program.graph.ops[1].expert_map
    assert len(expert_map) == 4 and sorted(set(expert_map)) == [0, 1]
    for group_index, group in enumerate(layer["groups"]):
        assert all(expert_map[member] == group_index for member in group)
    assert layer["params_after"] == sum(t.numel() for t in program.weights.values()) < layer["params_before"]


def test_errors_without_calibration_and_on_a_merged_layer():
    program = program_of(SMALL_MOE, small_moe_weights())
    with pytest.raises(PassError, match="pass 'expert-merge' needs calibration data"):
        run_passes(program, [ExpertMerge(keep=2)], PassContext(progress=False))
    merge(program, token_samples(), keep=2)
    with pytest.raises(PassError, match="already merged"):
        merge(program, token_samples(), keep=2)
    with pytest.raises(PassError, match="fewer than its top_k=2"):
        merge(program_of(SMALL_MOE, small_moe_weights()), token_samples(), keep=1)
    with pytest.raises(PassError, match="align='sorted' is not one of"):
        ExpertMerge(keep=2, align="sorted")


def merged_expert(tensors, group, spec):
    """One merged expert, neuron by neuron: w = sum_i weight_i * neuron perm_i[j] of member i."""
    gate = torch.zeros(spec.intermediate, spec.hidden, dtype=torch.float64)
    up, down = torch.zeros_like(gate), torch.zeros(spec.hidden, spec.intermediate, dtype=torch.float64)
    for member, permutation, weight in zip(group.members, group.permutations, group.weights, strict=True):
        w_in, w_out = tensors["w_in"][member].double(), tensors["w_out"][member].double()
        for j, source in enumerate(permutation):
            gate[j] += weight * w_in[source]
            up[j] += weight * w_in[spec.intermediate + source]
            down[:, j] += weight * w_out[:, source]
    return gate.float(), up.float(), down.float()


@pytest.mark.parametrize(("preset", "keep", "align"), [
    ("tiny-mixtral", 2, "weight"),
    ("tiny-qwen2-moe", 3, "activation"),
    ("tiny-olmoe", 4, "weight"),
    ("tiny-deepseek-v3", 3, "none"),
])
def test_zoo_layers_match_a_token_by_token_reference(preset, keep, align):
    program, example = captured(preset)
    layers = {layer.block: layer for layer in moe_layers(program, "test")}
    generator = torch.Generator().manual_seed(5)
    samples = [{"input_ids": torch.randint(0, 128, (2, 12), generator=generator),
                "attention_mask": torch.ones(2, 12, dtype=torch.long)} for _ in range(3)]
    stats = PassContext(calibration=samples, progress=False).statistics(program)
    plans = {}
    for block, layer in layers.items():
        tensors, moe = layer.tensors(program), stats.moe[block]
        plans[block] = (tensors, layer.route.spec, layer.experts.spec,
                        plan_layer(tensors, moe.counts, moe.weight_mass, moe.inputs, keep, layer.experts.spec, align))
    record = merge(program, samples, keep=keep, align=align)
    seen = layer_io(program, program.flatten_inputs((), example))
    for block, (x, y) in seen.items():
        tensors, route_spec, experts_spec, groups = plans[block]
        merged = [merged_expert(tensors, group, experts_spec) for group in groups]
        group_of = {member: g for g, group in enumerate(groups) for member in group.members}
        indices, weights = reference.route(x, tensors["router"], tensors.get("router_bias"), route_spec)
        expected = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for slot in range(route_spec.top_k):
                gate, up, down = merged[group_of[int(indices[t, slot])]]
                act = reference.activation(experts_spec.act)
                expected[t] += weights[t, slot] * F.linear(act(F.linear(x[t], gate)) * F.linear(x[t], up), down)
        torch.testing.assert_close(y, expected, atol=2e-5, rtol=1e-4)
    summary = record["summary"]["layers"]
    assert [r["groups"] for r in summary] == [[g.members for g in plans[b][3]] for b in seen]
    assert all(r["experts_after"] == keep and r["params_after"] < r["params_before"] for r in summary)
