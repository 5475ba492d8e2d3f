"""The IR's canonical text form (the parser reads exactly this back).

::

    graph @main(%input_ids: i64[s0, s1]) {
      weight @embed.weight: f32[128, 32]
      %0 = aten.embedding.default(@embed.weight, %input_ids) : f32[s0, s1, 32]
      %1, %2 = moe.route(%0, router=@layers.0.mlp.gate.weight, num_experts=4, top_k=2, ...) : i64[s0, s1, 2], f32[s0, s1, 2]
      return %5
    }

Graph inputs print under their own names; every other value is numbered in order of definition.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from moec.ir.core import Graph, Operation, Value, WeightRef, weight_token


class Namer:
    """Gives values their printed names: inputs by name, the rest numbered as they are defined."""

    def __init__(self, graph: Graph) -> None:
        self.names: dict[int, str] = {id(v): name for v, name in zip(graph.inputs, graph.input_names, strict=True)}
        self.counter = 0

    def define(self, value: Value) -> str:
        name = f"%{self.counter}"
        self.counter += 1
        self.names[id(value)] = name[1:]
        return name

    def __call__(self, value: Value) -> str:
        name = self.names.get(id(value))
        return f"%{name}" if name is not None else "%<undefined>"


def format_constant(value: Any, namer: Namer) -> str:
    if isinstance(value, Value):
        return namer(value)
    if isinstance(value, WeightRef):
        return str(value)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)
        return text if any(c in text for c in ".e") else text + ".0"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_constant(item, namer) for item in value) + "]"
    if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
        return str(value)
    if isinstance(value, torch.device):
        return f'device("{value}")'
    raise TypeError(f"cannot print constant {value!r} of type {type(value).__name__}")


def format_op(op: Operation, namer: Namer) -> str:
    arguments = [format_constant(a, namer) for a in op.args]
    arguments += [f"{key}={format_constant(v, namer)}" for key, v in op.kwargs.items()]
    call = f"{op.op_name}({', '.join(arguments)})"
    if not op.results:
        return call
    results = ", ".join(namer.define(r) for r in op.results)
    types = ", ".join(str(r.type) for r in op.results)
    return f"{results} = {call} : {types}"


def print_graph_lines(graph: Graph) -> tuple[list[str], dict[int, int]]:
    """The text lines of a graph, and for each op (by id) the index of its line."""
    namer = Namer(graph)
    params = ", ".join(f"%{name}: {v.type}" for v, name in zip(graph.inputs, graph.input_names, strict=True))
    lines = [f"graph {weight_token(graph.name)}({params}) {{"]
    lines += [f"  weight {weight_token(name)}: {t}" for name, t in graph.weights.items()]
    op_lines: dict[int, int] = {}
    for op in graph.ops:
        op_lines[id(op)] = len(lines)
        lines.append("  " + format_op(op, namer))
    lines.append("  return " + ", ".join(namer(v) for v in graph.outputs))
    lines.append("}")
    return lines, op_lines


def op_location(graph: Graph, op: Operation) -> str:
    """Where ``op`` is, for an error: its line of the IR, quoted, and its place in the model (its own block, or
    the recognized blocks around it; the IR keeps no finer location)."""
    lines, op_lines = print_graph_lines(graph)
    line = op_lines[id(op)]
    return f"line {line + 1} of the IR, `{lines[line].strip()}`, {model_place(graph, op)}"


def model_place(graph: Graph, op: Operation) -> str:
    """``op``'s block in the model, or the recognized blocks (ops with a ``block``) before and after it."""
    blocks = [getattr(o, "block", "") for o in graph.ops]
    index = graph.ops.index(op)
    if blocks[index]:
        return f"in the model's block {blocks[index]!r}"
    before = next((block for block in reversed(blocks[:index]) if block), None)
    after = next((block for block in blocks[index + 1:] if block), None)
    if before and after:
        return f"in the model between blocks {before!r} and {after!r}"
    if before or after:
        return f"in the model {'after' if before else 'before'} block {before or after!r}"
    return "in the model (no recognized block around it)"


def print_graph(graph: Graph) -> str:
    return "\n".join(print_graph_lines(graph)[0]) + "\n"
