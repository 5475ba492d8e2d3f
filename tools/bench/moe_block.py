"""Benchmark: one Mixtral-style MoE block on the CPU, Hugging Face vs moec's grouped experts kernels.

Block: hidden 1024, FFN 3584, 8 experts, top-2, float32 (352 MB of expert weights, bigger than any cache).

Compared, in the same process and interleaved repeat by repeat (so background load hits all alike):

* ``hf_eager``       MixtralSparseMoeBlock as shipped (router + per-expert loop)
* ``hf_batched_mm``  / ``hf_grouped_mm``: the same block with ``config._experts_implementation`` switched
  to HF's other experts implementations (``transformers.integrations.moe``), where they run on the CPU.
  ``batched_mm`` gathers one weight copy per (token, slot), so it is skipped when that copy would not fit
  in ``--batched-mm-cap-gb``.
* ``hf_compiled``    the block as shipped under ``torch.compile`` (inductor, default mode; ``--no-torch-compile``
  leaves it out), compiled on its first call (about 20 s here), then for dynamic token counts.
* ``moec``           the *same* HF router (``block.gate``) followed by the experts kernel the torch runner runs
  by default for float32 on the CPU (``expert_kernel="auto"``: the fastest of the four below, timed on the
  first call of each size; ``torch_runner.float_experts``); only the expert computation differs.
* ``moec_onnxruntime``, ``moec_torch``, ``moec_torch_blas``, ``moec_torch_grouped``: the same with each of
  the runner's kernels forced: onnxruntime GEMMs on weights packed once (``moec.kernels.moe_onnxruntime``),
  ``moec.kernels.moe_cpu.experts_forward`` on oneDNN's matmuls or on ``F.linear`` (MKL), and
  ``experts_grouped_mm`` on ``F.grouped_mm``.

Before every timed call a 512 MB read evicts the CPU caches (``CacheEviction``), so each call streams its
weights from memory as a layer inside a model would. The machine's own limits are probed in the same run:
memory bandwidth from a big fp32 matrix-vector product (256 MB matrix, caches evicted before each; the best
of ``torch.mv``, oneDNN and onnxruntime), and fp32 FLOP rate from a big matmul (2048^3; the best of
``torch.mm``, oneDNN and onnxruntime). For each size moec's achieved rates use the bytes of expert weights
the routing actually needs (distinct experts hit) and the FLOPs of the T*k expert evaluations;
``roofline`` is the fraction of the machine's limit, max(bytes / bandwidth, flops / flop_rate) / measured
time.

Run:  python tools/bench/moe_block.py [--quick] [--out bench-results/moe_block.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench_util import output_file, positive_int, require_close, run_facts, token_counts  # noqa: E402

from moec.backend.torch_runner import EXPERT_KERNEL_CHOICE, expert_kernel_key, float_experts  # noqa: E402
from moec.frontend.blocks import ExpertsSpec  # noqa: E402
from moec.kernels.moe_cpu import onednn_available  # noqa: E402
from moec.kernels.moe_onnxruntime import OnnxruntimeExperts  # noqa: E402

HIDDEN, FFN, EXPERTS, TOP_K = 1024, 3584, 8, 2
MOEC_KERNELS = ("onnxruntime", "torch", "torch-blas", "torch-grouped")  # what expert_kernel="auto" chooses from


class CacheEviction:
    """Reads a buffer bigger than any CPU cache (512 MB, filled, so its pages are real), so that the next
    call finds its weights in memory, not in cache, as a layer of a model does after the other layers ran.
    Hosts with a last-level cache of hundreds of MB would otherwise serve a repeated call from cache."""

    def __init__(self, nbytes: int = 1 << 29) -> None:
        self.buffer = torch.ones(nbytes // 4)

    def __call__(self) -> None:
        self.buffer.sum()


def median_seconds(fn, repeats: int, warmup: int, evict: CacheEviction | None = None) -> float:
    """Median seconds of ``fn()`` over ``repeats`` timed calls after ``warmup`` untimed ones; ``evict()``, if
    given, runs before every timed call."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if evict is not None:
            evict()
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def onnxruntime_matmul(b: torch.Tensor):
    """``a -> a @ b`` by an onnxruntime session holding ``b`` as a constant (packed once, as moec's kernel)."""
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["y"])], "matmul",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["m", b.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", b.shape[1]])],
        [numpy_helper.from_array(b.numpy(), "b")])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(), options,
        providers=["CPUExecutionProvider"])
    return lambda a: session.run(None, {"a": a})


def probe_limits(quick: bool, evict: CacheEviction) -> dict:
    """Bandwidth (GB/s) from a big matvec and FLOP rate (GFLOP/s) from a big matmul, best of three libraries;
    the caches are evicted before every timed matvec."""
    reps = 5 if quick else 9
    gen = torch.Generator().manual_seed(0)
    mat = torch.randn(8192, 8192, generator=gen)  # 256 MB
    vec = torch.randn(8192, generator=gen)
    row = vec.unsqueeze(0)
    nbytes = mat.numel() * mat.element_size()
    out = {"bw_torch_mv_gbs": nbytes / median_seconds(lambda: torch.mv(mat, vec), reps, 2, evict) / 1e9}
    if onednn_available():
        op = torch.ops.mkldnn._linear_pointwise
        out["bw_onednn_matvec_gbs"] = (
            nbytes / median_seconds(lambda: op(row, mat, None, "none", [], ""), reps, 2, evict) / 1e9
        )
    matvec = onnxruntime_matmul(mat.T.contiguous())
    row_np = row.numpy()
    out["bw_onnxruntime_matvec_gbs"] = nbytes / median_seconds(lambda: matvec(row_np), reps, 2, evict) / 1e9
    mat = matvec = None  # free the 256 MB (and its packed copy) before the matmul probe
    n = 2048
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    flops = 2 * n**3
    out["flops_torch_mm_gflops"] = flops / median_seconds(lambda: torch.mm(a, b), reps, 2) / 1e9
    if onednn_available():
        op = torch.ops.mkldnn._linear_pointwise
        bt = b.t().contiguous()
        out["flops_onednn_gflops"] = flops / median_seconds(lambda: op(a, bt, None, "none", [], ""), reps, 2) / 1e9
    matmul, a_np = onnxruntime_matmul(b), a.numpy()
    out["flops_onnxruntime_gflops"] = flops / median_seconds(lambda: matmul(a_np), reps, 2) / 1e9
    out["bandwidth_gbs"] = max(v for k, v in out.items() if k.startswith("bw_"))
    out["flop_rate_gflops"] = max(v for k, v in out.items() if k.startswith("flops_"))
    return out


def build_block():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        hidden_act="silu",
    )
    config._experts_implementation = "eager"
    block = MixtralSparseMoeBlock(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return config, block


TOLERANCE = 1e-4  # relative to the output's largest value: float32 sums in another order stay near 1e-6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--out", default="bench-results/moe_block.json", help="the JSON result (default: %(default)s)")
    parser.add_argument("--sizes", default=None, type=token_counts,
                        help="comma-separated token counts (default: 1,16,64,256,2048; --quick: 1,16,64,256)")
    parser.add_argument("--batched-mm-cap-gb", type=float, default=3.0,
                        help="skip HF's batched_mm at sizes whose gathered expert weights exceed this (GB)")
    parser.add_argument("--no-torch-compile", action="store_true", help="leave out the torch.compile baseline")
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="intra-op threads for this run (default: torch's; restored at exit)",
    )
    args = parser.parse_args(argv)
    args.out = output_file(args.out)
    saved_threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(saved_threads)


def _run(args) -> int:
    load_before = os.getloadavg()

    sizes = args.sizes or ([1, 16, 64, 256] if args.quick else [1, 16, 64, 256, 2048])
    torch.set_grad_enabled(False)
    config, block = build_block()
    experts = block.experts
    spec = ExpertsSpec(EXPERTS, HIDDEN, FFN, act="silu", gated=True)
    per_expert_bytes = (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()) * 4

    def hf(impl):
        def run(x):
            config._experts_implementation = impl
            return block(x.unsqueeze(0))[0]

        return run

    onnxruntime_experts = OnnxruntimeExperts(experts.gate_up_proj.detach(), experts.down_proj.detach(), None, None, spec)

    def moec_kernel(kernel):
        def run(x):
            _, top_w, top_i = block.gate(x)  # the HF router, unchanged
            return float_experts(kernel, x, top_i, top_w, experts.gate_up_proj, experts.down_proj, None, None, spec,
                                 lambda: onnxruntime_experts)

        return run

    compiled_block = torch.compile(block)  # inductor's default mode, on HF's eager experts loop

    def hf_compiled(x):
        config._experts_implementation = "eager"
        return compiled_block(x.unsqueeze(0))[0]

    moec_run = moec_kernel("auto")  # the runner's own choice: the kernel below it measured fastest for this size
    impls = {"hf_eager": hf("eager"), "hf_batched_mm": hf("batched_mm"), "hf_grouped_mm": hf("grouped_mm"),
             **({} if args.no_torch_compile else {"hf_compiled": hf_compiled}),
             **{f"moec_{kernel.replace('-', '_')}": moec_kernel(kernel) for kernel in MOEC_KERNELS}}
    unavailable = {}
    with torch.inference_mode():
        probe_x = torch.randn(4, HIDDEN)
        ref = impls["hf_eager"](probe_x)
        for name in [n for n in ("hf_batched_mm", "hf_grouped_mm", "hf_compiled") if n in impls]:
            try:
                err = float((impls[name](probe_x) - ref).abs().max())
                if err > 1e-3:
                    unavailable[name] = f"wrong result (max abs err {err:.2e})"
            except Exception as exc:  # noqa: BLE001 - report and skip
                unavailable[name] = f"{type(exc).__name__}: {exc}"[:200]
        for name in unavailable:
            impls.pop(name)
        impls["moec"] = moec_run

        print(
            f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}"
            f", oneDNN fast path: {onednn_available()}"
        )
        evict = CacheEviction()
        limits = probe_limits(args.quick, evict)
        print(
            f"machine limits: bandwidth {limits['bandwidth_gbs']:.1f} GB/s (matvec), "
            f"FLOP rate {limits['flop_rate_gflops']:.1f} GFLOP/s (matmul)  {json.dumps({k: round(v, 1) for k, v in limits.items()})}"
        )
        for name, why in unavailable.items():
            print(f"skipped {name}: {why}")

        rows = []
        for tokens in sizes:
            gen = torch.Generator().manual_seed(tokens)
            x = torch.randn(tokens, HIDDEN, generator=gen)
            _, top_w, top_i = block.gate(x)
            pairs = tokens * TOP_K
            need_bytes = int(torch.unique(top_i).numel()) * per_expert_bytes
            flops = 2 * pairs * (2 * FFN * HIDDEN + HIDDEN * FFN)
            ref = impls["hf_eager"](x)
            err = require_close("moec", moec_run(x), ref, TOLERANCE, f"at {tokens} tokens")  # times its kernels too
            choice_key = expert_kernel_key(spec, TOP_K, tokens)
            active = dict(impls)
            skipped = {}
            if "hf_batched_mm" in active and pairs * per_expert_bytes > args.batched_mm_cap_gb * 1e9:
                skipped["hf_batched_mm"] = (
                    f"needs {pairs * per_expert_bytes / 1e9:.1f} GB of gathered weights"
                )
                active.pop("hf_batched_mm")
            errors = {name: require_close(name, fn(x), ref, TOLERANCE, f"at {tokens} tokens")
                      for name, fn in active.items() if name != "hf_eager"}  # every timed result, at its size
            big = tokens >= 1024
            repeats = (3 if big else 5) if args.quick else (3 if big else 9)
            samples = {name: [] for name in active}
            for fn in active.values():  # warmup
                fn(x)
            for _ in range(repeats):  # interleaved, so background load hits every implementation alike
                for name, fn in active.items():
                    evict()
                    t0 = time.perf_counter()
                    fn(x)
                    samples[name].append(time.perf_counter() - t0)
            med = {name: statistics.median(s) for name, s in samples.items()}
            t = med["moec"]
            gbs = need_bytes / t / 1e9
            gflops = flops / t / 1e9
            bound = max(
                need_bytes / (limits["bandwidth_gbs"] * 1e9), flops / (limits["flop_rate_gflops"] * 1e9)
            )
            row = {
                "tokens": tokens,
                "time_s": med,
                "speedup_vs": {name: med[name] / t for name in med if name != "moec"},
                "skipped": skipped,
                "moec_rel_err_vs_hf": err,
                "rel_err_vs_hf": errors,
                "weight_bytes_needed": need_bytes,
                "flops": flops,
                "moec_gbs": gbs,
                "moec_gflops": gflops,
                "frac_bandwidth": gbs / limits["bandwidth_gbs"],
                "frac_flop_rate": gflops / limits["flop_rate_gflops"],
                "roofline_frac": bound / t,
                "repeats": repeats,
                "auto_kernel": EXPERT_KERNEL_CHOICE.chosen[choice_key],
                "auto_kernel_race_s": EXPERT_KERNEL_CHOICE.timings[choice_key],
            }
            rows.append(row)
            race = ", ".join(f"{name} {seconds * 1e3:.2f}" for name, seconds in row["auto_kernel_race_s"].items())
            print(f"  measured T={tokens} ({repeats} repeats); auto chose {row['auto_kernel']} (race, best ms: {race})",
                  flush=True)

    names = [n for n in impls if n != "moec"]
    header = f"{'tokens':>6} | " + " | ".join(f"{n + ' ms':>17}" for n in [*names, "moec"])
    header += " | " + " | ".join(f"{'x vs ' + n.removeprefix('hf_'):>14}" for n in names)
    header += f" | {'moec GB/s':>9} | {'GFLOP/s':>7} | {'%BW':>5} | {'%FLOP':>5} | {'%roof':>5}"
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        cells = [
            f"{r['time_s'][n] * 1e3:17.2f}" if n in r["time_s"] else f"{'skipped':>17}"
            for n in [*names, "moec"]
        ]
        ratios = [f"{r['speedup_vs'][n]:13.2f}x" if n in r["speedup_vs"] else f"{'-':>14}" for n in names]
        print(
            f"{r['tokens']:>6} | "
            + " | ".join(cells)
            + " | "
            + " | ".join(ratios)
            + f" | {r['moec_gbs']:9.2f} | {r['moec_gflops']:7.1f} | {100 * r['frac_bandwidth']:4.0f}%"
            f" | {100 * r['frac_flop_rate']:4.0f}% | {100 * r['roofline_frac']:4.0f}%"
        )
    print(
        f"load average before/after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )
    print("ratios: other time / moec time (>1 means moec is faster); routing is HF's router in every column.")

    result = {
        "benchmark": "moe_block",
        "config": {"hidden": HIDDEN, "ffn": FFN, "experts": EXPERTS, "top_k": TOP_K, "dtype": "float32"},
        **run_facts(quick=args.quick, sizes=sizes),
        "loadavg_before_after": [load_before, os.getloadavg()],
        "limits": limits,
        "unavailable": unavailable,
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
