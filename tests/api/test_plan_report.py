"""report.md: every plan folder carries a report for people, written from the plan and never read back."""

from __future__ import annotations

import json

import pytest
import torch

import moec
from moec.ir.plan import PLAN_FILE
from moec.report import REPORT_FILE, check_lines, onnx_lines, quality_lines


def test_a_saved_plan_reports_its_model_recipe_passes_and_layers(preset, tmp_path):
    model, example = preset("tiny-mixtral")
    calibration = [example]
    recipe = {"passes": [{"bit-allocation": {"budget": 3.0, "widths": [2, 4], "group": 32}},
                         {"dynamic-skip": {"threshold": 0.5}}]}
    compiled = moec.compile(model, example, recipe=recipe, calibration=calibration)
    folder = compiled.save(tmp_path / "plan")
    report = (folder / REPORT_FILE).read_text()
    assert report.startswith("# moec plan: MixtralForCausalLM\n")
    assert f"torch {torch.__version__}" in report and "- inputs: `input_ids`, `attention_mask`" in report
    assert "- bit-allocation:\n    budget: 3.0\n    widths: [2, 4]\n    group: 32\n" in report  # the recipe, as YAML
    assert "- dynamic-skip: {threshold: 0.5}\n" in report
    records = compiled.program.metadata["passes"]
    for record in records:  # one row per pass, with its own before -> after bytes
        before, after = f"{record['before']['bytes']:,}", f"{record['after']['bytes']:,}"
        assert f"| {record['pass']} | {record['seconds']:.2f} |" in report
        assert (f"{before} -> {after} |" if before != after else f"| {after} |") in report
    summary = next(record["summary"] for record in records if record["pass"] == "bit-allocation")
    assert f"average {summary['average_bits']:.3f} bits (budget 3)" in report
    assert "![bits chosen per unit](bit_allocation.svg)" in report and (folder / "bit_allocation.svg").is_file()
    assert "- skip threshold 0.5 on 2 moe.experts ops" in report
    rows = [line for line in report.splitlines() if line.startswith("| ") and "`model.layers." in line]
    assert len(rows) == len(compiled.summary()) == 4  # route and experts of both layers
    assert "## Checks" not in report  # moec.compile compares nothing with the original: nothing to claim
    assert "## Calibration" not in report  # these passes only run the samples: the plan stores none


def test_a_plan_that_stores_a_calibration_says_what_it_covers(preset, tmp_path):
    model, example = preset("tiny-mixtral")
    compiled = moec.compile(model, example, recipe={"passes": [{"expert-prune": {"keep": 3}}]},
                            calibration=[example, example])
    report = (compiled.save(tmp_path / "plan") / REPORT_FILE).read_text()
    tokens = 2 * int(example["attention_mask"].sum())
    assert (f"## Calibration\n\n- 2 samples, {tokens:,} real tokens; statistics of 2 MoE blocks, at most 2,048 rows "
            "each (`calibration.json`, `calibration.safetensors`); reuse them with `moec.load(folder).calibration` "
            "or `moec compile --calibration folder`\n") in report


def test_the_report_is_not_a_checked_file_of_the_plan(preset, tmp_path):
    """Loading never reads report.md: it is not in plan.json's checksummed files, so editing it breaks nothing."""
    model, example = preset("tiny-qwen2-moe")
    compiled = moec.compile(model, example)
    folder = compiled.save(tmp_path / "plan")
    assert REPORT_FILE not in json.loads((folder / PLAN_FILE).read_text())["files"]
    (folder / REPORT_FILE).write_text("my own notes\n")
    again = moec.load(folder)
    torch.testing.assert_close(again(**example).logits, compiled(**example).logits)
    again.save(tmp_path / "again")  # written anew from the plan
    assert (tmp_path / "again" / REPORT_FILE).read_text().startswith("# moec plan: Qwen2MoeForCausalLM\n")


def test_check_lines_say_ok_or_failed_as_the_check_passed():
    parity = {"kind": "parity", "inputs": "example inputs", "shapes": "input_ids (2, 8)", "tolerance": 1e-4}
    deviation = {"kind": "deviation", "inputs": "resized inputs", "shapes": "x (3, 6)", "cosine": 0.99871,
                 "max_abs_diff": 0.02, "scale": 4.0, "masked": True}
    assert check_lines([parity | {"max_abs_diff": 6e-8, "passed": True},
                        parity | {"max_abs_diff": 2e-4, "passed": False}, deviation]) == [
        "parity on example inputs (input_ids (2, 8)): max abs diff 6e-08 ok (tolerance 0.0001)",
        "parity on example inputs (input_ids (2, 8)): max abs diff 0.0002 FAILED (tolerance 0.0001)",
        "deviation on resized inputs (x (3, 6)): output cosine 0.9987, max abs diff 0.02 (0.50% of the largest "
        "output); padding positions left out"]


def test_quality_lines_name_the_routers_only_for_a_routed_plan():
    routed = {"active_ffn_fraction": 0.5, "sentences": 128, "router": {"cosine": 0.89, "nn_agreement": 0.6},
              "random": {"cosine": 0.2, "nn_agreement": 0.1}, "oracle": {"cosine": 0.91, "nn_agreement": 0.7},
              "gap_closed": 0.97}
    lines = quality_lines(routed)
    assert lines[0] == "quality vs the original model on 128 held-out sentences (active FFN fraction 0.500):"
    assert lines[1] == "  the plan's routers: embedding cosine 0.8900, nearest-neighbour agreement 60.0%"
    assert lines[-1] == "  the router closes 97% of the random-to-oracle cosine gap"
    dense = {"active_ffn_fraction": 1.0, "sentences": 16, "router": {"cosine": 0.996, "nn_agreement": 0.93}}
    assert quality_lines(dense) == ["quality vs the original model on 16 held-out sentences:",
                                    "  the compiled model: embedding cosine 0.9960, nearest-neighbour agreement 93.0%"]
    assert quality_lines(None) == []


def test_onnx_lines_give_the_file_its_parity_and_each_portable_fallback():
    export = {"path": "/tmp/m.onnx", "lowering": "ort", "opset": 20, "fused_moe_ops_by_op": {"com.microsoft.MoE": 1},
              "parity_max_abs_diff": {"3x5": 1.04e-07, "1x11": 6e-08}, "tolerance": 1e-4,
              "portable_fallbacks": {"model.layers.1.mlp": "com.microsoft.MoE cannot express gelu experts"}}
    assert onnx_lines(export) == [
        "`/tmp/m.onnx`: ort lowering, opset 20, 1 com.microsoft.MoE",
        "onnxruntime parity vs the torch runner (batch x sequence: max abs diff) 3x5: 1.04e-07, 1x11: 6e-08 "
        "(tolerance 0.0001), after onnx.checker and shape inference",
        "model.layers.1.mlp: portable MoE lowering (com.microsoft.MoE cannot express gelu experts)"]
    assert onnx_lines(None) == []


def test_check_records_parity_or_the_deviation_of_a_recipe_that_changes_the_outputs(preset, tmp_path):
    model, example = preset("tiny-qwen2-moe")
    compiled = moec.compile(model, example)
    record = compiled.check(model, example, "example inputs")
    assert record["kind"] == "parity" and record["passed"] and record["tolerance"] == 1e-4
    assert record["max_abs_diff"] == pytest.approx(moec.api.parity(model, compiled, example))
    assert record["shapes"] == "input_ids (2, 8), attention_mask (2, 8)"
    quantized = moec.compile(model, example, recipe={"passes": [{"quantize": {"bits": 2, "group": 32}}]})
    changed = quantized.check(model, example)
    assert changed["kind"] == "deviation" and changed["masked"] and "passed" not in changed
    assert 0.5 < changed["cosine"] < 1.0 and changed["max_abs_diff"] > 1e-4  # 2-bit weights do move the outputs
    report = (quantized.save(tmp_path / "plan") / REPORT_FILE).read_text()
    assert "## Checks\n\n- deviation on inputs (input_ids (2, 8), attention_mask (2, 8)): output cosine" in report
    assert compiled.report["checks"] == [record]  # each model keeps its own checks


def test_a_pass_that_changed_nothing_keeps_the_parity_check(preset):
    model, example = preset("tiny-llama")
    with pytest.warns(UserWarning, match="pass 'dynamic-skip' changed nothing"):  # a dense model: no experts
        compiled = moec.compile(model, example, recipe={"passes": [{"dynamic-skip": {"threshold": 0.5}}]})
    assert not compiled.program.metadata["passes"][-1]["modified"]
    assert compiled.check(model, example)["kind"] == "parity"


def test_check_names_positional_inputs_by_the_forward_parameter():
    from torch import nn

    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).eval()
    compiled = moec.compile(model, (torch.randn(2, 3, 8),))
    record = compiled.check(model, (torch.randn(4, 5, 8),))
    assert record["shapes"] == "input (4, 5, 8)" and record["passed"]
