"""The bit-allocation pass: widths per expert under a budget, its report, and real-weights quality."""

from __future__ import annotations

import pytest
import torch
import transformers

from moec.analysis.corpus import calibration_and_held_out
from moec.analysis.quality import embedding_cosine
from moec.backend.torch_runner import TorchRunner
from moec.errors import PassError
from moec.frontend.capture import capture
from moec.frontend.zoo import build_preset, minilm_path
from moec.ir.quant import QuantizedType
from moec.passes import PassContext, bit_allocation, build_passes, run_passes
from moec.passes.bit_allocation import OutputError
from moec.passes.quantize import quantizable_units, quantize_units
from tests.passes.conftest import clone


def allocate(program, calibration, **options):
    context = PassContext(calibration=calibration)
    run_passes(program, build_passes({"passes": [{"bit-allocation": options}]}), context)
    return context.report["bit_allocation"]


@pytest.mark.parametrize("importance", ["routing", "output"])
def test_per_expert_widths_meet_the_budget(compiled_program, importance):
    _, example, program = compiled_program("tiny-olmoe")
    inputs = program.flatten_inputs((), example)
    report = allocate(program, [inputs], budget=2.5, group=32, dense=False, importance=importance)
    expert_types = [t for t in program.graph.weights.values() if isinstance(t, QuantizedType)]
    assert len(expert_types) == 4 and all(len(t.bits) == 8 for t in expert_types)  # 2 layers x (w_in, w_out)
    assert report["average_bits"] <= 2.5 + 1e-9 and len(report["table"]) == 16
    assert set(report["uniform"]) == {"2", "3", "4", "8"}
    for row in report["table"]:  # every unit's measured error falls with each wider width
        errors = [row["error"][width] for width in ("2", "3", "4", "8")]
        assert errors[0] > errors[1] > errors[2] > errors[3] > 0, row
    # The solved objective is at least as good as any uniform width that fits the budget.
    assert report["lower_bound"] <= report["objective"] <= report["uniform"]["2"]["objective"] + 1e-12
    assert TorchRunner(program).run(inputs)[0].isfinite().all()


def test_output_error_leaves_padding_positions_out(compiled_program):
    """Padded positions' outputs depend on their token ids but are no tokens of the sample: the measured error
    of rounding a unit must not change when only the ids under ``attention_mask == 0`` change."""
    _, example, program = compiled_program("tiny-mixtral")
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    ids = example["input_ids"].clone()
    other_ids = ids.clone()
    other_ids[1, 5:] = (ids[1, 5:] + 7) % 64
    (unit, *_) = quantizable_units(program, dense=False, per_linear=False)
    errors = [OutputError(program, [program.flatten_inputs((), {"input_ids": x, "attention_mask": mask})], 32)([unit], [2])
              for x in (ids, other_ids)]
    assert errors[0] > 0 and errors[0] == pytest.approx(errors[1], rel=1e-6)


def test_output_error_keeps_its_reference_within_its_memory_bound(compiled_program, monkeypatch):
    """A causal LM's first output is its logits: the reference keeps an equal seeded subset of each batch's
    rows that fits ``REFERENCE_BYTES``, the same rows as the unbounded reference."""
    _, example, program = compiled_program("tiny-mixtral")
    batches = [program.flatten_inputs((), example)] * 2
    (unit, *_) = quantizable_units(program, dense=False, per_linear=False)
    full = OutputError(program, batches, 32)
    width = full.reference[0].shape[-1]
    monkeypatch.setattr(bit_allocation, "REFERENCE_BYTES", 8 * width * 6)
    bounded = OutputError(program, batches, 32)
    assert [rows.shape[0] for rows in bounded.reference] == [3, 3] < [rows.shape[0] for rows in full.reference]
    for index, rows in enumerate(bounded.reference):
        torch.testing.assert_close(rows, full.reference[index][bounded.picks[index]], rtol=0, atol=0)
    assert bounded([unit], [2]) > 0


def test_keeps_the_uniform_width_when_the_allocation_measures_worse(compiled_program, monkeypatch):
    """A misleading error table makes the LP put half the experts at 2 bits and half at 4 (objective 0);
    rounded together, that mix measures a larger output error than every expert at 3 bits, so the pass
    applies uniform 3 bits and says so."""
    _, example, program = compiled_program("tiny-olmoe")
    inputs = program.flatten_inputs((), example)

    def misleading(program, unit, widths, group, activations):
        return [0.0] * len(widths) if unit.expert % 2 else [10.0, 10.0, 0.0]

    monkeypatch.setattr("moec.passes.bit_allocation.unit_errors", misleading)
    report = allocate(program, [inputs], budget=3.0, widths=[2, 3, 4], group=32, dense=False, importance="routing")
    measured = report["measured"]
    assert measured["uniform 3-bit"] < measured["allocation"] and report["kept"] == "uniform 3-bit"
    assert "same_as" not in report and report["units_by_bits"] == {"3": 16}
    assert [row["bits"] for row in report["table"]] == [3] * 16 and report["average_bits"] == 3.0
    expert_types = [t for t in program.graph.weights.values() if isinstance(t, QuantizedType)]
    assert all(t.bits == (3,) * 8 for t in expert_types)


def test_an_allocation_equal_to_uniform_bits_says_so_instead_of_measuring(compiled_program, monkeypatch):
    """Errors far larger at 2 bits than the gain at 4, alike for every expert: at a 3.0 budget the LP gives
    each 3 bits, which is uniform 3-bit itself, so there is nothing to measure and the report names it."""
    _, example, program = compiled_program("tiny-olmoe")
    monkeypatch.setattr("moec.passes.bit_allocation.unit_errors",
                        lambda program, unit, widths, group, activations: [100.0, 1.0, 0.0])
    report = allocate(program, [program.flatten_inputs((), example)], budget=3.0, widths=[2, 3, 4], group=32,
                      dense=False, importance="routing")
    assert report["kept"] == "allocation" and report["same_as"] == "uniform 3-bit" and "measured" not in report
    assert report["units_by_bits"] == {"3": 16} and report["units"] == 16


@pytest.mark.parametrize("importance", ["routing", "output"])
def test_needs_calibration_and_names_itself_without_it(compiled_program, importance):
    (pass_,) = build_passes({"passes": [{"bit-allocation": {"importance": importance}}]})
    assert pass_.needs_calibration()
    _, _, program = compiled_program("tiny-mixtral")
    with pytest.raises(PassError, match=r"pass 'bit-allocation' needs calibration data: .*--calibration FILE"):
        allocate(program, None, group=32, importance=importance)


def test_infeasible_budget_is_one_error_naming_the_smallest(compiled_program):
    _, example, program = compiled_program("tiny-qwen2-moe")
    with pytest.raises(PassError, match=r"smallest feasible budget for widths \[2, 3, 4, 8\] and floors .*shared.* is 4\.0000 bits"):
        allocate(program, [program.flatten_inputs((), example)], budget=2.0, group=32, floors={"shared": 8})


def test_a_width_whose_rounding_makes_the_output_non_finite_is_one_error_naming_the_unit(compiled_program, monkeypatch):
    """A half-precision model can overflow once a unit is rounded narrow: its measured error is NaN, which no
    allocation can weigh (every comparison with it is false)."""
    from moec.passes import bit_allocation as pass_module

    measure = pass_module.OutputError.__call__
    monkeypatch.setattr(pass_module.OutputError, "__call__", lambda self, units, bits: float("nan")
                        if len(units) == 1 and bits == [2] else measure(self, units, bits))
    _, example, program = compiled_program("tiny-qwen2-moe")
    with pytest.raises(PassError, match=r"rounding model\.layers\.0\.mlp.* to 2 bits makes the measured error nan .*"
                       r"floors: \{'model\.layers\.0\.mlp': 3\}\) or leave 2 out of widths"):
        allocate(clone(program), [program.flatten_inputs((), example)], budget=3.0, group=32, importance="output")


@pytest.mark.parametrize(("options", "same_as"), [
    ({"budget": 8.0, "floors": {"shared": 5}}, "uniform 8-bit"),
    ({"budget": 2.7, "widths": [2, 4], "floors": {"shared": 3}}, "uniform 2-bit (floors applied)"),
])
def test_a_floor_between_widths_takes_the_next_wider_one(compiled_program, options, same_as):
    """A floor is a least width: 5 with widths up to 8 gives the shared experts 8 bits, 3 with widths [2, 4] gives
    them 4; the uniform comparison keeps the floors and says so."""
    _, example, program = compiled_program("tiny-qwen2-moe")
    program = clone(program)
    report = allocate(program, [program.flatten_inputs((), example)], group=32, **options)
    shared = [row["bits"] for row in report["table"] if row["kind"] == "shared"]
    assert shared and set(shared) == {8 if options["budget"] == 8.0 else 4}
    assert report["same_as"] == same_as


@pytest.mark.parametrize("key", ["experts", "model.layers.9.mlp"])
def test_floor_keys_are_unit_kinds_or_blocks(compiled_program, key):
    _, _, program = compiled_program("tiny-qwen2-moe")
    with pytest.raises(PassError, match=rf"floors key '{key}' is neither a unit kind \(expert, shared, dense\) nor "
                                        r"the block of a quantized FFN \(such as 'model.layers.0.mlp'\)"):
        allocate(program, None, budget=4.0, group=32, floors={key: 8})


def test_group_that_does_not_divide_names_the_weight_before_measuring(compiled_program):
    _, example, program = compiled_program("tiny-mixtral")  # hidden 32: the default group of 64 does not divide it
    with pytest.raises(PassError, match=r"weight @.* group size 64 does not divide the reduced dimension 32"):
        allocate(program, [program.flatten_inputs((), example)], budget=3.0)


@pytest.mark.slow
def test_minilm_allocation_against_uniform_widths(compiled_program):
    """Real weights, per-linear units: at 3.0 average bits the pass's result loses no more embedding cosine
    than uniform 3 bits (12 units leave little room; where the solved mix measures worse on the calibration
    text, the pass keeps uniform 3 bits), and at 2.5 less than the best of three uniform 2/3-bit mixes."""
    _, _, program = compiled_program("minilm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    cal_text, held_text = calibration_and_held_out(32, 32)
    calibration = program.flatten_inputs((), dict(tokenizer(cal_text, padding=True, return_tensors="pt")))
    held = dict(tokenizer(held_text, padding=True, return_tensors="pt"))
    held_inputs = program.flatten_inputs((), held)
    with torch.inference_mode():
        reference = TorchRunner(program).run(held_inputs)[0]

    def loss(quantized) -> float:
        out = TorchRunner(quantized, quant_kernel="dequant").run(held_inputs)[0]
        return 1 - embedding_cosine(reference, out, held["attention_mask"])

    def with_bits(bits_of) -> float:
        quantized = clone(program)
        units = quantizable_units(quantized, dense=True, per_linear=True)
        quantize_units(quantized, units, [bits_of(i, len(units)) for i in range(len(units))], 64, "rtn", None)
        return loss(quantized)

    def allocated(budget: float) -> float:
        quantized = clone(program)
        allocate(quantized, [calibration], budget=budget, per_linear=True)
        return loss(quantized)

    assert allocated(3.0) <= with_bits(lambda i, n: 3) + 1e-6 < 0.15
    best_mix = min(with_bits(lambda i, n: 3 if i % 2 else 2), with_bits(lambda i, n: 3 if i < n // 2 else 2),
                   with_bits(lambda i, n: 2 if i < n // 2 else 3))
    assert allocated(2.5) < best_mix


@pytest.mark.slow
def test_converted_minilm_lp_beats_uniform_three_bits_and_the_best_mix_at_two_and_a_half():
    """The real-weights MoE (MiniLM made an MoE by dense-to-moe, 16 experts, top-8), per-linear units weighted
    by routing mass: the allocation loses less embedding cosine than uniform 3 bits at 3.0 average bits, and
    than the best of three uniform 2/3-bit mixes at 2.5 (the ``converted`` case of tools/bench/quantize.py)."""
    model, example = build_preset("minilm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    cal_text, held_text = calibration_and_held_out(64, 64)
    calibration = [dict(tokenizer(cal_text, padding=True, return_tensors="pt"))]
    held = dict(tokenizer(held_text, padding=True, return_tensors="pt"))
    converted = capture(model, (), example)
    run_passes(converted, build_passes({"passes": [{"dense-to-moe": {"experts": 16, "top_k": 8, "method": "weights"}}]}),
               PassContext(calibration=calibration, progress=False))
    held_inputs = converted.flatten_inputs((), held)
    with torch.inference_mode():
        reference = TorchRunner(converted).run(held_inputs)[0]

    def loss(program) -> float:
        with torch.inference_mode():
            out = TorchRunner(program, quant_kernel="dequant").run(held_inputs)[0]
        return 1 - embedding_cosine(reference, out, held["attention_mask"])

    def with_bits(bits_of) -> float:
        program = clone(converted)
        units = quantizable_units(program, dense=False, per_linear=True)
        quantize_units(program, units, [bits_of(i, len(units)) for i in range(len(units))], 32, "rtn", None)
        return loss(program)

    def allocated(budget: float) -> float:
        program = clone(converted)
        options = {"budget": budget, "group": 32, "dense": False, "per_linear": True, "importance": "routing"}
        run_passes(program, build_passes({"passes": [{"bit-allocation": options}]}), PassContext(calibration=calibration))
        return loss(program)

    assert allocated(3.0) < with_bits(lambda i, n: 3) < 0.1
    best_mix = min(with_bits(lambda i, n: 3 if i % 2 else 2), with_bits(lambda i, n: 3 if i < n // 2 else 2),
                   with_bits(lambda i, n: 2 if i < n // 2 else 3))
    assert allocated(2.5) < best_mix
