"""A program: an IR graph plus its weights and the structure of the model's inputs and outputs."""

from __future__ import annotations

import functools
import importlib
import itertools
import json
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from moec.ir.core import Graph, WeightRef
from moec.ir.guards import InputGuards
from moec.ir.quant import QuantizedType, storage_names
from moec.ir.types import DTYPE_NAMES


@dataclass
class Program:
    """What capture produces and passes transform.

    ``in_spec``/``out_spec`` are serialized pytree specs (JSON): how the user's ``(args, kwargs)``
    flatten into the graph inputs, and how the graph outputs rebuild the model's output object.
    """

    graph: Graph
    weights: dict[str, torch.Tensor]
    in_spec: str
    out_spec: str
    metadata: dict[str, Any] = field(default_factory=dict)
    # Input shapes (one tuple per flat input) whose sizes satisfied the capture's guards.
    _guarded_shapes: set[tuple] = field(default_factory=set, init=False, repr=False, compare=False)

    def weight_sizes(self, names: Iterable[str] | None = None) -> tuple[int, int]:
        """(parameters, stored bytes) of the named graph weights, all of them by default: a quantized weight
        counts the elements of its logical shape and the bytes of its packed storage."""
        params = size = 0
        for name in self.graph.weights if names is None else names:
            weight_type = self.graph.weights.get(name)
            if isinstance(weight_type, QuantizedType):
                params += math.prod(weight_type.static_shape)
                stored = [self.weights[n] for n in storage_names(name).values()]
            else:
                stored = [self.weights[name]] if name in self.weights else []
                params += sum(t.numel() for t in stored)
            size += sum(t.numel() * t.element_size() for t in stored)
        return params, size

    def flatten_inputs(self, args: tuple, kwargs: dict) -> list[Any]:
        """The graph's input tensors from a call's arguments, or ``TypeError`` naming the inputs the compiled
        model takes and what the call got wrong."""
        spec = load_treespec(self.in_spec)
        captured_args, captured_kwargs = self.in_captured_form(spec, tuple(args), kwargs)
        keywords = keyword_names(spec)
        if len(captured_args) != spec.child(0).num_children or set(captured_kwargs) != set(keywords):
            raise TypeError(self.call_mismatch(spec, tuple(args), kwargs))
        captured = (captured_args, {key: captured_kwargs[key] for key in keywords})
        leaves, call_spec = pytree.tree_flatten(captured)
        if call_spec != spec:
            raise TypeError(self.structure_mismatch(spec, captured))
        self.check_input_shapes(leaves)
        self.check_guards(captured, leaves)
        return self.with_captured_dtypes(leaves)

    def keep_guards_at_one(self, guards: list[str]) -> None:
        """Enforce ``guards`` at sizes of 1 too (``moec.frontend.sizes_of_one``): recorded in the metadata, and
        the input shapes already checked are checked again."""
        self.metadata["input_guards_kept_at_one"] = list(guards)
        self.__dict__.pop("input_guards", None)  # the cached compiled guards
        self._guarded_shapes.clear()

    @functools.cached_property
    def input_guards(self) -> InputGuards:
        """The capture's conditions on input sizes (``metadata["input_guards"]``, export's guards), compiled, with
        those enforced at sizes of 1 too (``metadata["input_guards_kept_at_one"]``)."""
        return InputGuards(self.metadata.get("input_guards", []), self.metadata.get("input_guards_kept_at_one", []))

    def check_guards(self, captured: tuple[tuple, dict], leaves: list[Any]) -> None:
        """A ``ValueError`` naming the first guard of the capture that a call's input sizes break; each set of
        input shapes is checked once, inputs of another rank than the example's not at all."""
        if not self.metadata.get("input_guards"):
            return
        shapes = tuple(tuple(leaf.shape) if isinstance(leaf, torch.Tensor) else None for leaf in leaves)
        if shapes in self._guarded_shapes:
            return
        if self.rank_mismatch(leaves) is not None:  # guards name dims by position: they speak of the example's rank
            return
        args, kwargs = captured
        names = self.metadata.get("forward_parameters", [])
        broken = self.input_guards.broken({**dict(zip(names, args, strict=False)), **kwargs})
        if broken is not None:
            given = ", ".join(f"{name} {list(leaf.shape)}" for name, leaf in zip(self.graph.input_names, leaves,
                                                                               strict=False)
                              if isinstance(leaf, torch.Tensor))
            condition = broken if len(broken) <= 300 else broken[:300] + " ..."
            empty = self.empty_input(leaves)
            if empty is not None:  # no example of size 0 compiles: say so, not "compile with an example of it"
                raise ValueError(f"{empty}, which the compiled model does not take (the model's code held "
                                 f"{condition} when it was captured); give it at least one along each axis")
            raise ValueError(f"inputs of these sizes ({given}) break a condition the model's code held when it was "
                             f"captured, {condition}, so the compiled graph does not hold for them: compile with "
                             "an example of this size if the model runs at it (a bound, such as the length of a "
                             "position table, holds for every example)")
        self._guarded_shapes.add(shapes)

    def input_names(self, spec: pytree.TreeSpec) -> list[str]:
        """The names of the inputs the compiled model takes, as the captured example gave them: positional ones
        by their ``forward`` parameter name (``argument i`` when it has none), then keyword ones."""
        names = self.metadata.get("forward_parameters", [])
        positional = [names[i] if i < len(names) else f"argument {i}" for i in range(spec.child(0).num_children)]
        return positional + keyword_names(spec)

    def call_mismatch(self, spec: pytree.TreeSpec, args: tuple, kwargs: dict) -> str:
        """What a call whose arguments do not fit the captured example got wrong."""
        expected = self.input_names(spec)
        order = self.metadata.get("forward_parameters", []) or expected
        by_position = order[:len(args)]
        problems = []
        if len(args) > len(by_position):
            problems.append("more positional arguments than it takes")
        problems += [f"{name!r} given by position, which the example did not give"
                     for name in by_position if name not in expected]
        problems += [f"{key!r} given twice (by position and by keyword)" for key in kwargs if key in by_position]
        problems += [f"unknown keyword argument {key!r}" for key in kwargs if key not in expected]
        missing = [name for name in expected if name not in by_position and name not in kwargs]
        if missing:
            problems.append(f"missing {', '.join(missing)}")
        given = [f"{len(args)} positional argument{'s' * (len(args) != 1)}"] if args else []
        if kwargs:
            given.append(f"keyword{'s' * (len(kwargs) != 1)} {', '.join(kwargs)}")
        return (f"the compiled model takes ({', '.join(expected)}); got {' and '.join(given) or 'no arguments'}: "
                f"{'; '.join(problems) or 'arguments it cannot match to those names'}")

    def structure_mismatch(self, spec: pytree.TreeSpec, captured: tuple[tuple, dict]) -> str:
        """Which argument's nesting (tensor, tuple, list, dict ...) differs from the captured example's."""
        expected = self.input_names(spec)
        given = [*captured[0], *captured[1].values()]
        example = [spec.child(0).child(i) for i in range(spec.child(0).num_children)]
        example += [spec.child(1).child(i) for i in range(spec.child(1).num_children)]
        for name, value, example_spec in zip(expected, given, example, strict=True):
            if pytree.tree_structure(value) != example_spec:
                return (f"the compiled model takes ({', '.join(expected)}); {name!r} is {structure(value)} where "
                        f"the example gave {structure(example_spec)}")
        return f"the compiled model takes ({', '.join(expected)}); the call's arguments do not match the example's"

    def with_captured_dtypes(self, leaves: list[Any]) -> list[Any]:
        """``leaves`` with integer and bool tensors cast to the integer or bool dtype their graph input was
        captured with: token ids as int32 or int64, masks as bool or integers (the model's code converted them
        itself, on the branch the example took). Other dtypes are left as they are."""
        out = []
        for leaf, value in zip(leaves, self.graph.inputs, strict=False):
            expected = getattr(value.type, "torch_dtype", None)
            if (isinstance(leaf, torch.Tensor) and expected is not None and leaf.dtype != expected
                    and not _is_float(leaf.dtype) and not _is_float(expected)):
                leaf = leaf.to(expected)
            out.append(leaf)
        return out + leaves[len(out):]

    def in_captured_form(self, spec: pytree.TreeSpec, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """A call's arguments moved to where the captured example had them: one the example gave by keyword
        may come by position and the other way round, matched by the names of the model's ``forward``
        parameters (``metadata["forward_parameters"]``). Arguments that cannot be matched stay as they are."""
        names = self.metadata.get("forward_parameters", [])
        positional = spec.child(0).num_children
        if len(args) == positional or len(args) > len(names) or positional > len(names):
            return args, kwargs
        bound = dict(zip(names, args, strict=False))
        if bound.keys() & kwargs.keys() or not set(names[:positional]) <= bound.keys() | kwargs.keys():
            return args, kwargs
        bound.update(kwargs)
        return tuple(bound.pop(name) for name in names[:positional]), bound

    def check_input_shapes(self, leaves: list[Any]) -> None:
        """``ValueError`` naming the first input tensor whose fixed sizes differ from the graph's, ``TypeError``
        naming one given as something else (``None``, a list). (Another rank is let through: a graph of
        rank-agnostic ops, an MLP's, runs on [T, H] and [B, S, H] alike.)"""
        for leaf, value, name in zip(leaves, self.graph.inputs, self.graph.input_names, strict=False):
            expected = value.type
            if not hasattr(expected, "shape"):
                continue
            if not isinstance(leaf, torch.Tensor):
                kind = type(leaf)
                given = "None" if leaf is None else f"a {kind.__module__}.{kind.__qualname__}".replace("builtins.", "")
                hint = " (torch.from_numpy makes one of it)" if kind.__module__ == "numpy" else ""
                raise TypeError(f"input {name!r} is {given}, but the compiled model takes a tensor {expected} "
                                f"there, as the example gave; pass a tensor{hint}")
            fixed = [(axis, size) for axis, size in enumerate(expected.shape) if isinstance(size, int)]
            if leaf.dim() == len(expected.shape) and any(leaf.shape[axis] != size for axis, size in fixed):
                raise ValueError(
                    f"input {name!r} has shape {list(leaf.shape)}, but the compiled model takes {expected}: "
                    "the sizes written as numbers were fixed when the model was captured (the model's code "
                    "pins them to the example's sizes); compile with an example of the size you will run"
                )

    def input_problem(self, leaves: list[Any]) -> tuple[str, str] | None:
        """Why a run on these flat inputs failed, as (what is wrong with an input, what to give instead), or None
        when no input explains it. Checked in order and lazily: after a failed GPU kernel, reading more inputs
        can raise again."""
        checks = ((self.rank_mismatch, "inputs of the example's rank"),
                  (self.dtype_mismatch, "inputs of the example's dtypes"),
                  (self.size_disagreement, "inputs whose sizes agree as the example's did"),
                  (self.empty_input, "at least one along each axis"),
                  (self.ids_out_of_range, "ids the model's vocabulary has"))
        for check, advice in checks:
            problem = check(leaves)
            if problem is not None:
                return problem, advice
        return None

    def rank_mismatch(self, leaves: list[Any]) -> str | None:
        """The first input tensor whose number of dimensions differs from its graph input's, described (a
        rank-agnostic graph may run on it: ``check_input_shapes``), or None."""
        for leaf, value, name in zip(leaves, self.graph.inputs, self.graph.input_names, strict=False):
            shape = getattr(value.type, "shape", None)
            if isinstance(leaf, torch.Tensor) and shape is not None and leaf.dim() != len(shape):
                return (f"input {name!r} has {leaf.dim()} dimension{'s' if leaf.dim() != 1 else ''} "
                        f"{list(leaf.shape)}, where the compiled model takes {value.type}")
        return None

    def size_disagreement(self, leaves: list[Any]) -> str | None:
        """The first input tensor whose size along an axis differs from an earlier input's where the example's
        two sizes were equal (a mask of another batch than its ids), described, or None: sizes may also be
        independent, so this only explains a failed run."""
        examples = self.metadata.get("example_shapes") or []
        tensors = [(name, leaf, example) for name, leaf, example in zip(self.graph.input_names, leaves, examples,
                                                                        strict=False)
                   if isinstance(leaf, torch.Tensor) and isinstance(example, list) and leaf.dim() == len(example)]
        for (first, a, a_example), (second, b, b_example) in itertools.combinations(tensors, 2):
            for axis in range(min(a.dim(), b.dim())):
                if a_example[axis] == b_example[axis] and a.shape[axis] != b.shape[axis]:
                    return (f"input {second!r} {list(b.shape)} differs from input {first!r} {list(a.shape)} along "
                            f"axis {axis}, where the example's sizes were equal ({a_example[axis]})")
        return None

    def embedding_rows(self) -> dict[int, int]:
        """For each graph input read as embedding indices (token ids), by position, the smallest table's rows."""
        positions = {id(value): index for index, value in enumerate(self.graph.inputs)}
        rows: dict[int, int] = {}
        for op in self.graph.ops:
            if getattr(op, "target", None) == "aten.embedding.default" and id(op.args[1]) in positions:
                table = op.args[0]
                if isinstance(table, WeightRef) and table.name in self.weights:
                    size = self.weights[table.name].shape[0]
                    index = positions[id(op.args[1])]
                    rows[index] = min(size, rows.get(index, size))
        return rows

    def ids_out_of_range(self, leaves: list[Any]) -> str | None:
        """The first input of token ids holding one outside its embedding table, described, or None."""
        for index, size in self.embedding_rows().items():
            ids = leaves[index] if index < len(leaves) else None
            # on the CPU only: after a device-side assert, reading a GPU tensor raises again
            if isinstance(ids, torch.Tensor) and ids.device.type == "cpu" and ids.numel() and not ids.is_floating_point():
                low, high = int(ids.min()), int(ids.max())
                if low < 0 or high >= size:
                    return (f"input {self.graph.input_names[index]!r} holds ids {low}..{high}, outside its embedding "
                            f"table's {size} rows (ids 0..{size - 1})")
        return None

    def empty_input(self, leaves: list[Any]) -> str | None:
        """The first input tensor with a size of 0, described, or None."""
        for leaf, name in zip(leaves, self.graph.input_names, strict=False):
            if isinstance(leaf, torch.Tensor) and 0 in leaf.shape:
                return f"input {name!r} {list(leaf.shape)} is empty along axis {list(leaf.shape).index(0)}"
        return None

    def dtype_mismatch(self, leaves: list[Any]) -> str | None:
        """The first input tensor whose dtype differs from its graph input's, described, or None: a model
        that casts its inputs itself may run on it, so this only explains a failed run."""
        for leaf, value, name in zip(leaves, self.graph.inputs, self.graph.input_names, strict=False):
            dtype = getattr(value.type, "dtype", None)
            if isinstance(leaf, torch.Tensor) and dtype is not None and DTYPE_NAMES.get(leaf.dtype) != dtype:
                return f"input {name!r} is {leaf.dtype}, where the compiled model takes {value.type}"
        return None

    def unflatten_outputs(self, leaves: list[Any]) -> Any:
        return pytree.tree_unflatten(leaves, load_treespec(self.out_spec))


def keyword_names(spec: pytree.TreeSpec) -> list[str]:
    """The names of the keyword inputs of a call spec ``((args...), {kwargs...})``, in captured order."""
    return list(spec.child(1).context or []) if spec.num_children == 2 else []


def structure(value: Any) -> str:
    """A short description of an argument's nesting (``a Tensor``, ``a tuple of 2``), or of an example's
    argument given as its spec."""
    if isinstance(value, pytree.TreeSpec):
        return "a single value" if value.is_leaf() else f"a {value.type.__name__} of {value.num_children}"
    node = pytree.tree_structure(value)
    return f"a {type(value).__name__}" if node.is_leaf() else f"a {node.type.__name__} of {node.num_children}"


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def dump_treespec(spec: pytree.TreeSpec) -> str:
    return pytree.treespec_dumps(spec)


OUTPUT_TYPE_PACKAGES = ("transformers", "torch")  # packages a plan's spec may name types of before they load


@functools.lru_cache(maxsize=64)
def load_treespec(text: str) -> pytree.TreeSpec:
    """Load a serialized pytree spec, importing the modules that define its node types first (cached: a
    compiled model loads its input and output specs on every call). A plan is data, and a type name in it must
    not make moec run a module it carries, one the process never asked for, or a module that acts when
    imported: only modules of transformers and torch (whose output classes a plan names) or of third-party
    packages already imported are imported, never a ``__main__`` (``unittest.__main__`` runs tests it finds
    in the current folder) nor one of the standard library."""
    for type_name in _node_type_names(json.loads(text)):
        module_name = type_name.rpartition(".")[0]
        if importable_type_module(module_name):
            try:
                importlib.import_module(module_name)
            except ImportError:
                pass  # treespec_loads names the missing type
    return pytree.treespec_loads(text)


def importable_type_module(module_name: str) -> bool:
    """Whether ``load_treespec`` may import ``module_name`` to register a type a plan names."""
    parts = module_name.split(".")
    package = parts[0]
    return (all(part.isidentifier() and part != "__main__" for part in parts)
            and package not in sys.stdlib_module_names
            and (package in sys.modules or package in OUTPUT_TYPE_PACKAGES))


def _node_type_names(tree: Any) -> list[str]:
    if isinstance(tree, dict):
        names = [tree["type"]] if isinstance(tree.get("type"), str) else []
        return names + [n for child in tree.get("children_spec", []) for n in _node_type_names(child)]
    if isinstance(tree, list):
        return [n for item in tree for n in _node_type_names(item)]
    return []
