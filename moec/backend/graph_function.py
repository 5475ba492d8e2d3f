"""A graph written out as one Python function, so that running it costs little more than its ops' own calls.

Interpreting a graph op by op (look the op up, read its arguments out of an environment, store its results)
costs a few microseconds per op, which at one decoded token is a fifth of a small model's time. Like
``torch.fx``'s generated ``forward``, ``GraphFunction`` writes the graph as straight-line Python source: one
line per op, values as local variables, constants and weight references bound once, each value deleted
after its last use (so memory is freed as early as in an interpreter), and compiles it once.

A line calls either a *target* with the op's arguments spread (``ATen`` ops and Python operators) or a *step*
with its argument list (every other op); the runner says which (``Callee``). The source
is kept in ``source`` and registered with ``linecache``, so a failing op shows its own line in tracebacks, and
``failed_step`` reads which op that was.
"""

from __future__ import annotations

import itertools
import linecache
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from moec.ir.core import Graph, Operation, Value, WeightRef, iter_leaves
from moec.ir.ops import AtenOp

Observer = Callable[[Operation, list[Any], Any], None]

_FILE_NUMBERS = itertools.count()
_STEP_COMMENT = re.compile(r"    # (\d+): ")  # the line opening each op's lines: its index in the graph


@dataclass(frozen=True)
class Callee:
    """What runs one op: ``fn(*args, **kwargs)`` when ``spread``, else ``fn(args)`` (a rule, which reads the op's
    attributes and weights itself); ``returns_list``:
    an op of one result whose ``fn`` returns a list of one (``unbind`` of a dim of size 1), read as its item."""

    fn: Callable[..., Any]
    spread: bool
    returns_list: bool = False


@dataclass(frozen=True)
class Skip:
    """Ops the function may leave out: on each call ``check(*inputs)`` (all graph inputs) returns ``(skip,
    token)``; with ``skip`` the ops at ``ops`` (graph indices; each of one result, not a list) do not run and
    their results are None. Their results are read only by each other and by the ops at ``readers``, whose
    callees (spread) get ``token`` as their first argument."""

    check: Callable[..., tuple[bool, Any]]
    ops: frozenset[int]
    readers: frozenset[int]


class GraphFunction:
    """``graph`` as a compiled Python function of ``(weights, observe, inputs) -> outputs``.

    ``weights`` is read when the function runs, so a weight replaced in it is seen. Weight references are read
    from it only in the arguments of spread callees; a rule reads its op's weights (and attributes) itself.
    With ``observing``, ``observe(op, args, result)`` sees every op right after it ran; without, ``observe``
    is ignored and nothing is written for it. ``skips`` name ops to leave out when their check says so (never
    while observing: their readers get the token None).
    """

    def __init__(self, graph: Graph, callees: Sequence[Callee], observing: bool = False,
                 skips: Sequence[Skip] = ()) -> None:
        self.filename = f"<moec graph {next(_FILE_NUMBERS)}>"
        self.bound: dict[str, Any] = {}  # global names of the function: callees, observed ops, constants
        self.source = _Writer(graph, callees, self.bound, skips).source(observing)
        namespace = dict(self.bound)
        exec(compile(self.source, self.filename, "exec"), namespace)  # noqa: S102 - source written above
        linecache.cache[self.filename] = (len(self.source), None, self.source.splitlines(True), self.filename)
        self.fn: Callable[..., list[Any]] = namespace["graph"]

    def __call__(self, weights: dict[str, Any], observe: Observer | None, inputs: Sequence[Any]) -> list[Any]:
        return self.fn(weights, observe, *inputs)

    def failed_step(self, error: BaseException) -> int | None:
        """The index in the graph of the op whose line raised ``error`` (read from its traceback), or None when
        it was not raised from this function."""
        traceback = error.__traceback__
        while traceback is not None and traceback.tb_frame.f_code.co_filename != self.filename:
            traceback = traceback.tb_next
        if traceback is None:
            return None
        lines = self.source.splitlines()[:traceback.tb_lineno]
        return next((int(match[1]) for line in reversed(lines) if (match := _STEP_COMMENT.match(line))), None)

    def __del__(self) -> None:
        linecache.cache.pop(self.filename, None)


class _Writer:
    """Writes the source of one graph, naming values, callees and constants as it goes."""

    def __init__(self, graph: Graph, callees: Sequence[Callee], bound: dict[str, Any], skips: Sequence[Skip]) -> None:
        self.graph, self.callees, self.bound, self.skips = graph, callees, bound, skips
        self.names: dict[int, str] = {}

    def bind(self, prefix: str, obj: Any) -> str:
        name = f"{prefix}{len(self.bound)}"
        self.bound[name] = obj
        return name

    def expr(self, tree: Any) -> str:
        """A Python expression building ``tree`` with its values and weights read at run time."""
        if isinstance(tree, Value):
            return self.names[id(tree)]
        if isinstance(tree, WeightRef):
            return f"weights[{tree.name!r}]"
        if _is_literal(tree):
            return repr(tree)
        if not any(isinstance(leaf, (Value, WeightRef)) for leaf in iter_leaves(tree)):
            return self.bind("const", tree)  # built once: a list constant is not rebuilt on every call
        if isinstance(tree, dict):
            return "{" + ", ".join(f"{key!r}: {self.expr(item)}" for key, item in tree.items()) + "}"
        items = ", ".join(self.expr(item) for item in tree)
        if isinstance(tree, list):
            return f"[{items}]"
        if type(tree) is tuple:
            return f"({items},)" if len(tree) == 1 else f"({items})"
        return f"{self.bind('kind', type(tree))}([{items}])"

    def call(self, callee: Callee, op: Operation, args_name: str | None, token: str | None) -> tuple[str, str]:
        """The call expression of ``op``, and the expression of the argument list an observer gets; a step's
        argument list is read from ``args_name`` when given, a spread call gets ``token`` first when given."""
        label = op.target.removeprefix("aten.") if isinstance(op, AtenOp) else op.op_name
        fn = self.bind(re.sub(r"\W", "_", label) + "_", callee.fn)
        args = [self.expr(arg) for arg in op.args]
        observed = f"[{', '.join(args)}]"
        if not callee.spread:
            return f"{fn}({args_name or observed})", observed
        keywords = [f"{key}={self.expr(item)}" if key.isidentifier() else f"**{{{key!r}: {self.expr(item)}}}"
                    for key, item in op.kwargs.items()]
        return f"{fn}({', '.join(([token] if token else []) + args + keywords)})", observed

    def source(self, observing: bool) -> str:
        graph = self.graph
        inputs = [f"in{index}" for index in range(len(graph.inputs))]
        for value, name in zip(graph.inputs, inputs, strict=True):
            self.names[id(value)] = name
        lines = [f"def graph({', '.join(['weights', 'observe', *inputs])}):"]
        skipped: dict[int, str] = {}  # op index -> the flag that leaves it out
        tokens: dict[int, str] = {}  # op index -> the token its callee gets first
        for number, skip in enumerate(self.skips):
            if observing:
                lines.append(f"    token{number} = None")
            else:
                lines.append(f"    skip{number}, token{number} = {self.bind('check', skip.check)}({', '.join(inputs)})")
                skipped.update(dict.fromkeys(skip.ops, f"skip{number}"))
            tokens.update(dict.fromkeys(skip.readers, f"token{number}"))
        frees = _frees(graph)
        counter = itertools.count()
        for step, (op, callee) in enumerate(zip(graph.ops, self.callees, strict=True)):
            lines.append(f"    # {step}: {op.op_name}")
            step_args = "_args" if observing and not callee.spread else None
            call, observed = self.call(callee, op, step_args, tokens.get(step))
            results = [f"v{next(counter)}" for _ in op.results]
            for value, name in zip(op.results, results, strict=True):
                self.names[id(value)] = name
            temporaries = []
            if step in skipped:  # one result, not a list (Skip's contract), and not observing
                lines.append(f"    {results[0]} = None if {skipped[step]} else {call}")
            elif len(results) == 1 and not callee.returns_list and not observing:
                lines.append(f"    {results[0]} = {call}")
            else:
                if step_args:
                    lines.append(f"    {step_args} = {observed}")
                    observed = step_args
                    temporaries.append(step_args)
                lines.append(f"    _out = {call}")
                temporaries.append("_out")
                if observing:
                    lines.append(f"    observe({self.bind('op', op)}, {observed}, _out)")
                if len(results) == 1:
                    lines.append(f"    {results[0]} = _out[0]" if callee.returns_list else f"    {results[0]} = _out")
                else:
                    lines.extend(f"    {name} = _out[{index}]" for index, name in enumerate(results))
            dead = temporaries + [self.names[id(value)] for value in frees[step]]
            if dead:
                lines.append(f"    del {', '.join(dead)}")
        lines.append(f"    return [{', '.join(self.names[id(value)] for value in graph.outputs)}]")
        return "\n".join(lines) + "\n"


def _is_literal(tree: Any) -> bool:
    """Whether ``repr(tree)`` is Python source for ``tree`` itself."""
    if isinstance(tree, float):
        return math.isfinite(tree)
    return tree is None or type(tree) in (bool, int, str)


def _frees(graph: Graph) -> list[list[Value]]:
    """For each op, the values to delete after it: those it reads last, and its results nothing reads."""
    last: dict[int, tuple[int, Value]] = {}
    for step, op in enumerate(graph.ops):
        for value in op.results:
            last[id(value)] = (step, value)
        for value in op.operands:
            last[id(value)] = (step, value)
    keep = {id(value) for value in graph.outputs} | {id(value) for value in graph.inputs}
    frees: list[list[Value]] = [[] for _ in graph.ops]
    for value_id, (step, value) in last.items():
        if value_id not in keep:
            frees[step].append(value)
    return frees
