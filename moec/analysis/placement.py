"""Expert placement: which rank holds each expert of each MoE layer, chosen from routing traces.

A token routed to expert a in layer l and then to expert b in layer l+1 crosses ranks unless a and b
sit on the same rank (ExFlow's inter-layer affinity; MoETuner's ILP). ``solve_placement`` minimizes
those expected crossings with OR-Tools CP-SAT subject to

* every expert on exactly one rank,
* per layer, each rank's routed load within ``(1 + balance_eps)`` of the mean (by default within 10%,
  relaxed per layer to the tightest balance that layer's load allows under the capacity: with few routed
  tokens or a few heavy experts 10% can be out of reach by granularity alone),
* per layer, at most ``capacity`` experts per rank, and optionally at most ``memory_bytes`` of expert
  weights per rank over all layers,

within a work budget, returning the best solution found together with the solver's bound. Two baselines,
``contiguous_placement`` and ``round_robin_placement``, are the usual static layouts.

The solves are reproducible: CP-SAT interleaves its search strategies deterministically over a fixed number
of workers and stops on its deterministic work count (``max_deterministic_time``, about a second of work
on an idle 2-core machine per unit), not on the clock, so a busy or slow machine takes longer and places the
same. Only a wall-clock backstop (``BACKSTOP``, with a warning) can cut a solve short by the clock.

Model: ``x[l, e, r]`` (expert e of layer l on rank r) and, for each *affinity edge* a -> b (expert a of
layer l to expert b of layer l+1: one of b's ``predecessors_per_expert`` heaviest predecessors carrying at
least ``min_predecessor_share`` of the heaviest one's mass), ``together[l, a, b, r]``, true only if both sit
on r. The objective maximizes the edges' local mass. Thinner predecessors are left out: in a trace with
affinity their mass is the unstructured rest, of which no placement keeps much more than 1/R local, and
modelling it leaves the solver a bound ("every modelled pair local") it cannot close. Ranks are
interchangeable, so layer 0's expert e may only use ranks 0..e (one labelling of each placement).

Around the solver, ``moec.analysis.placement_search`` improves on the full trace: a greedy layer-by-layer
placement polished by expert and chain swaps is the solver's hint, and the solver's answer is polished the
same way. ``SolveStats`` keeps the solver's objective, bound and gap apart from the full-trace moves.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from ortools.sat.python import cp_model

from moec.analysis import placement_search
from moec.analysis.traces import RoutingTrace
from moec.errors import MoecError, warn
from moec.ir.core import Graph
from moec.ir.ops import ExpertsOp

BACKSTOP = 5.0  # the wall-clock limit of a solve, in multiples of its work budget: only a stalled machine hits it

DEFAULT_BALANCE_EPS = 0.1  # the default load bound, relaxed per layer where the load cannot meet it


@dataclass(frozen=True)
class Placement:
    """``ranks[l][e]``: the rank that holds expert e of layer ``layers[l]``; a plain, serializable plan."""

    world_size: int
    layers: tuple[str, ...]
    ranks: tuple[tuple[int, ...], ...]
    method: str = ""

    def local_experts(self, layer: str, rank: int) -> list[int]:
        """The experts of ``layer`` held by ``rank``, in increasing id order."""
        owners = self.ranks[self.layers.index(layer)]
        return [expert for expert, owner in enumerate(owners) if owner == rank]

    def to_json(self) -> dict:
        return {"world_size": self.world_size, "layers": list(self.layers),
                "ranks": [list(row) for row in self.ranks], "method": self.method}

    @staticmethod
    def from_json(data: dict) -> Placement:
        return Placement(int(data["world_size"]), tuple(data["layers"]),
                         tuple(tuple(int(r) for r in row) for row in data["ranks"]), data.get("method", ""))


@dataclass
class SolveStats:
    """How a placement solve went.

    ``objective`` and ``bound``: the modelled local mass (token units) CP-SAT found and its proven upper
    bound; ``gap`` = (bound - objective) / objective, CP-SAT's relative gap on the maximized objective.
    ``solver_moves`` = total transition mass - objective (unmodelled mass counted as moved) and
    ``gap_moves`` = (bound - objective) / solver_moves, the same gap relative to moved tokens.
    ``moves``: the returned placement's cross-rank moves on the full trace (after swap polishing).
    ``seconds``: the whole call (local search and model building included); ``solver_seconds``: CP-SAT's part,
    and ``solver_work`` its deterministic time (what ``time_limit_s`` budgets).
    ``balance_limits``: per layer, the busiest rank's allowed load divided by the mean rank load (the bound
    the placement was held to); ``relaxed_layers``: the layers whose default 10% bound was out of reach and
    was relaxed to the tightest balance found for them.
    """

    status: str
    objective: float
    bound: float
    gap: float
    gap_moves: float
    solver_moves: float
    moves: float
    seconds: float
    solver_seconds: float
    solver_work: float
    balance_limits: dict[str, float]
    relaxed_layers: list[str]

    def to_json(self) -> dict:
        return asdict(self)


def placement_mismatch(placement: Placement, graph: Graph) -> str | None:
    """Why ``placement`` no longer fits ``graph``'s ``moe.experts`` ops (a pass pruned, merged or converted
    experts after it was made), or None when every MoE block has a row with one rank per expert."""
    for op in graph.ops_of(ExpertsOp):
        if op.block not in placement.layers:
            return f"the placement has no entry for MoE block {op.block!r}"
        placed = len(placement.ranks[placement.layers.index(op.block)])
        if placed != op.spec.num_experts:
            return f"the placement holds {placed} experts for MoE block {op.block!r}, which has {op.spec.num_experts}"
    return None


def idle_ranks(placement: Placement) -> dict[str, list[int]]:
    """Per layer, the ranks the placement gives no expert of it (every rank needs one to run its share)."""
    idle = {layer: sorted(set(range(placement.world_size)) - set(row))
            for layer, row in zip(placement.layers, placement.ranks, strict=True)}
    return {layer: ranks for layer, ranks in idle.items() if ranks}


def check_world_size(num_experts: int, world_size: int) -> None:
    if world_size < 1:
        raise MoecError(f"world size must be at least 1, got {world_size}")
    if world_size > num_experts:
        raise MoecError(
            f"cannot place {num_experts} experts per layer on {world_size} ranks: every rank needs at least "
            f"one expert; use at most {num_experts} ranks"
        )


def contiguous_placement(layers: tuple[str, ...], num_experts: int, world_size: int) -> Placement:
    """Experts 0..E/R-1 on rank 0, the next block on rank 1, ... (the default layout of most runtimes)."""
    check_world_size(num_experts, world_size)
    row = tuple(expert * world_size // num_experts for expert in range(num_experts))
    return Placement(world_size, tuple(layers), tuple(row for _ in layers), "contiguous")


def round_robin_placement(layers: tuple[str, ...], num_experts: int, world_size: int) -> Placement:
    """Expert e on rank e mod R."""
    check_world_size(num_experts, world_size)
    row = tuple(expert % world_size for expert in range(num_experts))
    return Placement(world_size, tuple(layers), tuple(row for _ in layers), "round-robin")


def cross_rank_moves(trace: RoutingTrace, placement: Placement) -> float:
    """Expected token moves between ranks at layer boundaries (``RoutingTrace.transitions`` units)."""
    ranks = torch.tensor(placement.ranks, dtype=torch.int64)
    moves = 0.0
    for layer, counts in enumerate(trace.transitions()):
        differ = ranks[layer].unsqueeze(1) != ranks[layer + 1].unsqueeze(0)
        moves += float(counts[differ].sum())
    return moves


def layer_balance(trace: RoutingTrace, placement: Placement) -> list[float]:
    """Each layer's busiest rank load divided by its mean rank load (1.0 = perfect, and for a layer no token
    reaches)."""
    balance = []
    for layer, load in enumerate(trace.expert_load()):
        per_rank = torch.zeros(placement.world_size, dtype=torch.float64)
        per_rank.index_add_(0, torch.tensor(placement.ranks[layer]), load)
        balance.append(float(per_rank.max() / per_rank.mean()) if per_rank.sum() > 0 else 1.0)
    return balance


def load_imbalance(trace: RoutingTrace, placement: Placement) -> float:
    """The worst layer's ``layer_balance`` (1.0 = perfect)."""
    return max(layer_balance(trace, placement), default=1.0)


def solve_placement(
    trace: RoutingTrace,
    world_size: int,
    *,
    balance_eps: float | None = None,
    capacity: int | None = None,
    memory_bytes: int | None = None,
    expert_bytes: list[int] | None = None,
    time_limit_s: float = 20.0,
    predecessors_per_expert: int = 2,
    min_predecessor_share: float = 0.25,
    workers: int = 2,
    seed: int = 0,
) -> tuple[Placement, SolveStats]:
    """The CP-SAT placement of ``trace``'s layers on ``world_size`` ranks, and how the solve went.

    ``capacity`` is the most experts one rank may hold per layer (default ``ceil(E / R)``);
    ``memory_bytes`` caps the expert bytes a rank holds over all layers, with ``expert_bytes[l]`` the
    size of one expert of layer l. ``balance_eps`` bounds each rank's routed load per layer to
    ``(1 + balance_eps)`` times the mean; None (the default) means 0.1, relaxed in each layer where no
    placement within the capacity reaches it to the tightest balance found for that layer (see
    ``tightest_rank_loads``), with one warning naming those layers. ``time_limit_s`` is the solver's work
    budget (CP-SAT's deterministic time: about that many seconds on an idle 2-core machine); model building
    and the local search come on top (well under a second at 16 x 64 x 8). The result depends on the
    trace, the options, ``workers`` and ``seed``, not on the machine's speed or load.
    Raises ``MoecError`` when no placement can satisfy the constraints (with an explicit ``balance_eps``,
    also when it is out of reach).
    """
    E, L, R = trace.num_experts, trace.num_layers, world_size
    check_world_size(E, R)
    if trace.num_tokens == 0:
        raise MoecError("the routing trace holds no tokens, so it says nothing about where experts belong; trace "
                        "sample inputs with real (unpadded) tokens")
    capacity = math.ceil(E / R) if capacity is None else capacity
    if capacity * R < E:
        raise MoecError(
            f"capacity {capacity} experts per rank on {R} ranks holds {capacity * R} experts, fewer than the "
            f"{E} of each layer; raise the capacity to at least {math.ceil(E / R)}"
        )
    expert_bytes = expert_bytes or [1] * L
    if memory_bytes is not None:
        least = sum(math.ceil(E / R) * size for size in expert_bytes)
        if memory_bytes < least:
            raise MoecError(
                f"memory {memory_bytes:,} bytes per rank cannot hold a 1/{R} share of every layer's experts "
                f"({least:,} bytes); raise the memory per rank or use more ranks"
            )
    load = trace.expert_load().round().long()  # integer (token, slot) counts [L, E]
    eps = DEFAULT_BALANCE_EPS if balance_eps is None else balance_eps
    limit = [math.floor((1 + eps) * int(load[layer].sum()) / R) for layer in range(L)]
    start = time.perf_counter()
    relaxed: list[int] = []
    if balance_eps is None:
        tightest = tightest_rank_loads(load, R, capacity, limit, time_limit_s=min(1.0, time_limit_s / (4 * L)),
                                       seed=seed)
        relaxed = [layer for layer in range(L) if tightest[layer] > limit[layer]]
        limit = [max(bound, best) for bound, best in zip(limit, tightest, strict=True)]
        if relaxed:
            reached = ", ".join(f"{trace.layers[layer]} {balance_ratio(limit[layer], load[layer], R):.4g}x"
                                for layer in relaxed)
            warn(f"expert placement: the default balance (each rank's routed load within 10% of the mean) is out "
                 f"of reach for {E} experts on {R} ranks (at most {capacity} per rank) in "
                 f"{len(relaxed)} of {L} layers, held to the tightest balance found instead (the busiest rank's load "
                 f"over the mean): {reached}; give balance_eps to require a bound")
    else:
        for layer in range(L):
            if int(load[layer].max()) > limit[layer]:
                raise MoecError(
                    f"layer {trace.layers[layer]}: expert {int(load[layer].argmax())} alone carries "
                    f"{int(load[layer].max())} of {int(load[layer].sum())} routed tokens, more than one rank may "
                    f"hold with balance_eps={balance_eps}; raise balance_eps, leave it out (the tightest balance "
                    "each layer allows) or use fewer ranks"
                )
    # Integer transition masses: T * k is an integer count of slot pairs.
    transitions = (trace.transitions() * trace.top_k).round().long()
    edges = affinity_edges(transitions, predecessors_per_expert, min_predecessor_share)
    groups = placement_search.affinity_groups(edges, L, E)
    limits = torch.tensor(limit)

    def improve(ranks: list[list[int]]) -> list[list[int]]:
        return placement_search.improve(torch.tensor(ranks), transitions, load, limits, R, groups).tolist()

    hint = greedy_placement(load, transitions, R, capacity, limit)
    if hint is not None:
        hint = canonical_rank_labels(improve(hint), R)

    model = cp_model.CpModel()
    x = [[[model.new_bool_var(f"x{layer}_{e}_{r}") for r in range(R)] for e in range(E)] for layer in range(L)]
    for layer in range(L):
        for e in range(E):
            model.add_exactly_one(x[layer][e])
        weights = load[layer].tolist()
        for r in range(R):
            column = [x[layer][e][r] for e in range(E)]
            model.add_linear_constraint(cp_model.LinearExpr.sum(column), 1, capacity)  # no rank idles in a layer
            model.add(cp_model.LinearExpr.weighted_sum(column, weights) <= limit[layer])
    if memory_bytes is not None:
        for r in range(R):
            column = [x[layer][e][r] for layer in range(L) for e in range(E)]
            model.add(cp_model.LinearExpr.weighted_sum(column, [expert_bytes[layer] for layer in range(L) for _ in range(E)])
                      <= memory_bytes)
    # Ranks are interchangeable across the whole model, so every placement has R! relabelled copies; fixing
    # the labels by first use in layer 0 (expert e uses one of ranks 0..e) keeps one of them.
    for e in range(min(E, R)):
        for r in range(e + 1, R):
            model.add(x[0][e][r] == 0)

    # together[l, a, b, r]: expert a of layer l and expert b of layer l+1 both sit on rank r, so the
    # transition mass between them stays local. (Per pair rather than per expert b with a "min" of its
    # predecessors' mass: the LP relaxation is tighter and the constraints are plain implications.)
    objective, masses = [], []
    for layer, per_expert in enumerate(edges):
        for b, predecessors in enumerate(per_expert):
            for a, mass in predecessors:
                pair = [model.new_bool_var(f"t{layer}_{a}_{b}_{r}") for r in range(R)]
                model.add_at_most_one(pair)  # implied, but it gives the solver the bound "all pairs local"
                for r, together in enumerate(pair):
                    model.add_implication(together, x[layer][a][r])
                    model.add_implication(together, x[layer + 1][b][r])
                    if hint is not None:
                        model.add_hint(together, hint[layer][a] == r and hint[layer + 1][b] == r)
                objective += pair
                masses += [mass] * R
    model.maximize(cp_model.LinearExpr.weighted_sum(objective, masses))
    if hint is not None:
        for layer in range(L):
            for e in range(E):
                for r in range(R):
                    model.add_hint(x[layer][e][r], hint[layer][e] == r)

    solver = reproducible_solver(time_limit_s, workers, seed)
    solver.parameters.symmetry_level = 0  # symmetry breaking in presolve would discard the hint
    status = solver.solve(model)
    clock = check_the_clock(solver, status, time_limit_s, "the placement")
    if status == cp_model.UNKNOWN:
        raise MoecError(
            f"{clock}, before it found a placement; run it on a less busy machine" if clock else
            f"the solver found no placement of {E} experts x {L} layers on {R} ranks within time_limit_s="
            f"{time_limit_s:g} of work (nor proved that none exists); raise time_limit_s, or relax the balance or "
            "capacity"
        )
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        balance = (f"balance_eps={balance_eps}" if balance_eps is not None
                   else "the tightest balance each layer allows")
        raise MoecError(
            f"no placement of {E} experts x {L} layers on {R} ranks satisfies {balance}, capacity="
            f"{capacity}{f', memory {memory_bytes:,} bytes' if memory_bytes is not None else ''} "
            f"(solver: {solver.status_name(status)}); relax one of them"
        )
    solved = [[next(r for r in range(R) if solver.value(x[layer][e][r])) for e in range(E)] for layer in range(L)]
    placement = Placement(R, trace.layers, tuple(tuple(row) for row in improve(solved)), "cp-sat")
    k = trace.top_k
    total = float(transitions.sum())
    found, bound = solver.objective_value, solver.best_objective_bound
    stats = SolveStats(
        status=solver.status_name(status), objective=found / k, bound=bound / k,
        gap=(bound - found) / found if found > 0 else 0.0,
        gap_moves=(bound - found) / (total - found) if total > found else 0.0,
        solver_moves=(total - found) / k, moves=cross_rank_moves(trace, placement),
        seconds=time.perf_counter() - start, solver_seconds=solver.wall_time, solver_work=solver.deterministic_time,
        balance_limits={name: round(balance_ratio(limit[layer], load[layer], R), 4)
                        for layer, name in enumerate(trace.layers)},
        relaxed_layers=[trace.layers[layer] for layer in relaxed],
    )
    return placement, stats


def balance_ratio(rank_load: int, load: torch.Tensor, world_size: int) -> float:
    """``rank_load`` over the mean rank load of a layer whose experts carry ``load`` (1.0 when empty)."""
    total = int(load.sum())
    return rank_load * world_size / total if total > 0 else 1.0


def tightest_rank_loads(load: torch.Tensor, world_size: int, capacity: int, targets: list[int], *,
                        time_limit_s: float = 1.0, seed: int = 0) -> list[int]:
    """Per layer, the smallest busiest-rank load found for placing that layer's experts (integer loads
    ``load[layer]``) on ``world_size`` ranks with at most ``capacity`` experts each; a layer is only
    searched until it reaches ``targets[layer]`` (a bound it is allowed anyway).

    Longest-load-first onto the least loaded rank with room gives a first answer; where it is above both
    the target and the lower bound (the heaviest expert, the mean rank load rounded up), a small CP-SAT
    min-max model improves it within ``time_limit_s`` of work per layer, and its best solution found is taken
    (optimal or not, it is a load some placement reaches)."""
    R = world_size
    tightest = []
    for layer, weights in enumerate(load.tolist()):
        lower = max(max(weights), math.ceil(sum(weights) / R))
        rank_load, rank_count = [0] * R, [0] * R
        for placed, weight in enumerate(sorted(weights, reverse=True)):
            open_ranks = ranks_with_room(rank_count, capacity, len(weights) - placed)
            best = min(open_ranks, key=lambda r: rank_load[r])
            rank_load[best] += weight
            rank_count[best] += 1
        upper = max(rank_load)
        if upper > max(lower, targets[layer]):
            model = cp_model.CpModel()
            x = [[model.new_bool_var(f"x{e}_{r}") for r in range(R)] for e in range(len(weights))]
            busiest = model.new_int_var(lower, upper, "busiest")
            for row in x:
                model.add_exactly_one(row)
            for r in range(R):
                column = [row[r] for row in x]
                model.add_linear_constraint(cp_model.LinearExpr.sum(column), 1, capacity)
                model.add(cp_model.LinearExpr.weighted_sum(column, weights) <= busiest)
            for e in range(min(len(weights), R)):  # interchangeable ranks: expert e uses one of ranks 0..e
                for r in range(e + 1, R):
                    model.add(x[e][r] == 0)
            model.minimize(busiest)
            # One worker: with more, CP-SAT only checks the budget between batches of tasks and overshoots
            # a small one several times.
            solver = reproducible_solver(time_limit_s, 1, seed)
            status = solver.solve(model)
            check_the_clock(solver, status, time_limit_s, f"the balance search of layer {layer}")
            if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
                upper = min(upper, int(solver.objective_value))
        tightest.append(upper)
    return tightest


def ranks_with_room(rank_count: list[int], capacity: int, remaining: int) -> list[int]:
    """The ranks the next of ``remaining`` experts may go to: those below ``capacity``, or only the empty
    ones once there are no more experts left than empty ranks (every rank holds an expert of each layer)."""
    empty = [r for r, count in enumerate(rank_count) if count == 0]
    if len(empty) >= remaining:
        return empty
    return [r for r, count in enumerate(rank_count) if count < capacity]


def affinity_edges(transitions: torch.Tensor, per_expert: int, min_share: float) -> list[list[list[tuple[int, int]]]]:
    """``edges[l][b]``: the (expert a of layer l, mass) pairs the model scores for expert b of layer l+1:
    b's ``per_expert`` heaviest predecessors that carry at least ``min_share`` of the heaviest one's mass.

    Mass from the remaining predecessors is spread thin (in a trace with affinity it is the noise that
    follows no structure); placement cannot keep much more than 1/R of it local, so it is left out of
    the model and scored on the full trace afterwards, which keeps the solver's bound meaningful."""
    top = transitions.topk(min(per_expert, transitions.shape[1]), dim=1)  # values, indices [L-1, p, E]
    keep = (top.values > 0) & (top.values >= min_share * top.values[:, :1])
    edges = []
    for layer in range(transitions.shape[0]):
        rows = []
        for b in range(transitions.shape[2]):
            chosen = keep[layer, :, b]
            rows.append(list(zip(top.indices[layer, chosen, b].tolist(), top.values[layer, chosen, b].tolist(), strict=True)))
        edges.append(rows)
    return edges


def canonical_rank_labels(ranks: list[list[int]], world_size: int) -> list[list[int]]:
    """The same placement with ranks renamed in order of first use by layer 0's experts 0, 1, ...
    (the labelling the model's symmetry-breaking constraints allow)."""
    order = list(dict.fromkeys(ranks[0]))
    order += [r for r in range(world_size) if r not in order]
    rename = {old: new for new, old in enumerate(order)}
    return [[rename[r] for r in row] for row in ranks]


def greedy_placement(load: torch.Tensor, transitions: torch.Tensor, world_size: int, capacity: int,
                     limit: list[int]) -> list[list[int]] | None:
    """A feasible starting point for the solver, or None: layer 0 by longest-load-first onto the
    least loaded rank; each later expert (heaviest first) onto the allowed rank that keeps most of the
    transition mass arriving from the previous layer."""
    L, E = load.shape
    placement: list[list[int]] = []
    for layer in range(L):
        owner = [-1] * E
        rank_load = [0] * world_size
        rank_count = [0] * world_size
        for placed, e in enumerate(sorted(range(E), key=lambda e: -int(load[layer, e]))):
            allowed = [r for r in ranks_with_room(rank_count, capacity, E - placed)
                       if rank_load[r] + int(load[layer, e]) <= limit[layer]]
            if not allowed:
                return None
            if layer == 0:
                best = min(allowed, key=lambda r: rank_load[r])
            else:
                incoming = [0] * world_size
                for a in range(E):
                    incoming[placement[-1][a]] += int(transitions[layer - 1, a, e])
                best = max(allowed, key=lambda r: (incoming[r], -rank_load[r]))
            owner[e] = best
            rank_load[best] += int(load[layer, e])
            rank_count[best] += 1
        placement.append(owner)
    return placement


def reproducible_solver(work_s: float, workers: int, seed: int) -> cp_model.CpSolver:
    """A CP-SAT solver whose answer depends only on the model, ``workers`` and ``seed``: its strategies
    interleaved deterministically over ``workers`` and a budget of ``work_s`` deterministic seconds, with a
    wall-clock backstop of ``BACKSTOP`` times that."""
    solver = cp_model.CpSolver()
    solver.parameters.interleave_search = True
    solver.parameters.num_workers = workers
    solver.parameters.max_deterministic_time = work_s
    solver.parameters.max_time_in_seconds = BACKSTOP * work_s
    solver.parameters.random_seed = seed
    return solver


def check_the_clock(solver: cp_model.CpSolver, status: cp_model.CpSolverStatus, work_s: float,
                    what: str) -> str | None:
    """After a solve of ``what`` with a budget of ``work_s`` that ended with ``status``: where the wall-clock
    backstop rather than the budget or a proof ended it, a sentence saying so (else None), and where it found an
    answer, a warning that another run may not repeat it."""
    backstop = solver.parameters.max_time_in_seconds
    if status in (cp_model.OPTIMAL, cp_model.INFEASIBLE) or solver.deterministic_time >= work_s \
            or solver.wall_time < backstop:
        return None
    clock = (f"the solver's wall-clock backstop ({backstop:g} s) ended {what} after {solver.deterministic_time:.2f} "
             f"of its {work_s:g} s of work")
    if status == cp_model.FEASIBLE:
        warn(f"expert placement: {clock}, so another run may place differently; run it on a less busy machine")
    return clock
