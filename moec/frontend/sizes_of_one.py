"""Which of export's conditions on input sizes must hold at sizes of 1 too.

``torch.export`` treats sizes 0 and 1 apart, so its guards often fail for a batch of 1 or a single token where
the model computes the same there (``seq != 1``); ``moec.ir.guards`` lets such guards pass. But a model may
branch on a size of 1 itself (``if x.shape[0] == 1:``), and the graph, traced on the other branch, then computes
something else there. ``guards_kept_at_one`` tells the two apart by running the model and the captured graph
on the example itself and on the example cut to 1 along each of its sizes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from moec.frontend.capture import EagerFailure, capture, eager_failure, float_dtype, inference_setup
from moec.ir.program import Program
from moec.ir.types import TensorType

NOISE_FACTOR = 10  # a cut that departs this much more than the uncut example does is a branch, not rounding
# Of the largest output value, by the model's dtype: below it, a departure is rounding.
ROUNDING = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}  # float32: moec's parity tolerance


def capture_for_sizes_of_one(model: nn.Module, args: tuple, kwargs: dict) -> Program:
    """``capture``, with the guards the model's code needs at sizes of 1 enforced there too; an example of batch 1
    whose code branches at batch 1 is captured again at batch 1 (traced at batch 2, the graph would refuse its
    own example)."""
    program = capture(model, args, kwargs)
    kept_at_one = guards_kept_at_one(model, program, args, kwargs)
    if not kept_at_one:
        return program
    program.keep_guards_at_one(kept_at_one)
    try:
        program.flatten_inputs(args, kwargs)
    except ValueError:
        program = capture(model, args, kwargs, batch_of_two=False)
        kept_at_one = guards_kept_at_one(model, program, args, kwargs)
        if kept_at_one:
            program.keep_guards_at_one(kept_at_one)
    return program


def guards_kept_at_one(model: nn.Module, program: Program, args: tuple, kwargs: dict) -> list[str]:
    """The guards let pass at sizes of 1 that the model's own code needs there: those the example itself (a
    batch of 1, say) passes only at one, or that cutting it to 1 along one of its sizes makes pass only at one,
    where the model and the freshly captured ``program`` then depart by more than rounding. A model that export
    traced but that fails on its own example, as the graph then does (export's fake tensors check less), is an
    ``EagerFailure``."""
    from moec.backend.torch_runner import TorchRunner  # the frontend runs a graph only here

    runner = TorchRunner(program, expert_kernel="torch")  # no onnxruntime session or kernel race for a probe
    baseline = departure(model, runner, args, kwargs)
    if baseline is None:  # the model fails on its example: where the graph does too, every call would fail
        with torch.inference_mode():  # (export's fake tensors let a float32 norm in a bf16 model by)
            graph_fails = graph_outputs(runner, args, kwargs) is None
        if graph_fails:
            with inference_setup(model):
                error = eager_failure(model, args, kwargs)
            if error is not None:
                raise EagerFailure(model, error) from error
        return []  # moec's ops run what the model's own code does not (float64 experts that HF's grouped_mm refuses)
    guards = program.input_guards
    if not guards.checks:
        return []
    names = program.metadata.get("forward_parameters", [])

    def passed_at_one(cut_args: tuple, cut_kwargs: dict) -> set[str]:
        return set(guards.passed_at_one({**dict(zip(names, cut_args, strict=False)), **cut_kwargs}))

    rounding = ROUNDING.get(float_dtype(model), ROUNDING[torch.float32])
    already = passed_at_one(args, kwargs)
    kept = set(already) if already and baseline > rounding else set()
    for cut_args, cut_kwargs in cut_to_one(program, args, kwargs):
        blamed = passed_at_one(cut_args, cut_kwargs) - already - kept
        if not blamed:
            continue
        departed = departure(model, runner, cut_args, cut_kwargs)
        if departed is not None and departed > max(rounding, NOISE_FACTOR * baseline):
            kept |= blamed
    return [guard for guard, _ in guards.checks if guard in kept]


def cut_to_one(program: Program, args: tuple, kwargs: dict) -> Iterator[tuple[tuple, dict]]:
    """The example with every input dimension of one example size cut to its first entry, for each size above
    1 that some dynamic dimension has (dimensions of one size are cut together: export may give an input's
    dims symbols of their own that only its guards tie to another input's, as GPT-2's attention mask)."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    types = [value.type for value in program.graph.inputs]
    if len(leaves) != len(types):
        return
    dynamic = [[axis for axis, d in enumerate(t.shape) if isinstance(d, str)]
               if isinstance(t, TensorType) and isinstance(leaf, torch.Tensor) else []
               for leaf, t in zip(leaves, types, strict=True)]
    sizes = sorted({leaf.shape[axis] for leaf, axes in zip(leaves, dynamic, strict=True) for axis in axes} - {0, 1})
    for size in sizes:
        yield pytree.tree_unflatten([cut(leaf, axes, size) for leaf, axes in zip(leaves, dynamic, strict=True)], spec)


def cut(leaf: Any, axes: list[int], size: int) -> Any:
    """``leaf`` narrowed to its first entry along each of ``axes`` that has ``size``."""
    for axis in axes:
        if leaf.shape[axis] == size:
            leaf = leaf.narrow(axis, 0, 1)
    return leaf


def graph_outputs(runner: Any, args: tuple, kwargs: dict) -> list[torch.Tensor] | None:
    """The tensor outputs of ``runner`` (a torch runner of a program) on these inputs; None where it fails."""
    try:
        outputs = runner.run(runner.program.with_captured_dtypes(pytree.tree_leaves((args, kwargs))))
    except Exception:  # noqa: BLE001  (any failure of the graph)
        return None
    return [t for t in outputs if isinstance(t, torch.Tensor)]


def departure(model: nn.Module, runner: Any, args: tuple, kwargs: dict) -> float | None:
    """The largest difference between the model's and ``runner``'s (a torch runner of its program) outputs on
    these inputs, relative to the model's largest output value; None where the model fails on them (no evidence
    either way), infinity where only the graph fails or the outputs differ in number or shape."""
    with inference_setup(model), torch.inference_mode():
        try:
            expected = [t for t in pytree.tree_leaves(model(*args, **kwargs)) if isinstance(t, torch.Tensor)]
        except Exception:  # noqa: BLE001  (the model refuses these inputs: the cut says nothing)
            return None
        got = graph_outputs(runner, args, kwargs)
    if got is None:  # the model runs here and the graph does not
        return float("inf")
    if len(got) != len(expected) or any(a.shape != b.shape for a, b in zip(expected, got, strict=True)):
        return float("inf")
    worst = 0.0
    for a, b in zip(expected, got, strict=True):
        if a.numel() and (a.is_floating_point() or b.is_floating_point()):
            scale = float(a.float().abs().max().clamp_min(1e-30))
            worst = max(worst, float((a.float() - b.float().to(a.device)).abs().max()) / scale)
        elif a.numel() and not torch.equal(a, b.to(a.device)):
            worst = float("inf")
    return worst
