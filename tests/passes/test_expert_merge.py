"""expert-merge: alignment recovers permuted duplicates exactly, the merged IR under both routings, the output
refit, errors, and the zoo against a token-by-token reference built from the pass's own merge plan."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moec.api import layer_summary
from moec.backend.torch_runner import TorchRunner
from moec.errors import PassError
from moec.frontend.blocks import ExpertsSpec
from moec.ir import print_graph
from moec.kernels import reference
from moec.passes import PassContext, build_passes, run_passes
from moec.passes.expert_merge import (
    ExpertMerge,
    importance_alignment,
    merge_weights,
    neuron_shares,
    plan_layer,
    refit_outputs,
)
from moec.passes.moe_layers import moe_layers
from tests.passes.moe_programs import (
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


# The twin pair is chosen together (same router row): only member routing keeps both of its routing weights.
MC_SMOE = {"router": "members", "refit": False}


@pytest.mark.parametrize(("align", "combine"), [("weight", "average"), ("activation", "average"), ("weight", "select")])
def test_alignment_merges_a_permuted_twin_exactly_and_no_alignment_does_not(align, combine):
    weights = permuted_twin_weights()
    aligned = program_of(SMALL_MOE, {k: v.clone() for k, v in weights.items()})
    record = merge(aligned, token_samples(), keep=3, align=align, combine=combine, **MC_SMOE)
    unaligned = program_of(SMALL_MOE, {k: v.clone() for k, v in weights.items()})
    ablation = merge(unaligned, token_samples(), keep=3, align="none", combine=combine, **MC_SMOE)
    (layer,) = record["summary"]["layers"]
    assert [0, 2] in layer["groups"] or [2, 0] in layer["groups"]
    assert layer["output_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert ablation["summary"]["layers"][0]["output_cosine"] < 0.99
    x = torch.randn(40, 8)
    before = program_of(SMALL_MOE, weights)
    torch.testing.assert_close(TorchRunner(aligned).run([x])[0], TorchRunner(before).run([x])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_importance_alignment_keeps_the_most_important_half_of_a_pair(seed):
    generator = torch.Generator().manual_seed(seed)
    dominant, member = torch.rand(12, generator=generator, dtype=torch.float64), torch.rand(12, generator=generator,
                                                                                           dtype=torch.float64)
    identity, permutation = importance_alignment([dominant, member])
    assert identity == list(range(12)) and sorted(permutation) == list(range(12))
    kept = torch.maximum(dominant, member[torch.tensor(permutation)])
    best = torch.cat([dominant, member]).sort(descending=True).values[:12]
    torch.testing.assert_close(kept.sort(descending=True).values, best)
    unaligned_kept = torch.maximum(dominant, member).sum()
    assert kept.sum() >= unaligned_kept


def test_select_gives_each_merged_neuron_to_the_member_whose_aligned_neuron_matters_most():
    spec = ExpertsSpec(num_experts=2, hidden=8, intermediate=3, act="silu", gated=True)
    importances = [torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64), torch.tensor([1.0, 5.0, 0.0], dtype=torch.float64)]
    permutations = [[0, 1, 2], [2, 0, 1]]  # the member's neurons 2, 0, 1 meet the dominant's 0, 1, 2: importance 0, 1, 5
    shares = neuron_shares(importances, permutations, torch.tensor([0.9, 0.1]), spec)
    # position 0: 3 > 0, the dominant; position 1: a tie of 1, the dominant; position 2: 5 > 2, the member
    assert shares.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def test_average_weighs_members_by_their_routing_counts():
    """Without alignment or refit, each merged expert is its members' weights averaged with weights
    ``counts[member] / counts[group].sum()`` from the calibration statistics (seed 0: all counts differ)."""
    weights = small_moe_weights()
    program = program_of(SMALL_MOE, {k: v.clone() for k, v in weights.items()})
    counts = PassContext(calibration=token_samples(), progress=False).statistics(program, "test").moe["moe"].counts
    record = merge(program, token_samples(), keep=2, align="none", combine="average", refit=False)
    (layer,) = record["summary"]["layers"]
    assert max(len(group) for group in layer["groups"]) > 1
    for index, group in enumerate(layer["groups"]):
        share = counts[group].double() / counts[group].sum()
        for role in ("w_in", "w_out"):
            expected = (share.reshape(-1, 1, 1) * weights[role][group].double()).sum(0).float()
            torch.testing.assert_close(program.weights[role][index], expected, atol=1e-6, rtol=1e-6)


def test_member_routing_keeps_the_router_and_maps_router_experts():
    weights = permuted_twin_weights()
    program = program_of(SMALL_MOE, weights)
    record = merge(program, token_samples(), keep=2, router="members")
    text = print_graph(program.graph)
    assert "weight @gate: f32[4, 8]" in text and "weight @w_in: f32[2, 32, 8]" in text
    assert "num_experts=4, top_k=2" in text and "num_experts=2, hidden=8" in text
    (layer,) = record["summary"]["layers"]
    expert_map = program.graph.ops[1].expert_map
    assert len(expert_map) == 4 and sorted(set(expert_map)) == [0, 1]
    for group_index, group in enumerate(layer["groups"]):
        assert all(expert_map[member] == group_index for member in group)
    assert layer["params_after"] == sum(t.numel() for t in program.weights.values()) < layer["params_before"]
    assert layer_summary(program)[1]["detail"].endswith(", merged from 4 router experts")


def test_group_routing_keeps_the_dominant_router_rows_and_no_map():
    weights = small_moe_weights()
    program = program_of(SMALL_MOE, weights)
    record = merge(program, token_samples(), keep=2)
    text = print_graph(program.graph)
    assert "weight @gate: f32[2, 8]" in text and "weight @w_in: f32[2, 32, 8]" in text
    assert "num_experts=2, top_k=2" in text and "expert_map" not in text
    (layer,) = record["summary"]["layers"]
    dominants = [group[0] for group in layer["groups"]]
    assert dominants == sorted(dominants) and sorted(sum(layer["groups"], [])) == [0, 1, 2, 3]
    torch.testing.assert_close(program.weights["gate"], weights["gate"][dominants])
    # an ordinary (smaller) MoE layer again, not refused as merged; keep=2 leaves its 2 experts as they are
    with pytest.warns(UserWarning, match="nothing was merged"):
        merge(program, token_samples(), keep=2)


def test_refit_reproduces_reachable_outputs_and_never_raises_the_calibration_error():
    program = program_of(SMALL_MOE, small_moe_weights())
    (layer,) = moe_layers(program, "test")
    tensors, rows = layer.tensors(program), torch.cat([x for (x,) in token_samples()])
    stats = PassContext(calibration=token_samples(), progress=False).statistics(program, "test").moe["moe"]
    groups = plan_layer(tensors, stats, layer, torch.zeros(4, dtype=torch.long), 2, "weight", "select")
    merged = merge_weights(tensors, groups, layer.experts.spec)
    merged["router"] = tensors["router"][[group.members[0] for group in groups]]
    # a target the merged experts can produce exactly, with other output weights: the fit finds them
    reachable = merged | {"w_out": torch.randn_like(merged["w_out"])}
    target = layer.routed_output(reachable, rows)
    refitted = refit_outputs(layer, merged, rows, target, None, ridge=1e-9)
    torch.testing.assert_close(refitted["w_out"], reachable["w_out"], atol=1e-3, rtol=1e-3)
    # the unmerged layer's output: the fit's squared error is at most that of the combined weights
    target = layer.routed_output(tensors, rows)
    error = {name: (layer.routed_output(weights, rows) - target).square().sum().item()
             for name, weights in (("combined", merged), ("refitted", merged | refit_outputs(layer, merged, rows, target,
                                                                                               None, ridge=0.1)))}
    assert error["refitted"] < error["combined"]


@pytest.mark.parametrize("options", [{"keep": 4}, {"keep": 10, "router": "members"}, {"keep_ratio": 1.0}])
def test_a_target_of_every_expert_changes_nothing_and_says_so(options):
    program = program_of(SMALL_MOE, small_moe_weights())
    before = print_graph(program.graph)
    context = PassContext(calibration=token_samples(), progress=False)
    with pytest.warns(UserWarning, match="nothing was merged"):
        (record,) = run_passes(program, [ExpertMerge(**options)], context)
    assert print_graph(program.graph) == before and not record["modified"]
    assert "keeps every expert (a layer has at most 4)" in record["summary"]["note"]
    (row,) = record["summary"]["layers"]
    assert (row["experts_before"], row["experts_after"], row["groups"]) == (4, 4, [[0], [1], [2], [3]])
    assert not context.calibrations  # nothing to plan, so nothing calibrated


@pytest.mark.slow  # about 10 s
def test_errors_without_calibration_and_on_a_merged_layer():
    program = program_of(SMALL_MOE, small_moe_weights())
    with pytest.raises(PassError, match="pass 'expert-merge' needs calibration data"):
        run_passes(program, [ExpertMerge(keep=2)], PassContext(progress=False))
    merge(program, token_samples(), keep=2, router="members")
    with pytest.raises(PassError, match="already merged"):
        merge(program, token_samples(), keep=2)
    with pytest.raises(PassError, match=r"keep=1 is fewer experts than layer moe routes each token to \(top_k=2\)"):
        merge(program_of(SMALL_MOE, small_moe_weights()), token_samples(), keep=1)
    weighted_input = SMALL_MOE.replace("gated=true,", "gated=true, weighted_input=true,")
    with pytest.raises(PassError, match="layer moe's experts take the routing weight on their input"):
        merge(program_of(weighted_input, small_moe_weights()), token_samples(), keep=2)
    with pytest.raises(PassError, match="align='sorted' is not one of"):
        ExpertMerge(keep=2, align="sorted")
    with pytest.raises(PassError, match="align='importance' pairs neurons for combine='select'"):
        ExpertMerge(keep=2, align="importance", combine="average")
    assert ExpertMerge(keep=2, combine="average").alignment == "weight"
    assert ExpertMerge(keep=2).alignment == "importance"
    with pytest.raises(PassError, match="router='experts' is not one of groups, members"):
        ExpertMerge(keep=2, router="experts")
    with pytest.raises(PassError, match="refit_ridge=0 must be a positive finite number"):
        ExpertMerge(keep=2, refit_ridge=0)
    with pytest.raises(PassError, match="keep=3 does not fit layer model.layers.1.mlp, .*; keep one of 4, 6, 8"):
        program, _ = captured("tiny-deepseek-v3")
        merge(program, [{"input_ids": torch.ones(1, 4, dtype=torch.long),
                          "attention_mask": torch.ones(1, 4, dtype=torch.long)}], keep=3)


@pytest.mark.parametrize(("options", "message"), [
    ({"refit_ridge": float("inf")}, "refit_ridge=inf must be a positive finite number"),
    ({"refit": False, "refit_ridge": 5.0}, "refit_ridge=5.0 weighs the refit, and refit=false skips it"),
])
def test_refit_ridge_that_would_break_or_do_nothing_is_refused(options, message):
    with pytest.raises(PassError, match=message):
        build_passes({"passes": [{"expert-merge": {"keep": 2, **options}}]})


def merged_expert(tensors, group, spec):
    """One merged expert, neuron by neuron: w_j = sum_i share_ij * neuron perm_i[j] of member i."""
    gate = torch.zeros(spec.intermediate, spec.hidden, dtype=torch.float64)
    up, down = torch.zeros_like(gate), torch.zeros(spec.hidden, spec.intermediate, dtype=torch.float64)
    for member, permutation, shares in zip(group.members, group.permutations, group.neuron_weights, strict=True):
        w_in, w_out = tensors["w_in"][member].double(), tensors["w_out"][member].double()
        for j, source in enumerate(permutation):
            gate[j] += shares[j] * w_in[source]
            up[j] += shares[j] * w_in[spec.intermediate + source]
            down[:, j] += shares[j] * w_out[:, source]
    return gate.float(), up.float(), down.float()


@pytest.mark.parametrize(("preset", "keep", "align", "combine", "router"), [
    ("tiny-mixtral", 2, "weight", "select", "groups"),
    ("tiny-qwen2-moe", 3, "activation", "average", "members"),
    pytest.param("tiny-olmoe", 4, "weight", "select", "groups", marks=pytest.mark.slow),  # as Mixtral's above
    pytest.param("tiny-olmoe", 4, "activation", "average", "groups", marks=pytest.mark.slow),
    ("tiny-olmoe", 3, "importance", "select", "groups"),
    ("tiny-deepseek-v3", 4, "none", "select", "groups"),
    ("tiny-deepseek-v3", 3, "weight", "average", "members"),
])
def test_zoo_layers_match_a_token_by_token_reference(preset, keep, align, combine, router):
    """Without the refit (tested above), every merged expert is the plan's neuron combination; the route
    chooses among the dominant rows (``groups``) or maps the members (``members``)."""
    program, example = captured(preset)
    layers = {layer.block: layer for layer in moe_layers(program, "test")}
    generator = torch.Generator().manual_seed(5)
    samples = [{"input_ids": torch.randint(0, 128, (2, 12), generator=generator),
                "attention_mask": torch.ones(2, 12, dtype=torch.long)} for _ in range(3)]
    stats = PassContext(calibration=samples, progress=False).statistics(program, "test")
    plans = {}
    for block, layer in layers.items():
        tensors, route_spec = layer.tensors(program), layer.route.spec
        routing_group = torch.arange(route_spec.num_experts) // (route_spec.num_experts // route_spec.n_group)
        per_group = keep // route_spec.n_group
        if router == "members":
            routing_group, per_group = torch.zeros_like(routing_group), keep
        groups = plan_layer(tensors, stats.moe[block], layer, routing_group, per_group, align, combine)
        plans[block] = (tensors, route_spec, layer.experts.spec, groups)
    record = merge(program, samples, keep=keep, align=align, combine=combine, router=router, refit=False)
    seen = layer_io(program, program.flatten_inputs((), example))
    for block, (x, y) in seen.items():
        tensors, route_spec, experts_spec, groups = plans[block]
        merged = [merged_expert(tensors, group, experts_spec) for group in groups]
        if router == "groups":
            dominants = [group.members[0] for group in groups]
            bias = tensors.get("router_bias")
            indices, weights = reference.route(x, tensors["router"][dominants], None if bias is None else bias[dominants],
                                               type(route_spec)(**{**route_spec.__dict__, "num_experts": keep}))
            stored_of = list(range(keep))
        else:
            indices, weights = reference.route(x, tensors["router"], tensors.get("router_bias"), route_spec)
            stored_of = {member: g for g, group in enumerate(groups) for member in group.members}
        expected = torch.zeros_like(x)
        act = reference.activation(experts_spec.act)
        for t in range(x.shape[0]):
            for slot in range(route_spec.top_k):
                gate, up, down = merged[stored_of[int(indices[t, slot])]]
                expected[t] += weights[t, slot] * F.linear(act(F.linear(x[t], gate)) * F.linear(x[t], up), down)
        torch.testing.assert_close(y, expected, atol=2e-5, rtol=1e-4)
    summary = record["summary"]["layers"]
    assert [r["groups"] for r in summary] == [[g.members for g in plans[b][3]] for b in seen]
    assert all(r["experts_after"] == keep and r["params_after"] < r["params_before"] for r in summary)
    if combine == "select":  # every merged neuron is one member's neuron
        assert all(((g.neuron_weights == 0) | (g.neuron_weights == 1)).all() for plan in plans.values() for g in plan[3])


def test_refit_raises_zoo_layer_output_cosine_on_calibration_rows():
    samples = [{"input_ids": torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed)),
                "attention_mask": torch.ones(2, 12, dtype=torch.long)} for seed in range(3)]
    cosines = {}
    for refit in (False, True):
        program, _ = captured("tiny-olmoe")
        cosines[refit] = [r["output_cosine"] for r in merge(program, samples, keep=4, refit=refit)["summary"]["layers"]]
    assert all(fitted > plain for fitted, plain in zip(cosines[True], cosines[False], strict=True))


def test_group_routers_keep_the_dominant_experts_logit_bias():
    """GPT-OSS's router has its own bias on the logits: with ``groups`` routing, each merged expert's router
    row and its bias are the dominant member's."""
    program, _ = captured("tiny-gpt-oss")
    layers = moe_layers(program, "test")
    before = {layer.block: layer.tensors(program) for layer in layers}
    generator = torch.Generator().manual_seed(5)
    samples = [{"input_ids": torch.randint(0, 128, (2, 12), generator=generator),
                "attention_mask": torch.ones(2, 12, dtype=torch.long)} for _ in range(3)]
    record = merge(program, samples, keep=2, router="groups", refit=False)
    for layer, summary in zip(layers, record["summary"]["layers"], strict=True):
        dominants = [members[0] for members in summary["groups"]]
        after = layer.tensors(program)
        for role in ("router", "router_logit_bias"):
            assert torch.equal(after[role], before[layer.block][role][dominants]), role
