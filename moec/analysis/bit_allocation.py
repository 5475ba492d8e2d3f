"""Bit allocation: choose one width per unit (an expert, a dense FFN, or one linear) under an average-bits budget.

Given for each unit ``u`` its parameter count ``params[u]``, importance ``importance[u]``, measured error
``error[u][w]`` at each candidate width ``widths[w]`` and an optional floor (smallest width allowed), find
the optimum of the integer program (a multiple-choice knapsack)::

    minimize    sum_u importance[u] * sum_w error[u][w] * x[u][w]
    subject to  sum_w x[u][w] = 1                                 (one width per unit)
                sum_u params[u] * sum_w widths[w] * x[u][w] <= budget * sum_u params[u]
                x[u][w] = 0 where widths[w] < floor[u]
                x binary

Solved exactly in three steps, so that thousands of units leave only a small problem to the solver:

1. **Dominated widths are dropped** (exact): a width whose cost (importance x error) is not below that of a
   narrower allowed width can never be in an optimum that the narrower one would not also give.
2. **The LP relaxation is solved greedily**: it has a closed form (take each unit's lower convex hull of
   (bits, cost); take the upgrades along the hulls in order of cost saved per bit until the budget is spent),
   which gives the lower bound ``lower_bound``, the budget's price ``lam``, and, by skipping upgrades that do
   not fit, a feasible allocation whose cost is an upper bound.
3. **Reduced-cost fixing** (exact): every feasible allocation costs at least ``lower_bound + sum_u r[u][w_u]``,
   where ``r[u][w] = cost + lam * bits - min over the unit's widths of the same`` (Lagrangian bound), so a
   width with ``lower_bound + r > upper bound`` is in no optimum and is removed. (The bound holds for any
   price ``lam >= 0``, so the fixing stays exact even where floating point makes the price inexact.) The
   units left with more than one width (the "core": those near the budget's margin; more of them the larger
   the LP's integrality gap) go to OR-Tools (SCIP through ``pywraplp``) with a relative gap of 0.

The result is a plain, serializable ``Allocation``; the ``bit-allocation`` pass applies it. Inputs are plain
tables, so the solver is tested alone on tables whose optimum is known.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ortools.linear_solver import pywraplp

from moec.errors import PassError

# Reduced-cost fixing keeps a width whose bound is within this relative margin of the incumbent, so that
# floating-point rounding in the bounds can only keep more widths, never drop an optimal one.
FIXING_MARGIN = 1e-9


@dataclass(frozen=True)
class Allocation:
    bits: list[int]  # one width per unit
    objective: float  # sum of importance x error at the chosen widths
    average_bits: float  # parameter-weighted
    solve_seconds: float
    lower_bound: float  # the LP relaxation's optimum: no allocation costs less
    core_units: int  # units left with more than one width after reduced-cost fixing (all units without it)


def average_bits(bits: Sequence[int], params: Sequence[int]) -> float:
    return sum(b * p for b, p in zip(bits, params, strict=True)) / sum(params)


def objective_of(bits: Sequence[int], widths: Sequence[int], importance: Sequence[float],
                 error: Sequence[Sequence[float]]) -> float:
    """The allocation objective of any assignment (for comparing the solved one with uniform ones)."""
    return sum(imp * row[list(widths).index(b)] for b, imp, row in zip(bits, importance, error, strict=True))


def smallest_feasible_budget(params: Sequence[int], widths: Sequence[int], floors: Sequence[int | None]) -> float:
    """The lowest average the floors and candidate widths allow (every unit at its smallest allowed width)."""
    lowest = [min(w for w in widths if floor is None or w >= floor) for floor in floors]
    return average_bits(lowest, params)


def check_budget(budget: float, params: Sequence[int], widths: Sequence[int], floors: Sequence[int | None],
                 described_floors: str) -> None:
    """A ``PassError`` unless ``budget`` is finite and at least ``smallest_feasible_budget``. The message gives
    that smallest budget rounded up to 4 decimals, so that the printed figure is itself a feasible budget."""
    if not math.isfinite(budget):
        raise PassError(f"budget={budget} must be a finite average number of bits (such as 3.0)")
    minimum = smallest_feasible_budget(params, widths, floors)
    if budget < minimum - 1e-9:
        # Up, not to the nearest: 3.33333 prints as 3.3334. The 1e-6 (of the last digit) keeps float noise
        # above an exact figure, such as 3.0000000000000004, from printing as 3.0001.
        smallest = math.ceil(minimum * 1e4 - 1e-6) / 1e4
        raise PassError(f"an average budget of {budget} bits is infeasible: the smallest feasible budget for "
                        f"widths {list(widths)} and {described_floors} is {smallest:.4f} bits; raise the budget or "
                        "lower the floors")


@dataclass(frozen=True)
class Choice:
    """One candidate width of one unit: its bits (params x width) and its cost (importance x error)."""

    width: int
    bits: float
    cost: float


def undominated_choices(params: int, importance: float, errors: Sequence[float], widths: Sequence[int],
                        floor: int | None) -> list[Choice]:
    """The unit's allowed widths, narrowest first, each strictly cheaper than every narrower one."""
    kept: list[Choice] = []
    for width, error in sorted(zip(widths, errors, strict=True)):
        if (floor is None or width >= floor) and (not kept or importance * error < kept[-1].cost):
            kept.append(Choice(width, float(params * width), importance * error))
    return kept


def hull_upgrades(choices: list[Choice]) -> list[tuple[float, int, int]]:
    """Steps along the lower convex hull of the unit's (bits, cost) points, as (cost saved per bit, from, to):
    the LP relaxation only ever mixes neighbouring hull points, and the savings per bit fall along the hull."""
    hull = [0]
    for index in range(1, len(choices)):
        while len(hull) >= 2:
            a, b, c = choices[hull[-2]], choices[hull[-1]], choices[index]
            # Drop b when it lies on or above the segment from a to c.
            if (b.cost - a.cost) * (c.bits - a.bits) >= (c.cost - a.cost) * (b.bits - a.bits):
                hull.pop()
            else:
                break
        hull.append(index)
    return [((choices[i].cost - choices[j].cost) / (choices[j].bits - choices[i].bits), i, j)
            for i, j in zip(hull, hull[1:], strict=False)]


def lagrangian_price(choices: list[list[Choice]], capacity: float) -> float:
    """The LP relaxation's price of one bit: the saving per bit of the hull upgrade the budget runs out in
    (taking upgrades greedily, best saving per bit first); 0 when every upgrade fits."""
    spent = sum(unit[0].bits for unit in choices)
    for saving, u, i, j in sorted_upgrades(choices):
        spent += choices[u][j].bits - choices[u][i].bits
        if spent > capacity:
            return saving
    return 0.0


def sorted_upgrades(choices: list[list[Choice]]) -> list[tuple[float, int, int, int]]:
    """Every unit's hull upgrades as (saving per bit, unit, from, to), best first; a unit's own upgrades
    keep their hull order because their savings per bit strictly fall (and the sort is stable)."""
    return sorted(((saving, u, i, j) for u, unit in enumerate(choices) for saving, i, j in hull_upgrades(unit)),
                  key=lambda step: -step[0])


def greedy_allocation(choices: list[list[Choice]], capacity: float) -> list[int]:
    """A feasible allocation (an index into each unit's choices): take hull upgrades best first, skipping one
    that does not fit (and the rest of that unit's)."""
    picked = [0] * len(choices)
    spent = sum(unit[0].bits for unit in choices)
    for _, u, i, j in sorted_upgrades(choices):
        step = choices[u][j].bits - choices[u][i].bits
        if picked[u] == i and spent + step <= capacity:
            picked[u], spent = j, spent + step
    return picked


def exact_solve(choices: list[list[Choice]], capacity: float, total: float, hint: list[int]) -> list[int]:
    """The integer program over ``choices`` solved to optimality (relative gap 0) by SCIP, starting from the
    feasible allocation ``hint``."""
    solver = pywraplp.Solver.CreateSolver("SCIP")
    # A tight feasibility tolerance, so that the solver cannot buy a few extra bits beyond the budget.
    solver.SetSolverSpecificParametersAsString("numerics/feastol = 1e-9\n")
    choice = [[solver.BoolVar(f"x_{u}_{c.width}") for c in unit] for u, unit in enumerate(choices)]
    for row in choice:
        solver.Add(solver.Sum(row) == 1)
    # Scaled by the total so the coefficients are fractions of the model (well conditioned for the solver).
    solver.Add(solver.Sum([c.bits / total * x for unit, row in zip(choices, choice, strict=True)
                           for c, x in zip(unit, row, strict=True)]) <= capacity / total)
    solver.Minimize(solver.Sum([c.cost * x for unit, row in zip(choices, choice, strict=True)
                                for c, x in zip(unit, row, strict=True)]))
    solver.SetHint([x for row in choice for x in row],
                   [float(i == picked) for row, picked in zip(choice, hint, strict=True) for i in range(len(row))])
    settings = pywraplp.MPSolverParameters()
    settings.SetDoubleParam(settings.RELATIVE_MIP_GAP, 0.0)
    status = solver.Solve(settings)
    if status != pywraplp.Solver.OPTIMAL:
        raise PassError(f"the bit-allocation solver did not reach an optimum (status {status})")
    return [next(i for i, x in enumerate(row) if x.solution_value() > 0.5) for row in choice]


def solve(params: Sequence[int], importance: Sequence[float], error: Sequence[Sequence[float]],
          widths: Sequence[int], budget: float, floors: Sequence[int | None] | None = None,
          reduced_cost_fixing: bool = True) -> Allocation:
    """The optimal allocation (see the module docstring); ``PassError`` if the budget is infeasible.

    ``reduced_cost_fixing=False`` hands every undominated width to the solver (slower; for checking)."""
    units = len(params)
    floors = list(floors) if floors is not None else [None] * units
    if not (len(importance) == len(error) == len(floors) == units) or any(len(row) != len(widths) for row in error):
        raise ValueError("params, importance, error and floors need one entry per unit, error one column per width")
    if not all(math.isfinite(x) for x in [*importance, *(e for row in error for e in row)]):
        raise ValueError("importance and error must be finite numbers (a non-finite error makes every comparison "
                         "false, so no width could be weighed)")
    for floor in floors:
        if floor is not None and floor > max(widths):
            raise PassError(f"a floor of {floor} bits is above every candidate width {list(widths)}")
    check_budget(budget, params, widths, floors, "these floors")
    start = time.perf_counter()
    total = float(sum(params))
    capacity = (budget + 1e-9) * total
    choices = [undominated_choices(p, imp, row, widths, floor)
               for p, imp, row, floor in zip(params, importance, error, floors, strict=True)]
    price = lagrangian_price(choices, capacity)
    priced = [[c.cost + price * c.bits for c in unit] for unit in choices]
    lower_bound = sum(min(unit) for unit in priced) - price * capacity
    incumbent = greedy_allocation(choices, capacity)
    if reduced_cost_fixing:
        upper_bound = sum(unit[i].cost for unit, i in zip(choices, incumbent, strict=True))
        slack = upper_bound - lower_bound + FIXING_MARGIN * (abs(upper_bound) + abs(lower_bound))
        kept = [[i for i, value in enumerate(unit) if value - min(unit) <= slack] for unit in priced]
    else:
        kept = [list(range(len(unit))) for unit in choices]
    core = [u for u, indices in enumerate(kept) if len(indices) > 1]
    picked = [indices[0] for indices in kept]
    if core:
        in_core = set(core)
        core_capacity = capacity - sum(choices[u][picked[u]].bits for u in range(units) if u not in in_core)
        solved = exact_solve([[choices[u][i] for i in kept[u]] for u in core], core_capacity, total,
                             [kept[u].index(incumbent[u]) for u in core])
        for u, index in zip(core, solved, strict=True):
            picked[u] = kept[u][index]
    bits = [unit[i].width for unit, i in zip(choices, picked, strict=True)]
    return Allocation(bits, objective_of(bits, widths, importance, error), average_bits(bits, params),
                      time.perf_counter() - start, lower_bound, len(core))
