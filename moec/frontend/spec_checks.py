"""Checks of a spec a ``register_moe_block`` call returned: its form (``spec_problem``: its kind, parts,
field types and values, weight roles) and what it computes (``registered_probe_problem``: the module's forward
on a few random rows against moec's reference kernels)."""

from __future__ import annotations

import dataclasses
import types
import typing

import torch
from torch import nn
from torch.nn import functional as F

from moec.frontend.blocks import (
    ACTIVATIONS,
    GATE_UP_PARTS,
    GROUP_SCORES,
    KIND_PARTS,
    ORDERS,
    SCORINGS,
    BlockSpec,
    ExpertsSpec,
    FFNSpec,
    RouteSpec,
    required_part,
)
from moec.frontend.custom_ops import OUTPUT_PROJECTION, block_hidden
from moec.frontend.probing import probe_tolerance, random_choice, row_errors, rows_reaching_probe_peaks
from moec.kernels import reference

# The spec classes of a BlockSpec's parts, and the settings whose values are names from a fixed list.
_PART_CLASSES = {"ffn": FFNSpec, "route": RouteSpec, "experts": ExpertsSpec, "shared": FFNSpec}
_CHOICES = {"act": ACTIVATIONS, "scoring": SCORINGS, "order": ORDERS, "group_score": GROUP_SCORES}


def spec_problem(spec: BlockSpec) -> str | None:
    """Why ``spec`` is malformed (its kind, a part its kind needs or does not use, a field's type or value, a
    weight role), or None. Sizes are left to the IR verifier, which checks them against the weights."""
    if spec.kind not in KIND_PARTS:
        return (f"returned kind={spec.kind!r}; it must be 'moe' (a whole MoE block, router included), 'ffn' (a dense "
                f"FFN) or 'experts' (routed experts given the router's choice)")
    needed, optional = KIND_PARTS[spec.kind]
    for part_name, part_class in _PART_CLASSES.items():
        part = getattr(spec, part_name)
        if part is None and part_name in needed:
            return (f"returned a kind={spec.kind!r} spec without {part_name!r}, which that kind needs; give "
                    f"{part_name}=moec.{part_class.__name__}(...)")
        if part is not None and part_name not in needed + optional:
            return f"returned a kind={spec.kind!r} spec with {part_name!r}, which that kind does not use; leave it out"
        if part is not None and not isinstance(part, part_class):
            return f"gives {part_name} as a {type(part).__name__}; it must be a moec.{part_class.__name__}"
    for field_path, value, hint in _fields(spec):
        if not _fits(value, hint):
            return f"gives {field_path}={value!r} ({type(value).__name__}); it must be {_type_name(hint)}"
        choices = _CHOICES.get(field_path.rpartition(".")[2])
        if choices is not None and value not in choices:
            return f"gives {field_path}={value!r}; it must be one of {', '.join(map(repr, choices))}"
    if spec.ffn is not None and spec.ffn.has_output_gate:
        return "gives ffn.has_output_gate=True, which only a moe block's shared expert ('shared') has"
    route_problem = spec.route.counts_problem() if spec.route is not None else None
    if route_problem is not None:
        return f"gives a route whose {route_problem}"
    return _role_problem(spec)


def _fields(spec: BlockSpec) -> list[tuple[str, object, object]]:
    """(dotted name, value, type) of every field of ``spec`` and of its parts, such as ``route.top_k``."""
    found = []
    for obj, prefix in [(spec, ""), *((getattr(spec, name), f"{name}.") for name in _PART_CLASSES)]:
        if obj is None:
            continue
        hints = typing.get_type_hints(type(obj))
        found += [(prefix + f.name, getattr(obj, f.name), hints[f.name]) for f in dataclasses.fields(obj)]
    return found


def _fits(value: object, hint: object) -> bool:
    """Whether ``value`` is of the annotated type ``hint`` (a bool is not a number; a list passes for a tuple)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if hint in (int, float):
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    if origin is tuple:
        return isinstance(value, (tuple, list)) and all(_fits(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    return isinstance(value, typing.cast(type, hint))


def _type_name(hint: object) -> str:
    """``int``, ``float | None``, ``moec.RouteSpec | None``, ``tuple[str, ...]`` ..."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(map(_type_name, typing.get_args(hint)))
    if hint is type(None):
        return "None"
    if isinstance(hint, type) and not typing.get_args(hint):
        return f"moec.{hint.__name__}" if dataclasses.is_dataclass(hint) else hint.__name__
    return str(hint)


def _weight_roles(spec: BlockSpec) -> tuple[set[str], set[str]]:
    """(the weight roles ``spec`` needs, those it may give besides), as its parts' settings say (the layouts of
    ``moec.frontend.blocks``); a gated ``w_in`` may be given as its ``GATE_UP_PARTS`` instead."""
    needed: set[str] = set()
    optional: set[str] = set()
    if spec.route is not None:
        needed |= {"router"} | {role for role, has in (("router_bias", spec.route.has_bias),
                                                       ("router_logit_bias", spec.route.has_logit_bias)) if has}
    if spec.experts is not None:
        needed |= {"w_in", "w_out"}
        optional |= set(GATE_UP_PARTS) | ({"b_in", "b_out"} if spec.experts.has_bias else set())
    for ffn, prefix in ((spec.ffn, ""), (spec.shared, "shared_")):
        if ffn is None:
            continue
        gate = ("gate",) if ffn.gated else ()
        needed |= {f"{prefix}w_{part}" for part in ("up", "down", *gate)}
        if ffn.has_bias:
            optional |= {f"{prefix}b_{part}" for part in ("up", "down", *gate)}
        if ffn.has_output_gate:
            needed.add(f"{prefix}gate")
    return needed, optional


def _role_problem(spec: BlockSpec) -> str | None:
    """Why ``spec``'s weight roles do not fit its parts (``_weight_roles``) or its layout lists, or None."""
    needed, optional = _weight_roles(spec)
    given = set(spec.weights) | ({"w_in"} if set(GATE_UP_PARTS) <= set(spec.weights) else set())
    missing, unknown = sorted(needed - given), sorted(set(spec.weights) - needed - optional)
    if missing:
        return (f"gives no weight for the role(s) {missing}, which its settings need; add them to weights "
                f"(see moec/frontend/blocks.py for each role's layout)")
    if unknown:
        return (f"gives weight role(s) {unknown}, which a kind={spec.kind!r} block with these settings does not take "
                f"(it takes {sorted(needed | optional)}; biases need has_bias=True, 'w_gate' gated=True, "
                f"'router_bias' route.has_bias=True, 'router_logit_bias' route.has_logit_bias=True)")
    for layout in ("transposed", "interleaved", "flattened"):
        strays = sorted(set(getattr(spec, layout)) - set(spec.weights))
        if strays:
            return f"lists {strays} in {layout}, which are not roles of its weights {list(spec.weights)}"
    return None


# The settings that decide what each part of a spec computes, for a probe's message.
_PART_SETTINGS = {
    "route": "routing (route: scoring, order, top_k, renormalize, scaling, biases)",
    "experts": "experts (experts: act, gated, limit, up_offset, weighted_input)",
    "ffn": "FFN (ffn: act, gated, limit, up_offset)",
    "shared": "shared expert (shared: act, gated, has_output_gate)",
}


def registered_probe_problem(module: nn.Module, spec: BlockSpec, weights: dict[str, torch.Tensor]) -> str | None:
    """Why a registered block's forward does not compute what moec's reference kernels compute from ``spec`` and
    ``weights`` (by role) on 8 random rows (``_probe_rows``; for an experts module, with a random choice of
    experts), or None when they agree: each row within ``probe_tolerance`` of the weights' dtype plus, for a
    block with a router, that dtype's rounding of the row's largest router logit (``eps * max |logit|``: a
    module may compute its logits in its dtype, as Hugging Face's do, where the reference uses float32).

    The block runs in eval mode, without gradients; its forward must return one tensor of its input's shape.
    """
    try:
        hidden = block_hidden(weights, spec)
        x = _probe_rows(spec, weights, hidden)
    except (IndexError, RuntimeError) as err:  # a weight of another rank or size than its role's
        return (f"gives weights whose shapes do not fit the layouts of their roles (moec/frontend/blocks.py): "
                f"{type(err).__name__}: {err}")
    forward = f"{type(module).__name__}.forward"
    if spec.kind == "experts":
        indices, routing = random_choice(len(x), required_part(spec.experts, "experts", spec).num_experts,
                                         torch.Generator().manual_seed(1), x.device)
        calls: list[tuple[torch.Tensor, ...]] = [(x, indices, routing)]
    else:  # batched hidden states first; a block the model feeds flattened rows may take only [T, H]
        calls = [(x.reshape(2, -1, hidden),), (x,)]
    first_error: Exception | None = None
    for inputs in calls:
        try:
            actual = _probe_call(module, inputs)
            break
        except Exception as err:  # whatever the user's forward raises
            first_error = first_error or err
    else:
        assert first_error is not None
        reason = str(first_error).strip().splitlines()[0] if str(first_error).strip() else ""
        return (f"describes a block whose forward fails on random hidden states: {_probe_called(forward, spec, calls[0])} "
                f"raised {type(first_error).__name__}: {reason}. moec checks a registered block's spec on such rows: "
                "the forward of a kind='moe' or 'ffn' block takes the hidden states [..., H] alone, that of a "
                "kind='experts' module (hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])")
    called = _probe_called(forward, spec, inputs)
    if not isinstance(actual, torch.Tensor) or actual.shape != inputs[0].shape:
        got = f"a tensor of shape {list(actual.shape)}" if isinstance(actual, torch.Tensor) else (
            f"a {type(actual).__name__}")
        return (f"describes a block whose forward returns {got}, not one tensor of its input's shape ({called} on "
                f"random hidden states). A registered block's forward must return one tensor of its input's shape: "
                f"return the hidden states alone (without router logits), or register the module inside it that does")
    with torch.no_grad():
        try:
            if spec.kind == "experts":
                expected = reference.experts_block(x, indices, routing, weights, spec)
            else:
                run = reference.moe_block if spec.kind == "moe" else reference.ffn_block
                expected = run(inputs[0], weights, spec)
        except Exception as err:  # sizes or settings the reference kernels cannot run
            return (f"returned a spec that moec's reference kernels cannot run on the module's weights: "
                    f"{type(err).__name__}: {err}; check its sizes and settings")
    limits = torch.full((len(x),), probe_tolerance(x.dtype))
    if spec.route is not None:
        limits += torch.finfo(x.dtype).eps * _router_logits(x, weights, spec).abs().amax(dim=-1).cpu()
    errors = row_errors(actual, expected).cpu()
    worst = int((errors - limits).argmax())
    if errors[worst] <= limits[worst]:
        return None
    difference = (actual.float() - expected.float()).abs().max().item()
    settings = " and ".join(_PART_SETTINGS[name] for name in _PART_CLASSES if getattr(spec, name) is not None)
    return (f"returned a spec that computes other outputs than {forward}: on random hidden states the largest "
            f"difference is {difference:.3g}, and a row differs by {errors[worst]:.3g} of its largest output where "
            f"the rounding of {str(x.dtype).removeprefix('torch.')} allows {limits[worst]:.2g}. Check that the "
            f"spec's {settings} and the weights' layouts (moec/frontend/blocks.py) say what forward computes")


def _probe_call(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> typing.Any:
    """``module(*inputs)`` in eval mode, without gradients; the module's mode is restored after."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return module(*inputs)
    finally:
        module.train(was_training)


def _probe_called(forward: str, spec: BlockSpec, inputs: tuple[torch.Tensor, ...]) -> str:
    """How a probe called the block's forward, for messages."""
    if spec.kind == "experts":
        return f"{forward}(hidden_states {list(inputs[0].shape)}, top_k_index, top_k_weights) (kind='experts')"
    return f"{forward}(hidden_states {list(inputs[0].shape)})"


# Candidate rows an MoE block's probe picks its 8 rows from.
PROBE_CANDIDATES = 64


def _router_logits(x: torch.Tensor, weights: dict[str, torch.Tensor], spec: BlockSpec) -> torch.Tensor:
    """``x @ router.T`` in float32, [rows, E] (without the router's biases)."""
    return F.linear(x.float(), reference.oriented_weight(weights["router"], "router", spec).float())


def _probe_rows(spec: BlockSpec, weights: dict[str, torch.Tensor], hidden: int) -> torch.Tensor:
    """8 random rows [8, H] in the dtype and device of the block's output projection, scaled to ``PROBE_PEAKS`` on the block's input
    projections. For a block with a router they are the ``PROBE_CANDIDATES`` rows whose k-th and (k+1)-th
    router logits stand furthest apart (relative to their largest), so that rounding (of bfloat16 logits, say)
    cannot change a choice of experts between the module and the reference."""
    weight = weights[OUTPUT_PROJECTION[spec.kind]]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_CANDIDATES if spec.route is not None else 8, hidden, generator=generator)
    x = x.to(weight.device)
    if spec.route is not None and 1 <= spec.route.top_k < spec.route.num_experts:
        top = _router_logits(x, weights, spec).topk(spec.route.top_k + 1, dim=-1).values
        margin = (top[:, -2] - top[:, -1]) / top.abs().amax(dim=-1).clamp_min(1e-30)
        x = x[margin.argsort(descending=True)]
    x = x[:8].to(weight.dtype)
    projections = [reference.oriented_weight(w, role, spec).reshape(-1, hidden) for role, w in weights.items()
                   if role in ("w_in", *GATE_UP_PARTS, "w_gate", "w_up")]
    return rows_reaching_probe_peaks(x, lambda rows: torch.cat([rows @ p.T for p in projections], dim=-1))

