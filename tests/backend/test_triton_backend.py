"""The Triton backend end to end on a tiny Mixtral, in Triton's interpreter: generated kernels match the
torch runner (the reference interpreter), a saved plan carries its kernels and runs from them, and bad
input (unsupported ops, no triton) behaves as documented."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[triton]')")

import moec  # noqa: E402
from moec.api import CompiledModel  # noqa: E402
from moec.backend.torch_runner import TorchRunner  # noqa: E402
from moec.backend.triton_codegen import KERNELS_FILE  # noqa: E402
from moec.errors import BackendError, PlanError  # noqa: E402
from moec.ir.ops import RouteOp  # noqa: E402
from moec.ir.parser import parse_graph  # noqa: E402
from moec.ir.plan import read_plan_json  # noqa: E402
from moec.ir.program import Program  # noqa: E402

TOLERANCE = 1e-5  # float32 end to end; the kernels multiply in full float32


@pytest.fixture(scope="module")
def mixtral():
    from moec.frontend.zoo import build_preset

    model, example = build_preset("tiny-mixtral")
    return moec.compile(model, example, backend="triton"), example


def other_inputs(example):
    """A batch and sequence length capture never saw: 3 x 7 = 21 tokens, not a multiple of any tile."""
    input_ids = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(0))
    return {key: input_ids if key == "input_ids" else torch.ones_like(input_ids) for key in example}


def test_triton_run_matches_torch_runner(mixtral):
    compiled, example = mixtral
    reference = CompiledModel(compiled.program, "torch")
    for inputs in (example, other_inputs(example)):
        got, expected = compiled(**inputs).logits, reference(**inputs).logits
        torch.testing.assert_close(got, expected, rtol=TOLERANCE, atol=TOLERANCE)


def test_every_moe_op_runs_a_generated_kernel(mixtral, monkeypatch):
    compiled, example = mixtral
    from moec.kernels import triton_ops

    calls = []
    for name in ("route", "experts"):
        original = getattr(triton_ops, name)

        def counting(*args, _original=original, _name=name, **kwargs):
            calls.append((_name, kwargs["kernels"].__name__))
            return _original(*args, **kwargs)

        monkeypatch.setattr(triton_ops, name, counting)  # the generated launchers look it up per call
    compiled(**example)
    module = compiled.runner.kernels.__name__
    assert sorted(calls) == [("experts", module)] * 2 + [("route", module)] * 2  # 2 layers


def test_saved_plan_carries_kernels_and_runs_from_them(mixtral, tmp_path):
    compiled, example = mixtral
    plan = compiled.save(tmp_path / "plan")
    source = (plan / KERNELS_FILE).read_text()
    assert source.startswith('"""moec Triton kernels for one plan')
    assert ("model.layers.0.mlp: 4 experts, hidden 32, FFN 64, gated silu, f32 activations, w_in f32, w_out f32"
            in source)
    loaded = moec.load(plan)  # the backend the plan was compiled for
    assert loaded.backend == "triton"
    assert loaded.runner.kernels_file == plan / KERNELS_FILE
    assert loaded.runner.kernels.__file__ == str(plan / KERNELS_FILE)
    torch.testing.assert_close(loaded(**example).logits, compiled(**example).logits, rtol=0, atol=0)


def with_ir(program: Program, text: str) -> Program:
    return Program(parse_graph(text), program.weights, program.in_spec, program.out_spec, program.metadata)


@pytest.mark.parametrize("recipe", [
    # packed 3-bit experts, dequantized inside the kernels (3 bits: codes straddle bytes); compared with the
    # torch runner's exact kernel, its default one for up to 4 bits rounding the activations to bfloat16
    [{"quantize": {"bits": 3, "group": 32}}],
    [{"dynamic-skip": {"threshold": 0.9}}],  # secondary experts below 0.9 x the top weight: never computed
])
def test_compressed_plans_run_their_kernels_and_match_the_torch_runner(recipe):
    from moec.frontend.zoo import build_preset

    model, example = build_preset("tiny-mixtral")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: every MoE op runs a generated kernel
        compiled = moec.compile(model, example, backend="triton", recipe={"passes": recipe})
    assert compiled.runner.fallbacks == []
    if "quantize" in recipe[0]:
        assert "w_in int3 (group 32), w_out int3 (group 32)" in compiled.runner.source  # the header says so
    program = compiled.program
    inputs = other_inputs(example)
    exact = TorchRunner(program, quant_kernel="dequant").run(program.flatten_inputs((), inputs))
    torch.testing.assert_close(compiled(**inputs).logits, program.unflatten_outputs(exact).logits,
                               rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.slow  # about 12 s in the interpreter
def test_gpt_oss_runs_its_kernels_and_matches_the_torch_runner():
    """GPT-OSS: the router's own bias on the logits in the Triton router, clamped SwiGLU experts with biases."""
    from moec.frontend.zoo import build_preset

    model, example = build_preset("tiny-gpt-oss")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback warning: every MoE op runs a generated kernel
        compiled = moec.compile(model, example, backend="triton")
    assert compiled.runner.fallbacks == []
    routes = compiled.program.graph.ops_of(RouteOp)
    assert len(routes) == 2 and all(route.spec.has_logit_bias for route in routes)
    program = compiled.program
    inputs = other_inputs(example)
    exact = TorchRunner(program, quant_kernel="dequant").run(program.flatten_inputs((), inputs))
    torch.testing.assert_close(compiled(**inputs).logits, program.unflatten_outputs(exact).logits,
                               rtol=TOLERANCE, atol=TOLERANCE)


def test_merged_experts_read_the_expert_map(mixtral):
    """After expert merging the router still picks among 4 experts, which share 3 stored ones."""
    compiled, example = mixtral
    text = compiled.ir.replace('gated=true, block="model.layers.0.mlp"',
                               'gated=true, expert_map=[0, 0, 1, 3], block="model.layers.0.mlp"')
    merged = with_ir(compiled.program, text)
    expected = CompiledModel(merged, "torch")(**example).logits
    assert not torch.allclose(expected, compiled(**example).logits)  # the map changes the function
    torch.testing.assert_close(CompiledModel(merged, "triton")(**example).logits, expected, rtol=TOLERANCE, atol=TOLERANCE)


def test_unsupported_ops_fall_back_to_torch_with_one_warning(mixtral):
    compiled, example = mixtral
    program = compiled.program
    # Group-limited routing (DeepSeek-V3) is not in the Triton router: those ops keep their torch rule.
    text = compiled.ir.replace("n_group=1, topk_group=1", "n_group=2, topk_group=1")
    grouped = with_ir(program, text)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = CompiledModel(grouped, "triton")
    messages = [str(w.message) for w in caught if "moec triton backend" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "2 of 4 MoE ops run on the torch runner" in messages[0] and "n_group > 1" in messages[0]
    expected = CompiledModel(grouped, "torch")(**example).logits
    torch.testing.assert_close(fallback(**example).logits, expected, rtol=TOLERANCE, atol=TOLERANCE)


def test_a_plan_without_moe_ops_says_it_runs_on_the_torch_runner():
    dense = moec.compile(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
    with pytest.warns(UserWarning, match="no moe.route or moe.experts op .* runs on the torch runner"):
        CompiledModel(dense.program, "triton")


def test_triton_backend_without_triton_is_one_clear_error(mixtral, monkeypatch):
    compiled, _ = mixtral
    monkeypatch.setitem(sys.modules, "triton", None)  # what `import triton` sees when it is not installed
    with pytest.raises(BackendError, match=r"pip install 'moec\[triton\]'"):
        CompiledModel(compiled.program, "triton")


def test_compile_for_triton_without_triton_fails_before_capturing(monkeypatch):
    import moec.api

    def capture(*args):
        raise AssertionError("captured the model before finding that the backend cannot run")

    monkeypatch.setattr(moec.api, "capture_for_sizes_of_one", capture)
    monkeypatch.setitem(sys.modules, "triton", None)  # what `import triton` sees when it is not installed
    with pytest.raises(BackendError, match=r"pip install 'moec\[triton\]'"):
        moec.compile(torch.nn.Linear(4, 4), (torch.randn(2, 4),), backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels run without the interpreter")
@pytest.mark.parametrize(("setting", "advice"), [
    ("0", r"TRITON_INTERPRET is '0': leave it unset or set it to 1$"),
    (None, r"import moec before transformers/triton, or set TRITON_INTERPRET=1$"),
])
def test_triton_without_its_interpreter_on_a_cpu_says_why(setting, advice):
    """``import moec`` turns the interpreter on unless the variable is set, or triton was imported first."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    first = "import triton, moec" if setting is None else "import moec"
    if setting is not None:
        environment["TRITON_INTERPRET"] = setting
    code = f"{first}\nfrom moec.backend.triton_runner import check_available\ncheck_available()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment)
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert re.search(r"^moec.errors.BackendError: backend 'triton' needs a CUDA GPU, or Triton's interpreter on the "
                     r"CPU, which must be on when triton is first imported: " + advice, error), error


@pytest.mark.slow
def test_cli_compile_with_triton_writes_kernels_into_the_plan(tmp_path, capsys):
    from moec.cli import main

    plan = tmp_path / "plan"
    assert main(["compile", "--model", "tiny-mixtral", "--backend", "triton", "-o", str(plan)]) == 0
    out = capsys.readouterr().out
    assert "triton kernels: 4 of 4 MoE ops" in out
    assert "kernels timed on this host" not in out  # the torch runner's race does not run for this plan
    assert (plan / KERNELS_FILE).is_file()
    assert moec.load(plan).runner.kernels_file == plan / KERNELS_FILE


def test_a_plan_saved_again_runs_on_the_backend_it_was_loaded_with(mixtral, tmp_path):
    compiled, _ = mixtral
    triton_plan = compiled.save(tmp_path / "triton")
    as_torch = moec.load(moec.load(triton_plan, backend="torch").save(tmp_path / "torch"))
    assert as_torch.backend == "torch"
    as_triton = moec.load(moec.load(tmp_path / "torch", backend="triton").save(tmp_path / "triton-again"))
    assert as_triton.backend == "triton"
    assert as_triton.runner.kernels_file == tmp_path / "triton-again" / KERNELS_FILE


def test_a_float64_plan_runs_on_the_torch_runner_and_says_so_once():
    """The kernels compute in float32: float64 routers and experts keep their torch rules (float64), each named
    in one warning and recorded in the report, and the output is the torch runner's, not a float32 one."""
    from moec.frontend.zoo import build_preset

    model, example = build_preset("tiny-mixtral")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = moec.compile(model.double(), example, backend="triton")
    messages = [str(w.message) for w in caught if "moec triton backend" in str(w.message)]
    assert len(messages) == 1 and messages[0].startswith("moec triton backend: the whole plan runs on the torch runner")
    assert messages[0].count("activations of dtype f64") == 4
    route = next(index for index, op in enumerate(compiled.program.graph.ops) if op.op_name == "moe.route")
    assert f"op {route} moe.route of model.layers.0.mlp (activations of dtype f64 (the Triton router computes in " \
        "float32" in messages[0]
    record = compiled.report["triton"]
    assert record["kernel_ops"] == 0
    assert [(row["op_name"], row["block"]) for row in record["fallbacks"]] == [
        ("moe.route", "model.layers.0.mlp"), ("moe.experts", "model.layers.0.mlp"),
        ("moe.route", "model.layers.1.mlp"), ("moe.experts", "model.layers.1.mlp")]
    expected = CompiledModel(compiled.program, "torch")(**example).logits
    assert expected.dtype == torch.float64
    torch.testing.assert_close(compiled(**example).logits, expected, rtol=0, atol=0)


def test_a_kernel_file_for_another_ir_is_refused_without_running_it(mixtral, tmp_path):
    compiled, _ = mixtral
    marker = tmp_path / "ran"
    stale = re.sub(r'^IR_SHA256 = "[0-9a-f]{64}"$', 'IR_SHA256 = "' + "0" * 64 + '"', compiled.runner.source,
                   flags=re.MULTILINE)
    kernels = tmp_path / KERNELS_FILE
    kernels.write_text(f"open({str(marker)!r}, 'w').close()\n" + stale)
    with pytest.raises(PlanError, match="was generated for another IR than the plan's"):
        CompiledModel(compiled.program, "triton", kernels_file=kernels)
    assert not marker.exists()


def test_fallbacks_are_recorded_in_the_saved_plan_and_a_kernel_file_without_a_launcher_is_one(mixtral, tmp_path):
    compiled, example = mixtral
    assert CompiledModel(compiled.program, "triton").report["triton"] == {"kernel_ops": 4, "fallbacks": []}
    source = compiled.runner.source
    first = source.index("LAUNCHERS = {") + len("LAUNCHERS = {")
    missing = source[:first] + source[source.index(", ", first) + 2:]  # the first op's launcher left out
    kernels = tmp_path / KERNELS_FILE
    kernels.write_text(missing)
    with pytest.warns(UserWarning, match=r"1 of 4 MoE ops run on the torch runner: op \d+ moe.route of "
                                         r"model.layers.0.mlp \(the plan's triton_kernels.py has no launcher for it\)"):
        partial = CompiledModel(compiled.program, "triton", kernels_file=kernels)
    (row,) = partial.report["triton"]["fallbacks"]
    assert row["op_name"] == "moe.route" and partial.report["triton"]["kernel_ops"] == 3
    torch.testing.assert_close(partial(**example).logits, compiled(**example).logits, rtol=TOLERANCE, atol=TOLERANCE)
    folder = partial.save(tmp_path / "plan")
    assert read_plan_json(folder)[1]["metadata"]["report"]["triton"]["fallbacks"] == [row]
    with pytest.warns(UserWarning, match="has no launcher for it"):
        assert moec.load(folder).report["triton"]["fallbacks"] == [row]
    saved = moec.load(folder, backend="torch")  # runs no Triton kernel, so it reports none
    assert "triton" not in saved.report
    assert "triton" not in read_plan_json(saved.save(tmp_path / "as-torch"))[1]["metadata"]["report"]
    as_torch = CompiledModel(partial.program, "torch")  # a torch model over the triton model's program
    assert "triton" not in as_torch.report and "triton" in partial.report
    compiled.report["triton"] = compiled.runner.report()  # the shared program's record, as the fixture made it
