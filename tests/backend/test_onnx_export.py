"""ONNX export of compiled zoo models: checker, shape inference and onnxruntime parity, both lowerings.

Each export traces the model twice (torch.export, then torch.onnx's decompositions) and takes 20-80 s on
a 2-core machine, so the default run exports two models (Qwen2-MoE fused into com.microsoft.MoE, with its shared expert;
Mixtral with portable experts, through the CLI from a plan folder); ``-m slow`` runs every family with
both lowerings.
"""

from __future__ import annotations

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

TOLERANCE = 1e-4
MOE_FAMILIES = ["tiny-mixtral", "tiny-qwen2-moe", "tiny-olmoe", "tiny-deepseek-v3"]
DENSE_FAMILIES = ["tiny-llama", "tiny-gpt2", "tiny-bert", "minilm"]


def export_and_check(preset, name, lowering, tmp_path):
    model, example = preset(name)
    compiled = moec.compile(model, example)
    path = tmp_path / f"{name}.onnx"
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
    return compiled, onnx_model, report, fallback_warnings


def op_types(onnx_model):
    return {(node.domain, node.op_type) for node in onnx_model.graph.node}


def test_ort_lowering_fuses_qwen2_moe(preset, tmp_path):
    compiled, onnx_model, report, fallbacks = export_and_check(preset, "tiny-qwen2-moe", "ort", tmp_path)
    assert report["fused_moe_ops"] == 2 and not fallbacks
    assert sum(node.op_type == "MoE" for node in onnx_model.graph.node) == 2
    assert [o.name for o in onnx_model.graph.output] == ["logits"]
    assert ("", "NonZero") not in op_types(onnx_model)  # no portable experts left


def test_deepseek_routing_falls_back_to_portable(preset):
    model, example = preset("tiny-deepseek-v3")
    plan = plan_moe(moec.compile(model, example).program, "ort")
    assert not plan.fused and list(plan.fallbacks) == ["model.layers.1.mlp"]
    assert plan.fallbacks["model.layers.1.mlp"].startswith("sigmoid router scoring")


@pytest.mark.slow
def test_deepseek_export_is_standard_onnx_only(preset, tmp_path):
    compiled, onnx_model, report, fallbacks = export_and_check(preset, "tiny-deepseek-v3", "ort", tmp_path)
    assert report["fused_moe_ops"] == 0
    assert fallbacks == ["model.layers.1.mlp uses the portable MoE lowering: com.microsoft.MoE cannot express "
                         "sigmoid router scoring (the op scores with softmax)"]
    types = op_types(onnx_model)
    assert ("", "TopK") in types and ("", "ScatterND") in types
    assert all(domain in ("", "ai.onnx") for domain, _ in types)


def test_dense_programs_have_nothing_to_fuse(preset):
    model, example = preset("tiny-llama")
    plan = plan_moe(moec.compile(model, example).program, "ort")
    assert not plan.fused and not plan.fallbacks


def test_cli_exports_a_plan_written_by_compile(tmp_path, capsys):
    """The portable lowering of a MoE model, from a plan folder: experts as standard ops only."""
    plan, out = tmp_path / "plan", tmp_path / "mixtral.onnx"
    assert main(["compile", "--model", "tiny-mixtral", "-o", str(plan)]) == 0
    assert main(["export-onnx", str(plan), "-o", str(out), "--lowering", "portable"]) == 0
    printed = capsys.readouterr().out
    assert "onnxruntime parity" in printed and "0 com.microsoft.MoE ops" in printed
    onnx_model = onnx.load(str(out))
    assert [o.name for o in onnx_model.graph.output] == ["logits"]
    types = op_types(onnx_model)
    assert {("", "TopK"), ("", "NonZero"), ("", "ScatterND")} <= types
    assert all(domain in ("", "ai.onnx") for domain, _ in types)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixtral.onnx", "plan"]


class Searchsorted(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("edges", torch.linspace(-1, 1, 5))

    def forward(self, x):
        return torch.searchsorted(self.edges, self.proj(x).contiguous()).float()


def test_unlowerable_op_is_one_clear_error_and_no_file(tmp_path):
    compiled = moec.compile(Searchsorted(), (torch.randn(2, 3, 4),))
    target = tmp_path / "model.onnx"
    with pytest.raises(BackendError, match=r"cannot lower aten\.searchsorted\.Tensor .*line \d+ of the IR"):
        compiled.export_onnx(target)
    assert list(tmp_path.iterdir()) == []


def test_failed_parity_leaves_nothing_behind(tmp_path):
    compiled = moec.compile(nn.Sequential(nn.Linear(4, 8), nn.ReLU()).eval(), (torch.randn(2, 3, 4),))
    with pytest.raises(BackendError, match="differs from the torch runner"):
        export_onnx(compiled.program, tmp_path / "model.onnx", tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []


def test_external_data_lands_beside_the_model(tmp_path):
    compiled = moec.compile(nn.Sequential(nn.Linear(4, 8), nn.ReLU()).eval(), (torch.randn(2, 3, 4),))
    result = export_onnx(compiled.program, tmp_path / "model.onnx", external_data=True)
    assert result.external_data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]


@pytest.mark.slow
@pytest.mark.parametrize("lowering", ["portable", "ort"])
@pytest.mark.parametrize("name", MOE_FAMILIES + DENSE_FAMILIES)
def test_every_family_exports_with_both_lowerings(preset, name, lowering, tmp_path):
    compiled, onnx_model, report, fallbacks = export_and_check(preset, name, lowering, tmp_path)
    has_moe = name in MOE_FAMILIES
    uses_ort_moe = any(node.op_type == "MoE" for node in onnx_model.graph.node)
    assert uses_ort_moe == (lowering == "ort" and has_moe and name != "tiny-deepseek-v3")
