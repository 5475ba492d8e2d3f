"""``overlap-schedule``: choose, per MoE layer, how many chunks its all-to-alls are split into and whether
the shared expert runs while dispatch is in flight.

Requires: a verified graph whose ``metadata["expert_parallel"]`` has a placement (run
``expert-placement`` first), and either ``chunks`` (a fixed count) or ``cost_model`` (a
``moec.analysis.schedule.CostModel`` as a dict, fitted to this machine's measured all-to-all, GEMM and
row-copy times, with ``streams`` from ``concurrent_streams`` for the cores each rank will have: on ranks that share
cores overlap gains nothing and one chunk is chosen). Ensures: ``metadata["expert_parallel"]["schedule"]`` maps every MoE block to a
``LayerSchedule`` (JSON) and each block's shared expert comes right after its ``moe.experts`` op, so the
runtime can start it early. The summary has one row per layer: its chunk count, what chose it
(``chunks`` or ``cost_model``, with the predicted and serial seconds), whether a shared expert overlaps. In place. Work per layer is estimated for ``tokens_per_rank`` tokens, and the cost
model chooses at most ``min(max_chunks, tokens_per_rank)`` chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moec.analysis.schedule import CostModel, LayerSchedule, LayerWork, choose_chunks
from moec.errors import MoecError, PassError
from moec.ir.ops import ExpertsOp, SharedExpertOp
from moec.ir.program import Program
from moec.passes.base import Pass, PassContext, PassResult, register_pass

CHOOSING_OPTIONS = ("cost_model", "tokens_per_rank", "max_chunks")  # how the cost model picks the chunk count
DEFAULT_TOKENS_PER_RANK, DEFAULT_MAX_CHUNKS = 512, 8  # where the cost model is given without them


def ffn_flops(tokens: float, hidden: int, intermediate: int, gated: bool) -> float:
    return 2.0 * tokens * hidden * intermediate * (3 if gated else 2)


@register_pass
@dataclass(frozen=True)
class OverlapSchedule(Pass):
    name = "overlap-schedule"

    chunks: int | None = None
    cost_model: dict | None = field(default=None)
    tokens_per_rank: int | None = None  # None: DEFAULT_TOKENS_PER_RANK (None tells "not given" from the default)
    max_chunks: int | None = None  # None: DEFAULT_MAX_CHUNKS
    overlap_shared: bool = True

    def __post_init__(self) -> None:
        for option, value in (("chunks", self.chunks), ("tokens_per_rank", self.tokens_per_rank),
                              ("max_chunks", self.max_chunks)):
            if value is not None and value < 1:
                raise PassError(f"{option}={value} must be at least 1")
        if self.chunks is None and self.cost_model is None:  # checked with the recipe, before any model loads
            raise PassError("give overlap-schedule either chunks=N or a fitted cost_model (see tools/bench/expert_parallel.py)")
        choosing = [name for name in CHOOSING_OPTIONS if getattr(self, name) is not None]
        if self.chunks is not None and choosing:
            raise PassError(f"chunks={self.chunks} fixes the chunk count, and {', '.join(choosing)} would choose it; "
                            "give chunks or a cost model, not both")
        if self.cost_model is not None:
            try:
                CostModel.from_json(self.cost_model)
            except MoecError as err:
                raise PassError(f"option cost_model: {err}") from None

    def run(self, program: Program, context: PassContext) -> PassResult:
        settings = program.metadata.get("expert_parallel", {})
        if "placement" not in settings:
            raise PassError("overlap-schedule needs a placement: run expert-placement first")
        cost = CostModel.from_json(self.cost_model) if self.cost_model is not None else None
        tokens = self.tokens_per_rank or DEFAULT_TOKENS_PER_RANK
        max_chunks = self.max_chunks or DEFAULT_MAX_CHUNKS
        graph = program.graph
        schedules, rows, moved = {}, [], 0
        for op in graph.ops_of(ExpertsOp):
            shared = next((s for s in graph.ops_of(SharedExpertOp) if s.block == op.block and s.args[0] is op.args[0]), None)
            if shared is not None and graph.ops.index(shared) != graph.ops.index(op) + 1:
                graph.ops.remove(shared)
                graph.ops.insert(graph.ops.index(op) + 1, shared)
                moved += 1
            spec, k = op.spec, op.top_k
            row_bytes = spec.hidden * op.args[0].type.torch_dtype.itemsize  # one token's activations, as dispatched
            work = LayerWork(
                dispatch_bytes=tokens * k * row_bytes,
                expert_flops=ffn_flops(tokens * k, spec.hidden, spec.intermediate, spec.gated),
                shared_flops=ffn_flops(tokens, shared.spec.hidden, shared.spec.intermediate,
                                       shared.spec.gated) if shared is not None and self.overlap_shared else 0.0,
            )
            if self.chunks is not None:
                schedule = LayerSchedule(self.chunks, self.overlap_shared, 0.0, 0.0)
            else:
                assert cost is not None, "checked above: without chunks=N a cost model is given"
                # a chunk holds one token at least: more chunks than tokens would only add empty all-to-alls
                schedule = choose_chunks(work, cost, min(max_chunks, tokens))
                schedule = LayerSchedule(schedule.chunks, self.overlap_shared, schedule.predicted_s,
                                         schedule.baseline_s)
            schedules[op.block] = schedule.to_json()
            row = {"layer": op.block, "chunks": schedule.chunks, "chosen_by": "chunks" if cost is None else "cost_model",
                   "shared_overlap": None if shared is None else self.overlap_shared}
            if cost is not None:
                row.update(predicted_s=schedule.predicted_s, baseline_s=schedule.baseline_s, streams=cost.streams)
            rows.append(row)
        settings["schedule"] = schedules
        context.report["overlap_schedule"] = schedules
        return PassResult(True, {"layers": rows, "shared_moved": moved})
