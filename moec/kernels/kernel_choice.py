"""Choosing among interchangeable kernels by timing them on this host: for each problem size, the fastest
is measured on the first call of that size and remembered for the rest of the process.

Why: which CPU GEMM streams a skinny expert matrix fastest depends on the host, not only on the shape.
On the Mixtral-sized block of ``tools/bench/moe_block.py`` onnxruntime's prepacked GEMMs beat torch's
oneDNN and MKL matmuls at 2 to 2048 tokens on a 2-core AMD EPYC (Zen 3), while on a 2-core Intel Xeon
(Emerald Rapids) MKL's ``F.linear`` is fastest at 1-4 and 2048 tokens and onnxruntime at 16-64
(docs/BENCHMARKS.md). A fixed rule is wrong on one of them.

How: ``KernelChoice.run(key, candidates)`` takes candidates that compute the same result (to rounding).
The first call for a key runs each candidate once untimed (sessions get built, pages touched, caches warm),
then ``rounds`` timed rounds, candidates interleaved so that background load hits all alike; after each
round a candidate slower than ``drop_above`` x the best time so far leaves the race. The fastest by its
best time is remembered for the key, and the call returns that candidate's result from its last run.
Later calls with the key run only the winner, so every call of one size in a process runs one kernel.
Races run one at a time (a lock): threads making a key's first call together wait for one race and run its
winner, and no race times kernels slowed by another.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Generic, TypeVar

__all__ = ["KernelChoice"]

KeyT = TypeVar("KeyT", bound=Hashable)
ResultT = TypeVar("ResultT")


class KernelChoice(Generic[KeyT]):
    """The fastest of interchangeable kernels per key, timed on the key's first call."""

    def __init__(self, rounds: int = 3, drop_above: float = 1.5,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if rounds < 1:
            raise ValueError(f"KernelChoice needs at least one timed round, got rounds={rounds}")
        self.rounds, self.drop_above, self.clock = rounds, drop_above, clock
        self.chosen: dict[KeyT, str] = {}
        self.timings: dict[KeyT, dict[str, float]] = {}  # key -> candidate -> best seconds measured
        self.racing = threading.RLock()  # re-entrant: a candidate may itself choose with this instance

    def run(self, key: KeyT, candidates: Mapping[str, Callable[[], ResultT]]) -> ResultT:
        """``candidates[name]()`` for the fastest ``name`` for ``key`` (measured now if ``key`` is new)."""
        known = self.chosen.get(key)
        if known is not None and known in candidates:
            return candidates[known]()
        if not candidates:
            raise ValueError("KernelChoice.run needs at least one candidate")
        if len(candidates) == 1:  # nothing to choose: no race, nothing remembered
            (only,) = candidates.values()
            return only()
        with self.racing:
            known = self.chosen.get(key)  # another thread's race for this key may have ended meanwhile
            if known is not None and known in candidates:
                return candidates[known]()
            return self.race(key, candidates)

    def race(self, key: KeyT, candidates: Mapping[str, Callable[[], ResultT]]) -> ResultT:
        """Time ``candidates`` (see the module), remember the winner for ``key``, return its result."""
        results = {name: run() for name, run in candidates.items()}  # warm-up round, untimed
        best: dict[str, float] = {}
        racing = list(candidates)
        for _ in range(self.rounds):
            for name in racing:
                start = self.clock()
                results[name] = candidates[name]()
                best[name] = min(best.get(name, float("inf")), self.clock() - start)
            fastest = min(best[name] for name in racing)
            racing = [name for name in racing if best[name] <= self.drop_above * fastest]
        winner = min(racing, key=best.__getitem__)
        self.chosen[key], self.timings[key] = winner, best
        return results[winner]
