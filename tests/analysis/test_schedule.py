import networkx as nx
import pytest

from moec.analysis.schedule import (
    CostModel,
    LayerWork,
    choose_chunks,
    concurrent_streams,
    gantt_png,
    makespan,
    schedule_dag,
    start_times,
)
from moec.errors import MoecError

COST = CostModel(a2a_latency_s=1e-4, a2a_s_per_byte=1e-9, gemm_latency_s=1e-5, gemm_s_per_flop=1e-10)


def test_fit_recovers_lines():
    a2a = [(n, 2e-4 + 3e-9 * n) for n in (1e3, 1e5, 1e6)]
    gemm = [(f, 5e-6 + 2e-11 * f) for f in (1e6, 1e8, 1e9)]
    model = CostModel.fit(a2a, gemm)
    assert model.a2a_latency_s == pytest.approx(2e-4) and model.a2a_s_per_byte == pytest.approx(3e-9)
    assert model.gemm_latency_s == pytest.approx(5e-6) and model.gemm_s_per_flop == pytest.approx(2e-11)
    assert CostModel.from_json(model.to_json()) == model
    assert model.streams == 2.0 and CostModel.fit(a2a, gemm, streams=1.0).streams == 1.0
    older = {key: value for key, value in model.to_json().items() if key != "streams"}  # a plan from before
    assert CostModel.from_json(older) == model
    with pytest.raises(MoecError, match="two sizes"):
        CostModel.fit([(1.0, 1.0)], gemm)
    assert model.copy(1e6) == 0.0  # fitted without row-copy samples: copies are free
    copies = CostModel.fit(a2a, gemm, copy_samples=[(n, 1e-5 + 4e-10 * n) for n in (1e3, 1e6)])
    assert copies.copy_latency_s == pytest.approx(1e-5) and copies.copy_s_per_byte == pytest.approx(4e-10)
    assert copies.copy(0) == 0.0 and CostModel.from_json(copies.to_json()) == copies


def test_serial_schedule_is_the_sum_of_its_steps():
    work = LayerWork(4e6, 4e7, 1e7)
    dag = schedule_dag(work, COST, 3, overlap=False)
    assert makespan(dag) == pytest.approx(sum(d["seconds"] for _, d in dag.nodes(data=True)))


def test_row_copies_surround_each_chunks_communication():
    copying = CostModel(**{**COST.to_json(), "copy_latency_s": 2e-5, "copy_s_per_byte": 5e-10})
    work = LayerWork(4e6, 4e7, 1e7)
    for overlap in (False, True):
        dag = schedule_dag(work, copying, 3, overlap=overlap)
        for i in range(3):
            assert dag.has_edge(f"gather {i}", f"dispatch {i}") and dag.has_edge(f"combine {i}", f"sum {i}")
            assert dag.nodes[f"gather {i}"]["seconds"] == pytest.approx(2e-5 + 5e-10 * 4e6 / 3)
    serial = makespan(schedule_dag(work, copying, 1, overlap=False))
    assert serial == pytest.approx(makespan(schedule_dag(work, COST, 1, overlap=False)) + 2 * (2e-5 + 5e-10 * 4e6))
    start = start_times(schedule_dag(work, copying, 3))
    assert start["gather 2"] >= start["experts 0"]  # chunk 2 is gathered once chunk 0's experts are done


def test_overlap_dag_structure_and_makespan():
    work = LayerWork(4e6, 4e7, 1e7)  # dispatch ~4.1 ms, experts 4 ms, shared 1 ms
    dag = schedule_dag(work, COST, 2)
    assert nx.is_directed_acyclic_graph(dag)
    start = start_times(dag)
    # The shared expert runs while dispatch 0 is in flight; experts 0 waits for dispatch 0.
    assert start["shared"] < start["dispatch 0"] + dag.nodes["dispatch 0"]["seconds"]
    assert start["experts 0"] == pytest.approx(start["dispatch 0"] + dag.nodes["dispatch 0"]["seconds"])
    # Hand-computed: counts 0.1, d0 2.1, d1 2.1 (comm) ; shared 1.0 ; e0 2.01 ; c0, e1, c1.
    c, d, e = 1e-4, 1e-4 + 2e6 * 1e-9, 1e-5 + 2e7 * 1e-10
    d0_end, d1_end = c + d, c + 2 * d
    e0_end = max(d0_end, c + 1e-5 + 1e-3) + e
    c0_end = max(e0_end, d1_end) + d
    e1_end = max(e0_end, d1_end) + e
    assert makespan(dag) == pytest.approx(max(c0_end, e1_end) + d)
    assert makespan(dag) < makespan(schedule_dag(work, COST, 1, overlap=False))


def test_choose_chunks_is_the_best_count():
    work = LayerWork(4e6, 4e7, 1e7)
    chosen = choose_chunks(work, COST, max_chunks=6)
    best = min(makespan(schedule_dag(work, COST, c)) for c in range(1, 7))
    assert chosen.predicted_s == pytest.approx(best) and chosen.chunks > 1
    assert chosen.baseline_s == pytest.approx(makespan(schedule_dag(work, COST, 1, overlap=False)))
    latency_bound = CostModel(1.0, 0.0, 0.0, 1e-12)  # each all-to-all costs 1 s whatever its size
    assert choose_chunks(work, latency_bound).chunks == 1


def test_ranks_sharing_cores_gain_nothing_from_overlap():
    """With one stream per rank every schedule costs the sum of its steps, so chunking never pays."""
    work = LayerWork(4e6, 4e7, 1e7)
    shared_cores = CostModel(**{**COST.to_json(), "streams": 1.0})
    for chunks in (1, 2, 4):
        dag = schedule_dag(work, shared_cores, chunks)
        assert makespan(dag) == pytest.approx(sum(d["seconds"] for _, d in dag.nodes(data=True)))
    assert choose_chunks(work, COST).chunks > 1
    chosen = choose_chunks(work, shared_cores)
    assert chosen.chunks == 1 and chosen.predicted_s == pytest.approx(chosen.baseline_s)


@pytest.mark.parametrize(("cores", "ranks", "threads", "streams"),
                         [(2, 4, 1, 1.0), (4, 4, 1, 1.0), (6, 4, 1, 1.5), (8, 4, 1, 2.0), (64, 4, 2, 2.0)])
def test_concurrent_streams_from_cores_per_rank(cores, ranks, threads, streams):
    assert concurrent_streams(cores, ranks, threads) == streams
    with pytest.raises(MoecError, match="must be positive"):
        concurrent_streams(0, ranks)


def test_gantt_is_a_png():
    assert gantt_png(schedule_dag(LayerWork(1e6, 1e7), COST, 3)).startswith(b"\x89PNG")
    shared_cores = CostModel(**{**COST.to_json(), "streams": 1.0})
    assert gantt_png(schedule_dag(LayerWork(4e6, 4e7, 1e7), shared_cores, 2)).startswith(b"\x89PNG")
