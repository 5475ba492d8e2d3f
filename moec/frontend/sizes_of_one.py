"""Which of export's conditions on input sizes must hold at sizes of 1 too.

``torch.export`` treats sizes 0 and 1 apart, so its guards often fail for a batch of 1 or a single token where
the model computes the same there (``seq != 1``); ``moec.ir.guards`` lets such guards pass. But a model may
branch on a size of 1 itself (``if x.shape[0] == 1:``), and the graph, traced on the other branch, then computes
something else there. ``guards_kept_at_one`` tells the two apart by running the model and the captured graph
on the example cut to 1 along each dynamic dimension.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
import torch.utils._pytree as pytree
from torch import nn

from moec.frontend.capture import inference_setup
from moec.ir.guards import InputGuards
from moec.ir.program import Program
from moec.ir.types import TensorType


def guards_kept_at_one(model: nn.Module, program: Program, args: tuple, kwargs: dict) -> list[str]:
    """The guards that the example cut to 1 along some dimension fails only at one, where the model and the
    freshly captured ``program`` disagree (or either fails) on that cut example."""
    guards = InputGuards(program.metadata.get("input_guards", []))
    if not guards.checks:
        return []
    kept: list[str] = []
    names = program.metadata.get("forward_parameters", [])
    for cut_args, cut_kwargs in cut_to_one(program, args, kwargs):
        passed = guards.passed_at_one({**dict(zip(names, cut_args, strict=False)), **cut_kwargs})
        passed = [guard for guard in passed if guard not in kept]
        if passed and not agree_on(model, program, cut_args, cut_kwargs):
            kept += passed
    return kept


def cut_to_one(program: Program, args: tuple, kwargs: dict) -> Iterator[tuple[tuple, dict]]:
    """The example with every input dimension of one symbol cut to its first entry, for each symbol that
    stands alone wherever it appears (a dimension written as an expression of it cannot be cut alike)."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    types = [value.type for value in program.graph.inputs]
    if len(leaves) != len(types):
        return
    dims = [list(t.shape) if isinstance(t, TensorType) and isinstance(leaf, torch.Tensor) else []
            for leaf, t in zip(leaves, types, strict=True)]
    symbols = dict.fromkeys(d for shape in dims for d in shape if isinstance(d, str) and d.isidentifier())
    for symbol in symbols:
        word = re.compile(rf"\b{re.escape(symbol)}\b")
        if any(isinstance(d, str) and d != symbol and word.search(d) for shape in dims for d in shape):
            continue
        cut = []
        for leaf, shape in zip(leaves, dims, strict=True):
            for axis, d in enumerate(shape):
                if d == symbol:
                    leaf = leaf.narrow(axis, 0, 1)
            cut.append(leaf)
        yield pytree.tree_unflatten(cut, spec)


def agree_on(model: nn.Module, program: Program, args: tuple, kwargs: dict) -> bool:
    """Whether the model and ``program`` (run on the torch runner) give the same outputs on these inputs,
    within the parity tolerance of the model's dtype; False where either fails."""
    from moec.api import PARITY_TOLERANCE  # the frontend runs a graph only here
    from moec.backend.torch_runner import TorchRunner

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    try:
        with inference_setup(model), torch.inference_mode():
            expected = [t for t in pytree.tree_leaves(model(*args, **kwargs)) if isinstance(t, torch.Tensor)]
            leaves = pytree.tree_leaves((args, kwargs))
            got = TorchRunner(program).run(program.with_captured_dtypes(leaves))
    except Exception:  # noqa: BLE001  (a failure at size 1 on either side: the guard stays)
        return False
    got = [t for t in got if isinstance(t, torch.Tensor)]
    return len(got) == len(expected) and all(
        a.shape == b.shape and (not a.numel() or (a.float() - b.float().to(a.device)).abs().max().item()
                                <= PARITY_TOLERANCE.get(dtype, 1e-4))
        for a, b in zip(expected, got, strict=True))
