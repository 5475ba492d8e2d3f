"""The IR verifier."""

from __future__ import annotations

import re

from moec.errors import VerifyError
from moec.ir.core import Graph, Operation, WeightRef, iter_leaves
from moec.ir.ops import AtenOp, SpecOp
from moec.ir.printer import Namer, print_graph_lines
from moec.ir.quant import QuantizedType
from moec.ir.targets import resolve_target

INPUT_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


def verify(graph: Graph) -> None:
    """Check a graph's invariants; raise ``VerifyError`` naming the op and the broken rule.

    Messages quote every name they cite as the IR text spells it: ops (``'moe.route' (op #0)``), values
    (``'%x'``, ``'%3'``), weights (``'@layers.0.mlp.gate.weight'``) and attributes (``'top_k'``).

    Invariants:
      1. Inputs have distinct names that are identifiers.
      2. Every operand is a graph input or a result of an earlier op of this graph (SSA dominance).
      3. Use-lists are exact: a value's uses are the (op, operand index) pairs that read it, no more.
      4. Every ``@weight`` an op references is declared in ``graph.weights``.
      5. Generic ops name a real ATen op or a known ``py.*`` op.
      6. Each op's own rules hold (``Operation.verify_``: shapes, dtypes, attributes of MoE ops).
      7. Every graph output is defined.
      8. Quantized weights (``quant<...>``) follow the storage format of ``moec.ir.quant`` (supported widths,
         one width per matrix, a supported group size dividing the reduced dim) and are referenced only by
         keyword roles their op declares quantizable (``Operation.quantizable_roles``).
    """
    for position, name in enumerate(graph.input_names):
        if name in graph.input_names[:position]:
            raise VerifyError(f"graph input '%{name}' is declared twice")
        if not INPUT_NAME_RE.fullmatch(name):
            raise VerifyError(f"graph input '%{name}' is not an identifier")
    for name, weight_type in graph.weights.items():
        if isinstance(weight_type, QuantizedType):
            try:
                weight_type.check()
            except ValueError as err:
                raise VerifyError(f"weight '@{name}': {err}") from None
    names = printed_names(graph)
    defined = {id(v) for v in graph.inputs}
    for op in graph.ops:
        try:
            verify_op(graph, op, defined, names)
        except ValueError as err:
            block = op.block if isinstance(op, SpecOp) and "block" in op.kwargs else None
            raise VerifyError(describe(graph, op, str(err)), block=block) from None
        defined.update(id(r) for r in op.results)
    in_graph = {id(op) for op in graph.ops}
    for value in [*graph.inputs, *(r for op in graph.ops for r in op.results)]:
        for use in value.uses:
            if id(use.op) not in in_graph or use.op.operands[use.index:use.index + 1] != [value]:
                raise VerifyError(f"the use-list of '{names(value)}' names {quote_op(graph, use.op)}, "
                                  f"which does not read it as operand #{use.index}")
    for position, value in enumerate(graph.outputs):
        if id(value) not in defined:
            raise VerifyError(f"graph output #{position} ('{names(value)}') is not defined in the graph")


def printed_names(graph: Graph) -> Namer:
    """The names the printer gives the graph's values (``%x``, ``%0`` ...), for messages."""
    names = Namer(graph)
    for op in graph.ops:
        for result in op.results:
            names.define(result)
    return names


def quote_op(graph: Graph, op: Operation) -> str:
    if any(op is other for other in graph.ops):
        block = f", block {op.block!r}" if isinstance(op, SpecOp) and "block" in op.kwargs else ""
        return f"'{op.op_name}' (op #{graph.ops.index(op)}{block})"
    return f"'{op.op_name}' (an op outside the graph)"


def verify_op(graph: Graph, op: Operation, defined: set[int], names: Namer) -> None:
    if op.graph is not graph:
        raise ValueError("op is not attached to this graph")
    for index, value in enumerate(op.operands):
        if id(value) not in defined:
            raise ValueError(f"operand #{index} '{names(value)}' is used before it is defined "
                             f"(or comes from another graph)")
        if sum(1 for use in value.uses if use.op is op and use.index == index) != 1:
            raise ValueError(f"operand #{index} '{names(value)}' is missing from its value's use-list")
    for ref in op.weight_refs:
        if ref.name not in graph.weights:
            raise ValueError(f"weight '@{ref.name}' is not declared")
    for place, arguments in [*((f"argument #{i}", a) for i, a in enumerate(op.args)), *op.kwargs.items()]:
        quantized = [ref for ref in iter_leaves(arguments)
                     if isinstance(ref, WeightRef) and isinstance(graph.weights.get(ref.name), QuantizedType)]
        if quantized and place not in op.quantizable_roles:
            where = place if place.startswith("argument #") else f"'{place}'"
            raise ValueError(f"quantized weight '@{quantized[0].name}' is passed as {where}, which cannot take one "
                             f"(quantizable roles: {', '.join(map(repr, op.quantizable_roles)) or 'none'})")
    if isinstance(op, AtenOp):
        try:
            resolve_target(op.target)
        except KeyError as err:
            raise ValueError(err.args[0]) from None
    op.verify_()


def describe(graph: Graph, op: Operation, problem: str) -> str:
    lines, op_lines = print_graph_lines(graph)
    at = op_lines[id(op)]
    window = [("> " if i == at else "  ") + lines[i] for i in range(max(0, at - 3), min(len(lines), at + 2))]
    return f"{quote_op(graph, op)}: {problem}\n" + "\n".join(window)
