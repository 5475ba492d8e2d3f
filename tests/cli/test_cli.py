"""The moec command: compile, inspect, errors and exit codes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import moec
from moec.analysis.calibration import Calibration
from moec.backend import torch_runner
from moec.cli import main
from moec.ir.ops import ExpertsOp
from moec.ir.plan import WEIGHTS_FILE
from moec.kernels.kernel_choice import KernelChoice
from moec.report import pass_details, triton_lines

STEP_LINE = re.compile(r"done .* \(\d+\.\d s\)")  # the time of a step, on stderr


@pytest.fixture(scope="module")
def qwen_plan(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "plan"
    assert main(["compile", "--model", "tiny-qwen2-moe", "-o", str(folder)]) == 0
    return folder


def test_compile_prints_layers_parity_and_the_experts_kernels_it_timed(qwen_plan, capsys, monkeypatch):
    monkeypatch.setattr(torch_runner, "EXPERT_KERNEL_CHOICE", KernelChoice())  # none timed yet in this process
    assert main(["compile", "--model", "tiny-mixtral"]) == 0
    out = capsys.readouterr().out
    assert "moe.experts" in out and "moe.route" in out
    assert out.count("ok (tolerance 0.0001)") == 2
    # the example (2 x 8 tokens) and the resized inputs (3 x 6) fall in one size: one race, one line
    races = re.findall(r"4 experts 32 -> 64, top-2, 16-31 tokens, \d+ threads?: (\S+) \((.*)\)", out)
    assert len(races) == 1 and "kernels timed on this host for routed experts and quantized linears" in out
    winner, times = races[0]
    assert winner in set(torch_runner.EXPERT_KERNELS) - {"auto"} and f"{winner} " in times


def test_a_recipe_that_changes_the_model_reports_its_deviation_and_writes_the_plan(tmp_path, capsys):
    """Quantizing changes the outputs by design: the CLI says how much and writes the plan instead of failing
    a parity tolerance meant for lossless compilation."""
    recipe = tmp_path / "quantize.yaml"
    recipe.write_text("passes:\n  - quantize: {bits: 2, group: 32}\n")
    assert main(["compile", "--model", "tiny-mixtral", "--recipe", str(recipe), "-o", str(tmp_path / "plan")]) == 0
    out = capsys.readouterr().out
    assert out.count("deviation on") == 2 and "FAILED" not in out and "(tolerance" not in out
    line = " ".join(out.split("deviation on example inputs")[1].split())
    cosine, diff = (float(re.search(rf"{key} ([0-9.e+-]+)", line).group(1)) for key in ("output cosine", "max abs diff"))
    assert diff > 1e-4 and 0.5 < cosine < 1.0  # 2-bit experts do move the outputs: this is not parity
    assert "quantize changes the model's outputs by design" in out
    assert (tmp_path / "plan" / WEIGHTS_FILE).is_file()


def test_a_lossless_recipe_that_breaks_parity_fails_without_writing_a_plan(tmp_path, capsys, monkeypatch):
    from dataclasses import dataclass

    from moec.passes.base import PASSES, Pass, PassResult

    @dataclass(frozen=True)
    class ScaleFirstWeight(Pass):  # a pass that claims to be exact but is not
        name = "test-scale-first-weight"

        def run(self, program, context):
            first = next(iter(program.weights))
            program.weights[first] = program.weights[first] * 1.5
            return PassResult(True)

    monkeypatch.setitem(PASSES, ScaleFirstWeight.name, ScaleFirstWeight)
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("passes:\n  - test-scale-first-weight: {}\n")
    assert main(["compile", "--model", "tiny-mixtral", "--recipe", str(recipe), "-o", str(tmp_path / "plan")]) == 1
    captured = capsys.readouterr()
    assert captured.out.count("FAILED") == 2 and "deviation" not in captured.out
    assert captured.err.splitlines()[-1] == (f"error: the compiled model fails the parity check on the example "
                                             f"inputs and resized inputs (above); no plan was written to "
                                             f"{tmp_path / 'plan'}")
    assert not (tmp_path / "plan").exists()


def test_a_terminated_command_says_so_and_gives_back_the_signal_handler(monkeypatch, capsys):
    """SIGTERM (a kill, a CI timeout) raises where the command is, as Ctrl-C does, so that cleanup runs."""
    import signal
    import time

    from moec import cli

    reached_cleanup = []

    def killed_while_running(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:
            reached_cleanup.append(True)
        return 0

    monkeypatch.setattr(cli, "run_inspect", killed_while_running)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["inspect", "anything"]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "terminated\n"
    assert reached_cleanup == [True] and signal.getsignal(signal.SIGTERM) is before


def test_ctrl_c_while_the_plan_is_written_says_interrupted_and_leaves_nothing(monkeypatch, capsys, tmp_path):
    from moec.ir import plan as plan_module

    def interrupted(tensors, filename):
        raise KeyboardInterrupt

    monkeypatch.setattr(plan_module.safetensors.torch, "save_file", interrupted)
    assert main(["compile", "--model", "tiny-mixtral", "-o", str(tmp_path / "plan")]) == 130
    assert capsys.readouterr().err.endswith("\ninterrupted\n")
    assert list(tmp_path.iterdir()) == []  # neither the plan nor its staging folder


def test_compile_names_the_experts_each_compression_pass_removed_or_merged():
    row = {"layer": "model.layers.0.mlp", "experts_before": 4, "experts_after": 2, "output_cosine": 0.98765,
           "output_norm_ratio": 1.31234}
    whole = {**row, "layer": "model.layers.1.mlp", "experts_after": 4}
    assert pass_details({"layers": [row | {"kept": [0, 3], "removed": [1, 2]}, whole]}) == [
        "model.layers.0.mlp: 4 -> 2 experts (removed experts 1, 2), output cosine 0.9877, norm x1.312"]
    assert pass_details({"layers": [row | {"groups": [[0, 1], [3], [2]]}]}) == [
        "model.layers.0.mlp: 4 -> 2 experts (merged 0+1), output cosine 0.9877, norm x1.312"]
    assert pass_details({"threshold": 0.5, "expert_ops": 2, "top_1_ops": 1, "measured": False,
                         "not_measured_because": "no calibration samples were given"}) == [
        "skip threshold 0.5 on 2 moe.experts ops (1 with top-1 routing left alone)",
        "skip rate not measured: no calibration samples were given (give calibration data to measure it)"]
    assert pass_details({"ops_removed": 0}) == [] == pass_details({"layers": 2, "experts": 4})  # dense-to-moe


def test_compile_says_which_ops_simplify_and_dead_code_removed():
    assert pass_details({"ops_removed": 19, "removed_clone": 13, "removed_add-zero": 2, "removed_whole-slice": 4}) == [
        "removed 19 ops that return their input unchanged (13 clone, 2 add-zero, 4 whole-slice)"]
    assert pass_details({"ops_removed": 3, "weights_removed": 2}) == ["removed 3 ops and 2 weights nothing reads"]
    assert pass_details({"ops_removed": 0, "weights_removed": 1}) == ["removed 1 weight nothing reads"]
    assert pass_details({"ops_removed": 1}) == ["removed 1 op nothing reads"]
    assert pass_details({"ops_removed": 0, "weights_removed": 0}) == []


@pytest.fixture(scope="module")
def scheduled_plan(tmp_path_factory):
    """tiny-qwen2-moe placed on 2 ranks, its overlap schedule chosen by a cost model, and what compile printed."""
    folder = tmp_path_factory.mktemp("scheduled")
    cost = "{a2a_latency_s: 1.0e-4, a2a_s_per_byte: 1.0e-9, gemm_latency_s: 1.0e-5, gemm_s_per_flop: 1.0e-10}"
    (folder / "r.yaml").write_text("passes:\n  - expert-placement: {world_size: 2, method: round-robin}\n"
                                   f"  - overlap-schedule: {{cost_model: {cost}}}\n")
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["compile", "--model", "tiny-qwen2-moe", "--recipe", str(folder / "r.yaml"),
                     "-o", str(folder / "plan")]) == 0
    return folder / "plan", out.getvalue()


def test_compile_says_each_layers_chunk_count_and_its_predicted_time(scheduled_plan):
    _, out = scheduled_plan
    for layer in ("model.layers.0.mlp", "model.layers.1.mlp"):
        assert re.search(layer + r": 2 chunks, chosen by the cost model: 1\.55 ms predicted vs 1\.84 ms serial "
                         r"\(0\.84x\); shared expert overlaps dispatch", out), out
    row = {"layer": "b", "chunks": 1, "chosen_by": "cost_model", "shared_overlap": None, "predicted_s": 2e-3,
           "baseline_s": 2e-3, "streams": 1.0}
    assert pass_details({"layers": [row, {"layer": "c", "chunks": 4, "chosen_by": "chunks", "shared_overlap": False}]}) == [
        "b: 1 chunk, chosen by the cost model: 2 ms predicted vs 2 ms serial (1.00x), ranks sharing cores gain "
        "nothing from overlap", "c: 4 chunks, set by the chunks option; shared expert runs after the layer"]


def test_compile_says_which_widths_bit_allocation_chose_and_how_it_compared_with_uniform_bits():
    summary = {"budget": 2.5, "average_bits": 2.5, "units": 10, "units_by_bits": {"2": 6, "3": 4},
               "objective": 2.865e-4, "kept": "allocation",
               "measured": {"allocation": 2.699e-4, "uniform 2-bit": 7.203e-4}}
    assert pass_details(summary) == [
        "average 2.500 bits (budget 2.5) over 10 units: 6 at 2 bits, 4 at 3 bits; objective 0.0002865",
        "mean cosine distance of the output on the calibration data: allocation 0.0002699 vs uniform 2-bit "
        "0.0007203; kept the allocation"]
    same = {**summary, "units_by_bits": {"3": 10}, "average_bits": 3.0, "budget": 3.0, "same_as": "uniform 3-bit"}
    del same["measured"]
    assert pass_details(same)[1] == "the allocation is uniform 3-bit: nothing to compare at the model output"
    kept_uniform = {**summary, "kept": "uniform 2-bit"}
    assert pass_details(kept_uniform)[1].endswith("; kept uniform 2-bit")


def test_inspect_shows_the_placement_and_each_layers_schedule(scheduled_plan, capsys):
    plan, _ = scheduled_plan
    assert main(["inspect", "--no-ir", str(plan)]) == 0
    out = capsys.readouterr().out
    assert "expert parallel: 2 ranks, round-robin placement" in out
    for layer in ("model.layers.0.mlp", "model.layers.1.mlp"):  # round-robin: no trace, so no load figures
        assert f"  {layer} experts by rank: rank 0: 0, 2; rank 1: 1, 3\n" in out
    for layer in ("model.layers.0.mlp", "model.layers.1.mlp"):
        assert f"  {layer}: 2 chunks, 1.55 ms predicted vs 1.84 ms serial; shared expert overlaps dispatch" in out


def test_compile_prints_each_layers_placement_and_warnings_as_one_line(tmp_path, capsys):
    """cp-sat on 16 calibration tokens: each layer's experts by rank and load balance, the relaxed layer named
    in one clean ``warning:`` line (not Python's file:line: UserWarning form), and the same rows in inspect."""
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    safetensors.torch.save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                str(tmp_path / "ids.safetensors"))
    (tmp_path / "place.yaml").write_text("passes:\n  - expert-placement: {world_size: 2}\n")
    assert main(["compile", "--model", "tiny-mixtral", "--recipe", str(tmp_path / "place.yaml"),
                 "--calibration", str(tmp_path / "ids.safetensors"), "-o", str(tmp_path / "plan")]) == 0
    captured = capsys.readouterr()
    messages = [line for line in captured.err.splitlines() if not STEP_LINE.fullmatch(line)]  # progress left out
    err, out = " ".join(" ".join(messages).split()), " ".join(captured.out.split())
    assert err.startswith("warning: expert placement: the default balance") and "UserWarning" not in err
    relaxed = re.findall(r"(model\.layers\.\d\.mlp) 1\.\d+x", err.split("instead")[1])
    assert relaxed, err
    assert re.search(r"\d+ expected token moves between ranks at layer boundaries on the calibration data", out)
    placed = re.findall(r"(model\.layers\.\d\.mlp) experts by rank: rank 0: \d, \d; rank 1: \d, \d; "
                        r"busiest rank ([0-9.]+)x the mean load \(bound ([0-9.]+)x(, relaxed)?", out)
    assert [layer for layer, *_ in placed] == ["model.layers.0.mlp", "model.layers.1.mlp"], out
    for layer, load, bound, relaxation in placed:
        assert float(load) <= float(bound) and bool(relaxation) == (layer in relaxed)
    assert main(["inspect", "--no-ir", str(tmp_path / "plan")]) == 0
    assert len(re.findall(r"experts by rank: .* the mean load", capsys.readouterr().out)) == 2


def test_compile_measures_how_many_expert_evaluations_dynamic_skip_drops(tmp_path, capsys):
    recipe = tmp_path / "skip.yaml"
    recipe.write_text("passes:\n  - dynamic-skip: {threshold: 0.97}\n")  # tiny routers score experts almost alike
    assert main(["compile", "--model", "tiny-mixtral", "--recipe", str(recipe)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "skip threshold 0.97 on 2 moe.experts ops" in out
    skipped = re.search(r"dynamic skipping: (\d+) of 64 expert evaluations \(([0-9.]+)%\) skipped on the example", out)
    assert skipped and 0 < int(skipped.group(1)) < 64  # 2 layers x 16 tokens x top-2
    assert "skip rate not measured: no calibration samples were given" in out


def test_dynamic_skip_measures_its_skip_rate_on_a_calibration_file(calibration_files, capsys):
    row = {"evaluations": 200, "skipped": 50, "skipped_fraction": 0.25, "dropped_weight": 0.0625}
    summary = {"threshold": 0.5, "expert_ops": 1, "top_1_ops": 0, "measured": True, "samples": 3, **row,
               "layers": [{"layer": "model.layers.0.mlp", "threshold": 0.5, **row}]}
    assert pass_details(summary) == [
        "skip threshold 0.5 on 1 moe.experts ops",
        "on the calibration data (3 batches, real tokens only): 50 of 200 expert evaluations skipped (25.0%), dropping 6.2% "
        "of the routing weight",
        "model.layers.0.mlp: 50 of 200 expert evaluations skipped (25.0%), dropping 6.2% of the routing weight"]
    recipe = calibration_files / "skip.yaml"
    recipe.write_text("passes:\n  - dynamic-skip: {threshold: 0.97}\n")
    assert main(["compile", "--model", "tiny-mixtral", "--recipe", str(recipe),
                 "--calibration", str(calibration_files / "ids.safetensors")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    measured = re.search(r"on the calibration data \(2 batches, real tokens only\): (\d+) of 1,920 expert evaluations", out)
    assert measured and 0 < int(measured.group(1)) < 1920, out  # 40 x 12 tokens x top-2 x 2 layers
    assert "model.layers.1.mlp: " in out


@pytest.fixture(scope="module")
def calibration_files(tmp_path_factory):
    """A dense_to_moe recipe that calibrates, token ids for tiny-llama, and broken calibration files."""
    folder = tmp_path_factory.mktemp("calibration")
    (folder / "convert.yaml").write_text("passes:\n  - dense_to_moe: {experts: 4, top_k: 2}\n")
    (folder / "quantize.yaml").write_text("passes:\n  - quantize: {bits: 4, group: 32}\n")
    ids = torch.randint(0, 100, (40, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    safetensors.torch.save_file({"input_ids": ids, "attention_mask": mask}, str(folder / "ids.safetensors"))
    safetensors.torch.save_file({"input_ids": ids, "attention_mask": mask[:3]}, str(folder / "uneven.safetensors"))
    safetensors.torch.save_file({"input_ids": ids + 10**6, "attention_mask": mask}, str(folder / "big.safetensors"))
    whole = (folder / "ids.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])
    (folder / "lines.txt").write_text("one sample\nanother sample\n")
    (folder / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    (folder / "plan").mkdir()
    (folder / "plan" / "plan.json").write_text("{}")
    return folder


def test_calibration_from_a_file_for_a_model_without_tokenizer(calibration_files, tmp_path, capsys):
    folder = calibration_files
    plan = tmp_path / "plan"
    assert main(["compile", "--model", "tiny-llama", "--recipe", str(folder / "convert.yaml"),
                 "--calibration", str(folder / "ids.safetensors"), "-o", str(plan)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "moe.experts" in out and "dense-to-moe changes the model's outputs by design" in out
    # no calibration progress bar (nor the blank line it leaves) off a terminal, on either stream
    assert "\n\n" not in out and "\n\n" not in captured.err
    assert Calibration.load(plan).tokens == 40 * 12  # every calibration token, stored with the plan
    assert len(moec.load(plan).program.graph.ops_of(ExpertsOp)) == 2  # both FFNs became experts
    for reuse in (plan, plan / "calibration.safetensors"):  # the plan's calibration, given back: reused as is
        again = tmp_path / f"again-{reuse.name}"
        assert main(["compile", "--model", "tiny-llama", "--recipe", str(folder / "convert.yaml"),
                     "--calibration", str(reuse), "-o", str(again)]) == 0
        assert Calibration.load(again).fingerprint == Calibration.load(plan).fingerprint
        assert (again / "weights.safetensors").read_bytes() == (plan / "weights.safetensors").read_bytes()


@pytest.mark.slow  # about 16 s; a calibration file is read by default in the test above
def test_gptq_and_bit_allocation_take_a_calibration_file(calibration_files, tmp_path, capsys):
    folder = calibration_files
    for recipe in ("passes: [{quantize: {bits: 4, group: 32, method: gptq}}]",
                   "passes: [{bit-allocation: {budget: 3.0, group: 32, importance: routing}}]"):
        (tmp_path / "recipe.yaml").write_text(recipe + "\n")
        assert main(["compile", "--model", "tiny-llama", "--recipe", str(tmp_path / "recipe.yaml"),
                     "--calibration", str(folder / "ids.safetensors")]) == 0
        assert "changes the model's outputs by design" in capsys.readouterr().out


@pytest.mark.parametrize(("recipe", "calibration", "message", "code"), [
    ("convert.yaml", None, "give --calibration FILE", 1),
    ("quantize.yaml", "ids.safetensors", "no pass of the recipe needs calibration data", 2),
    ("convert.yaml", "missing.safetensors", "no such file", 2),
    ("convert.yaml", "convert.yaml", "give a .txt file", 2),
    ("convert.yaml", "plan", "is a folder without a plan's calibration.json; give a .txt file", 2),
    ("convert.yaml", "truncated.safetensors", "truncated.safetensors is not a readable .safetensors file", 2),
    ("convert.yaml", "uneven.safetensors", "same number of samples along dim 0", 1),
    ("convert.yaml", "latin1.txt", "latin1.txt is not UTF-8 text (byte 3)", 2),
    ("convert.yaml", "lines.txt", "no tokenizer to encode text", 1),
    ("convert.yaml", "big.safetensors", "outside its embedding table's 128 rows", 1),
])
def test_calibration_file_errors(calibration_files, tmp_path, capsys, recipe, calibration, message, code):
    """A path that is not a calibration file, or one the recipe has no use for, is bad usage (2); a file the
    model cannot use is a moec error (1)."""
    folder = calibration_files
    args = ["compile", "--model", "tiny-llama", "--recipe", str(folder / recipe), "-o", str(tmp_path / "plan")]
    assert main(args + (["--calibration", str(folder / calibration)] if calibration else [])) == code
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())  # rich wraps long lines
    assert message in err and "Traceback" not in err
    if recipe == "quantize.yaml" or "tokenizer" in message or "UTF-8" in message:  # known before the model loads
        assert "done loading model" not in captured.err
    assert not (tmp_path / "plan").exists()


@pytest.mark.slow  # converts the real MiniLM (about 30 s here)
def test_calibration_text_file_on_the_default_model(tmp_path, capsys):
    from moec.analysis.corpus import stdlib_sentences

    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(stdlib_sentences()[-40:]) + "\n\n")
    recipe = tmp_path / "convert.yaml"
    recipe.write_text("passes:\n  - dense_to_moe: {experts: 16, top_k: 8}\n")
    assert main(["compile", "--recipe", str(recipe), "--calibration", str(lines)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "done loading calibration data" in captured.err and "embedding cosine" in out
    cosine = float(out.split("│ router  │")[1].split("│")[0])
    assert cosine > 0.8  # 40 sentences calibrate a usable router (0.87 measured)


def test_inspect_shows_shared_expert_and_gate(qwen_plan, capsys):
    assert main(["inspect", str(qwen_plan)]) == 0
    out = capsys.readouterr().out
    assert "moe.shared_expert(" in out  # the IR text
    assert "gate=@model.layers.0.mlp.shared_expert_gate.weight" in out
    assert "sigmoid gate" in out  # the table's description of the shared expert
    rows = {row["op"]: row["weights"] for row in moec.load(qwen_plan).summary()}  # the module holding them all
    assert rows == {"moe.route": "model.layers.1.mlp.gate", "moe.experts": "model.layers.1.mlp.experts",
                    "moe.shared_expert": "model.layers.1.mlp"}
    ir_lines = moec.load(qwen_plan).ir.splitlines()
    assert max(map(len, ir_lines)) > 140  # wider than the console when piped: each line still prints whole
    assert set(ir_lines) <= set(out.splitlines())


def test_the_plan_report_and_inspect_repeat_the_parity_compile_measured(qwen_plan, capsys):
    report = (qwen_plan / "report.md").read_text()
    assert "# moec plan: Qwen2MoeForCausalLM" in report
    parity = [line for line in report.splitlines() if line.startswith("- parity on ")]
    assert len(parity) == 2 and all(line.endswith(" ok (tolerance 0.0001)") for line in parity)
    assert "| moe.shared_expert |" in report
    assert main(["inspect", "--no-ir", str(qwen_plan)]) == 0
    out = capsys.readouterr().out
    assert "checked against the original model when compiled:\n" in out
    assert all(f"  {line[2:]}\n" in out for line in parity)  # the same figures as the report
    assert f"report: {qwen_plan / 'report.md'}\n" in out


def test_inspect_a_triton_plan_needs_no_triton(tmp_path, capsys, monkeypatch):
    pytest.importorskip("triton", reason="compiling the triton plan needs triton")
    from moec.frontend.zoo import build_preset

    model, example = build_preset("tiny-mixtral")
    plan = moec.compile(model, example, backend="triton").save(tmp_path / "plan")
    monkeypatch.setitem(sys.modules, "triton", None)  # what `import triton` sees when it is not installed
    assert main(["inspect", "--no-ir", str(plan)]) == 0
    out = capsys.readouterr().out
    assert "backend triton" in out and "triton kernels: 4 of 4 MoE ops\n" in out
    record = {"kernel_ops": 2, "fallbacks": [{"op": 7, "op_name": "moe.route", "block": "model.layers.0.mlp",
                                              "reason": "activations of dtype f64"}]}
    assert triton_lines({"backend": "triton", "report": {"triton": record}}) == [
        "triton kernels: 2 of 3 MoE ops; 1 run on the torch runner:",
        "  op 7 moe.route of model.layers.0.mlp: activations of dtype f64"]
    assert triton_lines({"backend": "torch", "report": {"triton": record}}) == []


def test_compile_for_triton_without_triton_fails_before_loading_the_model(capsys, monkeypatch):
    from moec.frontend import zoo

    def load_model_spec(spec):
        raise AssertionError("loaded the model before finding that the backend cannot run")

    monkeypatch.setattr(zoo, "load_model_spec", load_model_spec)
    monkeypatch.setitem(sys.modules, "triton", None)  # what `import triton` sees when it is not installed
    assert main(["compile", "--model", "tiny-mixtral", "--backend", "triton"]) == 1
    assert "pip install 'moec[triton]'" in capsys.readouterr().err


def test_inspect_a_corrupted_plan_names_the_checksum(qwen_plan, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in qwen_plan.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    data = bytearray((broken / WEIGHTS_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (broken / WEIGHTS_FILE).write_bytes(bytes(data))
    assert main(["inspect", str(broken)]) == 1
    captured = capsys.readouterr()
    assert "checksum mismatch" in captured.err and "Traceback" not in captured.err + captured.out


def edited_copy(plan_folder, folder, edit):
    """A copy of ``plan_folder`` at ``folder`` whose plan.json went through ``edit`` (a function of the dict)."""
    folder.mkdir()
    for file in plan_folder.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    plan = json.loads((folder / "plan.json").read_text())
    edit(plan)
    (folder / "plan.json").write_text(json.dumps(plan))
    return folder


def test_inspect_a_plan_whose_ir_does_not_parse_names_the_file(qwen_plan, tmp_path, capsys):
    def misspell_an_op(plan):
        plan["ir"] = plan["ir"].replace("moe.route", "moe.rout", 1)

    broken = edited_copy(qwen_plan, tmp_path / "broken", misspell_an_op)
    assert main(["inspect", str(broken)]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert re.fullmatch(rf"error: {re.escape(str(broken / 'plan.json'))}: its IR does not load \(line \d+, column "
                        r"\d+: unknown op 'moe.rout'; known: [^()]*\); the plan is corrupt, compile it again", err), err


def test_inspect_a_plan_json_edited_by_hand_shows_what_still_reads(qwen_plan, tmp_path, capsys):
    def edit(plan):
        del plan["moec_version"]
        plan["metadata"]["report"] = {"checks": "x"}

    edited = edited_copy(qwen_plan, tmp_path / "edited", edit)
    assert main(["inspect", str(edited), "--no-ir"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"plan {edited}: format 1, moec ?, torch" in out and "moe.experts" in out
    assert "(a record in plan.json's metadata does not read: TypeError:" in out


def test_a_long_warning_prints_as_one_line_on_stderr(capsys):
    from moec.cli import print_warning

    print_warning("model.layers.0.mlp: portable MoE lowering " + "x" * 300)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"warning: model.layers.0.mlp: portable MoE lowering {'x' * 300}\n"


@pytest.mark.parametrize("kind", ["missing", "file", "folder"])
@pytest.mark.parametrize("command", ["inspect", "export-onnx"])
def test_a_plan_path_that_is_not_a_plan_folder_is_bad_usage(tmp_path, capsys, command, kind):
    plan = tmp_path / "plan"
    if kind == "file":
        plan.write_text("not a plan")
    if kind == "folder":
        plan.mkdir()
        (plan / "notes.txt").write_text("not a plan")
    output = ["-o", str(tmp_path / "model.onnx")] if command == "export-onnx" else []
    assert main([command, str(plan), *output]) == 2
    err = " ".join(capsys.readouterr().err.split())
    problem = {"file": "is a file, not a plan folder", "missing": "does not exist",
               "folder": "is not a moec plan: it has no plan.json"}[kind]
    assert f"PLAN {plan} {problem}; pass a plan folder written by `moec compile -o`" in err
    assert "Traceback" not in err and not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize(("output", "message"), [
    ("notes", "notes is a file, not a folder"),
    ("notes/plan", "notes is a file; choose another output path"),
    (".", "exists and is not a moec plan folder"),
])
def test_a_compile_output_that_cannot_hold_a_plan_is_bad_usage(tmp_path, capsys, output, message):
    (tmp_path / "notes").write_text("not a plan")
    assert main(["compile", "--model", "tiny-mixtral", "-o", str(tmp_path / output)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no folder can be made")
def test_a_compile_output_where_no_folder_can_be_made_is_bad_usage_before_the_model_loads(capsys, monkeypatch):
    monkeypatch.setattr("moec.frontend.zoo.load_model_spec", lambda spec: pytest.fail("the model was loaded"))
    assert main(["compile", "--model", "tiny-mixtral", "-o", "/proc/moec-plan"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("error: cannot write a plan at /proc/moec-plan: /proc: ") and \
        err.endswith("; choose another output path")


def test_a_plan_folder_given_as_the_model_says_to_compile_in_one_recipe(tmp_path, capsys):
    (tmp_path / "plan.json").write_text("{}")
    assert main(["compile", "--model", str(tmp_path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith(f"error: --model {tmp_path}: that is a moec plan folder, not a model;")
    assert "put every pass in one recipe" in err and "Traceback" not in err


@pytest.mark.parametrize(("files", "reason"), [
    ({}, "config.json"),
    ({"config.json": '{"model_type": "llama"'}, "JSON"),
])
def test_a_model_folder_that_does_not_load_is_bad_usage(tmp_path, capsys, files, reason):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "README").write_text("not a model")
    for name, text in files.items():
        (folder / name).write_text(text)
    assert main(["compile", "--model", str(folder)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith(f"error: --model {folder}: not a Hugging Face model folder that loads offline (")
    assert reason in err and "save_pretrained" in err and "Traceback" not in err


@pytest.mark.parametrize(("recipe", "message"), [("missing.yaml", "no such file"), (".", "is a folder")])
def test_a_recipe_path_that_names_no_file_is_bad_usage_before_the_model_loads(tmp_path, capsys, monkeypatch,
                                                                                recipe, message):
    monkeypatch.setattr("moec.frontend.zoo.load_model_spec", lambda spec: pytest.fail("the model was loaded"))
    assert main(["compile", "--model", "tiny-mixtral", "--recipe", str(tmp_path / recipe)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--recipe {tmp_path / recipe}" in err and message in err and "Traceback" not in err


def test_a_recipe_option_wrong_for_every_layer_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("moec.frontend.zoo.load_model_spec", lambda spec: pytest.fail("the model was loaded"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("passes:\n  - dense_to_moe: {experts: 4, top_k: 5}\n")
    assert main(["compile", "--model", "minilm", "--recipe", str(recipe)]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "top_k=5 must be in 1..experts=4" in err and "Traceback" not in err


def test_bad_usage_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["compile", "--dtype", "float7"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def test_version_names_moec_and_its_torch(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"moec {moec.__version__} (torch {torch.__version__})"


def test_model_help_names_every_preset(monkeypatch, capsys):
    from moec.frontend.zoo import PRESETS

    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside preset names
    with pytest.raises(SystemExit):
        main(["compile", "--help"])
    help_text = capsys.readouterr().out
    assert [name for name in PRESETS if name not in help_text] == []


@pytest.mark.slow  # about 11 s
def test_an_encoder_decoder_folder_compiles_with_decoder_inputs(tmp_path, capsys):
    """A saved T5ForConditionalGeneration: loaded with its LM head, its example feeds the decoder too."""
    import transformers

    config = transformers.T5Config(vocab_size=128, d_model=32, d_ff=64, num_layers=1, num_heads=4, d_kv=8)
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    assert main(["compile", "--model", str(tmp_path / "t5"), "-o", str(tmp_path / "plan")]) == 0
    out = capsys.readouterr().out
    assert "T5ForConditionalGeneration" in out and "decoder_input_ids (3, 6)" in out


def test_unknown_model_is_one_clear_error(capsys):
    assert main(["compile", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "Traceback" not in err


def test_default_compile_is_real_minilm_with_parity():
    """The console script with no arguments: the real all-MiniLM-L6-v2 weights, offline, with parity."""
    result = subprocess.run([sys.executable, "-m", "moec.cli", "compile"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ffn.dense") == 6
    assert result.stdout.count("ok (tolerance 0.0001)") == 2
    # stderr has each step's time, and no second progress bar (transformers' weight loading) beside moec's own
    steps = result.stderr.splitlines()
    assert steps and all(STEP_LINE.fullmatch(line) for line in steps), result.stderr
    assert "done" not in result.stdout  # results only


def test_quality_table_of_a_model_without_routers_has_no_routing_rows(capsys):
    """A dense model's quality table (a calibrating quantize recipe on MiniLM) shows one row for the compiled
    model: no routing column, router row or active FFN fraction, which only mean something for an MoE."""
    import transformers

    from moec.analysis.corpus import calibration_and_held_out, tokenized_batches
    from moec.cli import show_quality
    from moec.frontend.zoo import build_preset, minilm_path

    model, example = build_preset("minilm")
    compiled = moec.compile(model, example)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    show_quality(model, compiled, tokenized_batches(tokenizer, calibration_and_held_out(0, 8)[1]))
    out = capsys.readouterr().out
    assert "compiled" in out and "1.0000" in out and "100.0%" in out  # no pass ran: the same embeddings
    assert "router" not in out and "routing" not in out and "active FFN fraction" not in out
    assert compiled.report["quality"]["sentences"] == 8  # kept for the plan's report


FACTORIES = """
import torch
from torch import nn


class FloatMLP(nn.Module):  # takes a float tensor whose last dim (8) the model pins
    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

    def forward(self, features):
        return self.mlp(features)


def float_mlp():
    torch.manual_seed(0)
    return FloatMLP(), {"features": torch.randn(2, 5, 8)}


class ByLength(nn.Module):  # its code branches on the sequence length: export keeps the example's branch
    def __init__(self, divisor=1, at_least=0):
        super().__init__()
        self.divisor, self.at_least, self.proj = divisor, at_least, nn.Linear(8, 8)

    def forward(self, features):
        features = self.proj(features)
        length = features.shape[1]
        return features * 2 if length % self.divisor == 0 and length >= self.at_least else features * 3


def by_four():  # 8 tokens: 6 takes the other branch, 4 the same
    return ByLength(divisor=4), {"features": torch.randn(2, 8, 8)}


def from_eight():  # 8 tokens: every shorter size takes the other branch
    return ByLength(at_least=8), {"features": torch.randn(2, 8, 8)}


def raises():
    raise RuntimeError("checkpoint not found")


def returns_text():
    return "a model"


def returns_three():
    return nn.Linear(2, 2), {}, 3
"""


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """A module of model factories, importable as ``cli_test_factories`` for the test's length."""
    (tmp_path / "cli_test_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "cli_test_factories"
    sys.modules.pop("cli_test_factories", None)


def test_the_resized_parity_check_keeps_to_the_sizes_the_models_code_holds_for(factories, capsys):
    assert main(["compile", "--model", f"{factories}:by_four"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"parity on resized inputs \(features \(3, 4, 8\)\): max abs diff \S+ ok", out)
    assert main(["compile", "--model", f"{factories}:from_eight"]) == 0
    out = capsys.readouterr().out
    assert "parity on example inputs" in out and "resized inputs" not in out
    assert "(no parity check at another size: none tried meets the conditions the model's code holds" in out


@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", "0.0001"), ("bfloat16", "0.05"), ("float16", "0.01")])
def test_a_factory_with_float_inputs_compiles_with_parity_on_resized_inputs(factories, tmp_path, capsys, dtype,
                                                                            tolerance):
    plan = tmp_path / "plan"
    assert main(["compile", "--model", f"{factories}:float_mlp", "--dtype", dtype, "-o", str(plan)]) == 0
    out = capsys.readouterr().out
    assert "parity on example inputs (features (2, 5, 8)): max abs diff" in out
    assert "parity on resized inputs (features (3, 3, 8)): max abs diff" in out  # batch and sequence, not width
    assert out.count(f"ok (tolerance {tolerance})") == 2
    program = moec.load(plan).program
    assert {w.dtype for w in program.weights.values()} == {getattr(torch, dtype)}
    assert program.graph.inputs[0].tensor_type.torch_dtype == getattr(torch, dtype)


def test_float_calibration_inputs_follow_dtype(factories, tmp_path, capsys):
    """A float32 calibration file for a model compiled in bfloat16 is cast with the example inputs."""
    safetensors.torch.save_file({"features": torch.randn(40, 6, 8)}, tmp_path / "features.safetensors")
    (tmp_path / "convert.yaml").write_text("passes:\n  - dense_to_moe: {experts: 4, top_k: 2}\n")
    plan = tmp_path / "plan"
    assert main(["compile", "--model", f"{factories}:float_mlp", "--dtype", "bfloat16", "--recipe",
                 str(tmp_path / "convert.yaml"), "--calibration", str(tmp_path / "features.safetensors"),
                 "-o", str(plan)]) == 0
    assert "dense-to-moe changes the model's outputs by design" in capsys.readouterr().out
    assert len(moec.load(plan).program.graph.ops_of(ExpertsOp)) == 1


def test_path_options_expand_the_home_folder(factories, tmp_path, monkeypatch):
    """A ``~`` that no shell expanded (a quoted path, one from a config) is the user's home, in every path option."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)  # where a folder literally named ~ would appear
    safetensors.torch.save_file({"features": torch.randn(8, 6, 8)}, home / "features.safetensors")
    (home / "convert.yaml").write_text("passes:\n  - dense_to_moe: {experts: 4, top_k: 2}\n")
    assert main(["compile", "--model", f"{factories}:float_mlp", "--recipe", "~/convert.yaml",
                 "--calibration", "~/features.safetensors", "-o", "~/plan"]) == 0
    assert main(["inspect", "~/plan", "--no-ir"]) == 0
    assert main(["export-onnx", "~/plan", "-o", "~/model.onnx"]) == 0
    assert (home / "plan" / WEIGHTS_FILE).is_file() and (home / "model.onnx").is_file()
    assert not (tmp_path / "~").exists()


@pytest.mark.parametrize(("factory", "message"), [
    ("raises", "model factory '{module}:raises' raised RuntimeError: checkpoint not found"),
    ("returns_text", "model factory '{module}:returns_text' returned a str; return a model, or (model, example_kwargs)"),
    ("returns_three", "model factory '{module}:returns_three' returned a tuple of (Linear, dict, int)"),
    ("missing", "cannot load model factory '{module}:missing': module '{module}' has no attribute 'missing'"),
])
def test_a_factory_that_fails_is_one_usage_error(factories, capsys, factory, message):
    assert main(["compile", "--model", f"{factories}:{factory}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message.format(module=factories) in err and "Traceback" not in err


def test_a_factory_error_exits_2_from_the_console_script(factories, tmp_path):
    result = subprocess.run([sys.executable, "-m", "moec.cli", "compile", "--model", "no_such_module:factory"],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot load model factory 'no_such_module:factory'" in " ".join(result.stderr.split())


@pytest.mark.slow  # about 12 s
def test_cp_sat_placement_calibrates_on_a_calibration_file(calibration_files, tmp_path, capsys):
    """The default placement method traces the --calibration samples; an exact recipe keeps its parity check."""
    (tmp_path / "place.yaml").write_text("passes:\n  - expert-placement: {world_size: 2, balance_eps: 0.5, time_limit_s: 5}\n")
    plan = tmp_path / "plan"
    assert main(["compile", "--model", "tiny-mixtral", "--recipe", str(tmp_path / "place.yaml"),
                 "--calibration", str(calibration_files / "ids.safetensors"), "-o", str(plan)]) == 0
    assert "parity on resized inputs" in capsys.readouterr().out
    assert moec.load(plan).program.metadata["expert_parallel"]["placement"]["method"] == "cp-sat"


def test_compile_piped_into_a_reader_that_stops_early_still_writes_the_plan(tmp_path):
    """``moec compile -o plan | head -1``: once the reader has gone, the command stops printing and finishes."""
    plan = tmp_path / "plan"
    process = subprocess.Popen([sys.executable, "-m", "moec.cli", "compile", "--model", "tiny-mixtral", "-o", str(plan)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline()
    process.stdout.close()  # as head does after its line
    returncode = process.wait(timeout=300)
    assert returncode == 0
    assert process.stderr.read().splitlines()[-1].startswith(f"done writing plan to {plan}")
    assert moec.load(plan).ir


def test_a_narrow_layer_table_wraps_names_and_keeps_numbers_whole():
    from rich.console import Console

    from moec.cli import summary_table

    rows = [{"op": "moe.experts", "weights": "model.layers.12.block_sparse_moe.experts", "experts": 64, "top_k": 8,
             "detail": "gated silu, hidden 4096, ffn 14336", "params": 11_274_289_152, "bytes": 45_097_156_608}]
    console = Console(width=70, record=True, file=io.StringIO())
    console.print(summary_table(rows, "layers"))
    text = console.export_text()
    assert "…" not in text
    assert "11,274,289,152" in text and "45,097,156,608" in text
    lines = [line for line in text.splitlines() if line.startswith("│")]
    weights_column = "".join(line.split("│")[3].strip() for line in lines)
    assert weights_column == "model.layers.12.block_sparse_moe.experts"


def test_inspect_shows_the_rest_of_a_plan_whose_placement_record_does_not_read(qwen_plan, tmp_path, capsys):
    import shutil

    folder = tmp_path / "plan"
    shutil.copytree(qwen_plan, folder)
    plan = json.loads((folder / "plan.json").read_text())
    plan["metadata"]["expert_parallel"] = {"placement": 5}  # edited by hand: no world_size, no method
    (folder / "plan.json").write_text(json.dumps(plan))
    assert main(["inspect", "--no-ir", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "(a record in plan.json's metadata does not read: KeyError: 'world_size')" in out
    assert "all weights:" in out


def test_a_truncated_calibration_file_is_bad_usage_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from moec.frontend import zoo

    path = tmp_path / "ids.safetensors"
    safetensors.torch.save_file({"input_ids": torch.ones(4, 8, dtype=torch.long)}, str(path))
    path.write_bytes(path.read_bytes()[:-10])
    (tmp_path / "d2m.yaml").write_text("passes:\n  - dense-to-moe: {experts: 4, top_k: 2}\n")
    monkeypatch.setattr(zoo, "load_model_spec", lambda spec: pytest.fail("the model was loaded"))
    assert main(["compile", "--model", "tiny-llama", "--recipe", str(tmp_path / "d2m.yaml"),
                 "--calibration", str(path)]) == 2
    assert (f"error: --calibration {path} is not a readable .safetensors file (truncated or corrupt: Error while "
            "deserializing header: incomplete metadata") in " ".join(capsys.readouterr().err.split())


def test_inspect_json_is_the_plan_as_data_for_scripts(qwen_plan, capsys):
    assert main(["inspect", "--json", str(qwen_plan)]) == 0
    captured = capsys.readouterr()
    described = json.loads(captured.out)  # nothing else on stdout
    plan = moec.load(qwen_plan)
    assert described["layers"] == plan.summary() and described["plan"] == str(qwen_plan)
    assert described["weights"] == dict(zip(("params", "bytes"), plan.program.weight_sizes(), strict=True))
    assert described["model_class"].endswith("Qwen2MoeForCausalLM") and described["backend"] == "torch"
    assert [check["inputs"] for check in described["report"]["checks"]] == ["example inputs", "resized inputs"]
    assert "ir" not in described
    assert main(["inspect", "--json", "--ir", str(qwen_plan)]) == 0
    assert json.loads(capsys.readouterr().out)["ir"] == plan.ir
    assert main(["inspect", "--ir", str(qwen_plan)]) == 2
    assert "--ir goes with --json" in capsys.readouterr().err


@pytest.mark.parametrize(("columns", "width"), [(None, 140), ("60", 60), ("wide", 140), ("0", 140)])
def test_piped_output_is_as_wide_as_columns_says(monkeypatch, columns, width):
    from moec.cli import piped_width

    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    assert piped_width(io.StringIO()) == width


def test_a_calibration_file_of_no_samples_says_so(tmp_path, capsys):
    path = tmp_path / "ids.safetensors"
    safetensors.torch.save_file({"input_ids": torch.ones(0, 8, dtype=torch.long),
                                 "attention_mask": torch.ones(0, 8, dtype=torch.long)}, str(path))
    (tmp_path / "d2m.yaml").write_text("passes:\n  - dense-to-moe: {experts: 4, top_k: 2}\n")
    assert main(["compile", "--model", "tiny-llama", "--recipe", str(tmp_path / "d2m.yaml"),
                 "--calibration", str(path)]) == 1
    assert (f"error: --calibration {path} holds no samples (its tensors attention_mask, input_ids have 0 rows along "
            "dim 0); write the samples along dim 0") in " ".join(capsys.readouterr().err.split())


def test_the_command_runs_from_a_thread_other_than_the_main_one(qwen_plan, capsys):
    """Only the main thread may set a signal handler: elsewhere main() leaves SIGTERM alone and runs."""
    import threading

    codes = []
    thread = threading.Thread(target=lambda: codes.append(main(["inspect", "--no-ir", str(qwen_plan)])))
    thread.start()
    thread.join()
    assert codes == [0] and "all weights:" in capsys.readouterr().out
