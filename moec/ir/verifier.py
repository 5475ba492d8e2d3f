"""The IR verifier."""

from __future__ import annotations

import re

from moec.errors import VerifyError
from moec.ir.core import Graph, Operation
from moec.ir.ops import AtenOp
from moec.ir.printer import print_graph_lines
from moec.ir.quant import QuantizedType
from moec.ir.targets import resolve_target

INPUT_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


def verify(graph: Graph) -> None:
    """Check a graph's invariants; raise ``VerifyError`` naming the op and the broken rule.

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
    if len(set(graph.input_names)) != len(graph.input_names):
        raise VerifyError(f"graph inputs have duplicate names: {graph.input_names}")
    for name in graph.input_names:
        if not INPUT_NAME_RE.fullmatch(name):
            raise VerifyError(f"graph input name {name!r} is not an identifier")
    for name, weight_type in graph.weights.items():
        if isinstance(weight_type, QuantizedType):
            try:
                weight_type.check()
            except ValueError as err:
                raise VerifyError(f"quantized weight @{name}: {err}") from None
    defined = {id(v) for v in graph.inputs}
    for op in graph.ops:
        try:
            verify_op(graph, op, defined)
        except ValueError as err:
            raise VerifyError(describe(graph, op, str(err))) from None
        defined.update(id(r) for r in op.results)
    in_graph = {id(op) for op in graph.ops}
    for value in [*graph.inputs, *(r for op in graph.ops for r in op.results)]:
        for use in value.uses:
            if id(use.op) not in in_graph or use.op.operands[use.index] is not value:
                raise VerifyError(f"use-list of {value} names an op that does not read it: {use.op}")
    for position, value in enumerate(graph.outputs):
        if id(value) not in defined:
            raise VerifyError(f"graph output #{position} is not defined in the graph")


def verify_op(graph: Graph, op: Operation, defined: set[int]) -> None:
    if op.graph is not graph:
        raise ValueError("op is not attached to this graph")
    for index, value in enumerate(op.operands):
        if id(value) not in defined:
            raise ValueError(f"operand #{index} is used before it is defined (or comes from another graph)")
        if sum(1 for use in value.uses if use.op is op and use.index == index) != 1:
            raise ValueError(f"operand #{index} is missing from its value's use-list")
    for ref in op.weight_refs:
        if ref.name not in graph.weights:
            raise ValueError(f"weight @{ref.name} is not declared")
    quantized_refs = [ref for ref in op.weight_refs if isinstance(graph.weights.get(ref.name), QuantizedType)]
    in_quantizable_roles = [op.kwargs[r] for r in op.quantizable_roles if op.kwargs.get(r) in quantized_refs]
    if len(quantized_refs) != len(in_quantizable_roles):
        raise ValueError(f"refers to a quantized weight where it cannot take one "
                         f"(quantizable roles: {list(op.quantizable_roles) or 'none'})")
    if isinstance(op, AtenOp):
        try:
            resolve_target(op.target)
        except KeyError as err:
            raise ValueError(str(err)) from None
    op.verify_()


def describe(graph: Graph, op: Operation, problem: str) -> str:
    lines, op_lines = print_graph_lines(graph)
    at = op_lines[id(op)]
    window = [("> " if i == at else "  ") + lines[i] for i in range(max(0, at - 3), min(len(lines), at + 2))]
    return f"{op.op_name} (op #{graph.ops.index(op)}): {problem}\n" + "\n".join(window)
