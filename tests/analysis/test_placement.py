import itertools

import pytest
import torch
import transformers

from moec.analysis import placement as placing
from moec.analysis import placement_search
from moec.analysis.calibration import calibrate
from moec.analysis.corpus import calibration_and_held_out, tokenized_batches
from moec.analysis.traces import RoutingTrace, collect_trace, synthetic_trace
from moec.errors import MoecError
from moec.frontend.zoo import minilm_path
from moec.ir.parser import parse_graph
from moec.ir.printer import print_graph
from moec.ir.program import Program
from moec.passes import PassContext, build_passes, run_passes


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
    placement, stats = placing.solve_placement(trace, 2, balance_eps=0.5, predecessors_per_expert=4,
                                               min_predecessor_share=0.0, time_limit_s=10)
    assert stats.status == "OPTIMAL"
    assert placing.cross_rank_moves(trace, placement) == pytest.approx(optimum)
    assert placing.load_imbalance(trace, placement) <= 1.5


def test_solver_reports_its_gap_both_ways():
    trace = synthetic_trace(2000, 4, 16, top_k=2, skew=0.3, affinity=0.6, seed=3)
    _, stats = placing.solve_placement(trace, 4, balance_eps=0.3, min_predecessor_share=0.0, time_limit_s=3)
    assert stats.bound >= stats.objective > 0
    assert stats.gap == pytest.approx((stats.bound - stats.objective) / stats.objective)
    assert stats.gap_moves == pytest.approx((stats.bound - stats.objective) / stats.solver_moves)
    assert stats.moves <= stats.solver_moves  # unmodelled mass that the local search keeps local only helps


def test_affinity_edges_leave_out_thin_predecessors():
    transitions = torch.zeros(1, 3, 3, dtype=torch.int64)
    transitions[0, :, 0] = torch.tensor([100, 30, 10])  # expert 0 of layer 1: 10 is under a quarter of 100
    transitions[0, 2, 1] = 5
    edges = placing.affinity_edges(transitions, per_expert=3, min_share=0.25)
    assert edges == [[[(0, 100), (1, 30)], [(2, 5)], []]]


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


def chains_with_cross_talk(cross: int) -> torch.Tensor:
    """Transitions of four chains 0->0->0, 1->1->1, ... (mass 100 per step) over three layers, plus
    ``cross`` mass from chain 0 into chain 1 and from chain 2 into chain 3 at every step."""
    transitions = torch.zeros(2, 4, 4, dtype=torch.int64)
    for layer in range(2):
        transitions[layer] += 100 * torch.eye(4, dtype=torch.int64)
        transitions[layer, 0, 1] = transitions[layer, 2, 3] = cross
    return transitions


def test_group_swaps_regroup_whole_chains_that_expert_swaps_cannot_move():
    transitions = chains_with_cross_talk(cross=10)
    load = torch.full((3, 4), 100, dtype=torch.int64)
    limit = torch.full((3,), 200)
    start = torch.tensor([[0, 1, 0, 1]] * 3)  # chains 0 and 2 share rank 0: no cross-talk stays local
    edges = placing.affinity_edges(transitions, per_expert=2, min_share=0.25)
    groups = placement_search.affinity_groups(edges, 3, 4)
    assert groups.shape == (4, 3, 4)  # one group per chain
    no_groups = torch.zeros(0, 3, 4, dtype=torch.bool)
    assert torch.equal(placement_search.improve(start, transitions, load, limit, 2, no_groups), start)
    best = placement_search.improve(start, transitions, load, limit, 2, groups)
    assert best[:, 0].eq(best[0, 0]).all() and best[:, 1].eq(best[0, 0]).all()  # chains 0 and 1 together
    assert best[:, 2].eq(best[0, 2]).all() and best[:, 3].eq(best[0, 2]).all() and best[0, 0] != best[0, 2]


def test_local_search_respects_the_load_limit():
    transitions = chains_with_cross_talk(cross=10)
    load = torch.tensor([[150, 250, 100, 100]] * 3)  # chains 0 and 1 together would carry 400
    start = torch.tensor([[0, 1, 0, 1]] * 3)
    groups = placement_search.affinity_groups(placing.affinity_edges(transitions, 2, 0.25), 3, 4)
    assert torch.equal(placement_search.improve(start, transitions, load, torch.full((3,), 350), 2, groups), start)
    regrouped = placement_search.improve(start, transitions, load, torch.full((3,), 400), 2, groups)
    assert regrouped[0, 0] == regrouped[0, 1] != regrouped[0, 2] == regrouped[0, 3]


@pytest.mark.slow
def test_minilm_converted_to_moe_traces_without_padding_and_placement_beats_round_robin(captured):
    """The bench's real-trace case in miniature: dense-to-moe on the real all-MiniLM-L6-v2 (its default
    coactivation clustering), routing traced one sentence at a time (no padding tokens), placed on 2 ranks:
    at least 40% fewer cross-rank moves than round-robin. Slow: about a minute here."""
    _, _, program = captured("minilm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    calibration_text, held_text = calibration_and_held_out(16, 8)
    calibration = calibrate(program, tokenized_batches(tokenizer, calibration_text), progress=False)
    program = Program(parse_graph(print_graph(program.graph)), program.weights, program.in_spec, program.out_spec)
    run_passes(program, build_passes({"passes": [{"dense_to_moe": {"experts": 8, "top_k": 2}}]}),
               PassContext(calibration=calibration, progress=False))
    batches = tokenized_batches(tokenizer, held_text, batch_size=1)
    trace = collect_trace(program, [program.flatten_inputs((), batch) for batch in batches])
    assert trace.num_layers == 6 and trace.top_k == 2
    assert trace.num_tokens == sum(int(batch["attention_mask"].sum()) for batch in batches)
    rr = placing.round_robin_placement(trace.layers, 8, 2)
    eps = max(0.1, placing.load_imbalance(trace, rr) - 1)
    placement, _ = placing.solve_placement(trace, 2, balance_eps=eps, time_limit_s=5)
    assert placing.load_imbalance(trace, placement) <= 1 + eps + 1e-9
    cut = 1 - placing.cross_rank_moves(trace, placement) / placing.cross_rank_moves(trace, rr)
    assert cut >= 0.40, cut  # the target; 51% measured
