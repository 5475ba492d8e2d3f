"""The conditions on input sizes under which a captured graph is valid: ``torch.export``'s guards.

Export makes a dimension dynamic, then records the conditions the model's code held for the example's sizes
(``seq <= 512`` for BERT's position table, ``min(h // 4, w // 4) > 4`` for a Swin window): outside them the
graph may fail, or compute something else. They are Python expressions over ``L['name'].size()[i]`` (``L``: the
forward's arguments by name). moec keeps them as text in the plan and evaluates them with its own small
interpreter (integer arithmetic, comparisons, ``min``/``max``), never with ``eval``: conditions are data, and
loading them runs no code. An expression of any other form is left unchecked.

Export treats sizes 0 and 1 apart (``seq != 1``, ``8 * seq != 8``), while moec runs batch-1 and one-token
inputs, which its tests check: a guard that fails for an input with sizes of 1 but holds with them read as any
of ``GENERIC_SIZES`` is one of those and is let pass; one that does not (``seq % 2 == 0``) is enforced. Where
the model's own code branches on a size of 1 (``if x.shape[0] == 1``), ``moec.compile`` finds it by running the
model and the graph on the example cut to 1 and keeps those guards (``kept_at_one``) enforced.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable, Sequence
from typing import Any

MAX_EXPONENT = 64  # sizes are small integers: a larger power is no condition on them, and could take forever
MAX_GUARD_LENGTH = 10_000  # characters: export writes conditions of a few hundred


class OutOfRange(ValueError):
    """A power whose exponent no condition on sizes needs: the guard is skipped."""


def _power(base: Any, exponent: Any) -> Any:
    if not isinstance(exponent, int) or not 0 <= exponent <= MAX_EXPONENT:
        raise OutOfRange(f"exponent {exponent!r}")
    return operator.pow(base, exponent)


_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod, ast.Pow: _power,
}
_COMPARE: dict[type, Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge,
}
_CALLS: dict[str, Callable[..., Any]] = {"min": min, "max": max, "abs": abs}
GENERIC_SIZES = (2, 3, 4)

Evaluator = Callable[[dict[str, Any], int], Any]  # (the arguments by name, what a size of 1 reads as)


class Unsupported(ValueError):
    """An expression outside the forms the interpreter evaluates."""


def _compile(node: ast.AST) -> Evaluator:
    """A function of ``L`` evaluating ``node``, or ``Unsupported``."""
    if isinstance(node, ast.Expression):
        return _compile(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        value = node.value
        return lambda L, one: value
    if isinstance(node, ast.Name) and node.id == "L":
        return lambda L, one: L
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        op, left, right = _BINARY[type(node.op)], _compile(node.left), _compile(node.right)
        return lambda L, one: op(left(L, one), right(L, one))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
        operand = _compile(node.operand)
        return (lambda L, one: -operand(L, one)) if isinstance(node.op, ast.USub) else (lambda L, one: not operand(L, one))
    if isinstance(node, ast.BoolOp):
        values = [_compile(value) for value in node.values]
        if isinstance(node.op, ast.And):
            return lambda L, one: all(value(L, one) for value in values)
        return lambda L, one: any(value(L, one) for value in values)
    if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
        first = _compile(node.left)
        steps = [(_COMPARE[type(op)], _compile(right)) for op, right in zip(node.ops, node.comparators, strict=True)]

        def compare(L: dict[str, Any], one: int) -> bool:
            left = first(L, one)
            for op, right in steps:
                value = right(L, one)
                if not op(left, value):
                    return False
                left = value
            return True

        return compare
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "L":
        if not (isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)):
            raise Unsupported(ast.dump(node)[:80])
        name = node.slice.value  # an argument by name: the one place a string may stand
        return lambda L, one: L[name]
    if isinstance(node, ast.Subscript):
        container = _compile(node.value)
        if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):  # a dict input's entry
            entry = node.slice.value
            return lambda L, one: container(L, one)[entry]
        key = _compile(node.slice)
        return lambda L, one: container(L, one)[key(L, one)]
    if isinstance(node, ast.Attribute) and not node.attr.startswith("_"):  # a dataclass input's field
        owner, field = _compile(node.value), node.attr
        return lambda L, one: getattr(owner(L, one), field)
    if isinstance(node, ast.Call) and not node.keywords:
        args = [_compile(arg) for arg in node.args]
        if isinstance(node.func, ast.Name) and node.func.id in _CALLS:
            function = _CALLS[node.func.id]
            return lambda L, one: function(*(arg(L, one) for arg in args))
        if isinstance(node.func, ast.Attribute) and node.func.attr == "size" and not args:
            tensor = _compile(node.func.value)
            return lambda L, one: tuple(one if size == 1 else size for size in tensor(L, one).shape)
    raise Unsupported(ast.dump(node)[:80])


def readable(guard: str) -> str:
    """``L['x'].size()[2]`` written as ``x.shape[2]`` (``L['batch']['x'].size()`` as ``batch['x'].shape``)."""
    return re.sub(r"L\['([^']+)'\]((?:\['[^']+'\]|\.[A-Za-z]\w*)*)\.size\(\)", r"\1\2.shape", guard)


class InputGuards:
    """The guards of a capture, compiled once; ``broken(L)`` names the first one that inputs ``L`` break."""

    def __init__(self, guards: Sequence[str], kept_at_one: Sequence[str] = ()) -> None:
        self.checks: list[tuple[str, Evaluator]] = []
        self.unreadable: list[str] = []  # guards of a form the interpreter does not take: left unchecked
        self.kept_at_one = set(kept_at_one) if isinstance(kept_at_one, (list, tuple)) else set()
        if not isinstance(guards, (list, tuple)):  # a plan.json edited by hand: no conditions to read
            return
        for guard in guards:
            if not isinstance(guard, str) or len(guard) > MAX_GUARD_LENGTH:
                continue
            try:
                self.checks.append((guard, _compile(ast.parse(guard, mode="eval"))))
            except (SyntaxError, ValueError, RecursionError, MemoryError):  # Unsupported is a ValueError
                self.unreadable.append(guard)

    def broken(self, inputs: dict[str, Any]) -> str | None:
        """The first guard ``inputs`` (the forward's arguments by name) do not satisfy, readable, or None.
        A guard naming an argument the call does not give is skipped, and so is one that fails only for sizes
        of 1 (it holds with them read as 2, 3 and 4: export's 0/1 specialization) unless it is kept at one."""
        for guard, check in self.checks:
            verdict = self.verdict(check, inputs)
            if verdict == "fails" or (verdict == "fails at one only" and guard in self.kept_at_one):
                return readable(guard)
        return None

    def passed_at_one(self, inputs: dict[str, Any]) -> list[str]:
        """The guards ``inputs`` fail and are let pass only because their sizes of 1 read as generic sizes."""
        return [guard for guard, check in self.checks if self.verdict(check, inputs) == "fails at one only"]

    @staticmethod
    def verdict(check: Evaluator, inputs: dict[str, Any]) -> str:
        """``holds``, ``fails at one only`` (holds with sizes of 1 read as 2, 3 and 4), ``fails``, or ``skipped``
        (a condition these inputs cannot be put to: an argument the call does not give, division by 0)."""
        try:
            if check(inputs, 1):
                return "holds"
            return "fails at one only" if all(check(inputs, one) for one in GENERIC_SIZES) else "fails"
        except (KeyError, IndexError, TypeError, AttributeError, ArithmeticError, ValueError, RecursionError):
            return "skipped"
