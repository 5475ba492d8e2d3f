"""Lower an exported program (torch.export, with moec block ops) to a moec ``Program``.

Contract:
  * ``moec.moe_block`` nodes become ``moe.route`` + ``moe.experts`` (+ ``moe.shared_expert`` and an add);
    ``moec.ffn`` nodes become ``ffn.dense``; ``moec.experts`` nodes (routed experts given the choice of
    the model's own router code) become ``moe.experts``. Their weights are referenced by parameter name.
  * Every other ATen node becomes a generic ``AtenOp``; Python scalar arithmetic on sizes becomes ``py.*``.
  * Lifted parameters, buffers and constants become graph weights; runtime asserts are dropped.
  * Roles a recognizer marked ``transposed`` are stored transposed in the program's weights, roles it
    marked ``interleaved`` with their gate rows first, and roles it marked ``flattened`` as (E, R, C). A
    ``w_in`` given as gate and up parts becomes one new weight, ``<block>.w_in``; the parts are dropped
    unless another op reads them.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch.export import ExportedProgram
from torch.export.graph_signature import OutputKind

from moec.errors import CaptureError
from moec.frontend.blocks import GATE_UP_PARTS, ROUTER_BIAS_ROLES, BlockSpec, required_part
from moec.ir.core import Graph, Value, WeightRef
from moec.ir.ops import AtenOp, DenseFFNOp, ExpertsOp, RouteOp, SharedExpertOp
from moec.ir.program import Program, dump_treespec
from moec.ir.targets import PY_NAMES
from moec.ir.types import IndexType, TensorType, Type
from moec.kernels.reference import joined_gate_up, oriented_weight

BLOCK_TARGETS = {"moec.moe_block.default", "moec.ffn.default", "moec.experts.default"}
DROPPED_TARGETS = {
    "aten._assert_tensor_metadata.default",
    "aten._assert_scalar.default",
    "aten.sym_constrain_range_for_size.default",
    "aten.sym_constrain_range.default",
    "aten._assert_async.msg",
}
FFN_ROLES = ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")


def lower(ep: ExportedProgram) -> Program:
    """Turn an exported program into a verified-shape moec program (run ``verify`` on the graph)."""
    return Lowering(ep).run()


class Lowering:
    def __init__(self, ep: ExportedProgram) -> None:
        self.ep = ep
        self.graph = Graph()
        self.weights: dict[str, torch.Tensor] = {}
        self.env: dict[torch.fx.Node, Any] = {}
        self.joined_parts: set[str] = set()  # weights joined into another one (gate and up parts)
        signature = ep.graph_signature
        self.weight_sources = {
            **signature.inputs_to_parameters,
            **signature.inputs_to_buffers,
            **signature.inputs_to_lifted_tensor_constants,
        }

    def run(self) -> Program:
        for node in self.ep.graph.nodes:
            if node.op == "placeholder":
                self.lower_placeholder(node)
            elif node.op == "call_function":
                self.lower_call(node)
            elif node.op == "output":
                returned = self.user_outputs(node.args[0])
                constant = next((i for i, n in enumerate(returned) if not isinstance(n, torch.fx.Node)), None)
                if constant is not None:  # None, a number: export keeps it in the output, no node computes it
                    raise CaptureError(
                        f"the model returns {returned[constant]!r} (output {constant} of its flattened result) beside "
                        "its tensors; moec compiles tensor outputs only: return tensors alone (leave None entries "
                        "out, or return a dict or a ModelOutput without them)")
                outputs = [self.env[n] for n in returned]
                if not all(isinstance(v, Value) for v in outputs):
                    raise CaptureError("the model returns a non-tensor output; moec compiles tensor outputs only")
                self.graph.set_outputs(outputs)
            else:
                raise CaptureError(f"unsupported graph node kind {node.op!r} ({node.target})")
        for name in self.joined_parts - self.graph.used_weights():
            del self.weights[name], self.graph.weights[name]
        return Program(
            graph=self.graph,
            weights=self.weights,
            in_spec=dump_treespec(self.ep.call_spec.in_spec),
            out_spec=dump_treespec(self.ep.call_spec.out_spec),
        )

    def user_outputs(self, returned: Sequence[Any]) -> list[Any]:
        """The model's own outputs among the graph's ``returned`` values. The others are the new values of
        buffers the model writes while it runs (Phi-3's longrope sets ``inv_freq`` for the call's length): left
        out where the graph never reads the old value, so that no call depends on what an earlier one wrote;
        state carried from call to call, or an input changed in place, is refused."""
        signature = self.ep.graph_signature
        placeholders = {node.name: node for node in self.ep.graph.nodes if node.op == "placeholder"}
        read_from = {spec.target: placeholders[spec.arg.name] for spec in signature.input_specs
                     if spec.target is not None and hasattr(spec.arg, "name")}
        outputs = []
        for value, spec in zip(returned, signature.output_specs, strict=True):
            if spec.kind == OutputKind.USER_OUTPUT:
                outputs.append(value)
                continue
            old = read_from.get(spec.target) if spec.kind == OutputKind.BUFFER_MUTATION else None
            if old is None or any(str(user.target) not in DROPPED_TARGETS for user in old.users):
                what = (f"writes buffer {spec.target!r} in place and reads it, so each call depends on the calls "
                        "before it" if spec.kind == OutputKind.BUFFER_MUTATION else
                        f"changes {spec.target or 'an input'} in place ({spec.kind.name.lower()})")
                raise CaptureError(f"the model {what}; moec compiles models whose calls depend only on their "
                                   "inputs: keep such state outside the model's forward")
        return outputs

    # -- nodes ----------------------------------------------------------------------------
    def lower_placeholder(self, node: torch.fx.Node) -> None:
        source = self.weight_sources.get(node.name)
        if source is not None:
            tensor = self.ep.state_dict.get(source)
            if tensor is None:
                tensor = self.ep.constants[source]
            self.add_weight(source, tensor.detach())
            self.env[node] = WeightRef(source)
            return
        value = node.meta.get("val")
        if value is None:
            raise CaptureError(f"model input {node.name!r} is None in the example; leave it out of the example (a "
                               "keyword argument left out takes its default; pass the inputs after it by keyword)")
        if not isinstance(value, torch.Tensor):
            raise CaptureError(
                f"model input {node.name!r} is a {type(value).__name__}; moec compiles tensor inputs only "
                "(pass other arguments as Python constants to the model before compiling)"
            )
        name = re.sub(r"\W", "_", node.name)
        self.env[node] = self.graph.add_input(name, TensorType.of(value))

    def lower_call(self, node: torch.fx.Node) -> None:
        target = node.target
        if target is operator.getitem:
            producer, index = node.args
            self.env[node] = self.lowered(producer)[index]
            return
        name = target_name(target)
        if name in DROPPED_TARGETS:
            return
        if name in BLOCK_TARGETS:
            self.env[node] = self.lower_block(node)
            return
        if name is None:
            raise CaptureError(f"unsupported operation {target} {source_location(node)}")
        if not name.startswith(("aten.", "py.")):
            raise CaptureError(
                f"operation {name} (a custom op of the {name.split('.')[0]!r} library) {source_location(node)}: "
                "moec carries ATen ops only; register that block with moec.register_moe_block, or make the "
                "module run plain torch ops"
            )
        args = self.map_args(node.args)
        kwargs = self.map_args(dict(node.kwargs))
        constant = node.meta.get("val")
        if name.startswith("py.") and isinstance(constant, (int, float, bool)):
            self.env[node] = constant  # arithmetic on static sizes: already folded
            return
        result_types = result_types_of(node)
        op = self.graph.append(AtenOp(name, args, kwargs, result_types))
        val = node.meta.get("val")
        self.env[node] = list(op.results) if isinstance(val, (list, tuple)) else (op.results[0] if op.results else None)

    def lower_block(self, node: torch.fx.Node) -> Value:
        x_node, *routing_nodes, weight_nodes, config = node.args
        if not isinstance(weight_nodes, (list, tuple)) or not isinstance(config, str):
            raise CaptureError(f"{node.target} {source_location(node)} is not given its weights and config")
        spec = BlockSpec.from_json(config)
        x = self.lowered(x_node)
        names = {}
        for role, weight_node in zip(spec.roles, weight_nodes, strict=True):
            ref = self.env.get(weight_node)
            if not isinstance(ref, WeightRef):
                raise CaptureError(f"block {spec.module}: weight {role!r} is computed, not a parameter or buffer")
            names[role] = ref.name
            if {role} & {*spec.transposed, *spec.interleaved, *spec.flattened, *ROUTER_BIAS_ROLES}:
                self.add_weight(ref.name, oriented_weight(self.weights[ref.name], role, spec).contiguous())
        if all(part in names for part in GATE_UP_PARTS):
            names["w_in"] = self.joined_w_in(spec, [names.pop(part) for part in GATE_UP_PARTS])
        x_type = x.tensor_type
        expert_weights: dict[str, str] = {role: names[role] for role in ("w_in", "w_out", "b_in", "b_out")
                                          if role in names}
        if spec.kind == "experts":
            routing = [self.lowered(n) for n in routing_nodes]
            return self.graph.append(ExpertsOp.build([x, *routing], expert_weights, spec.experts, [x_type],
                                                     spec.module)).result
        if spec.kind == "ffn":
            weights = {role: names[role] for role in FFN_ROLES if role in names}
            return self.graph.append(DenseFFNOp.build([x], weights, spec.ffn, [x_type], spec.module)).result
        route_weights: dict[str, str] = {role: names[role] for role in ("router", *ROUTER_BIAS_ROLES) if role in names}
        k = required_part(spec.route, "route", spec).top_k
        route = self.graph.append(RouteOp.build(
            [x], route_weights, spec.route,
            [TensorType("i64", (*x_type.shape[:-1], k)), TensorType("f32", (*x_type.shape[:-1], k))],
            spec.module,
        ))
        routed = self.graph.append(
            ExpertsOp.build([x, *route.results], expert_weights, spec.experts, [x_type], spec.module)
        )
        if spec.shared is None:
            return routed.result
        shared_weights = {role[len("shared_"):]: name for role, name in names.items() if role.startswith("shared_")}
        shared = self.graph.append(SharedExpertOp.build([x], shared_weights, spec.shared, [x_type], spec.module))
        return self.graph.append(AtenOp("aten.add.Tensor", (routed.result, shared.result), {}, [x_type])).result

    def joined_w_in(self, spec: BlockSpec, parts: list[str]) -> str:
        """The name of a new weight ``<block>.w_in`` joined from the (oriented) gate and up ``parts``."""
        name = f"{spec.module}.w_in".lstrip(".")
        if name in self.weights:
            raise CaptureError(f"block {spec.module}: the name {name!r} for its joined w_in is taken by a weight")
        self.add_weight(name, joined_gate_up(*(self.weights[part] for part in parts)))
        self.joined_parts.update(parts)
        return name

    # -- helpers --------------------------------------------------------------------------
    def add_weight(self, name: str, tensor: torch.Tensor) -> None:
        self.weights[name] = tensor
        self.graph.weights[name] = TensorType.of(tensor)

    def lowered(self, arg: torch.fx.node.Argument) -> Any:
        """What the graph node ``arg`` was lowered to."""
        if not isinstance(arg, torch.fx.Node):
            raise CaptureError(f"expected a graph node, got {arg!r}")
        return self.env[arg]

    def map_args(self, tree: Any) -> Any:
        if isinstance(tree, torch.fx.Node):
            return self.env[tree]
        if isinstance(tree, (list, tuple)):
            return [self.map_args(item) for item in tree]
        if isinstance(tree, dict):
            return {key: self.map_args(item) for key, item in tree.items()}
        return tree


def target_name(target: Any) -> str | None:
    """The IR name of an fx call target, or None if the IR cannot carry it."""
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    return PY_NAMES.get(target)


def result_types_of(node: torch.fx.Node) -> list[Type]:
    val = node.meta.get("val")
    values = val if isinstance(val, (list, tuple)) else ([] if val is None else [val])
    types: list[Type] = []
    for item in values:
        if isinstance(item, torch.Tensor):
            types.append(TensorType.of(item))
        elif isinstance(item, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)):
            types.append(IndexType())
        else:
            raise CaptureError(f"operation {node.target} returns {type(item).__name__} {source_location(node)}")
    return types


def source_location(node: torch.fx.Node) -> str:
    """Where a node came from in the model: its module path and the user's source line."""
    stack = node.meta.get("nn_module_stack") or {}
    module = next(reversed(stack.values()))[0] if stack else "<model>"
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    line = trace[-2].strip() if len(trace) >= 2 else ""
    return f"in module {module!r}" + (f" at {line}" if line else "")
