"""The IR's core objects: values with use-lists, weight references, operations and graphs.

A graph is a list of operations in SSA form. Operations take *arguments*: a positional tuple and a
keyword dict whose leaves are ``Value`` (an SSA value), ``WeightRef`` (a named weight of the graph) or
plain constants (int, float, bool, str, None, lists, torch dtypes ...). Values have no names; the
printer names them. Passes edit graphs through ``Operation.set_args``, ``Value.replace_all_uses_with``,
``Graph.insert_before`` and ``Graph.erase`` so use-lists stay right.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from moec.ir.quant import QuantizedType
from moec.ir.types import TensorType, Type


@dataclass(frozen=True)
class WeightRef:
    """A reference to a weight (parameter, buffer or constant) stored beside the graph: ``@name``."""

    name: str

    def __str__(self) -> str:
        return weight_token(self.name)


PLAIN_WEIGHT_NAME = re.compile(r"[A-Za-z0-9_./\-]+")


def weight_token(name: str) -> str:
    """``@name`` in IR text; a name of other characters (a ``ModuleDict`` key with a colon or a space) is
    written as a JSON string, ``@"a:b.weight"``."""
    return f"@{name}" if PLAIN_WEIGHT_NAME.fullmatch(name) else "@" + json.dumps(name, ensure_ascii=False)


@dataclass(frozen=True)
class Use:
    """Operation ``op`` uses a value as its ``index``-th operand (in ``op.operands`` order)."""

    op: Operation
    index: int


class Value:
    """An SSA value: a graph input (``owner`` is None) or the ``index``-th result of ``owner``."""

    def __init__(self, type: Type, owner: Operation | None = None, index: int = 0) -> None:
        self.type = type
        self.owner = owner
        self.index = index
        self.uses: list[Use] = []

    @property
    def tensor_type(self) -> TensorType:
        if not isinstance(self.type, TensorType):
            raise TypeError(f"value of type {self.type} is not a tensor")
        return self.type

    def replace_all_uses_with(self, new: Value) -> None:
        """Make every user of this value use ``new`` instead."""
        for use in list(self.uses):
            use.op.replace_operand(self, new)

    def __repr__(self) -> str:
        owner = self.owner.name if self.owner else "input"
        return f"<Value {self.type} of {owner}#{self.index}>"


def map_leaves(tree: Any, fn: Callable[[Any], Any]) -> Any:
    """Apply ``fn`` to each leaf of a nested list/tuple/dict argument tree."""
    if isinstance(tree, (list, tuple)):
        return type(tree)(map_leaves(item, fn) for item in tree)
    if isinstance(tree, dict):
        return {key: map_leaves(item, fn) for key, item in tree.items()}
    return fn(tree)


def iter_leaves(tree: Any) -> Iterator[Any]:
    if isinstance(tree, (list, tuple)):
        for item in tree:
            yield from iter_leaves(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from iter_leaves(item)
    else:
        yield tree


OP_CLASSES: dict[str, type[Operation]] = {}
OpT = TypeVar("OpT", bound="Operation")


def register_op(cls: type[Operation]) -> type[Operation]:
    """Class decorator: make an op class known to the parser and the verifier by its ``name``."""
    OP_CLASSES[cls.name] = cls
    return cls


class Operation:
    """An operation: a name, argument trees and typed results.

    Subclasses declare one IR op each (``name``) and may override ``verify_`` to check their own
    invariants; the generic class ``AtenOp`` carries any ATen/Python target by name.
    """

    name: ClassVar[str] = ""
    # Keyword weight roles that may refer to a quantized weight (``moec.ir.quant``); backends dequantize them.
    quantizable_roles: ClassVar[tuple[str, ...]] = ()

    def __init__(self, args: tuple = (), kwargs: dict | None = None, result_types: list[Type] | None = None):
        self.args: tuple = ()
        self.kwargs: dict = {}
        self.operands: list[Value] = []
        self.results = [Value(t, self, i) for i, t in enumerate(result_types or [])]
        self.graph: Graph | None = None
        self.set_args(tuple(args), dict(kwargs or {}))

    @property
    def op_name(self) -> str:
        return self.name

    @property
    def result(self) -> Value:
        if len(self.results) != 1:
            raise ValueError(f"{self.op_name} has {len(self.results)} results, not one")
        return self.results[0]

    @property
    def weight_refs(self) -> list[WeightRef]:
        return [leaf for leaf in iter_leaves((self.args, self.kwargs)) if isinstance(leaf, WeightRef)]

    def set_args(self, args: tuple, kwargs: dict) -> None:
        """Replace the argument trees and keep the use-lists of old and new operands right."""
        for index, value in enumerate(self.operands):
            value.uses.remove(Use(self, index))
        self.args, self.kwargs = args, kwargs
        self.operands = [leaf for leaf in iter_leaves((args, kwargs)) if isinstance(leaf, Value)]
        for index, value in enumerate(self.operands):
            value.uses.append(Use(self, index))

    def replace_operand(self, old: Value, new: Value) -> None:
        swap = lambda leaf: new if leaf is old else leaf  # noqa: E731
        self.set_args(map_leaves(self.args, swap), map_leaves(self.kwargs, swap))

    def attr(self, key: str, default: Any = None) -> Any:
        return self.kwargs.get(key, default)

    def verify_(self) -> None:
        """Check this op's own invariants; raise ``ValueError`` with the broken rule."""

    def __repr__(self) -> str:
        return f"<{self.op_name} with {len(self.operands)} operands, {len(self.results)} results>"


class Graph:
    """A function in SSA form: named inputs, an ordered op list, outputs, and declared weight types."""

    def __init__(self, name: str = "main") -> None:
        self.name = name
        self.inputs: list[Value] = []
        self.input_names: list[str] = []
        self.ops: list[Operation] = []
        self.outputs: list[Value] = []
        self.weights: dict[str, TensorType | QuantizedType] = {}

    def add_input(self, name: str, type: Type) -> Value:
        value = Value(type)
        self.inputs.append(value)
        self.input_names.append(name)
        return value

    def append(self, op: Operation) -> Operation:
        op.graph = self
        self.ops.append(op)
        return op

    def insert_before(self, anchor: Operation, op: Operation) -> Operation:
        op.graph = self
        self.ops.insert(self.ops.index(anchor), op)
        return op

    def erase(self, op: Operation) -> None:
        """Remove an op whose results are unused."""
        for value in op.results:
            if value.uses or any(value is out for out in self.outputs):
                raise ValueError(f"cannot erase {op.op_name}: its result is still used")
        op.set_args((), {})
        self.ops.remove(op)
        op.graph = None

    def set_outputs(self, outputs: list[Value]) -> None:
        self.outputs = list(outputs)

    def ops_of(self, op_class: type[OpT]) -> list[OpT]:
        return [op for op in self.ops if isinstance(op, op_class)]

    def used_weights(self) -> set[str]:
        return {ref.name for op in self.ops for ref in op.weight_refs}

    def __str__(self) -> str:
        from moec.ir.printer import print_graph

        return print_graph(self)
