"""expert-prune: which experts it keeps, what the IR looks like after, errors, and the zoo against a
reference in which removed experts simply cannot be chosen (their router logits are -inf)."""

from __future__ import annotations

import pytest
import torch

from moec.errors import PassError
from moec.ir import print_graph
from moec.ir.ops import SharedExpertOp
from moec.kernels import reference
from moec.passes import PassContext, build_passes, run_passes
from moec.passes.expert_prune import ExpertPrune
from moec.passes.moe_layers import moe_layers
from tests.passes.moe_programs import (
    SMALL_MOE,
    captured,
    layer_io,
    program_of,
    small_moe_weights,
    token_samples,
)


def prune(program, samples, **options):
    context = PassContext(calibration=samples, progress=False)
    (record,) = run_passes(program, [ExpertPrune(**options)], context)
    return record, context


def masked_reference(x, tensors, route_spec, experts_spec, kept):
    """The unpruned layer in which removed experts get -inf router logits (and -inf choice bias)."""
    removed = torch.ones(route_spec.num_experts, dtype=torch.bool)
    removed[kept] = False
    mask = torch.zeros(route_spec.num_experts, 1).masked_fill(removed[:, None], float("-inf"))
    router = torch.cat([tensors["router"].float(), mask], dim=1)  # logit += -inf * 1 for removed experts
    x_with_one = torch.cat([x.float(), torch.ones(x.shape[0], 1)], dim=1)
    bias = tensors.get("router_bias")
    if bias is not None:
        bias = bias.float().masked_fill(removed, float("-inf"))
    indices, weights = reference.route(x_with_one, router, bias, route_spec, tensors.get("router_logit_bias"))
    return reference.experts(x.float(), indices, weights, tensors["w_in"].float(), tensors["w_out"].float(),
                             tensors.get("b_in"), tensors.get("b_out"), experts_spec)


def test_frequency_keeps_the_most_chosen_experts_and_shrinks_router_and_weights():
    weights = small_moe_weights()
    program = program_of(SMALL_MOE, weights)
    samples = token_samples()
    counts = PassContext(calibration=samples, progress=False).statistics(program, "test").moe["moe"].counts
    record, _ = prune(program, samples, keep=2)
    kept = sorted(torch.argsort(counts, descending=True)[:2].tolist())
    torch.testing.assert_close(program.weights["gate"], weights["gate"][kept])
    torch.testing.assert_close(program.weights["w_in"], weights["w_in"][kept])
    text = print_graph(program.graph)
    assert "weight @gate: f32[2, 8]" in text and "weight @w_out: f32[2, 8, 16]" in text
    assert "num_experts=2, top_k=2" in text and "num_experts=2, hidden=8" in text
    (layer,) = record["summary"]["layers"]
    assert (layer["experts_before"], layer["experts_after"]) == (4, 2)
    assert (layer["kept"], layer["removed"]) == (kept, [e for e in range(4) if e not in kept])
    assert layer["params_before"] == sum(t.numel() for t in weights.values())
    assert layer["params_after"] == sum(program.weights[n].numel() for n in ("gate", "w_in", "w_out"))
    assert layer["bytes_after"] == 4 * layer["params_after"]
    assert 0 < layer["output_cosine"] < 1


def test_a_second_prune_names_the_models_experts():
    """Report rows name the model's expert ids, after an earlier prune too (they named positions among the
    experts left: a second prune reported removing experts the first had kept)."""
    weights = small_moe_weights(seed=2)  # the first prune removes expert 0, so positions and ids part
    program = program_of(SMALL_MOE, weights)
    samples = token_samples()
    first, _ = prune(program, samples, keep=3)
    second, _ = prune(program, samples, keep=2)
    (once,) = first["summary"]["layers"]
    (twice,) = second["summary"]["layers"]
    assert set(twice["kept"]) | set(twice["removed"]) == set(once["kept"])
    torch.testing.assert_close(program.weights["gate"], weights["gate"][twice["kept"]])
    torch.testing.assert_close(program.weights["w_in"], weights["w_in"][twice["kept"]])


def test_weight_mass_keeps_the_experts_with_the_most_routing_weight():
    """Seed 0 ranks experts differently by weight mass ({0, 2} on top) than by count ({1, 2})."""
    weights = small_moe_weights()
    program = program_of(SMALL_MOE, weights)
    samples = token_samples()
    mass = PassContext(calibration=samples, progress=False).statistics(program, "test").moe["moe"].weight_mass
    record, _ = prune(program, samples, keep=2, criterion="weight_mass")
    kept = sorted(torch.argsort(mass, descending=True)[:2].tolist())
    (layer,) = record["summary"]["layers"]
    assert layer["kept"] == kept == [0, 2]
    torch.testing.assert_close(program.weights["gate"], weights["gate"][kept])


def test_similarity_removes_the_lighter_of_two_twin_experts():
    """Expert 3 computes what expert 1 does and its router row points the same way at twice the length, so
    the pair is the most similar whatever is compared, and the twins' routing weights differ: the one with
    less weight goes (here expert 1, though the lower id)."""
    weights = small_moe_weights()
    for name in weights:
        weights[name][3] = weights[name][1]
    weights["gate"][3] = 2 * weights["gate"][1]
    for similarity_of in ("output", "router"):
        program = program_of(SMALL_MOE, {k: v.clone() for k, v in weights.items()})
        mass = PassContext(calibration=token_samples(), progress=False).statistics(program, "test").moe["moe"].weight_mass
        assert mass[3] > 2 * mass[1]
        record, _ = prune(program, token_samples(), keep=3, criterion="similarity", similarity_of=similarity_of)
        (layer,) = record["summary"]["layers"]
        assert (layer["kept"], layer["removed"]) == ([0, 2, 3], [1])
        torch.testing.assert_close(program.weights["gate"], weights["gate"][[0, 2, 3]])


@pytest.mark.parametrize(("options", "message"), [
    ({"keep": 0}, "keep=0 must be a positive number of experts"),
    ({"keep": 1}, r"keep=1 is fewer experts than layer moe routes each token to \(top_k=2\); keep at least 2"),
    ({"keep_ratio": 0.1}, r"keep_ratio=0.1 \(0 of its 4 experts\) is fewer experts than layer moe routes"),
    ({"keep": 2, "keep_ratio": 0.5}, "give exactly one of keep"),
    ({"keep": 2, "criterion": "random"}, "criterion='random' is not one of"),
    ({"keep": 2, "similarity_of": "router"}, "similarity_of='router' says what criterion 'similarity' compares, "
     "and criterion='frequency' compares nothing"),
])
def test_bad_targets_are_one_clear_error(options, message):
    program = program_of(SMALL_MOE, small_moe_weights())
    with pytest.raises(PassError, match=message):
        prune(program, token_samples(), **options)


@pytest.mark.parametrize(("options", "given"), [({"keep": 2}, "keep=2"), ({"keep_ratio": 0.5}, r"keep_ratio=0.5 \(2 of")])
def test_a_count_that_routing_groups_cannot_share_is_refused_before_calibrating(options, given):
    grouped = SMALL_MOE.replace("n_group=1, topk_group=1", "n_group=2, topk_group=1")
    program = program_of(grouped, small_moe_weights())
    with pytest.raises(PassError, match=given + r".* routes in 2 equal groups .*; keep one of 4$"):
        run_passes(program, [ExpertPrune(**options)], PassContext(progress=False))  # no calibration: not reached


@pytest.mark.parametrize("options", [{"keep": 4}, {"keep": 10}, {"keep_ratio": 1.0}])
def test_a_target_of_every_expert_changes_nothing_and_says_so(options):
    program = program_of(SMALL_MOE, small_moe_weights())
    before = print_graph(program.graph)
    context = PassContext(calibration=token_samples(), progress=False)
    with pytest.warns(UserWarning, match="nothing was pruned"):
        (record,) = run_passes(program, [ExpertPrune(**options)], context)
    assert print_graph(program.graph) == before and not record["modified"]
    assert "keeps every expert (a layer has at most 4)" in record["summary"]["note"]
    assert [(row["experts_before"], row["experts_after"]) for row in record["summary"]["layers"]] == [(4, 4)]
    assert [(row["kept"], row["removed"]) for row in record["summary"]["layers"]] == [([0, 1, 2, 3], [])]
    assert not context.calibrations  # nothing to choose, so nothing calibrated


def test_recipe_errors_and_missing_calibration():
    with pytest.raises(PassError, match="keep=0 must be a positive number"):
        build_passes({"passes": [{"expert-prune": {"keep": 0}}]})
    program = program_of(SMALL_MOE, small_moe_weights())
    with pytest.raises(PassError, match="pass 'expert-prune' needs calibration data"):
        run_passes(program, [ExpertPrune(keep=2)], PassContext(progress=False))


@pytest.mark.parametrize(("preset", "keep", "criterion"), [
    ("tiny-mixtral", 3, "frequency"),
    ("tiny-qwen2-moe", 2, "weight_mass"),
    ("tiny-olmoe", 4, "similarity"),
    ("tiny-deepseek-v3", 4, "frequency"),  # 2 routing groups: 2 experts kept in each
    ("tiny-gpt-oss", 3, "weight_mass"),  # the router's own bias is pruned with its rows
])
def test_zoo_layers_match_the_masked_router_reference(preset, keep, criterion):
    program, example = captured(preset)
    layers = {layer.block: layer for layer in moe_layers(program, "test")}
    original = {block: (layer.tensors(program), layer.route.spec, layer.experts.spec) for block, layer in layers.items()}
    shared_before = {ref.name: program.weights[ref.name].clone()
                     for op in program.graph.ops_of(SharedExpertOp) for ref in op.weight_refs}
    generator = torch.Generator().manual_seed(5)
    samples = [{"input_ids": torch.randint(0, 128, (2, 12), generator=generator),
                "attention_mask": torch.ones(2, 12, dtype=torch.long)} for _ in range(3)]
    record, _ = prune(program, samples, keep=keep, criterion=criterion)
    for op in program.graph.ops_of(SharedExpertOp):
        for ref in op.weight_refs:
            assert torch.equal(program.weights[ref.name], shared_before[ref.name])
    seen = layer_io(program, program.flatten_inputs((), example))
    for block, (x, y) in seen.items():
        tensors, route_spec, experts_spec = original[block]
        kept = [i for i, row in enumerate(tensors["router"]) if any(torch.equal(row, r) for r in program.weights[
            layers[block].route.weight("router").name])]
        assert len(kept) == keep
        if route_spec.n_group > 1:
            groups = torch.tensor(kept) // (route_spec.num_experts // route_spec.n_group)
            assert groups.bincount().tolist() == [keep // route_spec.n_group] * route_spec.n_group
        expected = masked_reference(x, tensors, route_spec, experts_spec, kept)
        torch.testing.assert_close(y.float(), expected, atol=2e-5, rtol=1e-4)
    assert [r["experts_after"] for r in record["summary"]["layers"]] == [keep] * len(layers)
    route_spec = next(iter(original.values()))[1]
    if route_spec.scoring == "softmax" and route_spec.order == "score_then_topk" and not route_spec.renormalize:
        # OLMoE's softmax runs over the kept experts only: every kept weight grows, and the report says by how much
        assert all(r["output_norm_ratio"] > 1.05 for r in record["summary"]["layers"]), record["summary"]
