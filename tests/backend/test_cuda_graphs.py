"""CUDA graphs of repeated kernel calls (moec.backend.cuda_graphs): replays give what direct calls give, outputs
are the caller's own, and the capture policy (second sighting, row and count limits) holds. All but the first
test need a CUDA GPU (marked ``gpu``: ``python -m pytest -m gpu tests/backend/test_cuda_graphs.py`` there)."""

from __future__ import annotations

import pytest
import torch

from moec.backend.cuda_graphs import GraphedCall

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def scaled_sum(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A call of several launches with a scratch tensor in the middle, two outputs."""
    scratch = x * 2.0
    return scratch + y, (scratch * y).sum(dim=1)


def test_cpu_calls_run_directly():
    calls = []
    graphed = GraphedCall(lambda x: calls.append(x) or x + 1)
    x = torch.ones(3, 4)
    for _ in range(3):
        torch.testing.assert_close(graphed(x), x + 1)
    assert len(calls) == 3 and not graphed.graphs


@pytest.mark.gpu
@needs_cuda
def test_replays_match_direct_calls_and_outputs_are_copies():
    generator = torch.Generator(device="cuda").manual_seed(0)
    graphed = GraphedCall(scaled_sum)
    kept = []
    for step in range(4):
        x = torch.randn(5, 8, device="cuda", generator=generator)
        y = torch.randn(5, 8, device="cuda", generator=generator)
        got = graphed(x, y)
        expected = scaled_sum(x, y)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=0, atol=0)
        assert len(graphed.graphs) == (0 if step == 0 else 1)  # captured on the second call of the shape
        kept.append((got, expected))
    for got, expected in kept:  # a later replay did not overwrite an earlier call's outputs
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.gpu
@needs_cuda
def test_capture_policy():
    graphed = GraphedCall(scaled_sum, max_graphs=2, max_rows=8)
    ones = {rows: torch.ones(rows, 4, device="cuda") for rows in (1, 2, 3, 9)}
    graphed(ones[1], ones[1])
    assert not graphed.graphs  # a one-off shape is not captured
    for _ in range(2):
        graphed(ones[9], ones[9])
    assert not graphed.graphs  # more rows than max_rows
    for rows in (1, 2, 3):
        for _ in range(2):
            graphed(ones[rows], ones[rows])
    assert len(graphed.graphs) == 2  # max_graphs: the third repeated shape runs directly
    torch.testing.assert_close(graphed(ones[3], ones[3])[0], torch.full((3, 4), 3.0, device="cuda"))


@pytest.mark.gpu
@needs_cuda
def test_triton_runner_replays_its_kernels(monkeypatch):
    pytest.importorskip("triton")
    import moec
    from moec.api import CompiledModel
    from moec.frontend.zoo import build_preset

    captures = []
    original = GraphedCall.capture
    monkeypatch.setattr(GraphedCall, "capture", lambda self, inputs: captures.append(1) or original(self, inputs))
    model, example = build_preset("tiny-mixtral")
    compiled = moec.compile(model, example, backend="triton")
    reference = CompiledModel(compiled.program, "torch")
    for _ in range(3):  # the second run captures each route and experts op, the third replays them
        got = compiled(**example).logits
        torch.testing.assert_close(got.cpu(), reference(**example).logits, rtol=1e-4, atol=1e-4)
    assert compiled.runner.kernel_rules and len(captures) == len(compiled.runner.kernel_rules)


@pytest.mark.gpu
@needs_cuda
def test_a_call_that_waits_for_the_host_runs_directly():
    def synchronizing(x):
        return x * x.sum().item()  # .item() waits for the GPU: not allowed in a capture

    graphed = GraphedCall(synchronizing)
    x = torch.arange(4.0, device="cuda").reshape(2, 2)
    graphed(x)
    with pytest.warns(UserWarning, match="could not be captured"):
        torch.testing.assert_close(graphed(x), x * 6.0)
    torch.testing.assert_close(graphed(x + 1), (x + 1) * 10.0)
    assert not graphed.graphs
