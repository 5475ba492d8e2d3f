"""Bit allocation: choose one width per unit (an expert, a dense FFN, or one linear) under an average-bits budget.

Given for each unit ``u`` its parameter count ``params[u]``, importance ``importance[u]``, measured error
``error[u][w]`` at each candidate width ``widths[w]`` and an optional floor (smallest width allowed), solve
the integer program (OR-Tools, SCIP through ``pywraplp``)::

    minimize    sum_u importance[u] * sum_w error[u][w] * x[u][w]
    subject to  sum_w x[u][w] = 1                                 (one width per unit)
                sum_u params[u] * sum_w widths[w] * x[u][w] <= budget * sum_u params[u]
                x[u][w] = 0 where widths[w] < floor[u]
                x binary

The result is a plain, serializable ``Allocation``; the ``bit-allocation`` pass applies it. Inputs are plain
tables, so the solver is tested alone on tables whose optimum is known.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from ortools.linear_solver import pywraplp

from moec.errors import PassError


@dataclass(frozen=True)
class Allocation:
    bits: list[int]  # one width per unit
    objective: float  # sum of importance x error at the chosen widths
    average_bits: float  # parameter-weighted
    solve_seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


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


def solve(params: Sequence[int], importance: Sequence[float], error: Sequence[Sequence[float]],
          widths: Sequence[int], budget: float, floors: Sequence[int | None] | None = None) -> Allocation:
    """The optimal allocation (see the module docstring); ``PassError`` if the budget is infeasible."""
    units = len(params)
    floors = list(floors) if floors is not None else [None] * units
    if not (len(importance) == len(error) == len(floors) == units) or any(len(row) != len(widths) for row in error):
        raise ValueError("params, importance, error and floors need one entry per unit, error one column per width")
    for floor in floors:
        if floor is not None and floor > max(widths):
            raise PassError(f"a floor of {floor} bits is above every candidate width {list(widths)}")
    minimum = smallest_feasible_budget(params, widths, floors)
    if budget < minimum - 1e-9:
        raise PassError(f"an average budget of {budget} bits is infeasible: the smallest feasible budget for "
                        f"widths {list(widths)} and these floors is {minimum:.4f} bits; raise the budget or lower the floors")
    start = time.perf_counter()
    solver = pywraplp.Solver.CreateSolver("SCIP")
    choice = [[solver.BoolVar(f"x_{u}_{w}") if floors[u] is None or widths[w] >= floors[u] else None
               for w in range(len(widths))] for u in range(units)]
    total = float(sum(params))
    for u in range(units):
        solver.Add(solver.Sum([x for x in choice[u] if x is not None]) == 1)
    # Scaled by the total so the coefficients are fractions of the model (well conditioned for the solver).
    solver.Add(solver.Sum([params[u] / total * widths[w] * x for u in range(units)
                           for w, x in enumerate(choice[u]) if x is not None]) <= budget + 1e-9)
    solver.Minimize(solver.Sum([importance[u] * error[u][w] * x for u in range(units)
                                for w, x in enumerate(choice[u]) if x is not None]))
    status = solver.Solve()
    if status not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
        raise PassError(f"the bit-allocation solver found no solution (status {status}) for budget {budget}")
    bits = [next(widths[w] for w, x in enumerate(row) if x is not None and x.solution_value() > 0.5) for row in choice]
    return Allocation(bits, objective_of(bits, widths, importance, error), average_bits(bits, params),
                      time.perf_counter() - start)
