"""Parse the IR text form written by ``moec.ir.printer`` back into a ``Graph``.

Errors are ``ParseError`` with the line and column and what was expected there.
"""

from __future__ import annotations

import json
import re
from typing import Any, NoReturn

import torch

from moec.errors import ParseError
from moec.ir.core import OP_CLASSES, Graph, Operation, Value, WeightRef
from moec.ir.ops import AtenOp
from moec.ir.quant import QuantizedType
from moec.ir.types import DTYPES_BY_NAME, Dim, IndexType, TensorType, Type

TOKEN_PATTERNS = [
    ("value", r"%[A-Za-z0-9_.]+"),
    ("weight", r'@(?:[A-Za-z0-9_./\-]+|"(?:[^"\\]|\\.)*")'),
    ("string", r'"(?:[^"\\]|\\.)*"'),
    ("number", r"-?(?:\d+\.\d*(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\d+)|-inf\b"),
    ("ident", r"[A-Za-z_][A-Za-z0-9_.]*"),
    ("punct", r"[(){}\[\],:=<>]"),
]
def weight_name(token: str) -> str:
    """The name a weight token spells: ``@name``, or ``@"..."`` (JSON) for a name of other characters."""
    return json.loads(token[1:]) if token.startswith('@"') else token[1:]


TOKEN_RE = re.compile("|".join(f"(?P<{kind}>{pattern})" for kind, pattern in TOKEN_PATTERNS))
SPACE_RE = re.compile(r"(?:\s|//[^\n]*)*")
TORCH_CONSTANT_TYPES = (torch.dtype, torch.layout, torch.memory_format)


class Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.values: dict[str, Value] = {}

    # -- lexing ---------------------------------------------------------------------------
    def skip_space(self) -> None:
        match = SPACE_RE.match(self.text, self.pos)
        assert match is not None, "SPACE_RE matches the empty string, so it matches anywhere"
        self.pos = match.end()

    def peek(self) -> tuple[str, str]:
        self.skip_space()
        if self.pos >= len(self.text):
            return ("eof", "")
        match = TOKEN_RE.match(self.text, self.pos)
        if not match:
            self.fail(f"unexpected character {self.text[self.pos]!r}")
        assert match.lastgroup is not None, "every TOKEN_RE alternative is a named group"
        return (match.lastgroup, match.group())

    def next(self) -> tuple[str, str]:
        token = self.peek()
        self.pos += len(token[1])
        return token

    def accept(self, text: str) -> bool:
        if self.peek()[1] == text:
            self.next()
            return True
        return False

    def expect(self, text: str) -> None:
        kind, got = self.peek()
        if got != text:
            self.fail(f"expected {text!r}, found {got or kind!r}")
        self.next()

    def expect_kind(self, kind: str, what: str) -> str:
        got_kind, got = self.peek()
        if got_kind != kind:
            self.fail(f"expected {what}, found {got or got_kind!r}")
        self.next()
        return got

    def fail(self, message: str, at: int | None = None) -> NoReturn:
        """``ParseError`` pointing at offset ``at`` of the text (default: where parsing stands)."""
        pos = self.pos if at is None else at
        line = self.text.count("\n", 0, pos) + 1
        column = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        lines = self.text.splitlines()
        source_line = lines[line - 1] if line <= len(lines) else ""  # at the end of text ending in a newline
        raise ParseError(f"line {line}, column {column}: {message}\n  {source_line}\n  {' ' * (column - 1)}^")

    # -- grammar --------------------------------------------------------------------------
    def parse_graph(self) -> Graph:
        self.expect("graph")
        graph = Graph(weight_name(self.expect_kind("weight", "@graph_name")))
        self.expect("(")
        while not self.accept(")"):
            name = self.expect_kind("value", "%input")[1:]
            self.expect(":")
            self.define(name, graph.add_input(name, self.parse_type()))
            if self.peek()[1] != ")":
                self.expect(",")
        self.expect("{")
        while True:
            kind, text = self.peek()
            if text == "weight":
                self.next()
                name = weight_name(self.expect_kind("weight", "@weight_name"))
                self.expect(":")
                weight_type = self.parse_weight_type()
                graph.weights[name] = weight_type
            elif text == "return":
                self.next()
                outputs = []
                while self.peek()[0] == "value":
                    outputs.append(self.use(self.next()[1]))
                    if not self.accept(","):
                        break
                graph.set_outputs(outputs)
                self.expect("}")
                break
            elif kind in ("value", "ident"):
                graph.append(self.parse_op())
            else:
                self.fail(f"expected an op, 'weight' or 'return', found {text or kind!r}")
        if self.peek()[0] != "eof":
            self.fail("text after the end of the graph")
        return graph

    def parse_op(self) -> Operation:
        result_names = []
        if self.peek()[0] == "value":
            result_names.append(self.next()[1][1:])
            while self.accept(","):
                result_names.append(self.expect_kind("value", "%result")[1:])
            self.expect("=")
        op_name = self.expect_kind("ident", "an op name")
        if op_name not in OP_CLASSES and not op_name.startswith(("aten.", "py.")):
            self.fail(f"unknown op {op_name!r}; known: {', '.join(sorted(OP_CLASSES))}, aten.*, py.*",
                      at=self.pos - len(op_name))
        self.expect("(")
        args, kwargs = [], {}
        while not self.accept(")"):
            if self.peek()[0] == "ident" and self.text.startswith("=", self.pos + len(self.peek()[1])):
                key = self.next()[1]
                self.expect("=")
                kwargs[key] = self.parse_constant()
            else:
                if kwargs:
                    self.fail("positional argument after keyword arguments")
                args.append(self.parse_constant())
            if self.peek()[1] != ")":
                self.expect(",")
        result_types = []
        if result_names:
            self.expect(":")
            result_types.append(self.parse_type())
            while self.accept(","):
                result_types.append(self.parse_type())
            if len(result_types) != len(result_names):
                self.fail(f"{len(result_names)} results but {len(result_types)} types")
        op = self.make_op(op_name, tuple(args), kwargs, result_types)
        for name, value in zip(result_names, op.results, strict=True):
            self.define(name, value)
        return op

    def make_op(self, name: str, args: tuple, kwargs: dict, result_types: list[Type]) -> Operation:
        if name in OP_CLASSES:
            return OP_CLASSES[name](args, kwargs, result_types)
        return AtenOp(name, args, kwargs, result_types)  # parse_op let through only aten.* and py.* names

    def parse_constant(self) -> Any:
        kind, text = self.next()
        if kind == "value":
            return self.use(text)
        if kind == "weight":
            return WeightRef(weight_name(text))
        if kind == "string":
            return json.loads(text)
        if kind == "number":
            if text == "-inf":
                return float("-inf")
            return float(text) if any(c in text for c in ".eE") else int(text)
        if text == "[":
            items = []
            while not self.accept("]"):
                items.append(self.parse_constant())
                if self.peek()[1] != "]":
                    self.expect(",")
            return items
        if kind == "ident":
            keywords = {"none": None, "true": True, "false": False, "inf": float("inf"), "nan": float("nan")}
            if text in keywords:
                return keywords[text]
            if text.startswith("torch.") and isinstance(getattr(torch, text[6:], None), TORCH_CONSTANT_TYPES):
                return getattr(torch, text[6:])
            if text == "device":
                self.expect("(")
                device = torch.device(json.loads(self.expect_kind("string", "a device string")))
                self.expect(")")
                return device
        self.pos -= len(text)
        self.fail(f"expected a value, @weight or constant, found {text or kind!r}")

    def parse_weight_type(self) -> TensorType | QuantizedType:
        """A tensor type, or ``quant<dtype[shape], bits=[...], group=G>`` (see ``moec.ir.quant``)."""
        if self.accept("quant"):
            self.expect("<")
            logical = self.parse_type()
            if not isinstance(logical, TensorType):
                self.fail("a quantized weight's logical type must be a tensor type")
            self.expect(",")
            self.expect("bits")
            self.expect("=")
            bits = self.parse_constant()
            self.expect(",")
            self.expect("group")
            self.expect("=")
            group = self.parse_constant()
            self.expect(">")
            if not isinstance(bits, list) or not all(isinstance(b, int) for b in bits) or not isinstance(group, int):
                self.fail("quant<...> takes bits=[ints] and group=int")
            return QuantizedType(logical.dtype, logical.shape, tuple(bits), group)
        weight_type = self.parse_type()
        if not isinstance(weight_type, TensorType):
            self.fail("a weight must have a tensor type")
        return weight_type

    def parse_type(self) -> Type:
        name = self.expect_kind("ident", "a type")
        if name == "index":
            return IndexType()
        if name not in DTYPES_BY_NAME:
            self.pos -= len(name)
            self.fail(f"unknown type {name!r}; expected index or one of {', '.join(DTYPES_BY_NAME)}")
        self.expect("[")
        dims: list[Dim] = []
        start, depth = self.pos, 0
        while True:
            if self.pos >= len(self.text):
                self.fail("unterminated shape")
            char = self.text[self.pos]
            if char in "([":
                depth += 1
            elif char in ")" or (char == "]" and depth > 0):
                depth -= 1
            elif (char == "," and depth == 0) or char == "]":
                dim = self.text[start:self.pos].strip()
                if dim:
                    dims.append(int(dim) if re.fullmatch(r"-?\d+", dim) else dim.replace(" ", ""))
                elif char == "," or dims:
                    self.fail("empty dimension")
                start = self.pos + 1
                if char == "]":
                    self.pos += 1
                    return TensorType(name, tuple(dims))
            self.pos += 1

    # -- values ---------------------------------------------------------------------------
    def define(self, name: str, value: Value) -> None:
        if name in self.values:
            self.fail(f"value %{name} is defined twice")
        self.values[name] = value

    def use(self, token: str) -> Value:
        value = self.values.get(token[1:])
        if value is None:
            self.pos -= len(token)
            self.fail(f"value {token} is used before it is defined")
        return value


def parse_graph(text: str) -> Graph:
    """Parse one graph in the canonical text form."""
    return Parser(text).parse_graph()
