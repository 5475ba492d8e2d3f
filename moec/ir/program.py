"""A program: an IR graph plus its weights and the structure of the model's inputs and outputs."""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from moec.ir.core import Graph
from moec.ir.quant import QuantizedType, storage_names


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
        """The graph's input tensors from a call's arguments, or ``TypeError`` saying what was expected."""
        spec = load_treespec(self.in_spec)
        args, kwargs = self.in_captured_form(spec, tuple(args), kwargs)
        kwargs_spec = spec.child(1) if spec.num_children == 2 else None
        if kwargs_spec is not None and kwargs_spec.context is not None:
            expected = list(kwargs_spec.context)
            unknown = set(kwargs) - set(expected)
            missing = [key for key in expected if key not in kwargs]
            if unknown or missing:
                raise TypeError(
                    f"the compiled model takes keyword arguments {expected}; "
                    f"missing {missing}, unexpected {sorted(unknown)}"
                )
            kwargs = {key: kwargs[key] for key in expected}
        leaves, call_spec = pytree.tree_flatten((tuple(args), kwargs))
        if call_spec != spec:
            raise TypeError(f"the compiled model expects arguments shaped like {spec}, got {call_spec}")
        self.check_input_shapes(leaves)
        return self.with_captured_dtypes(leaves)

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
        """``ValueError`` naming the first input tensor whose fixed sizes differ from the graph's. (Another rank
        is let through: a graph of rank-agnostic ops, an MLP's, runs on [T, H] and [B, S, H] alike.)"""
        for leaf, value, name in zip(leaves, self.graph.inputs, self.graph.input_names, strict=False):
            expected = value.type
            if not isinstance(leaf, torch.Tensor) or not hasattr(expected, "shape"):
                continue
            fixed = [(axis, size) for axis, size in enumerate(expected.shape) if isinstance(size, int)]
            if leaf.dim() == len(expected.shape) and any(leaf.shape[axis] != size for axis, size in fixed):
                raise ValueError(
                    f"input {name!r} has shape {list(leaf.shape)}, but the compiled model takes {expected}: "
                    "the sizes written as numbers were fixed when the model was captured (the model's code "
                    "pins them to the example's sizes); compile with an example of the size you will run"
                )

    def unflatten_outputs(self, leaves: list[Any]) -> Any:
        return pytree.tree_unflatten(leaves, load_treespec(self.out_spec))


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def dump_treespec(spec: pytree.TreeSpec) -> str:
    return pytree.treespec_dumps(spec)


def load_treespec(text: str) -> pytree.TreeSpec:
    """Load a serialized pytree spec, importing the modules that define its node types first."""
    for type_name in _node_type_names(json.loads(text)):
        module_name = type_name.rpartition(".")[0]
        if module_name:
            try:
                importlib.import_module(module_name)
            except ImportError:
                pass  # treespec_loads names the missing type
    return pytree.treespec_loads(text)


def _node_type_names(tree: Any) -> list[str]:
    if isinstance(tree, dict):
        names = [tree["type"]] if isinstance(tree.get("type"), str) else []
        return names + [n for child in tree.get("children_spec", []) for n in _node_type_names(child)]
    if isinstance(tree, list):
        return [n for item in tree for n in _node_type_names(item)]
    return []
