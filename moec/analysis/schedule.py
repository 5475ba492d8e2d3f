"""Overlap schedules for expert-parallel MoE layers: a DAG per layer, its makespan under a fitted cost
model, and the chunk count that minimizes it (Tutel's pipelining, FSMoE, shortcut-connected MoE).

One MoE layer on one rank, split into C chunks of its local tokens, runs in this program order (the
distributed runtime follows it exactly)::

    exchange counts (all chunks, one small all-to-all)
    gather chunk 0's rows, issue dispatch 0; gather chunk 1's rows, issue dispatch 1
    shared expert / dense path           <- while dispatch is in flight
    for i in 0..C-1: wait dispatch i; experts on chunk i; issue combine i; gather i+2, issue dispatch i+2
    for i in 0..C-1: wait combine i; sum its rows into their tokens

Communication runs on one serial stream (collectives complete in issue order), computation (the
GEMMs and the row gathers and sums around them) on the calling thread. The DAG has one node per step
with its stream and predicted duration; its edges are the data dependencies (gather i -> dispatch i ->
experts i -> combine i -> sum i), stream order, and issue order. Start times are the longest path to
each node. The makespan is that longest path, or the steps' total time divided by the rank's
``CostModel.streams`` when that is longer: communication only overlaps computation when a rank has a
core to spare for it (on a CPU with fewer cores than ranks, gloo's copies and the GEMMs take turns on
the same cores, and overlapping only interleaves the same work). The non-overlapped baseline is C = 1
with every step in series.
"""

from __future__ import annotations

import io
from dataclasses import MISSING, asdict, dataclass, fields

import networkx as nx
import numpy as np

from moec.errors import MoecError

COMM, COMPUTE = "comm", "compute"


@dataclass(frozen=True)
class CostModel:
    """Predicted seconds: all-to-all ``latency + bytes * per_byte``; GEMM ``latency + flops * per_flop``;
    row copy (gathering a chunk's rows for dispatch, or summing the returned rows into their tokens)
    ``latency + bytes * per_byte``; ``streams``: how many of one rank's steps really run at once,
    between 1 (ranks share cores) and 2 (communication and computation side by side); see
    ``concurrent_streams``."""

    a2a_latency_s: float
    a2a_s_per_byte: float
    gemm_latency_s: float
    gemm_s_per_flop: float
    streams: float = 2.0
    copy_latency_s: float = 0.0
    copy_s_per_byte: float = 0.0

    def all_to_all(self, nbytes: float) -> float:
        return self.a2a_latency_s + nbytes * self.a2a_s_per_byte

    def gemm(self, flops: float) -> float:
        return self.gemm_latency_s + flops * self.gemm_s_per_flop if flops > 0 else 0.0

    def copy(self, nbytes: float) -> float:
        return self.copy_latency_s + nbytes * self.copy_s_per_byte if nbytes > 0 else 0.0

    @staticmethod
    def fit(a2a_samples: list[tuple[float, float]], gemm_samples: list[tuple[float, float]],
            streams: float = 2.0, copy_samples: list[tuple[float, float]] | None = None) -> CostModel:
        """Least-squares lines through measured all-to-all ``(bytes, seconds)``, GEMM ``(flops,
        seconds)`` and, optionally, row copy ``(bytes, seconds)`` samples (each needs two sizes at
        least; without copy samples copies cost nothing); intercepts and slopes are kept non-negative."""
        a_lat, a_slope = fit_line(a2a_samples, "all-to-all")
        g_lat, g_slope = fit_line(gemm_samples, "GEMM")
        c_lat, c_slope = fit_line(copy_samples, "row copy") if copy_samples else (0.0, 0.0)
        return CostModel(a_lat, a_slope, g_lat, g_slope, streams, c_lat, c_slope)

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(data: dict) -> CostModel:
        """The cost model ``to_json`` wrote: ``MoecError`` naming the key at fault for a missing or unknown key,
        a value that is not a non-negative number, or ``streams`` outside [1, 2]."""
        keys = [f.name for f in fields(CostModel)]
        required = [f.name for f in fields(CostModel) if f.default is MISSING]
        missing, unknown = [k for k in required if k not in data], [k for k in data if k not in keys]
        if missing or unknown:
            wrong = [f"lacks {', '.join(missing)}"] if missing else []
            wrong += [f"has unknown key(s) {', '.join(map(str, unknown))}"] if unknown else []
            raise MoecError(f"the cost model {' and '.join(wrong)}; it takes {', '.join(required)} and optionally "
                            f"{', '.join(k for k in keys if k not in required)} (CostModel.fit(...).to_json() gives them)")
        for key, value in data.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise MoecError(f"the cost model's {key}={value!r} must be a non-negative number (seconds, or "
                                "seconds per byte or FLOP)")
        if "streams" in data and not 1 <= data["streams"] <= 2:
            raise MoecError(f"the cost model's streams={data['streams']!r} must be between 1 (ranks share cores) and "
                            "2 (communication beside computation); concurrent_streams(cores, ranks) gives it")
        return CostModel(**{key: float(value) for key, value in data.items()})


def concurrent_streams(cores: int, ranks: int, threads_per_rank: int = 1) -> float:
    """``CostModel.streams`` for ``ranks`` ranks of ``threads_per_rank`` compute threads on ``cores`` cores:
    the cores each rank has, per compute thread, clamped to [1, 2] (2: a whole core left for
    communication)."""
    if cores < 1 or ranks < 1 or threads_per_rank < 1:
        raise MoecError(f"cores={cores}, ranks={ranks} and threads_per_rank={threads_per_rank} must be positive")
    return min(2.0, max(1.0, cores / (ranks * threads_per_rank)))


def fit_line(samples: list[tuple[float, float]], what: str) -> tuple[float, float]:
    sizes = sorted({size for size, _ in samples})
    if len(sizes) < 2:
        raise MoecError(f"fitting the {what} cost needs measurements at two sizes at least, got {sizes}")
    x = np.array([size for size, _ in samples], dtype=np.float64)
    y = np.array([seconds for _, seconds in samples], dtype=np.float64)
    slope, intercept = np.polyfit(x, y, 1)
    if intercept < 0:
        slope, intercept = float(np.dot(x, y) / np.dot(x, x)), 0.0
    return max(float(intercept), 0.0), max(float(slope), 0.0)


@dataclass(frozen=True)
class LayerWork:
    """One rank's work in one MoE layer: bytes it dispatches (and gets back in combine), FLOPs of its
    experts on the rows it receives, FLOPs of the shared expert / dense path on its own tokens."""

    dispatch_bytes: float
    expert_flops: float
    shared_flops: float = 0.0


def schedule_dag(work: LayerWork, cost: CostModel, chunks: int, overlap: bool = True) -> nx.DiGraph:
    """The DAG of one layer split into ``chunks`` chunks; ``overlap=False`` chains every step in series."""
    if chunks < 1:
        raise MoecError(f"a schedule needs at least one chunk, got {chunks}")
    dag = nx.DiGraph(streams=cost.streams)

    def node(name: str, stream: str, seconds: float, chunk: int | None = None) -> str:
        dag.add_node(name, stream=stream, seconds=seconds, chunk=chunk)
        return name

    send = work.dispatch_bytes / chunks
    counts = node("counts", COMM, cost.all_to_all(0))
    gather = [node(f"gather {i}", COMPUTE, cost.copy(send), i) for i in range(chunks)]
    dispatch = [node(f"dispatch {i}", COMM, cost.all_to_all(send), i) for i in range(chunks)]
    experts = [node(f"experts {i}", COMPUTE, cost.gemm(work.expert_flops / chunks), i) for i in range(chunks)]
    combine = [node(f"combine {i}", COMM, cost.all_to_all(send), i) for i in range(chunks)]
    sums = [node(f"sum {i}", COMPUTE, cost.copy(send), i) for i in range(chunks)]
    shared = node("shared", COMPUTE, cost.gemm(work.shared_flops)) if work.shared_flops else None
    for i in range(chunks):
        nx.add_path(dag, [gather[i], dispatch[i], experts[i], combine[i], sums[i]])
    if not overlap:
        chain = [counts] + [step for i in range(chunks)
                            for step in (gather[i], dispatch[i], experts[i], combine[i], sums[i])]
        chain += [shared] if shared else []
        nx.add_path(dag, chain)
        return dag
    comm_order = [counts, *dispatch[:2]]
    compute_order = [*gather[:2]] + ([shared] if shared else [])
    for i in range(chunks):
        comm_order += [combine[i]] + ([dispatch[i + 2]] if i + 2 < chunks else [])
        compute_order += [experts[i]] + ([gather[i + 2]] if i + 2 < chunks else [])
    nx.add_path(dag, comm_order)
    nx.add_path(dag, [counts, *compute_order, *sums])  # the count exchange blocks: buffers need its sizes
    return dag


def start_times(dag: nx.DiGraph) -> dict[str, float]:
    """Each step's start: the latest finish among its predecessors (0 for the first ones)."""
    start: dict[str, float] = {}
    for name in nx.topological_sort(dag):
        start[name] = max((start[p] + dag.nodes[p]["seconds"] for p in dag.predecessors(name)), default=0.0)
    return start


def longest_path(dag: nx.DiGraph) -> float:
    """When the last step ends if every stream runs its steps as soon as their inputs are ready."""
    start = start_times(dag)
    return max((start[n] + dag.nodes[n]["seconds"] for n in dag), default=0.0)


def makespan(dag: nx.DiGraph) -> float:
    """The longest path, or the total step time over the rank's concurrent streams if that is longer."""
    total = sum(data["seconds"] for _, data in dag.nodes(data=True))
    return max(longest_path(dag), total / dag.graph.get("streams", 2.0))


@dataclass(frozen=True)
class LayerSchedule:
    """The chosen schedule of one layer: chunk count, whether the shared path overlaps dispatch, and
    the predicted step times of this schedule and of the non-overlapped baseline."""

    chunks: int
    overlap: bool
    predicted_s: float
    baseline_s: float

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(data: dict) -> LayerSchedule:
        return LayerSchedule(int(data["chunks"]), bool(data["overlap"]), float(data["predicted_s"]),
                             float(data["baseline_s"]))


def choose_chunks(work: LayerWork, cost: CostModel, max_chunks: int = 8) -> LayerSchedule:
    """The chunk count in 1..max_chunks with the shortest predicted makespan (the fewest on ties)."""
    baseline = makespan(schedule_dag(work, cost, 1, overlap=False))
    best = min(range(1, max_chunks + 1), key=lambda c: (round(makespan(schedule_dag(work, cost, c)), 12), c))
    return LayerSchedule(best, True, makespan(schedule_dag(work, cost, best)), baseline)


def gantt_png(dag: nx.DiGraph, title: str = "") -> bytes:
    """A Gantt chart of the DAG's steps, one row per stream, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = start_times(dag)
    colors = {"counts": "#999999", "dispatch": "#4c72b0", "combine": "#55a868", "experts": "#dd8452",
              "shared": "#8172b3", "gather": "#c4ad66", "sum": "#c4ad66"}
    rows = {COMM: 1, COMPUTE: 0}
    fig, ax = plt.subplots(figsize=(10, 2.4))
    for name, data in dag.nodes(data=True):
        kind = name.split()[0]
        ax.barh(rows[data["stream"]], data["seconds"] * 1e3, left=start[name] * 1e3, color=colors[kind],
                edgecolor="black", linewidth=0.5)
        if data["seconds"] > 0:
            ax.text((start[name] + data["seconds"] / 2) * 1e3, rows[data["stream"]], name.replace("experts", "exp")
                    .replace("dispatch", "d").replace("combine", "c").replace("gather", "g").replace("sum", "s"), ha="center", va="center", fontsize=7)
    ax.set_yticks([0, 1], ["compute", "communication"])
    ax.set_xlabel("ms")
    title = title or f"makespan {makespan(dag) * 1e3:.2f} ms"
    drawn = longest_path(dag)
    if makespan(dag) > drawn * (1 + 1e-9):
        title += (f"\n(drawn as if the streams overlapped, {drawn * 1e3:.1f} ms; with "
                  f"{dag.graph['streams']:g} stream(s) per rank the steps take turns)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()
