"""The quantize pass: packed storage, parity with a reference model on the dequantized weights, plans."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from moec.analysis.calibration import fingerprint
from moec.analysis.ffn_activations import collect
from moec.api import CompiledModel, load
from moec.backend.torch_runner import TorchRunner
from moec.errors import MoecError, PassError
from moec.ir.ops import ExpertsOp
from moec.ir.quant import QuantizedType, storage_names
from moec.ir.types import TensorType
from moec.kernels.quant import QuantizedWeight
from moec.passes import PassContext, build_passes, run_passes
from moec.passes.manager import refused_order
from moec.passes.quantize import calibration_rows, quantizable_units, quantize_units
from tests.passes.moe_programs import SMALL_MOE, program_of, small_moe_weights, token_samples


def quantized(program, recipe, calibration=None):
    run_passes(program, build_passes({"passes": recipe}), PassContext(calibration=calibration))
    return program


def dequantized_reference(program):
    """The same program with every quantized weight replaced by its float32 dequantization."""
    from tests.passes.conftest import clone

    reference = clone(program)
    for name, weight_type in list(reference.graph.weights.items()):
        if isinstance(weight_type, QuantizedType):
            weight = QuantizedWeight.from_storage(name, weight_type, program.weights)
            for stored in storage_names(name).values():
                del reference.weights[stored]
            reference.weights[name] = weight.dequantize()
            from moec.ir.types import TensorType

            reference.graph.weights[name] = TensorType(weight_type.dtype, weight_type.shape)
    return reference


@pytest.mark.parametrize(("preset", "recipe"), [
    ("tiny-mixtral", [{"quantize": {"bits": 4, "group": 32}}]),
    ("tiny-qwen2-moe", [{"quantize": {"bits": 3, "group": 32}}]),
    ("tiny-llama", [{"quantize": {"bits": 2, "group": 32}}]),
])
def test_parity_with_the_dequantized_reference(compiled_program, preset, recipe):
    model, example, program = compiled_program(preset)
    program = quantized(program, recipe)
    assert any(isinstance(t, QuantizedType) for t in program.graph.weights.values())
    inputs = program.flatten_inputs((), example)
    want = TorchRunner(dequantized_reference(program)).run(inputs)[0]
    exact = TorchRunner(program, quant_kernel="dequant").run(inputs)[0]
    torch.testing.assert_close(exact, want, rtol=1e-5, atol=1e-5)
    fast = TorchRunner(program).run(inputs)[0]  # int4pack for 4-bit matrices: bfloat16 activations
    torch.testing.assert_close(fast, want, rtol=0.05, atol=0.02 * float(want.abs().max()))


def test_gptq_runs_on_calibration_and_stays_close(compiled_program):
    model, example, program = compiled_program("tiny-mixtral")
    inputs = program.flatten_inputs((), example)
    float_out = TorchRunner(program).run(inputs)[0]
    errors = {}
    for method in ("rtn", "gptq"):
        _, _, fresh = compiled_program("tiny-mixtral")
        q = quantized(fresh, [{"quantize": {"bits": 3, "group": 32, "method": method}}], calibration=[inputs])
        errors[method] = float((TorchRunner(q, quant_kernel="dequant").run(inputs)[0] - float_out).pow(2).mean())
    assert errors["gptq"] < errors["rtn"]


def test_gptq_declares_it_needs_calibration_and_names_itself_without_it(compiled_program):
    assert build_passes({"passes": [{"quantize": {"method": "gptq"}}]})[0].needs_calibration()
    assert not build_passes({"passes": [{"quantize": {"method": "rtn"}}]})[0].needs_calibration()
    _, _, program = compiled_program("tiny-mixtral")
    with pytest.raises(PassError, match=r"pass 'quantize' needs calibration data: pass calibration=.* to "
                                        r"moec.compile, or --calibration FILE to the moec CLI"):
        quantized(program, [{"quantize": {"group": 32, "method": "gptq"}}])


def test_gptq_on_calibration_the_model_cannot_run_names_the_sample(compiled_program):
    _, example, program = compiled_program("tiny-mixtral")
    inputs = program.flatten_inputs((), example)
    out_of_vocabulary = [inputs[0] + 10**6, *inputs[1:]]
    with pytest.raises(MoecError, match=r"^pass 'quantize' failed: calibration sample 1: input 'input_ids' holds ids "
                                        r"\d+..\d+, outside its embedding table's 128 rows \(ids 0..127\), and the "
                                        r"model fails on it \(IndexError: .*\)"):
        quantized(program, [{"quantize": {"group": 32, "method": "gptq"}}], calibration=[inputs, out_of_vocabulary])


def test_gptq_after_a_merge_that_keeps_every_router_row(compiled_program):
    """The router still picks among 8 experts; GPTQ calibrates each of the 2 stored experts on its members' rows."""
    _, example, program = compiled_program("tiny-mixtral")
    inputs = program.flatten_inputs((), example)
    recipe = [{"expert-merge": {"keep": 2, "router": "members"}}, {"quantize": {"bits": 8, "group": 32, "method": "gptq"}}]
    merged_out = None

    def after_merge(pass_, program, record):
        nonlocal merged_out
        if pass_.name == "expert-merge":
            merged_out = TorchRunner(program).run(inputs)[0]

    run_passes(program, build_passes({"passes": recipe}), PassContext(calibration=[inputs]), hooks=[after_merge])
    assert program.graph.ops_of(ExpertsOp)[0].expert_map is not None
    out = TorchRunner(program, quant_kernel="dequant").run(inputs)[0]
    torch.testing.assert_close(out, merged_out, rtol=0.02, atol=0.02 * float(merged_out.abs().max()))


@pytest.mark.parametrize(("preset", "rewrite", "layer"), [
    ("tiny-mixtral", {"expert-prune": {"keep": 2}}, "model.layers.0.mlp"),
    ("tiny-mixtral", {"expert-merge": {"keep": 2}}, "model.layers.0.mlp"),
    ("tiny-llama", {"dense-to-moe": {"experts": 4, "top_k": 2}}, "model.layers.0.mlp"),
])
def test_passes_that_rewrite_float_weights_refuse_quantized_layers(compiled_program, preset, rewrite, layer):
    """A program quantized by an earlier run of passes: the rewriting pass refuses it when it runs."""
    _, example, program = compiled_program(preset)
    (name,) = rewrite
    calibration = [program.flatten_inputs((), example)]
    quantized(program, [{"quantize": {"bits": 4, "group": 32}}])
    with pytest.raises(PassError, match=rf"pass '{name}' failed: layer {layer} is already quantized \(@{layer}\..*\); "
                                        rf"run {name} before quantize"):
        quantized(program, [rewrite], calibration=calibration)


@pytest.mark.parametrize(("preset", "rewrite", "kind"), [
    ("tiny-mixtral", {"expert-prune": {"keep": 2}}, "experts"),
    ("tiny-mixtral", {"expert-merge": {"keep": 2}}, "experts"),
    ("tiny-llama", {"dense-to-moe": {"experts": 4, "top_k": 2}}, "dense FFNs"),
])
def test_a_recipe_rewriting_weights_it_quantized_is_refused_before_any_pass_runs(compiled_program, preset, rewrite,
                                                                                  kind):
    _, example, program = compiled_program(preset)
    (name,) = rewrite
    with pytest.raises(PassError, match=rf"^the recipe's order will not run: '{name}' comes after 'quantize', which "
                                        rf"quantized the {kind} it rewrites: {name} works on float weights; put it "
                                        "before quantize and bit-allocation in the recipe$"):
        quantized(program, [{"quantize": {"bits": 4, "group": 32}}, rewrite],
                  calibration=[program.flatten_inputs((), example)])
    assert not any(isinstance(t, QuantizedType) for t in program.graph.weights.values())  # quantize did not run


def test_a_recipe_leaving_what_it_rewrites_float_is_let_run(compiled_program):
    """Quantizing only routed experts of a dense model quantizes nothing: dense-to-moe and pruning may follow."""
    _, _, program = compiled_program("tiny-llama")
    passes = build_passes({"passes": [{"quantize": {"bits": 4, "dense": False}}, {"dense-to-moe": {"experts": 4}},
                                      {"expert-prune": {"keep": 2}}]})
    assert refused_order(program, passes) is None
    passes = build_passes({"passes": [{"dense-to-moe": {"experts": 4}}, {"quantize": {"bits": 4, "dense": False}},
                                      {"expert-prune": {"keep": 2}}]})
    assert "'expert-prune' comes after 'quantize', which quantized the experts" in refused_order(program, passes)
    _, _, with_shared = compiled_program("tiny-qwen2-moe")  # routed and shared experts, no dense FFN
    passes = build_passes({"passes": [{"quantize": {"bits": 4}}, {"dense-to-moe": {"experts": 4}}]})
    assert refused_order(with_shared, passes) is None  # dense-to-moe finds nothing to convert: a note, not a refusal


def test_bit_allocation_after_quantize_names_the_quantized_weight(compiled_program):
    _, example, program = compiled_program("tiny-mixtral")
    quantized(program, [{"quantize": {"bits": 4, "group": 32}}])
    with pytest.raises(PassError, match=r"weight @model.layers.0.mlp.experts.\w+ is already quantized \(by an earlier "
                                        r"quantize or bit-allocation\); quantize each weight once"):
        quantized(program, [{"bit-allocation": {"group": 32}}], calibration=[program.flatten_inputs((), example)])


def test_a_recipe_quantizing_the_experts_twice_is_refused_before_any_pass_runs(compiled_program):
    _, example, program = compiled_program("tiny-mixtral")
    with pytest.raises(PassError, match=r"'bit-allocation' comes after 'quantize', which already quantized the "
                                        r"experts: quantize each weight once"):
        quantized(program, [{"quantize": {"bits": 4, "group": 32}}, {"bit-allocation": {"group": 32}}],
                  calibration=[program.flatten_inputs((), example)])


def test_calibrating_after_quantize_fingerprints_the_packed_storage(compiled_program):
    """dense-to-moe calibrates a program whose experts are already quantized (DeepSeek-V3's first FFN is dense)."""
    _, example, program = compiled_program("tiny-deepseek-v3")
    context = PassContext(calibration=[program.flatten_inputs((), example)], progress=False)
    recipe = [{"quantize": {"bits": 4, "group": 32, "dense": False}},
              {"dense-to-moe": {"experts": 4, "top_k": 2, "router": "fitted"}}]
    run_passes(program, build_passes({"passes": recipe}), context)
    assert len(program.graph.ops_of(ExpertsOp)) == 2
    first = fingerprint(program)
    name = next(n for n, t in program.graph.weights.items() if isinstance(t, QuantizedType))
    program.weights[f"{name}.scales"] = program.weights[f"{name}.scales"] * 2
    assert fingerprint(program) != first


def test_plan_holds_packed_storage_and_reports_its_bytes(compiled_program, tmp_path):
    model, example, program = compiled_program("tiny-mixtral")
    float_expert_bytes = sum(program.weights[n].numel() * 4 for n, t in program.graph.weights.items() if "experts" in n)
    program = quantized(program, [{"quantize": {"bits": 4, "group": 32, "dense": False}}])
    plan = CompiledModel(program).save(tmp_path / "plan")
    stored = safetensors.torch.load_file(str(plan / "weights.safetensors"))
    quantized_names = [n for n, t in program.graph.weights.items() if isinstance(t, QuantizedType)]
    assert quantized_names and all(n not in stored for n in quantized_names)
    on_disk = sum(stored[s].numel() * stored[s].element_size() for n in quantized_names for s in storage_names(n).values())
    assert on_disk == sum(program.graph.weights[n].storage_bytes for n in quantized_names)
    assert float_expert_bytes / on_disk > 6  # 4 bits + 24 bits of scale/zero per 32 values: 32 / 4.75
    again = load(plan)
    inputs = program.flatten_inputs((), example)
    torch.testing.assert_close(again.runner.run(inputs)[0], TorchRunner(program).run(inputs)[0])


def test_layer_table_shows_each_quantized_ops_widths_and_group(compiled_program):
    """``moec inspect`` and ``moec compile`` print these rows: a quantized layer says so, a float one does not."""
    _, _, program = compiled_program("tiny-qwen2-moe")
    rows = CompiledModel(quantized(program, [{"quantize": {"bits": 3, "group": 32}}])).summary()
    assert {row["op"] for row in rows if row["detail"].endswith(", 3-bit, group 32")} == {"moe.experts", "moe.shared_expert"}
    assert not any("bit" in row["detail"] for row in rows if row["op"] == "moe.route")
    _, _, program = compiled_program("tiny-mixtral")
    units = quantizable_units(program, dense=False)  # 4 experts in each of 2 layers
    quantize_units(program, units, [2, 3, 4, 8] * 2, 32, "rtn", None)
    details = [row["detail"] for row in CompiledModel(program).summary() if row["op"] == "moe.experts"]
    assert details and all(detail.endswith(", 2-8 bits (mean 4.25), group 32") for detail in details)
    _, _, program = compiled_program("tiny-mixtral")
    units = quantizable_units(program, dense=False, per_linear=True)  # w_in is twice w_out's size in every expert
    quantize_units(program, units, [2 if unit.roles == ("w_in",) else 8 for unit in units], 32, "rtn", None)
    details = [row["detail"] for row in CompiledModel(program).summary() if row["op"] == "moe.experts"]
    assert details and all(detail.endswith(", 2-8 bits (mean 4.00), group 32") for detail in details)  # per parameter


@pytest.mark.parametrize(("options", "message"), [
    ({"bits": 5}, r"bits=5 is not supported; use one of \[2, 3, 4, 8\]"),
    ({"group": 48}, r"group size 48 is not supported"),
])
def test_bad_options_are_one_error(options, message):
    with pytest.raises(PassError, match=message):
        build_passes({"passes": [{"quantize": options}]})


def test_group_that_does_not_divide_names_the_weight(compiled_program):
    _, _, program = compiled_program("tiny-mixtral")  # hidden 32: a group of 64 does not divide w_in's rows
    with pytest.raises(PassError, match=r"weight @.*experts.* group size 64 does not divide the reduced dimension 32"):
        quantized(program, [{"quantize": {"bits": 4, "group": 64}}])


def dense_ffn(width: int):
    """One ``ffn.dense`` of hidden size ``width`` and intermediate size 64."""
    text = f"""\
graph @main(%x: f32[s0, {width}]) {{
  weight @mlp.up.weight: f32[64, {width}]
  weight @mlp.down.weight: f32[{width}, 64]
  %0 = ffn.dense(%x, w_up=@mlp.up.weight, w_down=@mlp.down.weight, hidden={width}, intermediate=64, act="gelu", \
block="mlp") : f32[s0, {width}]
  return %0
}}
"""
    return program_of(text, {"mlp.up.weight": torch.randn(64, width), "mlp.down.weight": torch.randn(width, 64)})


@pytest.mark.parametrize(("program", "group", "advice"), [
    (lambda: dense_ffn(32), 64, r"group size 64 does not divide the reduced dimension 32; set the pass's group option to 32$"),
    (lambda: dense_ffn(64), 128, r"group size 128 does not divide the reduced dimension 64; set the pass's group option to 32 or 64$"),
    (lambda: dense_ffn(8), 32, r"group size 32 does not divide the reduced dimension 8; no supported group size "
                               r"\(32, 64, 128\) divides it, so this weight cannot be quantized, and the model has no "
                               r"routed experts to quantize instead \(dense: false would leave nothing\)$"),
    (lambda: program_of(SMALL_MOE, small_moe_weights()), 32,
     r"reduced dimension 8; no supported group size \(32, 64, 128\) divides it, so this weight cannot be quantized; "
     r"if dense-to-moe made these experts, fewer of them \(its experts option\) makes each wider$"),
], ids=["dense-32", "dense-64", "dense-8", "experts-8"])
def test_group_that_does_not_divide_says_which_group_would(program, group, advice):
    with pytest.raises(PassError, match=advice):
        quantized(program(), [{"quantize": {"bits": 4, "group": group}}])


def test_float64_weights_are_refused_naming_the_dtypes_quantize_takes():
    program = dense_ffn(64)
    program.weights = {name: tensor.double() for name, tensor in program.weights.items()}
    program.graph.weights = {name: TensorType.of(tensor) for name, tensor in program.weights.items()}
    with pytest.raises(PassError, match=r"weight @mlp.up.weight is torch.float64; quantize takes float32, float16 "
                                        r"and bfloat16 weights"):
        quantized(program, [{"quantize": {"bits": 4, "group": 32}}])


def test_calibration_rows_of_experts_weighing_their_input_are_the_rows_they_compute_on():
    """GPTQ and the bit-allocation errors see each expert's rows scaled by its routing weight when the
    experts take the weight on their input (Llama 4), and the plain token rows otherwise."""
    for weighted_input in (False, True):
        text = SMALL_MOE.replace('gated=true,', f'gated=true, weighted_input={str(weighted_input).lower()},')
        program = program_of(text, small_moe_weights())
        activations = collect(program, [list(sample) for sample in token_samples()])
        op_index = program.graph.ops.index(program.graph.ops_of(ExpertsOp)[0])
        record = activations.ops[op_index]
        slots = record.indices == 1
        chosen = slots.any(dim=-1)
        weight = (record.weights * slots).sum(dim=-1, keepdim=True)[chosen]
        expected = record.inputs[chosen] * (weight if weighted_input else 1.0)
        torch.testing.assert_close(calibration_rows(program, activations, op_index, 1), expected)
        assert (weight < 0.99).any()  # the scaling shows

