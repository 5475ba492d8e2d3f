"""dense-to-moe on hand-written IR and on the tiny dense zoo: exactness when every expert runs, the rewrite's
shape, option errors, and that a fitted router beats random routing."""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

import moec
from moec.api import parity
from moec.backend.torch_runner import TorchRunner
from moec.errors import PassError
from moec.ir import DenseFFNOp, ExpertsOp, RouteOp, SharedExpertOp, parse_graph, print_graph, verify
from moec.ir.program import Program, dump_treespec
from moec.passes import PassContext, build_passes, run_passes

GELU_FFN = """\
graph @main(%x: f32[s0, 8]) {
  weight @mlp.up.weight: f32[16, 8]
  weight @mlp.up.bias: f32[16]
  weight @mlp.down.weight: f32[8, 16]
  weight @mlp.down.bias: f32[8]
  %0 = ffn.dense(%x, w_up=@mlp.up.weight, w_down=@mlp.down.weight, b_up=@mlp.up.bias, b_down=@mlp.down.bias, hidden=8, intermediate=16, act="gelu", block="mlp") : f32[s0, 8]
  return %0
}
"""

GATED_FFN = """\
graph @main(%x: f32[s0, 8]) {
  weight @mlp.gate.weight: f32[16, 8]
  weight @mlp.up.weight: f32[16, 8]
  weight @mlp.down.weight: f32[8, 16]
  %0 = ffn.dense(%x, w_up=@mlp.up.weight, w_down=@mlp.down.weight, w_gate=@mlp.gate.weight, hidden=8, intermediate=16, act="silu", block="mlp") : f32[s0, 8]
  return %0
}
"""

CLAMPED_FFN = GATED_FFN.replace('act="silu",', 'act="silu", limit=0.5,')  # GLM-5-Next's and DeepSeek-V4's MLPs

AFTER_CENTROID = """\
graph @main(%x: f32[s0, 8]) {
  weight @mlp.down.bias: f32[8]
  weight @mlp.moe.router.weight: f32[4, 8]
  weight @mlp.moe.router.bias: f32[4]
  weight @mlp.moe.experts.w_in: f32[4, 4, 8]
  weight @mlp.moe.experts.w_out: f32[4, 8, 4]
  weight @mlp.moe.experts.b_in: f32[4, 4]
  %0, %1 = moe.route(%x, router=@mlp.moe.router.weight, router_bias=@mlp.moe.router.bias, num_experts=4, top_k=2, scoring="softmax", order="topk_then_score", renormalize=true, renorm_eps=0.0, scaling=2.0, n_group=1, topk_group=1, block="mlp") : i64[s0, 2], f32[s0, 2]
  %2 = moe.experts(%x, %0, %1, w_in=@mlp.moe.experts.w_in, w_out=@mlp.moe.experts.w_out, b_in=@mlp.moe.experts.b_in, num_experts=4, hidden=8, intermediate=4, act="gelu", gated=false, block="mlp") : f32[s0, 8]
  %3 = aten.add.Tensor(%2, @mlp.down.bias) : f32[s0, 8]
  return %3
}
"""


def program_from(text: str, seed: int = 0) -> Program:
    graph = parse_graph(text)
    generator = torch.Generator().manual_seed(seed)
    weights = {name: torch.randn(t.shape, generator=generator) * 0.5 for name, t in graph.weights.items()}
    in_spec = dump_treespec(pytree.tree_flatten(((torch.zeros(1, 8),), {}))[1])
    return Program(graph, weights, in_spec, dump_treespec(pytree.tree_flatten(torch.zeros(1))[1]))


def convert(program: Program, calibration=None, **options) -> PassContext:
    context = PassContext(calibration=calibration, progress=False)
    run_passes(program, build_passes({"passes": [{"dense_to_moe": options}]}), context)
    return context


def run(program: Program, x: torch.Tensor) -> torch.Tensor:
    return TorchRunner(program).run([x])[0]


def token_samples(count=4, tokens=64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(tokens, 8, generator=generator),) for _ in range(count)]


def test_golden_rewrite_with_a_centroid_router():
    program = program_from(GELU_FFN)
    convert(program, experts=4, top_k=2, router="centroid")
    assert print_graph(program.graph) == AFTER_CENTROID
    assert set(program.weights) == set(program.graph.weights)


@pytest.mark.parametrize("text", [GELU_FFN, GATED_FFN, CLAMPED_FFN], ids=["gelu", "gated-silu", "clamped"])
@pytest.mark.parametrize("shared", [0.0, 0.25])
@pytest.mark.parametrize("method", ["weights", "coactivation"])
def test_all_experts_active_computes_the_dense_ffn(text, shared, method):
    program = program_from(text)
    x = torch.randn(32, 8)
    expected = run(program, x)
    convert(program, calibration=token_samples(), experts=4 if shared == 0 else 3, top_k=4 if shared == 0 else 3,
            shared=shared, method=method)
    verify(program.graph)
    graph = program.graph
    assert not graph.ops_of(DenseFFNOp) and len(graph.ops_of(RouteOp)) == len(graph.ops_of(ExpertsOp)) == 1
    assert len(graph.ops_of(SharedExpertOp)) == (1 if shared else 0)
    torch.testing.assert_close(run(program, x), expected, rtol=1e-5, atol=1e-5)
    if "limit=" in text:  # the clamp binds on these rows and carries over to the experts
        assert all(op.spec.limit == 0.5 for op in graph.ops_of(ExpertsOp))
        assert (expected - run(program_from(GATED_FFN), x)).abs().max() > 1e-3


def test_shared_expert_holds_the_most_frequently_active_neurons():
    program = program_from(GATED_FFN)
    context = convert(program, calibration=token_samples(), experts=3, top_k=1, shared=0.25)
    frequency = context.calibrations[0].dense["mlp"].frequency
    (shared,) = program.graph.ops_of(SharedExpertOp)
    original_gate = program_from(GATED_FFN).weights["mlp.gate.weight"]
    shared_gate = program.weights[shared.weight("w_gate").name]
    chosen = [int((original_gate == row).all(1).nonzero()) for row in shared_gate]
    assert sorted(chosen) == sorted(torch.argsort(frequency, descending=True)[:4].tolist())


def test_mean_compensation_is_each_experts_mean_output_on_the_calibration_rows():
    """With top_k < experts a skipped expert's share is replaced by its mean: every expert's output bias is
    minus its mean output over the calibration rows, and the FFN's output bias gains the sum of the means."""
    program = program_from(GELU_FFN)
    samples = token_samples()
    convert(program, calibration=samples, experts=4, top_k=2)
    original = program_from(GELU_FFN).weights
    up, down = original["mlp.up.weight"], original["mlp.down.weight"]
    x = torch.cat([x for (x,) in samples])
    hidden = torch.nn.functional.gelu(x @ up.T + original["mlp.up.bias"])
    means = []
    for rows in program.weights["mlp.moe.experts.w_in"]:  # [F_e, 8]: the expert's neurons' up rows
        neurons = [int((up == row).all(1).nonzero()) for row in rows]
        means.append((hidden[:, neurons] @ down[:, neurons].T).mean(0))
    torch.testing.assert_close(program.weights["mlp.moe.experts.b_out"], -torch.stack(means), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(program.weights["mlp.moe.output_bias"], original["mlp.down.bias"] + sum(means),
                               atol=1e-5, rtol=1e-5)


def test_fitted_router_beats_random_routing():
    program = program_from(GELU_FFN)
    x = token_samples(count=1, tokens=512, seed=7)[0][0]
    expected = run(program, x)
    fitted = program_from(GELU_FFN)
    convert(fitted, calibration=token_samples(count=8), experts=8, top_k=2)
    from moec.analysis.quality import RoutedRunner

    error = (run(fitted, x) - expected).norm() / expected.norm()
    random_error = (RoutedRunner(fitted, "random").run([x])[0] - expected).norm() / expected.norm()
    oracle_error = (RoutedRunner(fitted, "oracle").run([x])[0] - expected).norm() / expected.norm()
    assert oracle_error < error < random_error


@pytest.mark.parametrize(("options", "message"), [
    ({"experts": 32, "top_k": 2}, r"block 'mlp': experts=32 must be in 1\.\.16"),
    ({"experts": 4, "top_k": 5}, r"top_k=5 must be in 1\.\.experts=4 \(every layer gets 4 experts\)"),
    ({"experts": 5, "top_k": 2}, r"block 'mlp': the 16 routed neurons .* do not split into experts=5"),
    ({"experts": 4, "top_k": 2, "shared": 0.3}, r"block 'mlp': the 11 routed neurons"),
    ({"experts": 4, "top_k": 2, "shared": 0.01}, r"block 'mlp': shared=0.01 gives the shared expert no neuron .* "
                                                 r"use shared >= 0\.0625 \(one neuron\)"),
    ({"experts": 4, "top_k": 2, "shared": 0.99}, r"block 'mlp': shared=0.99 puts all 16 neurons of the FFN in the "
                                                 r"shared expert .* use shared <= 0\.75 to leave one neuron for each"),
    ({"experts": 4, "top_k": 2, "shared": 0.9}, r"block 'mlp': shared=0.9 leaves 2 of the FFN's 16 neurons to route "
                                                r"\(round\(shared \* 16\) = 14 shared\), fewer than experts=4; use shared "
                                                r"<= 0\.75, or fewer experts"),
    ({"experts": 4, "top_k": 2, "layers": [0, "mlp"]}, r"layers: 'mlp' names block 'mlp' a second time"),
    ({"experts": 4, "top_k": 2, "layers": []}, r"layers=\[\] chooses no FFN"),
])
def test_bad_options_name_the_block_and_change_nothing(options, message):
    program = program_from(GELU_FFN)
    with pytest.raises(PassError, match=message):
        convert(program, calibration=token_samples(), **options)
    assert print_graph(program.graph) == GELU_FFN


def test_a_block_converted_before_is_named_as_such():
    program = program_from(GELU_FFN)
    context = PassContext(calibration=token_samples(), progress=False)
    recipe = {"passes": [{"dense_to_moe": {"experts": 4, "top_k": 2, "layers": ["mlp"]}}]}
    (record,) = run_passes(program, build_passes(recipe), context)
    assert record["summary"]["blocks"] == ["mlp"]
    with pytest.raises(PassError, match=r"layers: block 'mlp' already runs routed experts"):
        run_passes(program, build_passes(recipe), context)


@pytest.mark.parametrize(("options", "clustering"), [
    ({"router": "fitted"}, "coactivation"),
    ({"router": "fitted", "method": "weights"}, "weights"),
    ({"router": "centroid"}, "weights"),
    ({"router": "centroid", "shared": 0.25}, "coactivation"),
])
def test_clustering_defaults_to_coactivation_when_the_pass_calibrates(options, clustering):
    program = program_from(GELU_FFN)
    calibrates = options["router"] == "fitted" or "shared" in options
    context = PassContext(calibration=token_samples() if calibrates else None, progress=False)
    experts = 3 if "shared" in options else 4
    recipe = {"passes": [{"dense_to_moe": {"experts": experts, "top_k": 2, **options}}]}
    (record,) = run_passes(program, build_passes(recipe), context)
    assert record["summary"]["method"] == clustering


def test_passes_needing_calibration_say_so():
    with pytest.raises(PassError, match="needs calibration data"):
        convert(program_from(GELU_FFN), experts=4, top_k=2, router="fitted")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
def test_tiny_dense_zoo_converts_exactly_with_every_expert_and_runs_with_fewer(name, preset):
    model, example = preset(name)
    samples = [example, {k: v.flip(-1) if k == "input_ids" else v for k, v in example.items()}]
    every = {"passes": [{"dense_to_moe": {"experts": 4, "top_k": 4, "shared": 0.25 if name != "tiny-gpt2" else 0.0}}]}
    compiled = moec.compile(model, example, recipe=every, calibration=samples)
    graph = compiled.program.graph
    assert not graph.ops_of(DenseFFNOp) and len(graph.ops_of(ExpertsOp)) == 2
    assert parity(model, compiled, example) <= 1e-4
    half = moec.compile(model, example, recipe={"passes": [{"dense_to_moe": {"experts": 4, "top_k": 2}}]},
                        calibration=compiled.calibration)
    assert all(op.spec.top_k == 2 for op in half.program.graph.ops_of(RouteOp))
    assert 0 < parity(model, half, example) < float("inf")


@pytest.mark.parametrize("text", [GELU_FFN, GATED_FFN])
def test_neuron_oracle_keeps_each_tokens_largest_contributions(text):
    """The bound the bench compares routers with: per token, the top quarter of neurons by true contribution
    run, the others contribute their mean; with every neuron kept it is the dense FFN."""
    from moec.analysis.quality import NeuronOracleRunner

    program = program_from(text)
    x = token_samples(count=1, tokens=32, seed=3)[0][0]
    w = program.weights
    gated = "w_gate" in text
    up = x @ w["mlp.up.weight"].T + (w["mlp.up.bias"] if "mlp.up.bias" in w else 0)
    h = torch.nn.functional.silu(x @ w["mlp.gate.weight"].T) * up if gated else torch.nn.functional.gelu(up)
    mean = torch.randn(16, generator=torch.Generator().manual_seed(4))
    contribution = (h - mean).abs() * w["mlp.down.weight"].norm(dim=0)
    kept = contribution >= contribution.topk(4, dim=-1).values[:, -1:]
    expected = torch.where(kept, h, mean) @ w["mlp.down.weight"].T + (w["mlp.down.bias"] if "mlp.down.bias" in w else 0)

    got = NeuronOracleRunner(program, 0.25, {"mlp": mean}).run([x])[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    everything = NeuronOracleRunner(program, 1.0, {"mlp": mean}).run([x])[0]
    torch.testing.assert_close(everything, run(program, x), rtol=1e-5, atol=1e-5)
