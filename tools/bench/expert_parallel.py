"""Benchmark: expert placement (CP-SAT vs contiguous and round-robin) and overlapped expert-parallel steps.

Placement, on routing traces: synthetic (16 layers x 64 experts x 8 ranks, Zipf skew 0.2, inter-layer
affinity 0.8, top-1 and top-2), collected from the tiny OLMoE zoo model (random weights, so it has
little affinity), and collected from the real all-MiniLM-L6-v2 converted to MoE (16 experts, top-4) on
calibration sentences, scored there and on held-out sentences. Reported: expected cross-rank token moves
of each placement, the load imbalance (busiest rank / mean, worst layer), CP-SAT's time, status and gap
to its own bound (relative to its objective and to the modelled moved tokens).

Overlap, on 4 local gloo ranks (one thread each, started with torchrun by this script): one MoE layer
(8 experts, 2 per rank, top-2, hidden 512, expert FFN 48 so that compute and all-to-all are of similar
size, 512 tokens per rank, uniform routing, a shared expert of the same width). The all-to-all, GEMM and
row-copy costs are measured and fitted (``moec.analysis.schedule.CostModel``; its concurrent streams per rank from the cores per rank),
``choose_chunks`` picks the chunk count, and the
non-overlapped step (C = 1, shared expert after) and the chosen overlapped schedule are timed interleaved,
slowest rank's time, median over repeats. The cost model's predictions are compared with both. A Gantt
chart of the chosen schedule is written as PNG.

Run:  python tools/bench/expert_parallel.py [--quick] [--out bench-results/expert_parallel.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench_util import output_file, require_close  # noqa: E402

from moec.analysis import placement as placing  # noqa: E402
from moec.analysis.schedule import (  # noqa: E402
    CostModel,
    LayerWork,
    choose_chunks,
    concurrent_streams,
    gantt_png,
    schedule_dag,
)
from moec.analysis.traces import collect_trace, synthetic_trace  # noqa: E402


def placement_case(name, trace, world_size, time_limit_s, balance_eps=0.1, held_out=None):
    """Place ``trace``'s experts; score every placement on ``trace`` and, when given, on ``held_out``
    (a trace of other inputs: what the placement meets after calibration)."""
    rr = placing.round_robin_placement(trace.layers, trace.num_experts, world_size)
    contiguous = placing.contiguous_placement(trace.layers, trace.num_experts, world_size)
    eps = max(balance_eps, placing.load_imbalance(trace, rr) - 1)  # at least as balanced as round-robin
    solved, stats = placing.solve_placement(trace, world_size, balance_eps=eps, time_limit_s=time_limit_s)
    row = {
        "case": name, "tokens": trace.num_tokens, "layers": trace.num_layers, "experts": trace.num_experts,
        "top_k": trace.top_k, "ranks": world_size, "balance_eps": round(eps, 4), "solver": stats.to_json(),
    }
    if world_size == 2 and trace.num_experts <= 16:
        row["optimum_moves"] = exact_two_rank_moves(trace, eps)
    for label, scored in (("", trace), ("held_out_", held_out)):
        if scored is None:
            continue
        moves = {p.method: placing.cross_rank_moves(scored, p) for p in (contiguous, rr, solved)}
        row[f"{label}moves"] = moves
        row[f"{label}imbalance"] = {p.method: round(placing.load_imbalance(scored, p), 4) for p in (contiguous, rr, solved)}
        row[f"{label}cut_vs_round_robin"] = 1 - moves["cp-sat"] / moves["round-robin"] if moves["round-robin"] else 0.0
        print(f"{name + (' (held-out)' if label else ''):40s} moves rr {moves['round-robin']:9.0f} contiguous "
              f"{moves['contiguous']:9.0f} cp-sat {moves['cp-sat']:9.0f} (cut {row[f'{label}cut_vs_round_robin']:.1%}); "
              f"imbalance rr {row[f'{label}imbalance']['round-robin']:.3f} cp-sat {row[f'{label}imbalance']['cp-sat']:.3f}")
    if "optimum_moves" in row:
        print(f"{'':40s} exact optimum on 2 ranks: {row['optimum_moves']:.0f} moves "
              f"(cut {1 - row['optimum_moves'] / row['moves']['round-robin']:.1%})")
    print(f"{'':40s} solver {stats.status} {stats.seconds:.1f} s (CP-SAT {stats.solver_seconds:.1f} s, "
          f"{stats.solver_work:.1f} of work), gap {stats.gap:.2%} of the objective, "
          f"{stats.gap_moves:.2%} of modelled moves", flush=True)
    return row


def exact_two_rank_moves(trace, balance_eps: float) -> float:
    """The fewest cross-rank moves of any placement on 2 ranks with E/2 experts each and every layer's
    rank loads within the solver's limit: dynamic programming over layers, a layer's state being the
    half of its experts on rank 0. Exact, and affordable up to 16 experts (12,870 halves)."""
    E = trace.num_experts
    halves = torch.tensor(list(itertools.combinations(range(E), E // 2)))
    on_first = torch.zeros(len(halves), E, dtype=torch.float64).scatter_(1, halves, 1.0)  # [S, E]
    load = trace.expert_load().round()
    transitions = trace.transitions()

    def allowed(layer):
        limit = math.floor((1 + balance_eps) * float(load[layer].sum()) / 2)
        return (on_first @ load[layer] <= limit) & ((1 - on_first) @ load[layer] <= limit)

    kept = torch.where(allowed(0), 0.0, -math.inf).double()  # most local mass of any placement up to here
    for layer, counts in enumerate(transitions):
        into_first, into_second = on_first @ counts, (1 - on_first) @ counts  # [S, E]: mass to each next-layer expert
        best = torch.full((len(halves),), -math.inf, dtype=torch.float64)
        for rows in torch.arange(len(halves)).split(1024):  # [rows, S] blocks keep memory small
            local = into_first[rows] @ on_first.T + into_second[rows] @ (1 - on_first).T
            best = torch.maximum(best, (kept[rows].unsqueeze(1) + local).max(0).values)
        kept = torch.where(allowed(layer + 1), best, -math.inf)
    return float(transitions.sum()) - float(kept.max())


def zoo_trace(quick: bool):
    import moec
    from moec.frontend.zoo import build_preset

    model, example = build_preset("tiny-olmoe")
    program = moec.compile(model, example).program
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2 if quick else 8):
        ids = torch.randint(0, 128, (8, 32), generator=gen)
        batches.append(program.flatten_inputs((), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}))
    return collect_trace(program, batches)


def minilm_traces(quick: bool, experts: int, top_k: int):
    """Routing traces of the real all-MiniLM-L6-v2 converted to MoE by ``dense_to_moe`` (calibrated on the
    calibration sentences): one on those sentences, one on held-out sentences. Each sentence runs alone,
    so no padding token enters a trace."""
    import transformers

    from moec.analysis.calibration import calibrate
    from moec.analysis.corpus import calibration_and_held_out, tokenized_batches
    from moec.frontend.capture import capture
    from moec.frontend.zoo import build_preset, minilm_path
    from moec.passes import PassContext, build_passes, run_passes

    model, example = build_preset("minilm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    calibration_text, held_text = calibration_and_held_out(*((64, 64) if quick else (128, 128)))
    program = capture(model, (), example)
    calibration = calibrate(program, tokenized_batches(tokenizer, calibration_text), progress=False)
    run_passes(program, build_passes({"passes": [{"dense_to_moe": {"experts": experts, "top_k": top_k}}]}),
               PassContext(calibration=calibration, progress=False))

    def trace(sentences):
        return collect_trace(program, [program.flatten_inputs((), batch)
                                       for batch in tokenized_batches(tokenizer, sentences, batch_size=1)])

    return trace(calibration_text), trace(held_text)


# ---------------------------------------------------------------------------------------------------------
# Overlap: the worker runs on every rank under torchrun
# ---------------------------------------------------------------------------------------------------------


def timed(fn, reps):
    import torch.distributed as dist

    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        fn()
        elapsed = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step ends when its slowest rank does
        times.append(float(elapsed))
    return statistics.median(times)


def worker(out: Path, quick: bool) -> None:
    import torch.distributed as dist

    from moec.backend.distributed import (
        ChunkRoute,
        add_combined,
        expert_parallel_layer,
        local_positions,
        outgoing_rows,
    )
    from moec.frontend.blocks import ExpertsSpec, FFNSpec
    from moec.kernels import reference
    from moec.kernels.moe_cpu import experts_forward

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    # FFN width chosen so that expert compute and all-to-all time are of similar size on one thread.
    experts, k, hidden, ffn, tokens = 8, 2, 512, 48, (256 if quick else 512)
    reps = 5 if quick else 15
    gen = torch.Generator().manual_seed(rank)
    spec = ExpertsSpec(num_experts=experts, hidden=hidden, intermediate=ffn, act="silu", gated=True)
    owners = torch.arange(experts) % world
    local = int((owners == rank).sum())
    weight = {"w_in": torch.randn(local, 2 * ffn, hidden, generator=gen) * 0.02,
              "w_out": torch.randn(local, hidden, ffn, generator=gen) * 0.02, "b_in": None, "b_out": None}
    shared_spec = FFNSpec(hidden=hidden, intermediate=ffn, act="silu", gated=True)
    shared_w = [torch.randn(ffn, hidden, generator=gen) * 0.02, torch.randn(ffn, hidden, generator=gen) * 0.02,
                torch.randn(hidden, ffn, generator=gen) * 0.02]
    x = torch.randn(tokens, hidden, generator=gen)
    indices = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    routing = torch.full((tokens, k), 1.0 / k)

    def shared():
        return reference.ffn(x, shared_w[0], shared_w[1], shared_w[2], None, None, None, None, shared_spec)

    # Fit the cost model: all-to-all of total payload bytes, GEMM FLOPs of gated FFN rows, and the row
    # copies around them (the gather before dispatch and the weighted sum after combine) by bytes.
    a2a_samples, gemm_samples, copy_samples = [], [], []
    summed = torch.zeros_like(x)
    for fraction in (0.125, 0.25, 0.5, 1.0):
        n = int(tokens * k * fraction) // world * world
        payload = torch.randn(n, hidden)
        received = torch.empty_like(payload)
        seconds = timed(lambda p=payload, r=received: dist.all_to_all_single(r, p), reps)
        a2a_samples.append((n * hidden * 4, seconds))
        rows = torch.randn(n // world * local, hidden)
        ids = torch.arange(rows.shape[0]).remainder(local).unsqueeze(1)
        seconds = timed(lambda r=rows, i=ids: experts_forward(r, i, torch.ones(len(i), 1), weight["w_in"],
                                                             weight["w_out"], None, None, spec), reps)
        gemm_samples.append((6.0 * rows.shape[0] * hidden * ffn, seconds))
        route = ChunkRoute(torch.randint(tokens, (n,), generator=gen), torch.rand(n, generator=gen), torch.zeros(0))
        copy_samples.append((n * hidden * 4, timed(lambda r=route: outgoing_rows(x, r, spec), reps)))
        copy_samples.append((n * hidden * 4, timed(lambda r=route, p=payload: add_combined(summed, p, r, spec), reps)))
    # One compute thread per rank: communication overlaps it only where a rank has a core to spare.
    cost = CostModel.fit(a2a_samples, gemm_samples, streams=concurrent_streams(len(os.sched_getaffinity(0)), world),
                         copy_samples=copy_samples)
    work = LayerWork(dispatch_bytes=tokens * k * hidden * 4, expert_flops=6.0 * tokens * k * hidden * ffn,
                     shared_flops=6.0 * tokens * hidden * ffn)
    chosen = choose_chunks(work, cost, max_chunks=8)
    local_index = local_positions(owners, world)

    # Every variant must compute the layer: each rank's rows against the experts of all ranks in one process.
    gathered = {name: [torch.empty_like(weight[name]) for _ in range(world)] for name in ("w_in", "w_out")}
    for name, parts in gathered.items():
        dist.all_gather(parts, weight[name])
    everything = {name: torch.stack([parts[e % world][e // world] for e in range(experts)])
                  for name, parts in gathered.items()}
    want = reference.experts(x, indices, routing, everything["w_in"], everything["w_out"], None, None, spec)
    for chunks in sorted({1, chosen.chunks}):
        got = expert_parallel_layer(x, indices, routing, owners, local_index, weight, spec, chunks, shared)
        require_close(f"the expert-parallel layer in {chunks} chunk(s)", got, want, 1e-5, f"on rank {rank}")

    def serial():
        expert_parallel_layer(x, indices, routing, owners, local_index, weight, spec, 1)
        shared()

    def overlapped(chunks):
        return lambda: expert_parallel_layer(x, indices, routing, owners, local_index, weight, spec, chunks, shared)

    variants = {"serial": serial, "overlap_c1": overlapped(1)}
    if chosen.chunks != 1:  # one chunk is the overlap_c1 call itself: timing it twice would report noise as a gain
        variants["overlap_chosen"] = overlapped(chosen.chunks)
    for variant in variants.values():  # warmup
        variant()
    samples: dict[str, list[float]] = {key: [] for key in variants}
    for _ in range(3):  # interleaved rounds, so background load hits every variant alike
        for key, variant in variants.items():
            samples[key].append(timed(variant, reps))
    measured = {key: statistics.median(values) for key, values in samples.items()}
    measured.setdefault("overlap_chosen", measured["overlap_c1"])
    from moec.analysis.schedule import makespan

    predicted = {"serial": chosen.baseline_s, "overlap_c1": makespan(schedule_dag(work, cost, 1)),
                 "overlap_chosen": chosen.predicted_s}
    if rank == 0:
        result = {
            "ranks": world, "tokens_per_rank": tokens, "hidden": hidden, "ffn": ffn, "experts": experts, "top_k": k,
            "cost_model": cost.to_json(), "a2a_samples": a2a_samples, "gemm_samples": gemm_samples,
            "copy_samples": copy_samples,
            "chosen_chunks": chosen.chunks, "measured_s": measured, "predicted_s": predicted,
            "step_ratio_overlap_vs_serial": measured["overlap_chosen"] / measured["serial"],
            "prediction_error": {key: predicted[key] / measured[key] - 1 for key in measured},
            "compute_s": cost.gemm(work.expert_flops), "comm_s": 2 * cost.all_to_all(work.dispatch_bytes),
            "copy_s": 2 * cost.copy(work.dispatch_bytes),
        }
        out.write_text(json.dumps(result, indent=1))
        out.with_suffix(".gantt.png").write_bytes(gantt_png(
            schedule_dag(work, cost, chosen.chunks), f"chosen schedule: {chosen.chunks} chunks, predicted "
            f"{chosen.predicted_s * 1e3:.1f} ms vs {chosen.baseline_s * 1e3:.1f} ms serial"))
    dist.destroy_process_group()


def overlap_section(out_dir: Path, quick: bool) -> dict:
    part = out_dir / "expert_parallel_overlap.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
               __file__, "--worker", str(part)] + (["--quick"] if quick else [])
    subprocess.run(command, env=env, check=True)
    result = json.loads(part.read_text())
    m, p = result["measured_s"], result["predicted_s"]
    print(f"overlap on 4 gloo ranks: chosen {result['chosen_chunks']} chunks; step serial {m['serial'] * 1e3:.1f} ms, "
          f"shared-overlap C=1 {m['overlap_c1'] * 1e3:.1f} ms, chosen {m['overlap_chosen'] * 1e3:.1f} ms "
          f"(ratio {result['step_ratio_overlap_vs_serial']:.2f}x); predicted {p['serial'] * 1e3:.1f} / "
          f"{p['overlap_c1'] * 1e3:.1f} / {p['overlap_chosen'] * 1e3:.1f} ms; model comm {result['comm_s'] * 1e3:.1f} ms, "
          f"compute {result['compute_s'] * 1e3:.1f} ms, row copies {result['copy_s'] * 1e3:.1f} ms, {result['cost_model']['streams']:g} concurrent stream(s) per rank")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller traces and fewer repeats")
    parser.add_argument("--out", default="bench-results/expert_parallel.json")
    parser.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)
    parser.add_argument("--skip-overlap", action="store_true", help="placement only")
    parser.add_argument("--overlap-only", action="store_true", help="the 4-rank overlap measurement only")
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker), args.quick)
        return
    out = output_file(args.out)
    tokens, layers, experts, ranks = (4096, 8, 32, 8) if args.quick else (16384, 16, 64, 8)
    limit = 20.0
    rows = []
    for k in (1, 2) if not args.overlap_only else ():
        trace = synthetic_trace(tokens, layers, experts, top_k=k, skew=0.2, affinity=0.8, seed=0)
        rows.append(placement_case(f"synthetic {layers}x{experts} top-{k}", trace, ranks, limit))
    for world in (2, 4) if not args.overlap_only else ():
        trace = trace if world > 2 else zoo_trace(args.quick)
        rows.append(placement_case(f"tiny-olmoe trace on {world} ranks", trace, world, limit))
    if not args.overlap_only:
        calibration_trace, held_out = minilm_traces(args.quick, experts=16, top_k=4)
        for world in (2, 4):
            rows.append(placement_case(f"MiniLM->MoE 16 top-4 on {world} ranks", calibration_trace, world, limit,
                                       held_out=held_out))
    result = {"placement": rows, "cpu_threads": torch.get_num_threads(), "load": os.getloadavg()}
    if not args.skip_overlap:
        result["overlap"] = overlap_section(out.parent, args.quick)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
