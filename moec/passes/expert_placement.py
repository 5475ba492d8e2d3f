"""``expert-placement``: record which rank holds each expert of each MoE layer.

Requires: a verified graph with ``moe.experts`` ops and, for ``method="cp-sat"``, routing to place from:
a ``RoutingTrace`` (``moec.analysis.traces``) whose layers are the program's routed blocks, or sample
inputs (or a ``Calibration`` storing them) as ``context.calibration``, traced here with ``collect_trace``.
Ensures: ``program.metadata["expert_parallel"]`` holds ``world_size`` and ``placement`` (a
``Placement`` as JSON, one row per block) and ``placement_stats`` (moves, load balance, each layer's
``balance_limits`` held to, solver gap, and ``layers``: per block, the experts each rank holds and, for
cp-sat, the busiest rank's load over the mean, the bound held to and whether it was relaxed). ``balance_eps`` left out (None) holds each layer's busiest rank
within 10% of the mean load, or, where that layer's routed load cannot be split so evenly, to the tightest
balance found for it, with one warning naming those layers; a given ``balance_eps`` is a hard bound (an
error where it is out of reach). The graph is unchanged. In place. The decision is made by ``moec.analysis.placement``; this pass applies it.
"""

from __future__ import annotations

from dataclasses import dataclass

from moec.analysis import placement as placing
from moec.analysis.traces import RoutingTrace, collect_trace
from moec.errors import PassError
from moec.ir.ops import ExpertsOp
from moec.ir.program import Program
from moec.ir.quant import QuantizedType, storage_names
from moec.passes.base import Pass, PassContext, PassResult, register_pass

METHODS = ("cp-sat", "round-robin", "contiguous")
SOLVER_OPTIONS = ("balance_eps", "capacity", "memory_bytes", "time_limit_s")  # constraints of method cp-sat
DEFAULT_TIME_LIMIT_S = 20.0


def stored_expert_bytes(program: Program, op: ExpertsOp) -> int:
    """Bytes one expert of ``op`` takes as stored (quantized weights by their packed storage, whose widths
    may differ between experts: the mean over the layer's experts)."""
    names: list[str] = []
    for ref in op.weight_refs:
        quantized = isinstance(program.graph.weights[ref.name], QuantizedType)
        names += storage_names(ref.name).values() if quantized else [ref.name]
    total = sum(program.weights[name].numel() * program.weights[name].element_size() for name in names)
    return total // op.spec.num_experts


@register_pass
@dataclass(frozen=True)
class ExpertPlacement(Pass):
    name = "expert-placement"
    calibration_when = "with method cp-sat"
    takes_a_trace = True

    world_size: int = 2
    method: str = "cp-sat"
    balance_eps: float | None = None  # None: within 10% of the mean, relaxed per layer where out of reach
    capacity: int | None = None
    memory_bytes: int | None = None
    # The solver's work budget (about seconds on an idle 2-core machine; the placement does not depend on the
    # machine's speed). None: DEFAULT_TIME_LIMIT_S (None tells "not given" from the default).
    time_limit_s: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {', '.join(METHODS)}")
        for option, value in (("world_size", self.world_size), ("capacity", self.capacity),
                              ("memory_bytes", self.memory_bytes)):
            if value is not None and value < 1:
                raise PassError(f"{option}={value} must be at least 1")
        if self.balance_eps is not None and self.balance_eps < 0:
            raise PassError(f"balance_eps={self.balance_eps} must be at least 0 (the allowed load imbalance)")
        if self.time_limit_s is not None and not self.time_limit_s > 0:
            raise PassError(f"time_limit_s={self.time_limit_s} must be positive")
        given = [name for name in SOLVER_OPTIONS if getattr(self, name) is not None]
        if self.method != "cp-sat" and given:
            verb = "constrains" if len(given) == 1 else "constrain"
            raise PassError(f"{', '.join(given)} {verb} the cp-sat solver, and method={self.method!r} places "
                            "experts by a fixed rule without them; leave them out, or use method 'cp-sat'")

    def needs_calibration(self) -> bool:
        return self.method == "cp-sat"

    def routing_trace(self, program: Program, context: PassContext) -> RoutingTrace:
        """The given trace, or the trace of the given sample inputs through ``program``."""
        if isinstance(context.calibration, RoutingTrace):
            return context.calibration
        if context.calibration is None:
            raise PassError("cp-sat placement needs routing to place from: a RoutingTrace "
                            "(moec.analysis.traces.collect_trace) or sample inputs as calibration= to moec.compile, "
                            "or --calibration FILE to the moec CLI; method 'round-robin' or 'contiguous' needs none")
        return collect_trace(program, context.flat_samples(program, needed_by=f"pass {self.name!r}"))

    def run(self, program: Program, context: PassContext) -> PassResult:
        experts_ops = program.graph.ops_of(ExpertsOp)
        if not experts_ops:
            raise PassError("the program has no moe.experts ops to place")
        blocks = tuple(op.block for op in experts_ops)
        counts = {op.spec.num_experts for op in experts_ops}
        if len(counts) != 1:
            raise PassError(f"MoE layers differ in expert count {sorted(counts)}; placement needs one count")
        (num_experts,) = counts
        placing.check_world_size(num_experts, self.world_size)
        stats: dict = {}
        if self.method == "cp-sat":
            trace = self.routing_trace(program, context)
            if trace.layers != blocks:
                raise PassError(f"the trace's layers {list(trace.layers)} are not the program's MoE blocks {list(blocks)}")
            if trace.num_experts != num_experts:
                raise PassError(f"the trace routes among {trace.num_experts} experts per layer, the program's MoE blocks "
                                f"have {num_experts}; trace this program (a trace taken before a pass pruned, merged or "
                                "converted experts no longer fits)")
            expert_bytes = [stored_expert_bytes(program, op) for op in experts_ops]
            placement, solve = placing.solve_placement(
                trace, self.world_size, balance_eps=self.balance_eps, capacity=self.capacity,
                memory_bytes=self.memory_bytes, expert_bytes=expert_bytes, time_limit_s=self.time_limit_s or DEFAULT_TIME_LIMIT_S)
            solver = solve.to_json()
            stats = {"solver": solver, "moves": placing.cross_rank_moves(trace, placement),
                     "load_imbalance": placing.load_imbalance(trace, placement),
                     "balance_limits": solver.pop("balance_limits"), "relaxed_layers": solver.pop("relaxed_layers")}
        elif self.method == "round-robin":
            placement = placing.round_robin_placement(blocks, num_experts, self.world_size)
        else:
            placement = placing.contiguous_placement(blocks, num_experts, self.world_size)
        rows: list[dict[str, object]] = [{"layer": block, "experts_by_rank": [placement.local_experts(block, rank)
                                                     for rank in range(self.world_size)]} for block in blocks]
        if self.method == "cp-sat":
            for row, balance in zip(rows, placing.layer_balance(trace, placement), strict=True):
                row.update({"load": round(balance, 4), "bound": stats["balance_limits"][row["layer"]],
                            "relaxed": row["layer"] in stats["relaxed_layers"]})
        stats["layers"] = rows
        settings = program.metadata.setdefault("expert_parallel", {})
        settings.update({"world_size": self.world_size, "placement": placement.to_json(), "placement_stats": stats})
        context.report["expert_placement"] = {"method": placement.method, **stats}
        return PassResult(True, {"layers": rows, "world_size": self.world_size, "method": placement.method,
                                 "moves": stats.get("moves")})
