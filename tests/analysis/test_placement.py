import itertools

import pytest
import torch

from moec.analysis import placement as placing
from moec.analysis.traces import RoutingTrace, synthetic_trace
from moec.errors import MoecError


def chain_trace() -> RoutingTrace:
    """Tokens follow fixed chains 0->2->1, 1->3->0, 2->0->3, 3->1->2: a perfect placement moves nothing."""
    chains = [(0, 2, 1), (1, 3, 0), (2, 0, 3), (3, 1, 2)]
    experts = torch.tensor([chains[t % 4] for t in range(40)]).unsqueeze(2)
    return RoutingTrace(experts, ("l0", "l1", "l2"), 4)


def test_chains_are_placed_with_no_moves():
    trace = chain_trace()
    placement, stats = placing.solve_placement(trace, 2, time_limit_s=10)
    assert placing.cross_rank_moves(trace, placement) == 0
    assert stats.status == "OPTIMAL" and stats.moves == 0
    assert placing.load_imbalance(trace, placement) == 1.0
    assert placing.cross_rank_moves(trace, placing.round_robin_placement(trace.layers, 4, 2)) > 0


def brute_force_moves(trace: RoutingTrace, world_size: int, eps: float) -> float:
    E = trace.num_experts
    rows = [row for row in itertools.product(range(world_size), repeat=E)
            if all(row.count(r) == E // world_size for r in range(world_size))]
    best = float("inf")
    for combo in itertools.product(rows, repeat=trace.num_layers):
        placement = placing.Placement(world_size, trace.layers, combo)
        if placing.load_imbalance(trace, placement) <= 1 + eps + 1e-9:
            best = min(best, placing.cross_rank_moves(trace, placement))
    return best


def test_cp_sat_matches_brute_force_optimum():
    trace = synthetic_trace(60, 3, 4, top_k=1, skew=0.3, affinity=0.5, seed=4)
    optimum = brute_force_moves(trace, 2, eps=0.5)
    placement, stats = placing.solve_placement(trace, 2, balance_eps=0.5, predecessors_per_expert=4, time_limit_s=10)
    assert stats.status == "OPTIMAL"
    assert placing.cross_rank_moves(trace, placement) == pytest.approx(optimum)
    assert placing.load_imbalance(trace, placement) <= 1.5


def test_placement_respects_capacity_and_balance():
    trace = synthetic_trace(2000, 4, 16, top_k=2, skew=0.3, affinity=0.8, seed=2)
    placement, _ = placing.solve_placement(trace, 4, balance_eps=0.2, time_limit_s=5)
    for row in placement.ranks:
        assert sorted(row.count(r) for r in range(4)) == [4, 4, 4, 4]
    assert placing.load_imbalance(trace, placement) <= 1.2 + 1e-9
    rr = placing.round_robin_placement(trace.layers, 16, 4)
    assert placing.cross_rank_moves(trace, placement) < 0.75 * placing.cross_rank_moves(trace, rr)


def test_baselines():
    contiguous = placing.contiguous_placement(("a",), 8, 4)
    assert contiguous.ranks == ((0, 0, 1, 1, 2, 2, 3, 3),)
    assert placing.round_robin_placement(("a",), 8, 4).ranks == ((0, 1, 2, 3, 0, 1, 2, 3),)
    assert contiguous.local_experts("a", 2) == [4, 5]
    assert placing.Placement.from_json(contiguous.to_json()) == contiguous


def test_bad_inputs_raise_clear_errors():
    trace = chain_trace()
    with pytest.raises(MoecError, match="at most 4 ranks"):
        placing.solve_placement(trace, 5)
    with pytest.raises(MoecError, match="raise the capacity"):
        placing.solve_placement(trace, 2, capacity=1)
    with pytest.raises(MoecError, match="memory"):
        placing.solve_placement(trace, 2, memory_bytes=10, expert_bytes=[100, 100, 100])
    skewed = RoutingTrace(torch.zeros(10, 1, 1, dtype=torch.int64), ("a",), 4)
    with pytest.raises(MoecError, match="balance_eps"):
        placing.solve_placement(skewed, 2)
