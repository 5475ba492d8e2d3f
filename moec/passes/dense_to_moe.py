"""``dense-to-moe``: split each dense FFN into experts with a router (MoEfication), without retraining.

For each chosen ``ffn.dense`` op (GELU/ReLU MLPs and gated SiLU MLPs), with F neurons:

1. **Shared expert** (``shared`` > 0, needs calibration): the ``round(shared * F)`` neurons most often
   active on calibration tokens become an always-on ``moe.shared_expert``.
2. **Experts**: the other neurons are split into ``experts`` clusters of equal size by balanced spherical
   k-means (``moec.analysis.neuron_clustering``) of either their input weight vectors (``method="weights"``:
   the up row, with the gate row first for gated MLPs) or their activations on calibration tokens
   (``method="coactivation"``: neurons that fire together share an expert). The default is
   ``"coactivation"`` whenever the pass calibrates anyway (a fitted router or a shared expert), else
   ``"weights"``: on MiniLM at half the FFN, coactivation experts keep embedding cosine 0.897 against
   0.860 (``tools/bench/dense_to_moe.py``, docs/BENCHMARKS.md).
3. **Mean compensation** (with calibration): a skipped expert contributes its mean output ``m_e`` over the
   calibration tokens instead of nothing. Each expert gets the output bias ``-m_e`` and ``sum_e m_e`` joins the
   FFN's output bias, so ``y = sum_chosen (f_e(x) - m_e) + b_down + sum_e m_e`` (exact when all experts run).
   GELU neurons are rarely exactly zero, so this removes the systematic shift that dropping them causes.
4. **Router** (``router``): ``"centroid"`` scores an expert by ``x . c`` where ``c`` is the mean of its
   neurons' unit input weight vectors; ``"fitted"`` (needs calibration) is a ridge least-squares fit, on the
   calibration FFN inputs, of each expert's true output norm ``|f_e(x) - m_e|`` from ``[x, 1]``.
   The ``top_k`` best-scoring experts run for a token, each with weight exactly 1 (a sum of neuron groups,
   like the dense FFN it replaces): the route op scores the chosen logits by softmax and scales by
   ``top_k``, and the router weight and bias are stored multiplied by 2^-32, which leaves the choice
   unchanged (a power-of-two scale is exact in floating point) and makes that softmax uniform to ~1e-9.

The op ``%y = ffn.dense(%x, ...)`` becomes::

    %idx, %w = moe.route(%x, router=@B.router.weight, router_bias=@B.router.bias, ...)
    %e = moe.experts(%x, %idx, %w, w_in=@B.experts.w_in, w_out=@B.experts.w_out, b_in=...)
    %s = moe.shared_expert(%x, ...)                       (with a shared expert)
    %t = aten.add.Tensor(%e, %s)
    %y2 = aten.add.Tensor(%t, @B.moe.output_bias)          (or the FFN's own output bias, uncompensated)

where ``B`` is the op's block. The FFN's output bias belongs to no routed expert, so it is added on its own.

Requires: a verified graph whose chosen FFNs have float weights (run before quantize); calibration (``context.statistics``) when ``shared > 0``, ``router="fitted"``
or ``method="coactivation"``. Ensures: every chosen ``ffn.dense`` op is replaced as above; with
``top_k == experts`` and no shared expert the block computes the same function as before (to float32
rounding); the replaced op's weights are removed. Options wrong for any model (``top_k`` > ``experts``,
an empty ``layers``) are refused when the pass is built, before a model loads; those wrong for a layer (more
experts than neurons, neurons that do not divide, a ``shared`` too small for one neuron, a repeated
``layers`` entry) are reported for the first offending block before anything is changed. In place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from moec.analysis.neuron_clustering import balanced_kmeans
from moec.errors import PassError, warn
from moec.frontend.blocks import ExpertsSpec, FFNSpec, RouteSpec
from moec.ir.core import Operation, Value, WeightRef
from moec.ir.ops import AtenOp, DenseFFNOp, ExpertsOp, RouteOp, SharedExpertOp
from moec.ir.program import Program
from moec.ir.types import TensorType, Type
from moec.passes.base import Pass, PassContext, PassResult, check_float_weights, register_pass

METHODS = ("weights", "coactivation")
ROUTERS = ("fitted", "centroid")
ROUTER_SCALE = 2.0**-32  # see the module docstring: uniform weights over the chosen experts
RIDGE = 1e-3  # relative to the mean diagonal of the normal equations


@dataclass(frozen=True)
class ExpertLayout:
    """How one FFN's neurons are split: the shared expert's neurons and each routed expert's neurons."""

    shared: torch.Tensor  # [S] neuron ids
    experts: torch.Tensor  # [E, F_e] neuron ids


@register_pass
@dataclass(frozen=True)
class DenseToMoE(Pass):
    name = "dense-to-moe"
    approximate = True
    calibration_when = "with router fitted, method coactivation or shared above 0"

    experts: int = 8
    top_k: int = 2
    shared: float = 0.0
    method: str | None = None  # None: "coactivation" when the pass calibrates anyway, else "weights"
    router: str = "fitted"
    layers: tuple[str | int, ...] | None = None  # blocks (op.block) or indices among the ffn.dense ops left

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {', '.join(METHODS)}")
        if self.router not in ROUTERS:
            raise ValueError(f"router={self.router!r} is not one of {', '.join(ROUTERS)}")
        if not 0.0 <= self.shared < 1.0:
            raise ValueError(f"shared={self.shared} must be a fraction in [0, 1)")
        if self.experts < 1:
            raise ValueError(f"experts={self.experts} must be at least 1")
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"top_k={self.top_k} must be in 1..experts={self.experts} (every layer gets "
                             f"{self.experts} experts)")
        if self.layers is not None:
            if not self.layers:
                raise ValueError("layers=[] chooses no FFN; list blocks or indices, or leave layers out to convert "
                                 "every ffn.dense op")
            object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def clustering(self) -> str:
        """``method``, or its default: ``"coactivation"`` when a fitted router or a shared expert needs
        calibration anyway, else ``"weights"``."""
        if self.method is not None:
            return self.method
        return "coactivation" if self.shared > 0 or self.router == "fitted" else "weights"

    def needs_calibration(self) -> bool:
        return self.shared > 0 or self.router == "fitted" or self.clustering == "coactivation"

    def run(self, program: Program, context: PassContext) -> PassResult:
        ops = self.chosen_ops(program)
        for op in ops:
            self.check_options(program, op)
        if not ops:
            return PassResult(False, note="the program has no ffn.dense ops to split into experts")
        stats = context.statistics(program, needed_by=f"pass {self.name!r}") if self.needs_calibration() else None
        rounding: dict[str, float] = {}  # block -> its mean compensation's rounding, relative to its output
        blocks = [op.block for op in ops]
        for op in ops:
            dense_stats = stats.dense.get(op.block) if stats is not None else None
            if stats is not None and dense_stats is None:
                raise PassError(f"block {op.block!r}: calibration has no statistics for it")
            layout = self.split(program, op, dense_stats)
            outputs = expert_outputs(program, op, layout, dense_stats) if dense_stats is not None else None
            if outputs is not None:
                rounding[op.block] = compensation_rounding(program, op, outputs.mean(1), dense_stats)
            self.rewrite(program, op, layout, dense_stats, outputs)
        worst = max(rounding, key=rounding.__getitem__, default=None)
        if worst is not None and rounding[worst] > COMPENSATION_ROUNDING_WARNING:
            warn(f"dense-to-moe: the mean compensation's terms, stored in the model's half-precision dtype, round by "
                 f"about {rounding[worst]:.1%} of the FFN output's RMS in block {worst!r} (terms that should cancel in "
                 "the converted layer's sum); convert a float32 model for the most faithful result")
        return PassResult(True, {"layers": len(ops), "blocks": blocks, "experts": self.experts,
                                 "top_k": self.top_k, "method": self.clustering})

    def chosen_ops(self, program: Program) -> list[DenseFFNOp]:
        ops = program.graph.ops_of(DenseFFNOp)
        if self.layers is None:
            return ops
        by_block = {op.block: op for op in ops}
        chosen = []
        for layer in self.layers:
            if isinstance(layer, int) and 0 <= layer < len(ops):
                chosen.append(ops[layer])
            elif layer in by_block:
                chosen.append(by_block[layer])
            elif layer in {op.block for op in program.graph.ops_of(ExpertsOp)}:
                raise PassError(f"layers: block {layer!r} already runs routed experts (the model's own MoE, or an "
                                "earlier dense-to-moe); list ffn.dense blocks only")
            else:
                raise PassError(f"layers: {layer!r} is neither an ffn.dense block ({', '.join(by_block)}) "
                                f"nor an index below {len(ops)}")
            if chosen[-1] in chosen[:-1]:
                raise PassError(f"layers: {layer!r} names block {chosen[-1].block!r} a second time; "
                                "list each FFN once")
        return chosen

    def shared_count(self, op: DenseFFNOp) -> int:
        return round(self.shared * op.spec.intermediate)

    def check_options(self, program: Program, op: DenseFFNOp) -> None:
        where = f"block {op.block!r}"
        check_float_weights(program, self.name, op.block, [ref.name for ref in op.weight_refs])
        width = op.spec.intermediate
        if self.shared > 0 and self.shared_count(op) < 1:
            raise PassError(f"{where}: shared={self.shared} gives the shared expert no neuron (round(shared * "
                            f"{width}) = 0 of the FFN's {width}); use shared >= {1 / width:.4g} (one neuron), or "
                            "shared=0 for no shared expert")
        routed = width - self.shared_count(op)
        if routed < 1:
            raise PassError(f"{where}: shared={self.shared} puts all {width} neurons of the FFN in the shared expert "
                            f"(round(shared * {width}) = {self.shared_count(op)}), leaving none to route; use shared <= "
                            f"{(width - self.experts) / width:.4g} to leave one neuron for each of experts={self.experts}")
        if self.experts > routed and self.shared_count(op):
            raise PassError(f"{where}: shared={self.shared} leaves {routed} of the FFN's {width} neurons to route "
                            f"(round(shared * {width}) = {self.shared_count(op)} shared), fewer than experts="
                            f"{self.experts}; use shared <= {(width - self.experts) / width:.4g}, or fewer experts")
        if self.experts > routed:
            raise PassError(f"{where}: experts={self.experts} must be in 1..{routed} (the FFN's routed neurons)")
        if routed % self.experts:
            raise PassError(f"{where}: the {routed} routed neurons (FFN width {op.spec.intermediate}, shared="
                            f"{self.shared}) do not split into experts={self.experts} equal experts; "
                            "choose a divisor or change shared")

    # ---- deciding the split ------------------------------------------------------------------------------

    def split(self, program: Program, op: DenseFFNOp, stats: Any) -> ExpertLayout:
        neurons = op.spec.intermediate
        shared_count = self.shared_count(op)
        if shared_count:
            shared = torch.argsort(stats.frequency, descending=True, stable=True)[:shared_count].sort().values
        else:
            shared = torch.zeros(0, dtype=torch.int64)
        routed_mask = torch.ones(neurons, dtype=torch.bool)
        routed_mask[shared] = False
        routed = torch.arange(neurons)[routed_mask]
        if self.clustering == "weights":
            features = input_vectors(program, op)[routed]
        else:
            features = stats.hidden[:, routed].T
        cluster = balanced_kmeans(features, self.experts)
        experts = torch.stack([routed[cluster == e] for e in range(self.experts)])
        return ExpertLayout(shared, experts)

    def router_weights(self, program: Program, op: DenseFFNOp, layout: ExpertLayout, stats: Any,
                       outputs: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(router [E, H], bias [E]) before scaling; ``outputs`` as ``expert_outputs`` gives them."""
        if self.router == "centroid":
            unit = torch.nn.functional.normalize(weight(program, op, "w_gate" if op.spec.gated else "w_up").float(), dim=1)
            return unit[layout.experts].mean(1), torch.zeros(self.experts)
        assert outputs is not None, "the fitted router needs calibration (needs_calibration)"
        deviations = (outputs - outputs.mean(1, keepdim=True)).norm(dim=-1)  # [E, N]
        return fit_linear(stats.inputs.float(), deviations.T)

    # ---- rewriting the graph -----------------------------------------------------------------------------

    def rewrite(self, program: Program, op: DenseFFNOp, layout: ExpertLayout, stats: Any,
                outputs: torch.Tensor | None) -> None:
        """Replace ``op`` by the route and experts ops of ``layout`` (and its shared expert); ``outputs``
        [E, N, H] are the experts' outputs on the calibration rows, whose means the compensation subtracts
        (None without calibration)."""
        means = outputs.mean(1) if outputs is not None else None
        graph = program.graph
        spec = op.spec
        x = op.args[0]
        prefix = op.block or op.required_weight("w_up").name.rsplit(".", 1)[0]
        dtype = weight(program, op, "w_up").dtype
        new_weights: dict[str, torch.Tensor] = {}

        def add_weight(suffix: str, tensor: torch.Tensor) -> WeightRef:
            name = f"{prefix}.moe.{suffix}"
            if name in graph.weights:
                raise PassError(f"block {op.block!r}: weight name {name!r} is taken")
            new_weights[name] = tensor.to(dtype).contiguous()
            return WeightRef(name)

        router, bias = self.router_weights(program, op, layout, stats, outputs)
        route_spec = RouteSpec(num_experts=self.experts, top_k=self.top_k, order="topk_then_score",
                               scaling=float(self.top_k), has_bias=True)
        lead = x.tensor_type.shape[:-1]
        route_types: list[Type] = [TensorType("i64", (*lead, self.top_k)),
                                   TensorType("f32", (*lead, self.top_k))]
        route_weights = {"router": add_weight("router.weight", router * ROUTER_SCALE),
                         "router_bias": add_weight("router.bias", bias * ROUTER_SCALE)}
        # The route op computes its logits in float32 whatever the model's dtype; keep the router exact.
        for ref in route_weights.values():
            new_weights[ref.name] = new_weights[ref.name].float()
        route = RouteOp.build([x], {k: v.name for k, v in route_weights.items()}, route_spec, route_types, op.block)

        ids = layout.experts  # [E, F_e]
        w_in_rows = [weight(program, op, "w_up")[ids]]
        b_in_parts = [bias_or_zeros(program, op, "b_up", spec.intermediate)[ids]]
        if spec.gated:
            w_in_rows.insert(0, weight(program, op, "w_gate")[ids])
            b_in_parts.insert(0, bias_or_zeros(program, op, "b_gate", spec.intermediate)[ids])
        expert_weights = {
            "w_in": add_weight("experts.w_in", torch.cat(w_in_rows, dim=1)),
            "w_out": add_weight("experts.w_out", weight(program, op, "w_down")[:, ids].permute(1, 0, 2)),
        }
        if op.weight("b_up") is not None or op.weight("b_gate") is not None:
            expert_weights["b_in"] = add_weight("experts.b_in", torch.cat(b_in_parts, dim=1))
        if means is not None:
            expert_weights["b_out"] = add_weight("experts.b_out", -means)
        experts_spec = ExpertsSpec(num_experts=self.experts, hidden=spec.hidden, intermediate=ids.shape[1],
                                   act=spec.act, gated=spec.gated, limit=spec.limit, up_offset=spec.up_offset)
        experts = ExpertsOp.build([x, *route.results], {k: v.name for k, v in expert_weights.items()},
                                  experts_spec, [x.type], op.block)
        new_ops: list[Operation] = [route, experts]
        output: Value = experts.result
        if len(layout.shared):
            shared_weights = {"w_up": add_weight("shared.w_up", weight(program, op, "w_up")[layout.shared]),
                              "w_down": add_weight("shared.w_down", weight(program, op, "w_down")[:, layout.shared])}
            for role in ("w_gate", "b_gate", "b_up"):
                if op.weight(role) is not None:
                    shared_weights[role] = add_weight(f"shared.{role}", weight(program, op, role)[layout.shared])
            shared_spec = FFNSpec(hidden=spec.hidden, intermediate=len(layout.shared), act=spec.act, gated=spec.gated,
                                  limit=spec.limit, up_offset=spec.up_offset)
            refs = {k: v.name for k, v in shared_weights.items()}
            shared = SharedExpertOp.build([x], refs, shared_spec, [x.type], op.block)
            total = AtenOp("aten.add.Tensor", (output, shared.result), {}, [x.type])
            new_ops += [shared, total]
            output = total.result
        output_bias = op.weight("b_down")
        if "b_out" in expert_weights:  # the skipped experts' mean outputs, always added
            dropped_mean = -program_weight(new_weights, expert_weights["b_out"]).float().sum(0)
            if output_bias is not None:
                dropped_mean = dropped_mean + program.weights[output_bias.name].float()
            output_bias = add_weight("output_bias", dropped_mean)
        if output_bias is not None:
            with_bias = AtenOp("aten.add.Tensor", (output, output_bias), {}, [x.type])
            new_ops.append(with_bias)
            output = with_bias.result

        for name, tensor in new_weights.items():
            program.weights[name] = tensor
            graph.weights[name] = TensorType.of(tensor)
        for new_op in new_ops:
            graph.insert_before(op, new_op)
        old_weights = {ref.name for ref in op.weight_refs}
        op.result.replace_all_uses_with(output)
        graph.set_outputs([output if value is op.result else value for value in graph.outputs])
        graph.erase(op)
        for name in old_weights - graph.used_weights():
            del graph.weights[name]
            program.weights.pop(name, None)


COMPENSATION_ROUNDING_WARNING = 0.01  # of the FFN output's RMS


def expert_outputs(program: Program, op: DenseFFNOp, layout: ExpertLayout, stats: Any) -> torch.Tensor:
    """[E, N, H] each routed expert's output on the calibration rows (its share of the FFN's output)."""
    hidden, w_down = stats.hidden.float(), weight(program, op, "w_down").float()
    return torch.stack([hidden[:, ids] @ w_down[:, ids].T for ids in layout.experts])


def compensation_rounding(program: Program, op: DenseFFNOp, means: torch.Tensor, stats: Any) -> float:
    """How coarsely the mean compensation ``means`` [E, H] of ``op``'s conversion rounds in the weights' dtype,
    relative to the RMS of the FFN's output on the calibration rows (0.0 in float32 or wider): each chosen
    expert adds ``f_e(x) - m_e`` and the output bias adds back every ``m_e``, terms that cancel only as exactly
    as the dtype holds them (MiniLM in bfloat16: terms up to about 20, so steps of about 0.08)."""
    dtype = weight(program, op, "w_up").dtype
    if dtype not in (torch.bfloat16, torch.float16):
        return 0.0
    largest = float(means.abs().max())
    output = stats.hidden.float() @ weight(program, op, "w_down").float().T
    rms = float(output.pow(2).mean().sqrt().clamp_min(1e-30))
    return largest * torch.finfo(dtype).eps * math.sqrt(len(means)) / rms


def program_weight(new_weights: dict[str, torch.Tensor], ref: WeightRef) -> torch.Tensor:
    return new_weights[ref.name]


def weight(program: Program, op: DenseFFNOp, role: str) -> torch.Tensor:
    return program.weights[op.required_weight(role).name]


def bias_or_zeros(program: Program, op: DenseFFNOp, role: str, size: int) -> torch.Tensor:
    ref = op.weight(role)
    return program.weights[ref.name] if ref is not None else torch.zeros(size, dtype=weight(program, op, "w_up").dtype)


def input_vectors(program: Program, op: DenseFFNOp) -> torch.Tensor:
    """[F, D] each neuron's input weights: its up row, after its gate row for gated FFNs."""
    rows = [weight(program, op, "w_up").float()]
    if op.spec.gated:
        rows.insert(0, weight(program, op, "w_gate").float())
    return torch.cat(rows, dim=1)


def fit_linear(x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge least squares ``targets ~ x @ W.T + b``: returns (W [E, H], b [E])."""
    design = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1).double()
    gram = design.T @ design
    ridge = RIDGE * gram.diagonal().mean()
    solution = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), design.T @ targets.double())
    return solution[:-1].T.float(), solution[-1].float()
