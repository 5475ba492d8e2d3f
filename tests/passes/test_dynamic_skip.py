"""The dynamic-skip pass: low-weight secondary experts are dropped per token, and the runner skips them."""

from __future__ import annotations

import pytest
import torch

from moec.api import layer_summary
from moec.backend.torch_runner import TorchRunner
from moec.errors import PassError
from moec.ir import parse_graph, print_graph, verify
from moec.ir.ops import ExpertsOp
from moec.kernels import reference
from moec.kernels.skip import skipped_pairs
from moec.passes import PassContext, build_passes, run_passes
from moec.passes.dynamic_skip import DynamicSkip, skip_statistics
from tests.passes.moe_programs import SMALL_MOE, program_of, small_moe_weights


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
