"""ONNX export of compiled zoo models: checker, shape inference and onnxruntime parity, both lowerings.

Every family of the tiny zoo is exported with both lowerings (an export takes 3-15 s on a 2-core
machine: one torch.export trace, translation, optimization, checks); each family is compiled once.
"""

from __future__ import annotations

import functools
import json
import warnings

import onnx
import pytest
import torch
from torch import nn

import moec
from moec.backend.onnx import export_onnx
from moec.backend.onnx.module import plan_moe
from moec.cli import main
from moec.errors import BackendError
from moec.ir.guards import InputGuards
from moec.ir.ops import ExpertsOp, RouteOp

TOLERANCE = 1e-4
MOE_FAMILIES = ["tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-olmoe", "tiny-deepseek-v3", "tiny-gpt-oss"]
DENSE_FAMILIES = ["tiny-llama", "tiny-gpt2", "tiny-bert", "minilm"]


@pytest.fixture(scope="module")
def compiled_preset(preset):
    """``compiled_preset(name)``: the preset compiled once for this module (exports only read the program)."""
    return functools.cache(lambda name: moec.compile(*preset(name)))


def export_and_check(compiled, lowering, path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = compiled.export_onnx(path, lowering=lowering)
    report = compiled.report["onnx"]
    assert written == path and path.is_file()
    assert set(report["parity_max_abs_diff"]) == {"3x5", "1x11"}
    assert max(report["parity_max_abs_diff"].values()) <= TOLERANCE
    onnx_model = onnx.load(str(path))
    assert [i.name for i in onnx_model.graph.input] == compiled.program.graph.input_names
    dims = [d.dim_param for d in onnx_model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]
    fallback_warnings = [str(w.message) for w in caught if "portable MoE lowering" in str(w.message)]
    return onnx_model, report, fallback_warnings


def op_types(onnx_model):
    return {(node.domain, node.op_type) for node in onnx_model.graph.node}


def test_deepseek_routing_is_chosen_by_the_portable_router_and_fused(compiled_preset):
    """Sigmoid, biased, grouped routing is beyond the op's own softmax: the portable router chooses."""
    program = compiled_preset("tiny-deepseek-v3").program
    plan = plan_moe(program, "ort")
    (experts,) = program.graph.ops_of(ExpertsOp)
    assert list(plan.fused) == [id(experts)] and plan.fused[id(experts)].route is None and not plan.fallbacks
    mixtral = compiled_preset("tiny-mixtral").program
    routes = [fused.route for fused in plan_moe(mixtral, "ort").fused.values()]
    assert len(routes) == 2 and all(isinstance(route, RouteOp) for route in routes)  # the op routes itself


def test_dense_programs_have_nothing_to_fuse(compiled_preset):
    plan = plan_moe(compiled_preset("tiny-llama").program, "ort")
    assert not plan.fused and not plan.fallbacks


def test_cli_exports_a_plan_written_by_compile(tmp_path, capsys):
    """The portable lowering of a MoE model, from a plan folder: experts as standard ops only."""
    plan, out = tmp_path / "plan", tmp_path / "mixtral.onnx"
    assert main(["compile", "--model", "tiny-mixtral", "-o", str(plan)]) == 0
    assert main(["export-onnx", str(plan), "-o", str(out), "--lowering", "portable"]) == 0
    printed = capsys.readouterr().out
    assert "onnxruntime parity" in printed and "opset 20, no fused MoE ops" in printed
    onnx_model = onnx.load(str(out))
    assert [o.name for o in onnx_model.graph.output] == ["logits"]
    types = op_types(onnx_model)
    assert {("", "TopK"), ("", "NonZero"), ("", "ScatterND")} <= types
    assert all(domain in ("", "ai.onnx") for domain, _ in types)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixtral.onnx", "plan"]


def test_the_cli_exports_a_triton_plan_where_triton_is_missing(monkeypatch, tmp_path):
    from moec.backend import triton_runner

    with pytest.warns(UserWarning, match="the plan has no moe.route or moe.experts op for the Triton kernels"):
        compiled = moec.compile(nn.Sequential(nn.Linear(4, 8), nn.ReLU()).eval(), (torch.randn(2, 3, 4),),
                                backend="triton")
    compiled.save(tmp_path / "plan")

    def missing():
        raise BackendError("backend 'triton' needs Triton, which is not installed")

    monkeypatch.setattr(triton_runner, "import_triton", missing)
    assert main(["export-onnx", str(tmp_path / "plan"), "-o", str(tmp_path / "model.onnx")]) == 0
    assert (tmp_path / "model.onnx").is_file()


class PassThrough(nn.Module):
    """Returns one value under two names, and one of its inputs as is."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x, y):
        hidden = self.proj(x)
        return {"hidden": hidden, "hidden_again": hidden, "passed_through": y}


def test_an_output_that_is_an_input_or_another_output_keeps_every_name(tmp_path):
    import onnxruntime

    compiled = moec.compile(PassThrough().eval(), (torch.randn(2, 3, 4), torch.randn(2, 3, 4)))
    compiled.export_onnx(tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    assert [i.name for i in session.get_inputs()] == ["x", "y"]
    assert [o.name for o in session.get_outputs()] == ["hidden", "hidden_again", "passed_through"]
    x, y = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    hidden, again, passed = session.run(None, {"x": x.numpy(), "y": y.numpy()})
    assert (hidden == again).all() and (passed == y.numpy()).all()


class Pair(nn.Module):
    def __init__(self, nested: bool):
        super().__init__()
        self.proj, self.nested = nn.Linear(4, 4), nested

    def forward(self, x):
        hidden = self.proj(x)
        return ((hidden, hidden * 2), x) if self.nested else (hidden, hidden * 2)


@pytest.mark.parametrize(("model", "names"), [(Pair(nested=False), ["output_0", "output_1"]),
                                              (Pair(nested=True), ["output_0_0", "output_0_1", "output_1"]),
                                              (nn.Linear(4, 4), ["output"])])
def test_outputs_without_keys_are_named_after_their_place(model, names):
    from moec.backend.onnx.export import output_names

    assert output_names(moec.compile(model.eval(), (torch.randn(2, 4),)).program) == names


def test_any_file_name_can_be_written(tmp_path):
    """The shape-inference check writes a file beside the model: never over the model itself."""
    compiled = moec.compile(Pair(nested=False).eval(), (torch.randn(2, 4),))
    compiled.export_onnx(tmp_path / "model.inferred")
    assert [p.name for p in tmp_path.iterdir()] == ["model.inferred"]
    onnx.checker.check_model(str(tmp_path / "model.inferred"))


class NamedLikeTheExporter(nn.Module):
    """Submodules named like what the exporter's own module holds (``program``, ``linear``, ``ffn``)."""

    def __init__(self):
        super().__init__()
        self.linear, self.program, self.ffn = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.ffn(self.program(self.linear(x)))


@pytest.mark.parametrize("model", [NamedLikeTheExporter(), nn.Linear(4, 2)], ids=["submodules", "bare-linear"])
def test_initializers_keep_any_parameter_name(model, tmp_path):
    compiled = moec.compile(model.eval(), (torch.randn(2, 4),))
    compiled.export_onnx(tmp_path / "model.onnx")
    names = {init.name for init in onnx.load(str(tmp_path / "model.onnx")).graph.initializer}
    assert names == {name for name, _ in model.named_parameters()}


class Searchsorted(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("edges", torch.linspace(-1, 1, 5))

    def forward(self, x):
        return torch.searchsorted(self.edges, self.proj(x).contiguous()).float()


class ComplexRotation(nn.Module):
    """Rotates pairs of features as complex numbers, the way DeepSeek-V2 and Llama 4 apply rotary embeddings:
    ``polar``, ``view_as_complex``, a complex product (broadcast over the heads) and ``view_as_real``."""

    def forward(self, x):  # x [B, S, 2, 4]: 2 heads of 4 features
        angles = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * torch.tensor([0.3, 0.7])  # [S, 2]
        rotation = torch.polar(torch.ones_like(angles), angles).unsqueeze(1)  # [S, 1, 2]
        pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))  # [B, S, 2, 2]
        return torch.view_as_real(pairs * rotation * 0.5).flatten(-2)


class ComplexExponential(nn.Module):
    """A complex op outside those moec carries as pairs."""

    def forward(self, x):
        return torch.view_as_real(torch.exp(torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2)))).flatten(-2)


class Histogram(nn.Module):
    """An op torch.onnx lists but fails to translate (histc), found only while translating."""

    def forward(self, x):
        return x + torch.histc(x, bins=4).sum() * 0


def test_complex_rotary_exports_as_real_ops(tmp_path):
    compiled = moec.compile(ComplexRotation(), (torch.randn(2, 3, 2, 4),))
    assert "c64" in compiled.ir
    result = export_onnx(compiled.program, tmp_path / "model.onnx")
    assert max(result.max_abs_diff.values()) <= 1e-5
    model = onnx.load(str(tmp_path / "model.onnx"))
    assert all(value.type.tensor_type.elem_type != onnx.TensorProto.COMPLEX64
               for value in [*model.graph.value_info, *model.graph.output])
    assert {("", "Cos"), ("", "Sin")} <= op_types(model)


@pytest.mark.parametrize("module, reason", [
    (Searchsorted(), r"aten\.searchsorted\.Tensor \(no ONNX translation"),
    (ComplexExponential(), r"aten\.exp\.default \(complex-valued tensors: moec carries complex values through "),
    (Histogram(), r"aten\.histc\.default \(torch.onnx failed to translate it\)"),
])
def test_unlowerable_op_is_one_clear_error_and_no_file(module, reason, tmp_path):
    compiled = moec.compile(module, (torch.randn(2, 3, 4),))
    target = tmp_path / "model.onnx"
    with pytest.raises(BackendError, match=rf"cannot lower {reason}.*line \d+ of the IR"):
        compiled.export_onnx(target)
    assert list(tmp_path.iterdir()) == []


def test_failed_parity_leaves_nothing_behind(tmp_path):
    compiled = moec.compile(nn.Sequential(nn.Linear(4, 8), nn.ReLU()).eval(), (torch.randn(2, 3, 4),))
    with pytest.raises(BackendError, match="differs from the torch runner"):
        export_onnx(compiled.program, tmp_path / "model.onnx", tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []


def test_failed_export_removes_the_folders_it_made(tmp_path):
    compiled = moec.compile(nn.Sequential(nn.Linear(4, 8), nn.ReLU()).eval(), (torch.randn(2, 3, 4),))
    with pytest.raises(BackendError, match="differs from the torch runner"):
        export_onnx(compiled.program, tmp_path / "new" / "folders" / "model.onnx", tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []


def test_an_output_path_under_a_file_is_one_error(tmp_path):
    compiled = moec.compile(nn.Sequential(nn.Linear(4, 8), nn.ReLU()).eval(), (torch.randn(2, 3, 4),))
    (tmp_path / "notes").write_text("")
    with pytest.raises(BackendError, match=r"notes/deeper/model\.onnx: .*notes is a file, not a folder; choose another"):
        compiled.export_onnx(tmp_path / "notes" / "deeper" / "model.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["notes"]


def test_an_output_folder_that_cannot_be_written_to_is_one_error(monkeypatch, tmp_path):
    """... and the folders the export made for the file are removed."""
    from moec.backend.onnx import export

    def refuse(**kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(export.tempfile, "mkdtemp", refuse)
    compiled = moec.compile(nn.Sequential(nn.Linear(4, 8), nn.ReLU()).eval(), (torch.randn(2, 3, 4),))
    with pytest.raises(BackendError, match=r"cannot write .*new/model\.onnx: Permission denied; choose another"):
        compiled.export_onnx(tmp_path / "new" / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_external_data_lands_beside_the_model(tmp_path):
    """... and an inline export over it removes the data file it no longer reads."""
    compiled = moec.compile(nn.Sequential(nn.Linear(4, 8), nn.ReLU()).eval(), (torch.randn(2, 3, 4),))
    result = export_onnx(compiled.program, tmp_path / "model.onnx", external_data=True)
    assert result.external_data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert not export_onnx(compiled.program, tmp_path / "model.onnx", external_data=False).external_data
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_inline_weights_beyond_what_torch_onnx_writes_inline_are_refused(monkeypatch, tmp_path):
    """torch.onnx stores weights above its threshold as external data whatever it is asked: an inline export
    of such weights is refused, rather than written with its data file then removed as stale."""
    from torch.onnx._internal.exporter import _onnx_program

    from moec.backend.onnx import export

    compiled = moec.compile(nn.Sequential(nn.Linear(4, 8), nn.ReLU()).eval(), (torch.randn(2, 3, 4),))
    monkeypatch.setattr(_onnx_program, "_LARGE_MODEL_THRESHOLD", 64)
    monkeypatch.setattr(export, "INLINE_BYTES_MAX", 64, raising=False)
    with pytest.raises(BackendError, match=r"weights take 0\.00 GiB, more than torch\.onnx writes inside a \.onnx "
                                           r"file .*; export them as external data"):
        export_onnx(compiled.program, tmp_path / "model.onnx", external_data=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("options", "message"), [
    ({"opset": "20"}, r"^opset is a str \('20'\); give an int from 18 to 25$"),
    ({"opset": 20.0}, r"^opset is a float \(20\.0\)"),
    ({"external_data": "yes"}, r"^external_data is a str \('yes'\); give True, False or None"),
])
def test_export_options_of_the_wrong_type_are_refused_up_front(options, message, tmp_path):
    compiled = moec.compile(nn.Sequential(nn.Linear(4, 8), nn.ReLU()).eval(), (torch.randn(2, 3, 4),))
    with pytest.raises(TypeError, match=message):
        compiled.export_onnx(tmp_path / "model.onnx", **options)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("opset", [0, 13, 17, 99])
def test_an_opset_out_of_range_is_refused_up_front(opset, tmp_path):
    compiled = moec.compile(nn.Sequential(nn.Linear(4, 8), nn.ReLU()).eval(), (torch.randn(2, 3, 4),))
    with pytest.raises(BackendError, match=rf"cannot export at ONNX opset {opset}: choose an opset from 18 to 25"):
        export_onnx(compiled.program, tmp_path / "model.onnx", opset=opset)
    assert list(tmp_path.iterdir()) == []


def test_export_errors_are_public_moec_errors(tmp_path):
    compiled = moec.compile(nn.Sequential(nn.Linear(4, 8), nn.ReLU()).eval(), (torch.randn(2, 3, 4),))
    with pytest.raises(moec.BackendError):
        compiled.export_onnx(tmp_path / "model.onnx", opset=99)
    assert issubclass(moec.BackendError, moec.MoecError) and "BackendError" in moec.__all__


def test_the_report_gives_the_written_opset_and_the_cli_checks_it_first(tmp_path, capsys):
    compiled = moec.compile(nn.Sequential(nn.Linear(4, 8), nn.ReLU()).eval(), (torch.randn(2, 3, 4),))
    result = export_onnx(compiled.program, tmp_path / "model.onnx", opset=21)
    assert result.opset == 21 == onnx.load(str(tmp_path / "model.onnx")).opset_import[0].version
    assert main(["export-onnx", str(tmp_path / "no-plan"), "-o", str(tmp_path / "x.onnx"), "--opset", "0"]) == 2
    assert "error: cannot export at ONNX opset 0" in capsys.readouterr().err


@pytest.mark.parametrize("output, why", [(".", "is a folder; give the path of the .onnx file"),
                                         ("notes/model.onnx", "notes is a file, not a folder"),
                                         ("exports/", "exports/ names a folder; give the path of the .onnx file "
                                                      "to write (such as exports/model.onnx)"),
                                         ("taken.onnx", "taken.onnx.data is a folder, where the export keeps the "
                                                        "weights of taken.onnx")])
def test_the_cli_refuses_an_unusable_output_path_first_as_bad_usage(output, why, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes").write_text("")
    (tmp_path / "taken.onnx.data").mkdir()
    assert main(["export-onnx", str(tmp_path / "no-plan"), "-o", output]) == 2
    err = capsys.readouterr().err
    assert why in err and "Traceback" not in err


def test_rotary_models_export_at_opset_23(compiled_preset, tmp_path):
    """onnxscript's RotaryEmbedding fusion (opset 23) writes caches onnxruntime rejects: it is left out."""
    result = export_onnx(compiled_preset("tiny-llama").program, tmp_path / "llama.onnx", opset=23)
    assert result.opset == 23 and max(result.max_abs_diff.values()) <= TOLERANCE
    assert ("", "RotaryEmbedding") not in op_types(onnx.load(str(tmp_path / "llama.onnx")))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_plans_of_other_float_dtypes_are_refused(dtype, tmp_path):
    """float64 too: a float64 BERT failed in onnxruntime's parity run (no float64 Erf), advising the other
    lowering."""
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU()).eval().to(dtype)
    compiled = moec.compile(model, (torch.randn(2, 3, 4, dtype=dtype),))
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}[dtype]
    with pytest.raises(BackendError, match=rf"the plan computes in {name}; .* Compile the model in float32"):
        compiled.export_onnx(tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_an_onnxruntime_failure_in_the_parity_check_is_one_error(monkeypatch, tmp_path):
    """onnxruntime has no bfloat16 Add: with the dtype check left out, its error arrives as a BackendError."""
    from moec.backend.onnx import export

    monkeypatch.setattr(export, "check_float32", lambda program: None)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU()).eval().to(torch.bfloat16)
    compiled = moec.compile(model, (torch.randn(2, 3, 4, dtype=torch.bfloat16),))
    with pytest.raises(BackendError, match=r"onnxruntime could not run the exported model in the parity check: "
                                           r"\[ONNXRuntimeError\][^\n]*; nothing was written"):
        compiled.export_onnx(tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


class Patchify(nn.Module):
    """8 x 8 patches of an image of any size, then an MLP: images smaller than a patch do not run."""

    def __init__(self):
        super().__init__()
        self.patches = nn.Conv2d(3, 8, kernel_size=8, stride=8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

    def forward(self, pixels):
        return self.mlp(self.patches(pixels).flatten(2).transpose(1, 2))


def test_image_sizes_come_from_the_capture_example(tmp_path):
    """Height and width are dynamic; the export traces and checks at the example's 16 x 24, varying the
    batch (a small made-up size, as for a sequence, would be smaller than one patch)."""
    compiled = moec.compile(Patchify().eval(), (torch.randn(2, 3, 16, 24),))
    assert compiled.program.metadata["example_shapes"] == [[2, 3, 16, 24]]
    result = export_onnx(compiled.program, tmp_path / "model.onnx")
    assert max(result.max_abs_diff.values()) <= 1e-5
    onnx_model = onnx.load(str(tmp_path / "model.onnx"))
    (output,) = onnx_model.graph.output  # its patch count, written in the inputs' renamed dims
    assert [dim.dim_param or dim.dim_value for dim in output.type.tensor_type.shape.dim] == [
        "batch", "((dim3//8))*((dim2//8))", 8]
    (entry,) = onnx_model.metadata_props  # the conditions on input sizes, which onnxruntime does not check
    guards = InputGuards(json.loads(entry.value))
    assert entry.key == "moec_input_guards" and json.loads(entry.value) == compiled.program.metadata["input_guards"]
    assert guards.broken({"pixels": torch.zeros(1, 3, 16, 40)}) is None
    assert "pixels.shape[3] >= 8" in guards.broken({"pixels": torch.zeros(1, 3, 16, 4)})


# The default run exports one family per routing kind and one per dense FFN kind; the rest run with -m slow.
# The rest run in the slow run; Mixtral's portable lowering is exported by default from the CLI above.
DEFAULT_RUN = {("tiny-mixtral", "ort"), ("tiny-llama", "portable"), ("tiny-llama", "ort")}


@pytest.mark.parametrize(("name", "lowering"), [
    pytest.param(name, lowering, marks=() if (name, lowering) in DEFAULT_RUN else pytest.mark.slow)
    for name in MOE_FAMILIES + DENSE_FAMILIES for lowering in ("portable", "ort")])
def test_every_family_exports_with_both_lowerings(compiled_preset, name, lowering, tmp_path):
    compiled = compiled_preset(name)
    onnx_model, report, fallbacks = export_and_check(compiled, lowering, tmp_path / f"{name}.onnx")
    types = op_types(onnx_model)
    moe_blocks = len(compiled.program.graph.ops_of(ExpertsOp))
    fused = lowering == "ort"
    assert report["fused_moe_ops"] == sum(node.op_type == "MoE" for node in onnx_model.graph.node)
    assert report["fused_moe_ops"] == (moe_blocks if fused else 0)
    assert report["fused_moe_ops_by_op"] == ({"com.microsoft.MoE": moe_blocks} if fused and moe_blocks else {})
    if not fused:
        assert all(domain in ("", "ai.onnx") for domain, _ in types)  # standard ONNX only
    if moe_blocks and not fused:
        assert {("", "TopK"), ("", "NonZero"), ("", "ScatterND")} <= types
    if fused:
        assert ("", "NonZero") not in types  # no portable experts left
    assert not fallbacks


@pytest.mark.slow  # about 15 s
def test_a_dense_to_moe_llama_exports_fused(preset, tmp_path):
    """dense-to-moe routing (choice bias, top-k then softmax, scaled: each chosen expert weighs exactly 1)
    goes to com.microsoft.MoE as the portable router's choice; silu experts need no fallback."""
    model, example = preset("tiny-llama")
    recipe = {"passes": [{"dense-to-moe": {"experts": 4, "top_k": 2}}]}
    calibration = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                   for ids in torch.randint(0, 128, (4, 2, 8), generator=torch.Generator().manual_seed(0))]
    compiled = moec.compile(model, example, recipe=recipe, calibration=calibration)
    onnx_model, report, fallbacks = export_and_check(compiled, "ort", tmp_path / "llama-moe.onnx")
    assert report["fused_moe_ops"] == 2 and not fallbacks
    assert ("", "NonZero") not in op_types(onnx_model)


@pytest.fixture(scope="module")
def minilm_moe(preset):
    """The real-weights MoE: all-MiniLM-L6-v2 split into 16 experts per FFN (top-4) by dense-to-moe."""
    import transformers

    from moec.analysis.corpus import calibration_and_held_out, tokenized_batches
    from moec.frontend.zoo import minilm_path

    model, example = preset("minilm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    sentences, _ = calibration_and_held_out(32, 0)
    recipe = {"passes": [{"dense-to-moe": {"experts": 16, "top_k": 4, "method": "weights"}}]}
    return moec.compile(model, example, recipe=recipe, calibration=tokenized_batches(tokenizer, sentences))


@pytest.mark.slow
@pytest.mark.parametrize("lowering", ["portable", "ort"])
def test_minilm_converted_to_moe_exports_with_both_lowerings(minilm_moe, lowering, tmp_path):
    """Its GELU experts are beyond com.microsoft.MoE (its gelu is an approximation), so `ort` keeps portable
    experts, saying so.
    Slow: about 95 s per export (torch.export reasons symbolically about 96 experts' data-dependent rows)."""
    assert len(minilm_moe.program.graph.ops_of(ExpertsOp)) == 6
    onnx_model, report, fallbacks = export_and_check(minilm_moe, lowering, tmp_path / "minilm-moe.onnx")
    assert report["fused_moe_ops"] == 0
    assert len(fallbacks) == (6 if lowering == "ort" else 0)
    assert ("", "TopK") in op_types(onnx_model)


@pytest.mark.slow  # about 18 s each; clamped experts run on moec by default in tests/frontend/test_hf_experts.py
@pytest.mark.parametrize("router", ["moec", "model"])
def test_gpt_oss_clamped_experts_export_fused(router, monkeypatch, tmp_path):
    """GPT-OSS's clamped SwiGLU experts fuse into com.microsoft.MoE under either router: moec's (a
    ``moe.route`` with the router's own logit bias, which the op then routes by itself: no TopK left), or,
    with the block's recognizer left out, the model's own ATen ops (linear with bias, top-k, softmax)
    handing over the chosen experts as logits (weights from a softmax, experts from a top-k: both proved
    from the graph)."""
    from moec.frontend import recognize
    from tests.frontend.test_hf_experts import CLAMPED, clamped_family

    if router == "model":
        monkeypatch.setattr(recognize, "_REGISTRY", [entry for entry in recognize._REGISTRY
                                                     if not str(entry[0]).endswith(".GptOssMLP")])
    model, example = clamped_family("gpt_oss")
    compiled = moec.compile(model, example)
    assert len(compiled.program.graph.ops_of(RouteOp)) == (2 if router == "moec" else 0)
    onnx_model, report, fallbacks = export_and_check(compiled, "ort", tmp_path / "gpt_oss.onnx")
    assert report["fused_moe_ops"] == 2 and not fallbacks
    assert ("", "NonZero") not in op_types(onnx_model)
    assert (("", "TopK") in op_types(onnx_model)) == (router == "model")
    _, (_, limit, up_offset), *_ = CLAMPED["gpt_oss"]
    for node in (node for node in onnx_model.graph.node if node.op_type == "MoE"):
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["swiglu_limit"] == limit and attributes["activation_beta"] == up_offset
        assert attributes["activation_alpha"] == pytest.approx(1.702)  # quick_gelu


@pytest.fixture(scope="module")
def merged_skipping_mixtral(preset):
    """Mixtral with its 4 experts merged to 2 (router: members, so the router keeps 4 ids: an expert_map)
    and dynamic skipping at 0.9 (which fires on the parity check's inputs)."""
    model, example = preset("tiny-mixtral")
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    recipe = {"passes": [{"expert-merge": {"keep": 2, "router": "members"}}, {"dynamic-skip": {"threshold": 0.9}}]}
    return moec.compile(model, example, recipe=recipe, calibration=[{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])


@pytest.mark.slow  # about 14 s each
@pytest.mark.parametrize("lowering", ["portable", "ort"])
def test_merged_and_skipping_experts_export_with_both_lowerings(merged_skipping_mixtral, lowering, tmp_path):
    """The export applies expert_map and skip_threshold as the torch runner does (parity), skips on the
    check's inputs, and ``ort`` hands the remapped, skipped routing to com.microsoft.MoE as a choice."""
    from moec.backend.onnx.export import CHECK_SHAPES, example_inputs
    from moec.passes.dynamic_skip import skip_statistics

    program = merged_skipping_mixtral.program
    assert all(op.expert_map is not None and op.skip_threshold == 0.9 for op in program.graph.ops_of(ExpertsOp))
    assert skip_statistics(program, [example_inputs(program, *shape) for shape in CHECK_SHAPES])["skipped"] > 0
    onnx_model, report, fallbacks = export_and_check(merged_skipping_mixtral, lowering, tmp_path / "m.onnx")
    assert not fallbacks
    assert report["fused_moe_ops_by_op"] == ({"com.microsoft.MoE": 2} if lowering == "ort" else {})


def test_an_export_interrupted_between_its_files_leaves_the_earlier_pair_whole(tmp_path, monkeypatch):
    """A model and its external data are replaced as one: interrupted after the new data file moved in, the
    earlier model and data are both put back (a new data file beside an old model runs, and computes garbage)."""
    import os

    from moec.backend.onnx import export as export_module

    out, staging = tmp_path / "out", tmp_path / "staging"
    out.mkdir()
    staging.mkdir()
    for name, text in (("model.onnx", "old model"), ("model.onnx.data", "old data")):
        (out / name).write_text(text)
    files = [staging / "model.onnx.data", staging / "model.onnx"]
    for file in files:
        file.write_text("new")
    replace = os.replace

    def interrupted_at_the_model(source, destination):
        if str(source) == str(staging / "model.onnx"):
            raise KeyboardInterrupt
        replace(source, destination)

    monkeypatch.setattr(export_module.os, "replace", interrupted_at_the_model)
    with pytest.raises(KeyboardInterrupt):
        export_module.replace_files(files, out)
    monkeypatch.undo()
    assert {f.name: f.read_text() for f in out.iterdir()} == {"model.onnx": "old model", "model.onnx.data": "old data"}
    export_module.replace_files(files[1:], out)  # uninterrupted: replaced, nothing set aside is left
    assert {f.name: f.read_text() for f in out.iterdir()} == {"model.onnx": "new", "model.onnx.data": "old data"}
