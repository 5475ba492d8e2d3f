"""The dynamic-skip pass: low-weight secondary experts are dropped per token, and the runner skips them."""

from __future__ import annotations

import pytest
import torch

from moec.api import layer_summary
from moec.backend.torch_runner import TorchRunner
from moec.errors import PassError
from moec.frontend.zoo import build_preset
from moec.ir import parse_graph, print_graph, verify
from moec.ir.ops import ExpertsOp, RouteOp
from moec.kernels import reference
from moec.kernels.skip import skipped_pairs
from moec.passes import PassContext, build_passes, run_passes
from moec.passes.dynamic_skip import DynamicSkip, skip_statistics
from tests.passes.moe_programs import SMALL_MOE, program_of, small_moe_weights, token_samples


def test_skipped_pairs_never_drop_the_top_expert():
    weights = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.5, 0.5, 0.0]])
    assert skipped_pairs(weights, 0.5).tolist() == [[False, True, True], [False, False, False], [False, False, True]]


def test_runner_output_equals_the_reference_without_the_dropped_pairs(compiled_program):
    # Tiny random routers score experts almost alike, so only a threshold near 1 drops pairs here.
    _, example, program = compiled_program("tiny-olmoe")
    run_passes(program, build_passes({"passes": [{"dynamic-skip": {"threshold": 0.97}}]}), PassContext())
    assert "skip_threshold=0.97" in print_graph(program.graph)
    verify(parse_graph(print_graph(program.graph)))
    checked = []

    def observe(op, args, result):
        if isinstance(op, ExpertsOp):
            x, indices, weights = args
            kept = weights.masked_fill(skipped_pairs(weights, 0.97), 0.0)
            w = {role: program.weights[op.kwargs[role].name] for role in ("w_in", "w_out")}
            want = reference.experts(x, indices, kept, w["w_in"], w["w_out"], None, None, op.spec)
            torch.testing.assert_close(result, want, rtol=1e-5, atol=1e-6)
            checked.append(op)

    inputs = program.flatten_inputs((), example)
    TorchRunner(program).run(inputs, observe=observe)
    assert checked
    stats = skip_statistics(program, [inputs])
    assert 0 < stats["skipped"] < stats["evaluations"]


def test_threshold_must_be_a_fraction():
    with pytest.raises(PassError, match="^dynamic-skip: threshold=1.0 must be in"):
        build_passes({"passes": [{"dynamic-skip": {"threshold": 1.0}}]})
    with pytest.raises(PassError, match="^dynamic-skip: threshold=0 must be in"):
        DynamicSkip(threshold=0)  # from Python too, the error names the pass


def test_top_1_routing_is_left_alone():
    top_1 = SMALL_MOE.replace("top_k=2", "top_k=1").replace("i64[s0, 2], f32[s0, 2]", "i64[s0, 1], f32[s0, 1]")
    program = program_of(top_1, small_moe_weights())
    with pytest.warns(UserWarning, match=r"dynamic-skip' changed nothing: every moe.experts op .* one expert \(top-1\)"):
        (record,) = run_passes(program, build_passes({"passes": [{"dynamic-skip": {"threshold": 0.5}}]}), PassContext())
    assert "skip_threshold" not in print_graph(program.graph)
    assert not record["modified"]
    assert {k: record["summary"][k] for k in ("expert_ops", "top_1_ops")} == {"expert_ops": 0, "top_1_ops": 1}


def test_the_layer_table_shows_the_skip_threshold():
    program = program_of(SMALL_MOE, small_moe_weights())
    run_passes(program, build_passes({"passes": [{"dynamic-skip": {"threshold": 0.25}}]}), PassContext())
    (experts_row,) = [row for row in layer_summary(program) if row["op"] == "moe.experts"]
    assert experts_row["detail"].endswith(", skips weights < 0.25 x top")


def skip_rate_by_hand(program, samples, threshold):
    """(evaluations, skipped) over the samples' rows, from the routing weights the program's router gives."""
    from moec.kernels.reference import route

    route_op = program.graph.ops_of(RouteOp)[0]
    weights = [route(x, program.weights["gate"], None, route_op.spec)[1] for (x,) in samples]
    return sum(w.numel() for w in weights), sum(int(skipped_pairs(w, threshold).sum()) for w in weights)


def test_the_skip_rate_is_measured_on_calibration_samples():
    program = program_of(SMALL_MOE, small_moe_weights())
    samples = token_samples()
    context = PassContext(calibration=samples)
    (record,) = run_passes(program, build_passes({"passes": [{"dynamic-skip": {"threshold": 0.5}}]}), context)
    summary = record["summary"]
    evaluations, skipped = skip_rate_by_hand(program, samples, 0.5)
    assert 0 < skipped < evaluations
    assert summary["measured"] and summary["samples"] == 4
    assert (summary["evaluations"], summary["skipped"]) == (evaluations, skipped) == (4 * 64 * 2, skipped)
    assert summary["skipped_fraction"] == pytest.approx(skipped / evaluations)
    assert 0 < summary["dropped_weight"] < summary["skipped_fraction"]  # skipped pairs carry the smaller weights
    (layer,) = summary["layers"]
    assert layer["layer"] == "moe" and layer["threshold"] == 0.5 and layer["skipped"] == skipped
    assert context.report["dynamic_skip"] == summary


def test_a_later_pass_that_changes_the_experts_has_the_skip_rate_measured_again():
    """A prune after dynamic-skip changes which experts tokens choose: the figures describe the final program
    (they kept the rate measured before the prune) and say after which pass they were taken."""
    program = program_of(SMALL_MOE, small_moe_weights(seed=2))
    samples = token_samples()
    context = PassContext(calibration=samples, progress=False)
    recipe = {"passes": [{"dynamic-skip": {"threshold": 0.5}}, {"expert-prune": {"keep": 3}}]}
    skip, _ = run_passes(program, build_passes(recipe), context)
    evaluations, skipped = skip_rate_by_hand(program, samples, 0.5)
    assert (skip["summary"]["evaluations"], skip["summary"]["skipped"]) == (evaluations, skipped)
    assert skip["summary"]["measured_after"] == "expert-prune"
    assert context.report["dynamic_skip"] is skip["summary"]


def test_without_calibration_the_skip_rate_is_not_measured():
    program = program_of(SMALL_MOE, small_moe_weights())
    (record,) = run_passes(program, build_passes({"passes": [{"dynamic-skip": {"threshold": 0.5}}]}), PassContext())
    summary = record["summary"]
    assert summary["measured"] is False and "no calibration samples" in summary["not_measured_because"]
    assert "skipped_fraction" not in summary
    assert not DynamicSkip().needs_calibration() and DynamicSkip().uses_calibration()


def test_padding_positions_are_not_counted(compiled_program):
    _, example, program = compiled_program("tiny-mixtral")
    run_passes(program, build_passes({"passes": [{"dynamic-skip": {"threshold": 0.97}}]}), PassContext())
    inputs = program.flatten_inputs((), example)
    whole = skip_statistics(program, [inputs])
    padded = dict(example, attention_mask=example["attention_mask"].clone())
    padded["attention_mask"][:, 5:] = 0  # 5 real tokens of 8 in each of 2 rows
    stats = skip_statistics(program, [program.flatten_inputs((), padded)])
    assert whole["evaluations"] == 2 * 2 * 8 * 2  # 2 layers x 16 tokens x top-2
    assert stats["evaluations"] == 2 * 2 * 5 * 2
    assert [row["evaluations"] for row in stats["layers"]] == [20, 20]
    assert [row["layer"] for row in stats["layers"]] == ["model.layers.0.mlp", "model.layers.1.mlp"]


def test_compile_with_calibration_for_dynamic_skip_alone_uses_it(recwarn):
    import moec

    model, example = build_preset("tiny-mixtral")
    samples = [{"input_ids": torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(i)),
                "attention_mask": torch.ones(2, 8, dtype=torch.int64)} for i in range(2)]
    compiled = moec.compile(model, example, recipe={"passes": [{"dynamic-skip": {"threshold": 0.97}}]},
                            calibration=samples)
    assert not [w for w in recwarn if "calibration is not used" in str(w.message)]
    report = compiled.report["dynamic_skip"]
    assert report["measured"] and report["samples"] == 2 and report["evaluations"] == 2 * 2 * 16 * 2
