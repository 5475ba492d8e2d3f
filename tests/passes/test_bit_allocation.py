"""The bit-allocation pass: widths per expert under a budget, its report, and real-weights quality."""

from __future__ import annotations

import pytest
import torch
import transformers

from moec.analysis.corpus import calibration_and_held_out
from moec.analysis.embedding_quality import calibration_sentences, embedding_cosine, held_out_sentences
from moec.backend.torch_runner import TorchRunner
from moec.errors import PassError
from moec.frontend.capture import capture
from moec.frontend.zoo import build_preset, minilm_path
from moec.ir.quant import QuantizedType
from moec.passes import PassContext, build_passes, run_passes
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
def test_minilm_lp_beats_uniform_three_bits(compiled_program):
    """Real weights: at 3.0 average bits the allocation loses less embedding cosine than uniform 3 bits."""
    _, _, program = compiled_program("minilm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    calibration = program.flatten_inputs((), dict(tokenizer(calibration_sentences(), padding=True, return_tensors="pt")))
    held = dict(tokenizer(held_out_sentences(), padding=True, return_tensors="pt"))
    held_inputs = program.flatten_inputs((), held)
    with torch.inference_mode():
        reference = TorchRunner(program).run(held_inputs)[0]
    losses = {}
    for label, recipe in {"uniform": {"quantize": {"bits": 3}},
                          "lp": {"bit-allocation": {"budget": 3.0, "per_linear": True}}}.items():
        _, _, fresh = compiled_program("minilm")
        run_passes(fresh, build_passes({"passes": [recipe]}), PassContext(calibration=[calibration]))
        out = TorchRunner(fresh, quant_kernel="dequant").run(held_inputs)[0]
        losses[label] = 1 - embedding_cosine(reference, out, held["attention_mask"])
    assert losses["lp"] < losses["uniform"] < 0.15


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
