"""``expert_kernel`` / ``quant_kernel`` of ``moec.compile`` and ``moec.load``: kernels fixed instead of timed."""

from __future__ import annotations

import pytest
import torch

import moec
from moec.errors import BackendError

RECIPE = {"passes": [{"quantize": {"bits": 4, "group": 32}}]}


@pytest.fixture(scope="module")
def fixed(preset):
    model, example = preset("tiny-mixtral")
    return moec.compile(model, example, recipe=RECIPE, expert_kernel="torch", quant_kernel="dequant"), example


def test_fixed_kernels_make_a_tokens_output_independent_of_its_batch(fixed):
    """Timed kernels race per batch size (from 16 rows on for quantized experts), and their roundings differ;
    with ``dequant`` each row computes the same whatever shares its call."""
    compiled, _ = fixed
    assert (compiled.runner.quant_kernel, compiled.runner.expert_kernel) == ("dequant", "torch")
    ids = torch.randint(0, 100, (6, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    batch = compiled(input_ids=ids, attention_mask=mask).logits
    for row in range(ids.shape[0]):
        alone = compiled(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1]).logits[0]
        torch.testing.assert_close(alone, batch[row], rtol=0, atol=1e-6)


def test_a_saved_plan_loads_with_its_fixed_kernels_unless_told_otherwise(fixed, tmp_path):
    compiled, example = fixed
    folder = compiled.save(tmp_path / "plan")
    again = moec.load(folder)
    assert (again.runner.quant_kernel, again.runner.expert_kernel) == ("dequant", "torch")
    torch.testing.assert_close(again(**example).logits, compiled(**example).logits, rtol=0, atol=0)
    timed = moec.load(folder, quant_kernel="auto", expert_kernel="auto")
    assert (timed.runner.quant_kernel, timed.runner.expert_kernel) == ("auto", "auto")
    assert "kernels" not in timed.program.metadata  # saved again, it times its kernels


def test_an_unknown_kernel_is_refused_before_capture(monkeypatch):
    from moec import api

    monkeypatch.setattr(api, "capture_for_sizes_of_one", lambda *args: pytest.fail("captured"))
    with pytest.raises(BackendError, match=r"^quant_kernel='exact' is not one of auto, "):
        moec.compile(torch.nn.Linear(4, 4), (torch.randn(2, 4),), quant_kernel="exact")
    with pytest.raises(BackendError, match=r"^expert_kernel='fast' is not one of auto, onnxruntime, torch, torch-blas, torch-grouped$"):
        moec.compile(torch.nn.Linear(4, 4), (torch.randn(2, 4),), expert_kernel="fast")


def test_fixed_kernels_belong_to_the_compiled_model_not_its_shared_program(fixed, tmp_path):
    compiled, _ = fixed
    assert "kernels" not in compiled.program.metadata
    timed = moec.CompiledModel(compiled.program)  # the same program, timed kernels
    assert "kernels" not in moec.load(timed.save(tmp_path / "timed")).program.metadata
    assert moec.load(compiled.save(tmp_path / "fixed")).kernels == {"expert_kernel": "torch", "quant_kernel": "dequant"}


def test_a_plan_whose_fixed_kernel_cannot_run_here_loads_on_timed_kernels(fixed, tmp_path, monkeypatch):
    from moec import api

    compiled, example = fixed
    folder = compiled.save(tmp_path / "plan")
    plan = (folder / "plan.json").read_text().replace('"quant_kernel": "dequant"', '"quant_kernel": "onnxruntime"')
    (folder / "plan.json").write_text(plan)

    def unavailable(program, kernel):
        if kernel == "onnxruntime":
            raise BackendError("quant_kernel='onnxruntime' cannot run here: no int8 MatMulNBits")

    from moec.backend import torch_runner

    monkeypatch.setattr(api, "check_quant_kernel", unavailable)
    monkeypatch.setattr(torch_runner, "check_quant_kernel", unavailable)
    with pytest.warns(UserWarning, match=r"fixes quant_kernel='onnxruntime', which cannot run here .*; it runs on "
                                         r"the quantized kernels timed on this host instead"):
        again = moec.load(folder)
    assert again.kernels == {"expert_kernel": "torch", "quant_kernel": "auto"}
    torch.testing.assert_close(again(**example).logits, compiled(**example).logits, rtol=0.02, atol=0.02)
    with pytest.raises(BackendError, match="cannot run here"):  # asked for by the caller: not replaced
        moec.load(folder, quant_kernel="onnxruntime")


def test_inspect_shows_the_fixed_kernels_and_runs_none_of_them(fixed, tmp_path, capsys, monkeypatch):
    from moec.backend import torch_runner
    from moec.cli import main

    compiled, _ = fixed
    folder = compiled.save(tmp_path / "plan")
    monkeypatch.setattr(torch_runner, "check_quant_kernel", lambda program, kernel: pytest.fail(f"checked {kernel}")
                        if kernel != "auto" else None)
    assert main(["inspect", "--no-ir", str(folder)]) == 0
    assert "kernels fixed at compile time: expert_kernel=torch, quant_kernel=dequant" in capsys.readouterr().out
