"""The IR's op classes: generic ATen/Python ops, and moec's FFN and MoE ops.

MoE ops take the tensors they transform as positional operands, their weights as keyword
``WeightRef`` arguments (by role, see ``moec.frontend.blocks``) and their configuration as keyword
constants whose names are the fields of the matching spec dataclass::

    %idx, %w = moe.route(%x, router=@layers.0.mlp.gate.weight, num_experts=8, top_k=2, ...)
    %y = moe.experts(%x, %idx, %w, w_in=@layers.0.mlp.experts.gate_up_proj, w_out=..., act="silu", ...)

Every MoE op works on ``[..., H]`` inputs: leading dims are tokens.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Any, ClassVar

from moec.frontend.blocks import ACTIVATIONS, GROUP_SCORES, ORDERS, SCORINGS, ExpertsSpec, FFNSpec, RouteSpec
from moec.ir.core import Operation, Value, WeightRef, register_op
from moec.ir.quant import QuantizedType
from moec.ir.types import Dim, TensorType, Type


class AtenOp(Operation):
    """Any ATen op (``aten.linear.default``) or Python scalar op (``py.mul``) carried by name.

    Arguments mirror the ATen schema's positional and keyword arguments; every backend runs these
    by looking the target up (``torch.ops.aten...`` or ``operator``).
    """

    def __init__(self, target: str, args: tuple = (), kwargs: dict | None = None,
                 result_types: list[Type] | None = None) -> None:
        if not target.startswith(("aten.", "py.")):
            raise ValueError(f"generic op target {target!r} must start with 'aten.' or 'py.'")
        self.target = target
        super().__init__(args, kwargs, result_types)

    @property
    def op_name(self) -> str:
        return self.target


class SpecOp(Operation):
    """An op whose keyword constants are exactly the fields of a spec dataclass."""

    spec_class: ClassVar[type]
    num_operands: ClassVar[int]
    required_weights: ClassVar[tuple[str, ...]]
    optional_weights: ClassVar[tuple[str, ...]]
    derived_fields: ClassVar[tuple[str, ...]] = ()
    extra_attributes: ClassVar[tuple[str, ...]] = ()  # keyword constants beyond the spec's fields
    # Spec fields written only when they differ from their default (features few models have).
    omitted_at_default: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def build(cls, operands: list[Value], weights: dict[str, str], spec: Any,
              result_types: list[Type], block: str | None = None) -> SpecOp:
        """An op from its spec; ``block`` names the model block it came from (a stable layer key)."""
        attrs = {f.name: getattr(spec, f.name) for f in fields(spec) if f.name not in cls.derived_fields
                 and not (f.name in cls.omitted_at_default and getattr(spec, f.name) == f.default)}
        kwargs = {role: WeightRef(name) for role, name in weights.items()} | attrs
        if block is not None:
            kwargs["block"] = block
        return cls(tuple(operands), kwargs, result_types)

    @property
    def block(self) -> str:
        """The model block (module path) this op came from, or '' if unknown."""
        return self.kwargs.get("block", "")

    def weight(self, role: str) -> WeightRef | None:
        return self.kwargs.get(role)

    def required_weight(self, role: str) -> WeightRef:
        """The weight of a role the op must have: one of ``required_weights`` (a verified op has them), one
        its configuration needs (``w_gate`` of a gated FFN), or one the caller found on it."""
        ref = self.weight(role)
        if ref is None:
            raise ValueError(f"'{self.op_name}' has no weight {role!r}")
        return ref

    def weight_type(self, role: str) -> TensorType | QuantizedType | None:
        ref = self.weight(role)
        if ref is None or self.graph is None:
            return None
        return self.graph.weights.get(ref.name)

    @property
    def spec(self) -> Any:
        """The spec of the op's current keyword arguments. Built once per distinct kwargs: runners read it on
        every call, and building the dataclass costs tens of microseconds."""
        cached = getattr(self, "_spec_cache", None)
        if cached is not None and cached[0] == self.kwargs:
            return cached[1]
        values = {f.name: self.kwargs[f.name] for f in fields(self.spec_class) if f.name in self.kwargs}
        values = {k: v for k, v in values.items() if k not in self.derived_fields}
        spec = self.spec_class(**values, **self.derived_spec_values())
        self._spec_cache = (dict(self.kwargs), spec)
        return spec

    def derived_spec_values(self) -> dict[str, Any]:
        return {}

    def verify_(self) -> None:
        allowed = set(self.required_weights) | set(self.optional_weights)
        allowed |= {f.name for f in fields(self.spec_class)} - set(self.derived_fields)
        allowed |= {"block", *self.extra_attributes}
        unknown = set(self.kwargs) - allowed
        if unknown:
            raise ValueError(f"unknown attributes {', '.join(map(repr, sorted(unknown)))}")
        for role in self.required_weights:
            if not isinstance(self.kwargs.get(role), WeightRef):
                raise ValueError(f"weight {role!r} is required and must be a '@name' reference")
        if len(self.args) != self.num_operands or not all(isinstance(a, Value) for a in self.args):
            raise ValueError(f"takes {self.num_operands} value operands, got {len(self.args)} arguments")
        required = [f.name for f in fields(self.spec_class) if f.default is MISSING and f.default_factory is MISSING
                    and f.name not in self.derived_fields]
        missing = [name for name in required if name not in self.kwargs]
        if missing:
            raise ValueError(f"missing attributes {', '.join(map(repr, missing))}")
        for name, kinds in spec_field_kinds(self.spec_class).items():
            value = self.kwargs.get(name, MISSING)
            if value is not MISSING and not any(SCALAR_KINDS[kind][1](value) for kind in kinds):
                shown = json.dumps(value) if isinstance(value, str) else repr(value)
                raise ValueError(f"{name!r} is {shown}; it must be {' or '.join(SCALAR_KINDS[k][0] for k in kinds)}")
        try:
            spec = self.spec
        except TypeError as err:
            raise ValueError(f"bad configuration: {err}") from None
        self.verify_spec(spec)

    def verify_spec(self, spec: Any) -> None:
        raise NotImplementedError

    def expect_weight_shape(self, role: str, shape: tuple) -> None:
        weight_type = self.weight_type(role)
        if weight_type is not None and tuple(weight_type.shape) != tuple(shape):
            raise ValueError(f"weight {role!r} ('{self.kwargs[role]}') has shape {list(weight_type.shape)}, "
                             f"expected {list(shape)}")


# A spec field's annotation -> how an error names it, and whether an attribute value is of it (a bool is no number).
SCALAR_KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "int": ("an integer", lambda value: isinstance(value, int) and not isinstance(value, bool)),
    "float": ("a number", lambda value: isinstance(value, (int, float)) and not isinstance(value, bool)),
    "bool": ("true or false", lambda value: isinstance(value, bool)),
    "str": ("a string", lambda value: isinstance(value, str)),
    "None": ("none", lambda value: value is None),
}


@functools.cache
def spec_field_kinds(spec_class: type) -> dict[str, tuple[str, ...]]:
    """The ``SCALAR_KINDS`` each field of ``spec_class`` takes, by its annotation (``float | None``: float or
    None); fields of other types are left out."""
    kinds = {}
    for field in fields(spec_class):
        names = tuple(part.strip() for part in str(field.type).split("|"))
        if all(name in SCALAR_KINDS for name in names):
            kinds[field.name] = names
    return kinds


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        shown = json.dumps(value) if isinstance(value, str) else repr(value)  # as the IR text spells a string
        raise ValueError(f"{name!r} is {shown}; it must be one of {', '.join(map(json.dumps, choices))}")


def check_token_operand(value: Value, hidden: Dim) -> TensorType:
    t = value.tensor_type
    if t.rank < 1 or t.shape[-1] != hidden:
        raise ValueError(f"operand #0 must be [..., {hidden}], got {t}")
    return t


@register_op
class RouteOp(SpecOp):
    """``moe.route(x) -> (indices i64[..., k], weights f32[..., k])``: a router with its exact scoring."""

    name = "moe.route"
    spec_class = RouteSpec
    num_operands = 1
    required_weights = ("router",)
    optional_weights = ("router_bias", "router_logit_bias")
    derived_fields = ("has_bias", "has_logit_bias")
    omitted_at_default = ("group_score", "round_logits")

    def derived_spec_values(self) -> dict[str, Any]:
        return {"has_bias": "router_bias" in self.kwargs, "has_logit_bias": "router_logit_bias" in self.kwargs}

    def verify_spec(self, spec: RouteSpec) -> None:
        check_choice("scoring", spec.scoring, SCORINGS)
        check_choice("order", spec.order, ORDERS)
        check_choice("group_score", spec.group_score, GROUP_SCORES)
        problem = spec.counts_problem()
        if problem is not None:
            raise ValueError(problem)
        router = self.weight_type("router")
        if router is not None:
            if router.rank != 2 or router.shape[0] != spec.num_experts:
                raise ValueError(f"weight 'router' ('{self.kwargs['router']}') must be [{spec.num_experts}, H], "
                                 f"got {router}")
            check_token_operand(self.args[0], router.shape[1])
        self.expect_weight_shape("router_bias", (spec.num_experts,))
        self.expect_weight_shape("router_logit_bias", (spec.num_experts,))
        x_type = self.args[0].tensor_type
        expected = [TensorType("i64", (*x_type.shape[:-1], spec.top_k)), TensorType("f32", (*x_type.shape[:-1], spec.top_k))]
        if [r.type for r in self.results] != expected:
            raise ValueError(f"results must be {expected[0]}, {expected[1]}")


@register_op
class ExpertsOp(SpecOp):
    """``moe.experts(x, indices, weights) -> y``: routed experts with stacked weights, combined.

    With ``expert_map=[m_0, ..., m_{R-1}]`` (written by expert merging) the router's R experts share the
    ``num_experts`` stored ones: a token routed to router expert ``r`` runs stored expert ``m_r`` with the
    same routing weight, so two chosen experts with one target add their weights. Without it, router
    expert ``r`` is stored expert ``r``.
    """

    name = "moe.experts"
    spec_class = ExpertsSpec
    num_operands = 3
    required_weights = ("w_in", "w_out")
    optional_weights = ("b_in", "b_out")
    quantizable_roles = ("w_in", "w_out")
    derived_fields = ("has_bias",)
    omitted_at_default = ("limit", "up_offset", "weighted_input")
    # skip_threshold, set by the dynamic-skip pass: per token, drop pairs whose routing weight is below this
    # fraction of the token's top weight (``moec.kernels.skip``); absent or 0: every chosen expert runs.
    # expert_map, set by expert-merge: the stored expert each router expert runs (docs/IR.md).
    extra_attributes = ("skip_threshold", "expert_map")

    def derived_spec_values(self) -> dict[str, Any]:
        return {"has_bias": "b_in" in self.kwargs or "b_out" in self.kwargs}

    @property
    def skip_threshold(self) -> float:
        return float(self.kwargs.get("skip_threshold", 0.0))

    @property
    def expert_map(self) -> list[int] | None:
        """For each router expert, the stored expert it runs (None: the identity)."""
        mapping = self.kwargs.get("expert_map")
        return None if mapping is None else list(mapping)

    @property
    def top_k(self) -> int:
        """How many experts each token is routed to (the last dim of ``indices``)."""
        return self.args[1].tensor_type.shape[-1]

    @property
    def routed_experts(self) -> int:
        """How many experts the router chooses among (the length of ``indices``' value range)."""
        mapping = self.expert_map
        return self.spec.num_experts if mapping is None else len(mapping)

    def verify_expert_map(self, num_experts: int) -> None:
        mapping = self.kwargs.get("expert_map")
        if mapping is None:
            return
        if not isinstance(mapping, (list, tuple)) or not all(type(m) is int for m in mapping):
            raise ValueError(f"'expert_map' must be a list of ints, got {mapping!r}")
        if any(not 0 <= m < num_experts for m in mapping) or set(mapping) != set(range(num_experts)):
            raise ValueError(f"'expert_map' must map onto every stored expert 0..{num_experts - 1} and nothing else, "
                             f"got {list(mapping)}")
        route = self.args[1].owner
        if isinstance(route, RouteOp) and route.kwargs.get("num_experts") != len(mapping):
            raise ValueError(f"'expert_map' has {len(mapping)} entries but its router ('moe.route', 'num_experts') "
                             f"chooses among {route.kwargs.get('num_experts')} experts")

    def verify_spec(self, spec: ExpertsSpec) -> None:
        check_choice("act", spec.act, ACTIVATIONS)
        check_gating(spec)
        if spec.weighted_input and spec.has_bias:
            raise ValueError("experts that take the routing weight on their input ('weighted_input') have no biases "
                             "('b_in', 'b_out'): a pair of weight 0, such as a skipped one, must contribute nothing")
        if not 0.0 <= self.skip_threshold < 1.0:
            raise ValueError(f"'skip_threshold' is {self.skip_threshold}; it must be in [0, 1) "
                             f"(the top expert always runs)")
        self.verify_expert_map(spec.num_experts)
        f_in = 2 * spec.intermediate if spec.gated else spec.intermediate
        self.expect_weight_shape("w_in", (spec.num_experts, f_in, spec.hidden))
        self.expect_weight_shape("w_out", (spec.num_experts, spec.hidden, spec.intermediate))
        self.expect_weight_shape("b_in", (spec.num_experts, f_in))
        self.expect_weight_shape("b_out", (spec.num_experts, spec.hidden))
        x_type = check_token_operand(self.args[0], spec.hidden)
        idx_type, w_type = self.args[1].tensor_type, self.args[2].tensor_type
        if idx_type.dtype != "i64" or idx_type.shape[:-1] != x_type.shape[:-1]:
            raise ValueError(f"operand #1 (indices) must be i64[{', '.join(map(str, x_type.shape[:-1]))}, k], got {idx_type}")
        if w_type.shape != idx_type.shape:
            raise ValueError(f"operand #2 (routing weights) is {w_type}; it must have the shape of "
                             f"operand #1 (indices), {idx_type}")
        if len(self.results) != 1 or self.results[0].type != x_type:
            raise ValueError(f"result must be {x_type}")


def check_gating(spec: ExpertsSpec | FFNSpec) -> None:
    """The clamp and offset of gated experts or FFNs: a positive ``limit``, and neither on ungated ones."""
    if not spec.plain_gating and not spec.gated:
        raise ValueError("'limit' and 'up_offset' apply to gated experts and FFNs only")
    if spec.limit is not None and not (isinstance(spec.limit, (int, float)) and spec.limit > 0):
        raise ValueError(f"'limit' is {spec.limit!r}; it must be a positive number")


class FFNLikeOp(SpecOp):
    spec_class = FFNSpec
    num_operands = 1
    required_weights = ("w_up", "w_down")
    derived_fields: ClassVar[tuple[str, ...]] = ("has_bias", "gated")
    quantizable_roles = ("w_gate", "w_up", "w_down")
    omitted_at_default = ("limit", "up_offset")

    def derived_spec_values(self) -> dict[str, Any]:
        return {
            "has_bias": any(role in self.kwargs for role in ("b_gate", "b_up", "b_down")),
            "gated": "w_gate" in self.kwargs,
        }

    def verify_spec(self, spec: FFNSpec) -> None:
        check_choice("act", spec.act, ACTIVATIONS)
        check_gating(spec)
        for role in ("w_gate", "w_up"):
            self.expect_weight_shape(role, (spec.intermediate, spec.hidden))
        self.expect_weight_shape("w_down", (spec.hidden, spec.intermediate))
        for role in ("b_gate", "b_up"):
            self.expect_weight_shape(role, (spec.intermediate,))
        self.expect_weight_shape("b_down", (spec.hidden,))
        x_type = check_token_operand(self.args[0], spec.hidden)
        if len(self.results) != 1 or self.results[0].type != x_type:
            raise ValueError(f"result must be {x_type}")


@register_op
class DenseFFNOp(FFNLikeOp):
    """``ffn.dense(x) -> y``: a dense feed-forward block (gated when ``w_gate`` is given)."""

    name = "ffn.dense"
    optional_weights = ("w_gate", "b_gate", "b_up", "b_down")
    derived_fields = ("has_bias", "gated", "has_output_gate")

    def derived_spec_values(self) -> dict[str, Any]:
        return super().derived_spec_values() | {"has_output_gate": False}


@register_op
class SharedExpertOp(FFNLikeOp):
    """``moe.shared_expert(x) -> y``: an always-on expert, optionally scaled by sigmoid(x @ gate.T)."""

    name = "moe.shared_expert"
    optional_weights = ("w_gate", "b_gate", "b_up", "b_down", "gate")
    derived_fields = ("has_bias", "gated", "has_output_gate")

    def derived_spec_values(self) -> dict[str, Any]:
        return super().derived_spec_values() | {"has_output_gate": "gate" in self.kwargs}

    def verify_spec(self, spec: FFNSpec) -> None:
        super().verify_spec(spec)
        self.expect_weight_shape("gate", (1, spec.hidden))


MOE_OPS: tuple[type[Operation], ...] = (RouteOp, ExpertsOp, SharedExpertOp)
