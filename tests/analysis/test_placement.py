import itertools
import subprocess
import sys
import warnings

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


def test_a_solve_cut_short_by_its_budget_places_the_same_on_a_busy_machine():
    """CP-SAT stops on its deterministic work count, not the clock: a run while another process keeps a core
    busy gets less wall time per unit of work and still returns the same placement."""
    trace = synthetic_trace(1500, 4, 12, top_k=2, skew=0.3, affinity=0.6, seed=3)

    def solve():
        return placing.solve_placement(trace, 3, balance_eps=0.3, min_predecessor_share=0.0, time_limit_s=0.5)

    idle, idle_stats = solve()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        loaded, loaded_stats = solve()
    finally:
        busy.kill()
        busy.wait()
    assert idle_stats.status == loaded_stats.status == "FEASIBLE"  # not proved optimal: the budget ended it
    assert loaded.ranks == idle.ranks
    assert loaded_stats.solver_work == idle_stats.solver_work


def test_a_solve_the_wall_clock_backstop_ends_says_so(monkeypatch):
    monkeypatch.setattr(placing, "BACKSTOP", 1e-4)  # 0.1 ms of wall clock: over before the hint is read
    trace = synthetic_trace(1500, 4, 12, top_k=2, skew=0.3, affinity=0.6, seed=3)
    with pytest.raises(MoecError, match=r"^the solver's wall-clock backstop \(0\.0001 s\) ended the placement after "
                                        r"[0-9.]+ of its 1 s of work, before it found a placement; run it on a less busy"):
        placing.solve_placement(trace, 3, balance_eps=0.3, min_predecessor_share=0.0, time_limit_s=1)


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
    with pytest.raises(MoecError, match="balance_eps=0.1; raise balance_eps, leave it out"):
        placing.solve_placement(skewed, 2, balance_eps=0.1)
    with pytest.warns(UserWarning, match=r"in 1 of 1 layers.*: a 2x; give balance_eps"):
        _, stats = placing.solve_placement(skewed, 2)  # by default one expert too heavy for 10% is no error
    assert stats.balance_limits == {"a": 2.0} and stats.relaxed_layers == ["a"]


def test_every_rank_holds_an_expert_of_every_layer():
    """A skewed trace of few tokens (some experts never chosen) or a generous capacity leaves the solver free
    to pile experts on some ranks; a rank with no expert of a layer could not run its share of it."""
    cases = [(synthetic_trace(16, 3, 8, 2, skew=1.5, affinity=0.8, seed=seed), 6, None) for seed in range(4)]
    cases += [(synthetic_trace(64, 2, 4, 2, skew=2.0, seed=0), 2, 4), (synthetic_trace(16, 3, 8, 2, skew=1.5, seed=2), 5, 8)]
    for trace, world_size, capacity in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the default balance relaxed on such traces
            placement, _ = placing.solve_placement(trace, world_size, capacity=capacity, time_limit_s=2)
        assert placing.idle_ranks(placement) == {}, (world_size, capacity, placement.ranks)
    loads = torch.tensor([[40, 0, 0, 0, 0, 0, 0, 0]])
    assert min(placing.tightest_rank_loads(loads, 6, 8, [0])) == 40  # reachable with a rank for each of 6
    hint = placing.greedy_placement(loads, torch.zeros(0, 8, 8, dtype=torch.int64), 6, 8, [40])
    assert hint is not None and sorted(set(hint[0])) == list(range(6))


def test_a_solver_out_of_time_is_not_called_infeasible(monkeypatch):
    monkeypatch.setattr(placing.cp_model.CpSolver, "solve", lambda self, model: placing.cp_model.UNKNOWN)
    monkeypatch.setattr(placing.cp_model.CpSolver, "deterministic_time", property(lambda self: 0.5))  # all spent
    with pytest.raises(MoecError, match=r"found no placement .* within time_limit_s=0.5 of work \(nor proved that "
                       r"none exists\); raise time_limit_s"):
        placing.solve_placement(chain_trace(), 2, balance_eps=0.5, time_limit_s=0.5)


def test_an_empty_trace_is_refused():
    with pytest.raises(MoecError, match="holds no tokens"):
        placing.solve_placement(RoutingTrace(torch.zeros(0, 2, 1, dtype=torch.int64), ("a", "b"), 4), 2)


def few_tokens_trace() -> RoutingTrace:
    """32 top-1 tokens per layer with expert loads 10, 4, 8, 10 and 5, 9, 9, 9 (tiny-mixtral's on its
    example input): two experts a rank, so the best split is 18 / 14, 12.5% over the mean, not 10%."""
    layer0 = [0] * 10 + [1] * 4 + [2] * 8 + [3] * 10
    layer1 = [0] * 5 + [1] * 9 + [2] * 9 + [3] * 9
    return RoutingTrace(torch.tensor([layer0, layer1]).T.unsqueeze(2), ("l0", "l1"), 4)


def test_default_balance_relaxes_only_the_layers_that_cannot_reach_ten_percent():
    trace = few_tokens_trace()
    with pytest.raises(MoecError, match=r"satisfies balance_eps=0.1, capacity=2 \(solver: INFEASIBLE\)"):
        placing.solve_placement(trace, 2, balance_eps=0.1, time_limit_s=5)
    with pytest.warns(UserWarning, match=r"out of reach for 4 experts on 2 ranks \(at most 2 per rank\) in 2 of 2 "
                      r"layers.*: l0 1.125x, l1 1.125x; give balance_eps"):
        placement, stats = placing.solve_placement(trace, 2, time_limit_s=5)
    assert stats.balance_limits == {"l0": 1.125, "l1": 1.125} and stats.relaxed_layers == ["l0", "l1"]
    assert placing.load_imbalance(trace, placement) == 1.125
    with pytest.warns(UserWarning, match="at most 4 per rank"):  # three experts on a rank do no better
        _, stats = placing.solve_placement(trace, 2, capacity=4, time_limit_s=5)
    assert stats.balance_limits == {"l0": 1.125, "l1": 1.125}
    balanced = synthetic_trace(2000, 3, 8, top_k=2, skew=0.0, seed=1)  # 10% within reach: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        placement, stats = placing.solve_placement(balanced, 2, time_limit_s=5)
    assert stats.relaxed_layers == [] and max(stats.balance_limits.values()) <= 1.1
    assert placing.load_imbalance(balanced, placement) <= 1.1


def test_tightest_rank_loads_match_brute_force():
    generator = torch.Generator().manual_seed(0)
    load = torch.randint(0, 50, (6, 6), generator=generator)
    for world_size, capacity in ((2, 3), (3, 2), (2, 5), (4, 2)):
        found = placing.tightest_rank_loads(load, world_size, capacity, [0] * 6, time_limit_s=5)
        for layer, weights in enumerate(load.tolist()):
            best = min(max(sum(w for w, r in zip(weights, row, strict=True) if r == rank) for rank in range(world_size))
                       for row in itertools.product(range(world_size), repeat=6)
                       if 1 <= min(row.count(rank) for rank in range(world_size))
                       and max(row.count(rank) for rank in range(world_size)) <= capacity)
            assert found[layer] == best, (world_size, capacity, layer)


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
    """The bench's real-trace case: dense-to-moe on the real all-MiniLM-L6-v2 (its default coactivation
    clustering, 16 experts, top-4) calibrated on 128 sentences, routing traced one sentence at a time (no
    padding tokens), placed on 2 ranks from the calibration trace: on 128 held-out sentences at least 40%
    fewer cross-rank moves than round-robin. Slow: 100 s on a busy 2-core machine. (Smaller cases are too
    noisy to hold a floor: with 16 or 32 calibration sentences and 8 experts the cut ranged from 21% to 47%.)"""
    _, _, program = captured("minilm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    calibration_text, held_text = calibration_and_held_out(128, 128)
    calibration = calibrate(program, tokenized_batches(tokenizer, calibration_text), progress=False)
    program = Program(parse_graph(print_graph(program.graph)), program.weights, program.in_spec, program.out_spec)
    run_passes(program, build_passes({"passes": [{"dense_to_moe": {"experts": 16, "top_k": 4}}]}),
               PassContext(calibration=calibration, progress=False))

    def trace_of(sentences: list[str]) -> RoutingTrace:
        batches = tokenized_batches(tokenizer, sentences, batch_size=1)
        trace = collect_trace(program, [program.flatten_inputs((), batch) for batch in batches])
        assert trace.num_layers == 6 and trace.top_k == 4
        assert trace.num_tokens == sum(int(batch["attention_mask"].sum()) for batch in batches)
        return trace

    placed_on, held_out = trace_of(calibration_text), trace_of(held_text)
    rr = placing.round_robin_placement(placed_on.layers, 16, 2)
    eps = max(0.1, placing.load_imbalance(placed_on, rr) - 1)
    placement, _ = placing.solve_placement(placed_on, 2, balance_eps=eps, time_limit_s=10)
    assert placing.load_imbalance(placed_on, placement) <= 1 + eps + 1e-9
    cut = 1 - placing.cross_rank_moves(held_out, placement) / placing.cross_rank_moves(held_out, rr)
    assert cut >= 0.40, cut  # the target; 58.6% measured
