"""The bit-allocation integer program on hand-made tables whose optimum is known."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from moec.analysis.bit_allocation import average_bits, objective_of, solve
from moec.errors import PassError

ERRORS = [[10.0, 1.0], [2.0, 1.0], [5.0, 0.0]]  # three equal units, widths 2 and 4


def test_budget_buys_the_largest_error_reduction():
    # Budget 3.0 over three equal units allows one unit at 4 bits; unit 0 gains the most (10 -> 1).
    allocation = solve([100, 100, 100], [1, 1, 1], ERRORS, (2, 4), budget=3.0)
    assert allocation.bits == [4, 2, 2]
    assert allocation.objective == pytest.approx(1 + 2 + 5)
    assert allocation.average_bits == pytest.approx(8 / 3)


def test_importance_changes_the_choice():
    # With unit 2 three times as important, its gain (15) beats unit 0's (9).
    assert solve([100, 100, 100], [1, 1, 3], ERRORS, (2, 4), budget=3.0).bits == [2, 2, 4]


def test_parameter_counts_weight_the_budget():
    # Unit 0 is big: upgrading it alone costs more than the budget allows, so the two small ones go up.
    allocation = solve([400, 100, 100], [1, 1, 1], ERRORS, (2, 4), budget=2.7)
    assert allocation.bits == [2, 4, 4]


def test_floors_are_respected():
    allocation = solve([100, 100, 100], [1, 1, 1], ERRORS, (2, 4), budget=3.0, floors=[None, 4, None])
    assert allocation.bits == [2, 4, 2]


@pytest.mark.parametrize(("budget", "floors", "smallest"), [(1.5, None, "2.0000"), (2.5, [None, 4, 4], "3.3334")])
def test_infeasible_budget_names_the_smallest_feasible_one_rounded_up(budget, floors, smallest):
    with pytest.raises(PassError, match=rf"budget of {budget} bits is infeasible.*smallest feasible budget .* is {smallest} bits"):
        solve([100, 100, 100], [1, 1, 1], ERRORS, (2, 4), budget=budget, floors=floors)
    solve([100, 100, 100], [1, 1, 1], ERRORS, (2, 4), budget=float(smallest), floors=floors)  # the figure works


@pytest.mark.parametrize("budget", [float("inf"), float("nan")])
def test_budget_must_be_finite(budget):
    with pytest.raises(PassError, match=rf"budget={budget} must be a finite average number of bits"):
        solve([100, 100, 100], [1, 1, 1], ERRORS, (2, 4), budget=budget)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_errors_are_refused(bad):
    with pytest.raises(ValueError, match="must be finite numbers"):
        solve([100, 100], [1, 1], [[bad, 0.1], [0.5, 0.1]], (2, 4), budget=3.0)


@settings(max_examples=50, deadline=None)
@given(
    data=st.data(),
    units=st.integers(1, 5),
    budget=st.sampled_from([2.0, 2.5, 3.0, 3.5, 5.0]),
)
def test_matches_brute_force(data, units, budget):
    widths = (2, 3, 4, 8)
    params = data.draw(st.lists(st.integers(1, 50), min_size=units, max_size=units))
    importance = data.draw(st.lists(st.floats(0.0, 5.0), min_size=units, max_size=units))
    # Errors in any order: a wider width may be no better (dominated), which the solver must handle.
    error = [data.draw(st.lists(st.floats(0.0, 10.0), min_size=4, max_size=4)) for _ in range(units)]
    floors = data.draw(st.lists(st.sampled_from([None, None, 3, 4]), min_size=units, max_size=units))
    feasible = [bits for bits in itertools.product(widths, repeat=units) if average_bits(bits, params) <= budget + 1e-9
                and all(floor is None or b >= floor for b, floor in zip(bits, floors, strict=True))]
    assume(feasible)
    best = min(objective_of(bits, widths, importance, error) for bits in feasible)
    allocation = solve(params, importance, error, widths, budget, floors)
    assert allocation.average_bits <= budget + 1e-9
    assert allocation.objective == pytest.approx(best, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("budget", [3.0, 2.5])
def test_reduced_cost_fixing_keeps_the_optimum_of_a_full_size_table(budget):
    # 64 layers x 64 experts x 4 widths: the fast solve (a small core after reduced-cost fixing) must reach
    # the same optimum as the solver given every width of every unit.
    rng = random.Random(7)
    widths = (2, 3, 4, 8)
    params = [rng.randint(1, 4) * 1_000_000 for _ in range(64 * 64)]
    importance = [rng.random() for _ in params]
    error = [sorted((rng.random() * 2.0**-b for b in widths), reverse=True) for _ in params]
    fast = solve(params, importance, error, widths, budget)
    full = solve(params, importance, error, widths, budget, reduced_cost_fixing=False)
    assert fast.core_units < len(params) // 2 < full.core_units
    assert fast.average_bits <= budget + 1e-9
    assert fast.lower_bound <= fast.objective
    assert fast.objective == pytest.approx(full.objective, rel=1e-9)
