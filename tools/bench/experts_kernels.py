"""Benchmark: the torch runner's CPU kernels for routed experts, alone, against Hugging Face's experts module.

Two layer shapes, each in float32 and bfloat16, on T tokens routed uniformly at random (k distinct experts a
token, as a router trained with a load-balancing loss spreads them; a random-init model's router spreads
them unevenly):

* ``mixtral``: 8 experts, hidden 512, FFN 1536, top-2 (Mixtral's layout, few large experts);
* ``qwen3``: 64 experts, hidden 512, FFN 256, top-8 (Qwen3-MoE's, many small experts).

Compared in one process, interleaved call by call in an order that turns each round (median of
``--repeats``), on the same inputs:

* ``hf_<impl>``       transformers' ``Qwen3MoeExperts`` with each experts implementation it ships
                      (``eager``: a Python loop over experts; ``grouped_mm``: ``F.grouped_mm``; ``batched_mm``)
* ``moec_<kernel>``   ``torch_runner.float_experts`` with each kernel forced (``torch``: oneDNN matmuls per
                      expert; ``torch-blas``: ``F.linear`` per expert; ``torch-grouped``: ``F.grouped_mm``;
                      ``onnxruntime``: float32 only)
* ``moec_auto``       the runner's default: the fastest of those, timed on its first call of the size

Each result is checked against ``hf_eager`` first (1e-5 relative in float32, 2e-2 in bfloat16). Ratios are
HF's best / moec's time (> 1: moec faster).

Run:  python tools/bench/experts_kernels.py [--threads 1] [--tokens 1,16,64,256] [--out bench-results/experts_kernels.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench_util import output_file, positive_int, require_close, run_facts, token_counts  # noqa: E402

from moec.backend.torch_runner import EXPERT_KERNELS, float_experts  # noqa: E402
from moec.frontend.blocks import ExpertsSpec  # noqa: E402
from moec.kernels.moe_cpu import grouped_mm_fits  # noqa: E402
from moec.kernels.moe_onnxruntime import OnnxruntimeExperts  # noqa: E402

LAYERS = {"mixtral": (8, 512, 1536, 2), "qwen3": (64, 512, 256, 8)}  # experts, hidden, FFN, top-k
HF_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def bench_layer(name: str, dtype: torch.dtype, tokens: list[int], repeats: int) -> list[dict]:
    experts, hidden, ffn, top_k = LAYERS[name]
    config = transformers.Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=ffn, num_experts=experts,
                                         num_experts_per_tok=top_k)
    torch.manual_seed(0)
    module = Qwen3MoeExperts(config)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0, 0.02)
    module.to(dtype).eval()
    spec = ExpertsSpec(num_experts=experts, hidden=hidden, intermediate=ffn, act="silu", gated=True)
    w_in, w_out = module.gate_up_proj, module.down_proj
    kernels = [kernel for kernel in EXPERT_KERNELS if kernel != "auto"
               and (kernel != "onnxruntime" or dtype == torch.float32)
               and (kernel != "torch-grouped" or grouped_mm_fits(dtype, w_in.device, spec))]
    onnxruntime_experts = OnnxruntimeExperts(w_in, w_out, None, None, spec) if dtype == torch.float32 else None
    rows = []
    for count in tokens:
        generator = torch.Generator().manual_seed(count)
        x = torch.randn(count, hidden, generator=generator).to(dtype)
        indices = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(count)])
        weights = torch.randn(count, top_k, generator=generator).softmax(-1)

        routed = (x, indices, weights)

        def hf(implementation: str, routed=routed):
            def run():
                module.config._experts_implementation = implementation
                return module(*routed[:2], routed[2].to(dtype))
            return run

        def moec(kernel: str, routed=routed):
            return lambda: float_experts(kernel, *routed, w_in, w_out, None, None, spec, lambda: onnxruntime_experts)

        runners = {f"hf_{impl}": hf(impl) for impl in HF_IMPLEMENTATIONS}
        runners |= {f"moec_{kernel}": moec(kernel) for kernel in [*kernels, "auto"]}
        with torch.inference_mode():
            reference = runners["hf_eager"]()
            for runner, fn in runners.items():  # not timing a wrong result; auto races its kernels here
                require_close(runner, fn(), reference, TOLERANCE[dtype], f"on {name} {dtype} at {count} tokens")
            times: dict[str, list[float]] = {runner: [] for runner in runners}
            order = list(runners)
            for repeat in range(repeats):  # the order turns each round: a call after one of the same kernel
                for runner in order[repeat % len(order):] + order[:repeat % len(order)]:  # finds its buffers warm
                    start = time.perf_counter()
                    runners[runner]()
                    times[runner].append(time.perf_counter() - start)
        ms = {runner: statistics.median(samples) * 1e3 for runner, samples in times.items()}
        hf_best = min((runner for runner in ms if runner.startswith("hf_")), key=ms.__getitem__)
        row = {"layer": name, "dtype": str(dtype).removeprefix("torch."), "tokens": count, "ms": ms,
               "hf_best": hf_best, "hf_best_vs_moec_auto": ms[hf_best] / ms["moec_auto"]}
        rows.append(row)
        print(f"  {name} {row['dtype']} T={count}: " + ", ".join(f"{runner} {value:.2f}" for runner, value in ms.items())
              + f" ms; {hf_best} / moec_auto {row['hf_best_vs_moec_auto']:.2f}x", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--tokens", type=token_counts, default=[1, 16, 64, 256],
                        help="comma-separated token counts (default: 1,16,64,256)")
    parser.add_argument("--repeats", type=positive_int, default=21,
                        help="timed calls per runner and size, median taken (default: %(default)s)")
    parser.add_argument("--out", default="bench-results/experts_kernels.json", help="the JSON result (default: %(default)s)")
    args = parser.parse_args(argv)
    args.out = output_file(args.out)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} thread(s)", flush=True)
    rows = [row for name in LAYERS for dtype in (torch.float32, torch.bfloat16)
            for row in bench_layer(name, dtype, args.tokens, args.repeats)]
    args.out.write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, **run_facts(), "rows": rows},
                                   indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
