"""A captured attention mask left uncomputed once the model's inputs show what it holds.

Traced for export, a Hugging Face model builds its boolean attention mask from the ``attention_mask`` input on
every call (causality and padding: a few passes over L x L booleans), and ``read_mask_sdpa`` then reads the
whole mask to find that, with no token padded, it is the plain lower triangle (or all True). At 2048 tokens
that is about 3% of a forward pass on the CPU, for a result the inputs already decide.

``mask_skips`` finds each SDPA mask whose ops read no weights and no data but graph inputs: given the shapes
of all inputs and the values of the ones the mask reads, the mask is fixed. At run time ``MaskGuard.check``
sees whether each input the mask reads holds only ones (an unpadded batch). The first such call of each set
of input shapes computes the mask and learns its kind (``moec.kernels.attention.mask_kind``); later ones
leave the mask's ops out and run SDPA as that kind says. Anything else (padding, a mask of no such kind, a
tensor not on the CPU, an input that is not a tensor) runs the captured ops as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from moec.backend.graph_function import Callee, Skip
from moec.ir.core import Graph, Operation, Value
from moec.ir.ops import AtenOp
from moec.ir.targets import resolve_target
from moec.ir.types import TensorType
from moec.kernels.attention import MaskKind, mask_kind, sdpa_as

__all__ = ["MaskGuard", "mask_skips"]

SDPA = "aten.scaled_dot_product_attention.default"
# Ops that read only the shape (and dtype, device) of their first argument, not its values.
SHAPE_READERS = frozenset({
    "aten.sym_size.int", "aten.sym_numel.default", "aten.sym_stride.int", "aten.new_ones.default",
    "aten.new_zeros.default", "aten.new_full.default", "aten.ones_like.default", "aten.zeros_like.default",
    "aten.full_like.default",
})
MAX_SHAPES = 1024  # input shapes a guard remembers; past that it forgets them all and learns again

Token = tuple | MaskKind | None


class MaskGuard:
    """Decides, once per call, whether one mask's ops can be left out, and runs the SDPA ops that read it.

    ``check(*inputs)`` gets all graph inputs and returns ``(skip, token)``: skip the mask's ops when the inputs
    the mask reads (``reads``, indices into them) hold only ones and this set of input shapes has shown a
    mask of a known kind; the token goes to each SDPA op of the mask (``sdpa``) and is that kind, the shapes
    still to learn from the computed mask, or None (run as captured).
    """

    def __init__(self, reads: Sequence[int]) -> None:
        self.reads = tuple(reads)
        self.kinds: dict[tuple, MaskKind | None] = {}  # learned per input shapes

    def check(self, *inputs: Any) -> tuple[bool, Token]:
        if not all(isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu" for tensor in inputs):
            return False, None
        if not all(bool((inputs[index] == 1).all()) for index in self.reads):
            return False, None
        shapes = tuple((tuple(tensor.shape), tensor.dtype) for tensor in inputs)
        if shapes not in self.kinds:
            return False, shapes
        kind = self.kinds[shapes]
        return kind is not None, kind

    def sdpa(self, token: Token, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False, *,
             scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
        """The captured SDPA op with ``token`` first: a kind runs as that kind (its mask was left out, None);
        otherwise the mask is read as ``read_mask_sdpa`` reads it, and its kind remembered for shapes to learn."""
        if isinstance(token, str):
            kind: MaskKind | None = token
        else:  # the mask as computed: read it (once per call, as read_mask_sdpa does)
            kind = mask_kind(attn_mask, query, key) if attn_mask is not None and not is_causal else None
            if token is not None:
                if token not in self.kinds and len(self.kinds) >= MAX_SHAPES:  # each layer's SDPA learns
                    self.kinds.clear()
                self.kinds[token] = kind
        return sdpa_as(kind, query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)


def mask_skips(graph: Graph, callees: list[Callee]) -> list[Skip]:
    """A ``Skip`` for each boolean mask of SDPA ops that ``MaskGuard`` can decide (see the module), with
    ``callees`` of its SDPA ops replaced by the guard's; ``callees`` are the graph's ops' callees, in order."""
    index_of = {id(op): index for index, op in enumerate(graph.ops)}
    masks: dict[int, tuple[Value, list[Operation]]] = {}
    for op in graph.ops:
        if isinstance(op, AtenOp) and op.target == SDPA:
            mask = op.args[3] if len(op.args) > 3 else op.kwargs.get("attn_mask")
            if isinstance(mask, Value) and isinstance(mask.type, TensorType) and mask.type.dtype == "bool":
                masks.setdefault(id(mask), (mask, []))[1].append(op)
    skips = []
    for mask, readers in masks.values():
        found = _mask_ops(graph, mask, readers, callees, index_of)
        if found is None:
            continue
        ops, reads = found
        guard = MaskGuard(reads)
        for reader in readers:
            callees[index_of[id(reader)]] = Callee(guard.sdpa, spread=True)
        skips.append(Skip(guard.check, frozenset(index_of[id(op)] for op in ops),
                          frozenset(index_of[id(reader)] for reader in readers)))
    return skips


def _mask_ops(graph: Graph, mask: Value, readers: list[Operation], callees: list[Callee],
              index_of: dict[int, int]) -> tuple[list[Operation], list[int]] | None:
    """The ops that compute ``mask`` and nothing else read, and the graph inputs (indices) whose values it
    reads; None when it reads a weight or anything but the graph's inputs, or no op is left to skip."""
    input_index = {id(value): index for index, value in enumerate(graph.inputs)}
    cone: dict[int, Operation] = {}
    reads: set[int] = set()
    pending, seen = [mask], set()
    while pending:
        value = pending.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        op = value.owner
        if op is None:
            reads.add(input_index[id(value)])
            continue
        if id(op) in cone:
            continue
        if not isinstance(op, AtenOp) or not _fixed_by_its_arguments(op):
            return None
        cone[id(op)] = op
        shape_only = op.args[0] if op.target in SHAPE_READERS else None
        pending += [operand for operand in op.operands if not (operand is shape_only and operand.owner is None)]
    # Keep the ops whose results only the kept ops and the SDPA ops (as their mask) read, until none changes.
    outputs = {id(value) for value in graph.outputs}
    kept = {op_id for op_id, op in cone.items()
            if len(op.results) == 1 and not callees[index_of[op_id]].returns_list}
    readers_ids = {id(op) for op in readers}
    changed = True
    while changed:
        changed = False
        for op_id in list(kept):
            result = cone[op_id].result
            if id(result) in outputs or any(
                    id(use.op) not in kept and not (id(use.op) in readers_ids and result is mask) for use in result.uses):
                kept.discard(op_id)
                changed = True
    if mask.owner is None or id(mask.owner) not in kept:
        return None
    return [op for op in graph.ops if id(op) in kept], sorted(reads)


def _fixed_by_its_arguments(op: AtenOp) -> bool:
    """Whether ``op`` reads no weight and its result is decided by its arguments (no random numbers, no
    uninitialized memory)."""
    if op.weight_refs or "empty" in op.target:
        return False
    try:
        target = resolve_target(op.target)
    except KeyError:
        return False
    return torch.Tag.nondeterministic_seeded not in getattr(target, "tags", ())
