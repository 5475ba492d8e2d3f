"""KernelChoice: the fastest candidate per key, timed on the key's first call (a fake clock that each
candidate advances by its cost stands in for time)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from moec.kernels.kernel_choice import KernelChoice


class FakeTime:
    """A clock that only candidates move: ``candidate(name, cost)`` returns a kernel taking ``cost`` seconds."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def candidate(self, name: str, cost: float):
        def run() -> str:
            self.now += cost
            self.calls.append(name)
            return f"result of {name}"

        return run


def test_picks_the_fastest_remembers_it_and_returns_its_result() -> None:
    clock = FakeTime()
    choice = KernelChoice(rounds=2, clock=clock)
    candidates = {"a": clock.candidate("a", 3.0), "b": clock.candidate("b", 1.0), "c": clock.candidate("c", 1.2)}
    assert choice.run("layer", candidates) == "result of b"
    assert choice.chosen == {"layer": "b"}
    assert choice.timings["layer"] == pytest.approx({"a": 3.0, "b": 1.0, "c": 1.2})
    # one untimed warm-up round of all three, then two timed rounds; "a" (3x the best) left after the first
    assert clock.calls == ["a", "b", "c", "a", "b", "c", "b", "c"]
    clock.calls.clear()
    assert choice.run("layer", candidates) == "result of b"
    assert clock.calls == ["b"], "a known key runs only its winner"


def test_each_key_is_measured_on_its_own() -> None:
    clock = FakeTime()
    choice = KernelChoice(rounds=1, clock=clock)
    small = {"onnx": clock.candidate("onnx", 2.0), "blas": clock.candidate("blas", 1.0)}
    large = {"onnx": clock.candidate("onnx", 5.0), "blas": clock.candidate("blas", 9.0)}
    assert choice.run(1, small) == "result of blas"
    assert choice.run(2, large) == "result of onnx"
    assert choice.chosen == {1: "blas", 2: "onnx"}


def test_the_best_time_of_the_rounds_decides() -> None:
    """A candidate slowed once (background load) still wins on its best round."""
    clock = FakeTime()
    costs = iter([1.0, 9.0, 1.0, 1.0])  # warm-up, then a slow first timed round, then a fast second one

    def jittery() -> str:
        clock.now += next(costs)
        return "jittery"

    choice = KernelChoice(rounds=2, drop_above=100.0, clock=clock)
    assert choice.run("k", {"jittery": jittery, "steady": clock.candidate("steady", 2.0)}) == "jittery"
    assert choice.timings["k"] == pytest.approx({"jittery": 1.0, "steady": 2.0})


def test_a_remembered_winner_that_is_not_offered_is_measured_again() -> None:
    clock = FakeTime()
    choice = KernelChoice(rounds=1, clock=clock)
    choice.run("k", {"onnx": clock.candidate("onnx", 1.0), "blas": clock.candidate("blas", 2.0)})
    assert choice.run("k", {"blas": clock.candidate("blas", 2.0), "mkl": clock.candidate("mkl", 3.0)}) == "result of blas"
    assert choice.chosen["k"] == "blas"


def test_a_single_candidate_just_runs() -> None:
    clock = FakeTime()
    choice = KernelChoice(clock=clock)
    assert choice.run("k", {"only": clock.candidate("only", 1.0)}) == "result of only"
    assert clock.calls == ["only"] and not choice.chosen


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least one timed round"):
        KernelChoice(rounds=0)
    with pytest.raises(ValueError, match="at least one candidate"):
        KernelChoice().run("k", {})


def test_threads_making_a_keys_first_call_together_wait_for_one_race() -> None:
    """Every call of one size runs one kernel, in a server's threads too: the threads that arrive while the race
    runs wait for it and run its winner (each racing on its own gave different threads different kernels)."""
    clock = FakeTime()
    choice = KernelChoice(rounds=1, clock=clock)

    def arriving_slowly(name: str, cost: float):
        run = clock.candidate(name, cost)

        def call() -> str:
            time.sleep(0.01)  # real time, for the other threads to arrive during the race
            return run()

        return call

    candidates = {"a": arriving_slowly("a", 3.0), "b": arriving_slowly("b", 1.0)}
    together = threading.Barrier(4)

    def first_call(_: int) -> str:
        together.wait()
        return choice.run("k", candidates)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(first_call, range(4)))
    assert results == ["result of b"] * 4
    assert clock.calls.count("a") == 2, "one race: a's warm-up and its timed round"
