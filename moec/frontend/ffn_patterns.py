"""Fold the dense FFNs no recognizer claimed: generic ``linear -> activation -> linear`` chains of the lowered
graph become ``ffn.dense`` ops, so that passes (``dense-to-moe``, ``quantize``) and backends see them as FFNs.

Models that write their FFN inline in a layer (OPT, BART), in a module of their own that no recognizer knows
(DistilBERT, ViT, BLOOM), or as a user's ``nn.Sequential`` all lower to the same few ATen ops. The patterns,
each mapping ``x [..., H]`` to ``[..., H]`` through ``F`` neurons:

1. **plain**: ``down(act(up(x)))``;
2. **gated**: ``down(act(gate(x)) * up(x))``, the product's operands in either order;
3. **fused gated** (Phi-3): ``g, u = split(gate_up(x), F, -1)``, then ``down(u * act(g))``; the fused weight's
   rows are split into ``w_gate`` and ``w_up`` (new weights named after it) and it is dropped when unused.

``act`` is one activation op (relu, gelu in its erf or tanh form, silu) or elementwise ops of one tensor and
Python numbers that compute one of moec's activations (``blocks.ACTIVATIONS``), which a probe on 8,097 points
decides: BLOOM's ``x * 0.5 * (1 + tanh(0.79788456 * x * (1 + 0.044715 * x * x)))`` is ``gelu_tanh``,
``x * sigmoid(1.702 * x)`` is ``quick_gelu``. Nothing outside a chain may read a value inside it (the
hidden activations stay private), every linear's weight and bias must be graph weights, and eval-mode no-ops
between the activation (or product) and ``down`` (``aten.clone``, ``aten.alias``, ``aten.dropout`` with
``train=False``) are dropped. ``match_ffn``
returns why a chain does not fold, so a test or a user can see why an FFN stayed generic.

Contract: the folded graph computes the same function: the same ATen math in the same order when the
activation was one op, and to float32 rounding when moec's activation replaces a written-out one (they agree
within 1e-6 x (1 + |value|) on the probe; 2.4e-7 for BLOOM's). A folded FFN's block is the common module
path of its weights (``model.decoder.layers.0`` for OPT's ``fc1``/``fc2``), or the up projection's module
when they share none. In place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeGuard

import torch

from moec.frontend.blocks import ACTIVATIONS, FFNSpec
from moec.ir.core import Operation, Value, WeightRef, iter_leaves, map_leaves
from moec.ir.ops import AtenOp, DenseFFNOp
from moec.ir.program import Program
from moec.ir.targets import resolve_target
from moec.ir.types import TensorType
from moec.kernels.reference import activation as reference_activation

LINEAR = "aten.linear.default"
PASS_THROUGH = {"aten.clone.default", "aten.alias.default", "aten.dropout.default"}


class NoMatch(Exception):
    """A chain does not fold; the message says why."""


@dataclass
class FFNMatch:
    """One foldable chain: its input, activation, weights (role -> weight name) and the ops it replaces;
    ``spec`` is filled in once the weights' shapes are checked."""

    x: Value
    act: str
    gated: bool
    weights: dict[str, str]
    ops: list[Operation]
    fused_rows: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # role -> (fused weight, start, stop)
    spec: FFNSpec | None = None


def fold_dense_ffns(program: Program) -> list[str]:
    """Replace every foldable chain by an ``ffn.dense`` op; returns the new ops' blocks in graph order."""
    taken = {op.block for op in program.graph.ops_of(DenseFFNOp)}
    blocks = []
    for down in [op for op in program.graph.ops if is_linear(op)]:
        match = match_ffn(down, program)
        if isinstance(match, str):
            continue
        block = block_name(match, taken)
        taken.add(block)
        rewrite(program, down, match, block)
        blocks.append(block)
    return blocks


def match_ffn(down: Operation, program: Program) -> FFNMatch | str:
    """The chain that ends at the linear ``down``, or the reason it does not fold."""
    try:
        return _match(down, program)
    except NoMatch as reason:
        return str(reason)


def _match(down: Operation, program: Program) -> FFNMatch:
    if not is_linear(down):
        raise NoMatch(f"{down.op_name} is not {LINEAR}")
    w_down, b_down = linear_weights(down)
    ops = [down]
    hidden = down.args[0]
    while (owner := single_use_producer(hidden, "the down projection's input")).op_name in PASS_THROUGH:
        if owner.op_name == "aten.dropout.default" and (len(owner.args) < 3 or owner.args[2] is not False):
            raise NoMatch("the dropout before the down projection is not in eval mode")
        ops.append(owner)
        hidden = owner.args[0]
    if owner.op_name != "aten.mul.Tensor":
        match = match_plain(hidden, program)
    else:
        try:
            match = match_gated(owner, program)
        except NoMatch as gated:  # a product can also end a written-out activation (BLOOM's GELU)
            try:
                match = match_plain(hidden, program)
            except NoMatch as plain:
                raise NoMatch(f"not gated ({gated}), nor an activation ({plain})") from None
    match.ops = ops + match.ops
    match.weights |= {"w_down": w_down} | optional("b_down", b_down)
    return checked(match, down, program)


def match_plain(hidden: Value, program: Program) -> FFNMatch:
    """``act(up(x))``."""
    act, source, act_ops = activation_chain(hidden, program)
    up = source.owner
    if not is_linear(up):
        raise NoMatch(f"the activation's input comes from {up.op_name if up else 'a graph input'}, "
                      "not a linear")
    w_up, b_up = linear_weights(up)
    return FFNMatch(up.args[0], act, False, {"w_up": w_up} | optional("b_up", b_up), [*act_ops, up])


def match_gated(product: Operation, program: Program) -> FFNMatch:
    """``act(gate(x)) * up(x)``, or the two halves of one fused ``gate_up`` linear split in two."""
    if len(product.args) != 2 or not all(isinstance(a, Value) for a in product.args):
        raise NoMatch("the product before the down projection is not of two tensors")
    for side in (0, 1):
        try:
            single_use_producer(product.args[side], "an operand of the product")
            act, gate_value, act_ops = activation_chain(product.args[side], program)
            break
        except NoMatch:
            continue
    else:
        raise NoMatch("neither operand of the product is an activation")
    up_value = product.args[1 - side]
    owner = gate_value.owner
    if owner is not None and owner.op_name == "aten.split.Tensor":
        return match_fused(product, act_ops, act, gate_value, up_value, program)
    gate, up = gate_value.owner, single_use_producer(up_value, "the up projection")
    if not (is_linear(gate) and is_linear(up)):
        raise NoMatch("the product's operands are not act(linear(x)) and linear(x)")
    if gate.args[0] is not up.args[0]:
        raise NoMatch("the gate and up projections read different inputs")
    (w_gate, b_gate), (w_up, b_up) = linear_weights(gate), linear_weights(up)
    weights = {"w_gate": w_gate, "w_up": w_up} | optional("b_gate", b_gate) | optional("b_up", b_up)
    return FFNMatch(gate.args[0], act, True, weights, [product, *act_ops, gate, up])


def match_fused(product: Operation, act_ops: list[AtenOp], act: str, gate_value: Value, up_value: Value,
                program: Program) -> FFNMatch:
    split = gate_value.owner
    if split is None or up_value.owner is not split or len(split.results) != 2 or len(up_value.uses) != 1:
        raise NoMatch("the split feeding the product does not give exactly its gate and up halves")
    width, dim = split.args[1], split.args[2] if len(split.args) > 2 else 0
    fused = single_use_producer(split.args[0], "the fused gate/up projection")
    if not is_linear(fused):
        raise NoMatch("the split's input is not a linear")
    w_fused, b_fused = linear_weights(fused)
    rows = program.graph.weights[w_fused].shape[0]
    rank = split.args[0].tensor_type.rank
    if not isinstance(width, int) or dim not in (-1, rank - 1) or rows != 2 * width:
        raise NoMatch("the split does not cut the fused projection's output into two halves on its last dim")
    gate_half = gate_value.index
    spans = {"w_gate": (w_fused, gate_half * width, (gate_half + 1) * width),
             "w_up": (w_fused, (1 - gate_half) * width, (2 - gate_half) * width)}
    if b_fused is not None:
        spans |= {"b_gate": (b_fused, *spans["w_gate"][1:]), "b_up": (b_fused, *spans["w_up"][1:])}
    return FFNMatch(fused.args[0], act, True, {}, [product, *act_ops, split, fused], spans)


ACTIVATION_TARGETS = {"aten.relu.default", "aten.gelu.default", "aten.silu.default"}
# Elementwise ops an activation may be written with (BLOOM's tanh GELU, x * sigmoid(1.702 x) ...).
ELEMENTWISE = ACTIVATION_TARGETS | {
    "aten.mul.Tensor", "aten.add.Tensor", "aten.sub.Tensor", "aten.div.Tensor", "aten.rsub.Scalar",
    "aten.neg.default", "aten.tanh.default", "aten.sigmoid.default", "aten.erf.default", "aten.exp.default",
    "aten.pow.Tensor_Scalar",
}
MAX_FORMULA_OPS = 16
PROBE = torch.cat([torch.linspace(-10.0, 10.0, 4001), 3 * torch.randn(4096, generator=torch.Generator().manual_seed(0))])
PROBE_TOLERANCE = 1e-6  # relative to 1 + |activation|: float32 rounding of a rewritten formula, not another function


def activation_chain(value: Value, program: Program) -> tuple[str, Value, list[AtenOp]]:
    """(``FFNSpec.act`` name, its input, the ops computing it, last first) of an activation ending at ``value``.

    One activation op, or elementwise ops of one input tensor (and Python numbers) whose values on a probe
    of 8,097 points agree with one of moec's activations to float32 rounding. Nothing outside the ops may
    read their results or their input.
    """
    owner = value.owner
    if isinstance(owner, AtenOp) and owner.target in ACTIVATION_TARGETS:
        single_use_producer(owner.args[0], "the activation's input")
        return activation_of(owner), owner.args[0], [owner]
    ops, sources = formula_ops(value)
    if len(sources) != 1:
        raise NoMatch(f"{owner.op_name if owner else 'an input'} is no activation: it reads {len(sources)} tensors")
    (source,) = sources
    single_use_producer(source, "the activation's input", allowed_users=ops)
    inside = {id(op) for op in ops}
    for op in ops:
        outside = [use.op for result in op.results if result is not value for use in result.uses
                   if id(use.op) not in inside]
        if outside:
            raise NoMatch(f"{op.op_name} inside the activation is also read by {outside[0].op_name}")
    order = {id(op): index for index, op in enumerate(program.graph.ops)}
    ops.sort(key=lambda op: -order[id(op)])
    return probe_activation(ops, source), source, ops


def formula_ops(value: Value) -> tuple[list[AtenOp], list[Value]]:
    """The elementwise ops that compute ``value``, and the tensors they read from outside."""
    ops: dict[int, AtenOp] = {}
    sources: dict[int, Value] = {}
    stack = [value]
    while stack:
        current = stack.pop()
        op = current.owner
        if not (isinstance(op, AtenOp) and op.target in ELEMENTWISE):
            if current is value:
                raise NoMatch(f"{op.op_name if op else 'a graph input'} is not an activation")
            sources[id(current)] = current
            continue
        if id(op) in ops:
            continue
        if any(not isinstance(leaf, (Value, int, float, str)) for leaf in iter_leaves((op.args, op.kwargs))):
            raise NoMatch(f"{op.op_name} in the activation reads a weight or a non-scalar constant")
        ops[id(op)] = op
        if len(ops) > MAX_FORMULA_OPS:
            raise NoMatch(f"the elementwise ops before the down projection are more than {MAX_FORMULA_OPS}")
        stack.extend(op.operands)
    return list(ops.values()), list(sources.values())


def probe_activation(ops: list[AtenOp], source: Value) -> str:
    """The activation the elementwise ``ops`` (last first) compute from ``source``, found by probing."""
    env = {id(source): PROBE}
    for op in reversed(ops):
        args, kwargs = map_leaves((op.args, op.kwargs), lambda leaf: env[id(leaf)] if isinstance(leaf, Value) else leaf)
        env[id(op.result)] = resolve_target(op.target)(*args, **kwargs)
    out = env[id(ops[0].result)]
    for name in ACTIVATIONS:
        expected = reference_activation(name)(PROBE)
        if out.shape == expected.shape and ((out - expected).abs() <= PROBE_TOLERANCE * (1 + expected.abs())).all():
            return name
    raise NoMatch(f"the elementwise ops before the down projection ({', '.join(op.op_name for op in ops)}) "
                  f"compute none of {', '.join(ACTIVATIONS)}")


def activation_of(op: Operation) -> str:
    """The ``FFNSpec.act`` name of an activation op."""
    if op.op_name == "aten.gelu.default":
        approximate = op.kwargs.get("approximate", op.args[1] if len(op.args) > 1 else "none")
        return {"none": "gelu", "tanh": "gelu_tanh"}[approximate]
    return op.op_name.split(".")[1]


def checked(match: FFNMatch, down: Operation, program: Program) -> FFNMatch:
    """Fill in the spec's sizes; the chain must map [..., H] to [..., H] with weights of matching shapes."""
    x_type = match.x.tensor_type if isinstance(match.x, Value) else None
    if x_type is None or down.result.type != x_type:
        raise NoMatch(f"the chain maps {x_type} to {down.result.type}; an FFN keeps the shape")
    shapes = {role: program.graph.weights[name].static_shape for role, name in match.weights.items()}
    for role, (name, start, stop) in match.fused_rows.items():
        shapes[role] = (stop - start, *program.graph.weights[name].static_shape[1:])
        if split_weight_name(name, role) in program.graph.weights:
            raise NoMatch(f"weight name {split_weight_name(name, role)!r} for the split {name} is taken")
    hidden, neurons = x_type.shape[-1], shapes["w_down"][-1]
    if not isinstance(hidden, int):
        raise NoMatch(f"the chain's hidden size {hidden} is symbolic")
    expected = {"w_gate": (neurons, hidden), "w_up": (neurons, hidden), "w_down": (hidden, neurons),
                "b_gate": (neurons,), "b_up": (neurons,), "b_down": (hidden,)}
    for role, shape in shapes.items():
        if shape != expected[role]:
            raise NoMatch(f"weight {role} has shape {list(shape)}, expected {list(expected[role])}")
    has_bias = any(role.startswith("b_") for role in shapes)
    match.spec = FFNSpec(hidden, neurons, match.act, match.gated, has_bias=has_bias)
    return match


def rewrite(program: Program, down: Operation, match: FFNMatch, block: str) -> None:
    graph = program.graph
    weights = dict(match.weights)
    for role, (name, start, stop) in match.fused_rows.items():
        new_name = split_weight_name(name, role)
        tensor = program.weights[name][start:stop].clone()
        program.weights[new_name] = tensor
        graph.weights[new_name] = TensorType.of(tensor)
        weights[role] = new_name
    order = [role for role in ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down") if role in weights]
    ffn = DenseFFNOp.build([match.x], {role: weights[role] for role in order}, match.spec, [match.x.type], block)
    graph.insert_before(down, ffn)
    down.result.replace_all_uses_with(ffn.result)
    graph.set_outputs([ffn.result if value is down.result else value for value in graph.outputs])
    for op in match.ops:  # from the down projection back to the input: each op's users are gone by then
        graph.erase(op)
    if match.fused_rows:  # the fused weight, unless something else still reads it
        for name in {name for name, _, _ in match.fused_rows.values()} - graph.used_weights():
            del graph.weights[name]
            program.weights.pop(name, None)


def split_weight_name(fused: str, role: str) -> str:
    """``layers.0.mlp.gate_up_proj.weight`` -> ``layers.0.mlp.gate_up_proj.gate.weight`` for ``w_gate``."""
    module, leaf = fused.rsplit(".", 1) if "." in fused else ("", fused)
    return f"{module}.{role[2:]}.{leaf}".lstrip(".")


def block_name(match: FFNMatch, taken: set[str]) -> str:
    """The common module path of the chain's weights; the up projection's module when that is empty or taken;
    with ``#2``, ``#3`` ... after it while that is taken too (one module called several times: ALBERT's shared
    layer), so that every FFN op names its own block."""
    names = list(match.weights.values()) + [name for name, _, _ in match.fused_rows.values()]
    modules = [name.rsplit(".", 1)[0].split(".") if "." in name else [] for name in names]
    common = []
    for parts in zip(*modules, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    block = ".".join(common)
    if not block or block in taken:
        up = match.weights.get("w_up") or match.fused_rows["w_up"][0]
        block = up.rsplit(".", 1)[0] if "." in up else up
    base, call = block, 1
    while block in taken:
        call += 1
        block = f"{base}#{call}"
    return block


def is_linear(op: Operation | None) -> TypeGuard[AtenOp]:
    return isinstance(op, AtenOp) and op.target == LINEAR


def linear_weights(op: Operation) -> tuple[str, str | None]:
    """(weight name, bias name or None) of a linear whose weight and bias are graph weights."""
    args = list(op.args) + [op.kwargs[k] for k in ("bias",) if k in op.kwargs]
    weight, bias = args[1], args[2] if len(args) > 2 else None
    if not isinstance(weight, WeightRef) or not (bias is None or isinstance(bias, WeightRef)):
        raise NoMatch("a linear's weight or bias is computed, not a graph weight")
    return weight.name, None if bias is None else bias.name


def single_use_producer(value: object, what: str, allowed_users: Sequence[Operation] | None = None) -> AtenOp:
    """The generic op that computes ``value``, which nothing else may read (but ``allowed_users``, all of
    them, when given; else exactly one op)."""
    if not isinstance(value, Value) or value.owner is None:
        raise NoMatch(f"{what} is not computed by an op of the graph")
    if allowed_users is None:
        read_elsewhere = len(value.uses) != 1
    else:
        read_elsewhere = bool({id(use.op) for use in value.uses} - {id(op) for op in allowed_users})
    if read_elsewhere:
        raise NoMatch(f"{what} has {len(value.uses)} uses; folding would hide it from the others")
    if not isinstance(value.owner, AtenOp):
        raise NoMatch(f"{what} comes from {value.owner.op_name}")
    return value.owner


def optional(role: str, name: str | None) -> dict[str, str]:
    return {} if name is None else {role: name}


