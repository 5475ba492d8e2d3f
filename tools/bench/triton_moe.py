"""Benchmark (GPU): moec's Triton fused-MoE experts kernel vs Hugging Face's experts and torch.compile.

Layers, bfloat16, random weights (std 0.02), routing from a random router (softmax, top-k, renormalized),
every implementation given the *same* routing so only the expert computation is timed:

* ``mixtral``:      hidden 4096, FFN 14336, 8 experts, top-2   (Mixtral-8x7B)
* ``fine-grained``: hidden 2048, FFN 1408, 64 experts, top-6   (DeepSeek-V2-Lite / Qwen-MoE style)

Implementations, timed side by side in one process with CUDA events (median of repeats, after warmup):

* ``moec``           ``moec.kernels.triton_ops.experts`` with the tiles moec's table picks for the shape
* ``hf_<impl>``      ``MixtralExperts`` from transformers with ``config._experts_implementation`` set to each
                     of ``eager``, ``batched_mm``, ``grouped_mm`` that runs; ``hf_best`` is the fastest per size
* ``torch_compile``  ``torch.compile`` of the HF eager experts (dynamic shapes)
* ``moec_int4``      moec's kernel on the same experts quantized to 4 bits (group 128, moec's packed format),
                     dequantized tile by tile inside the kernel; its error is against the bfloat16 experts
* ``moec_graphs``, ``moec_int4_graphs``   the same calls replayed from CUDA graphs
                     (``moec.backend.cuda_graphs.GraphedCall``, as the Triton backend runs them on a GPU)

Reported per token count: times, the speedups of ``moec`` and ``moec_graphs`` over ``hf_best`` and
``torch_compile``, and their achieved fraction of the GPU's peak: memory bandwidth for decode (<= 64 tokens;
bytes = the distinct experts' weights the routing needs) and bfloat16 tensor-core FLOPs for prefill (FLOPs =
the T*k expert evaluations). Peaks are the spec sheet's for the detected GPU (override with --peak-gbs /
--peak-tflops).

Without a CUDA GPU (or without triton) it prints why and exits 0, writing ``{"skipped": reason}``.

Run:  python tools/bench/triton_moe.py [--quick] [--out bench-results/triton_moe.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

LAYERS = {
    "mixtral": {"hidden": 4096, "ffn": 14336, "experts": 8, "top_k": 2},
    "fine-grained": {"hidden": 2048, "ffn": 1408, "experts": 64, "top_k": 6},
}
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
QUICK_TOKENS = [1, 4, 16, 64, 128, 256, 512, 4096]
DECODE_MAX_TOKENS = 64
# Spec-sheet peaks (dense bfloat16 tensor-core TFLOP/s, HBM GB/s), matched on the device name.
PEAKS = {"H200": (989.0, 4800.0), "H100 PCIe": (756.0, 2000.0), "H100": (989.0, 3350.0), "A100": (312.0, 2039.0)}


def skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install -e '.[triton]')"
    return None


def cuda_time_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def build_experts(layer: dict):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = MixtralConfig(hidden_size=layer["hidden"], intermediate_size=layer["ffn"],
                           num_local_experts=layer["experts"], num_experts_per_tok=layer["top_k"], hidden_act="silu")
    config._experts_implementation = "eager"
    experts = MixtralExperts(config).to("cuda", torch.bfloat16).eval()
    generator = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, device="cuda", dtype=torch.bfloat16) * 0.02)
    return config, experts


def quantize_experts(stacked: torch.Tensor, bits: int, group: int):
    """[E, R, C] bfloat16 -> moec's packed QuantizedWeight, quantized on the GPU."""
    from moec.kernels.quant import QuantizedWeight, quantize_matrix

    matrices = [quantize_matrix(matrix.float(), bits, group) for matrix in stacked]
    return QuantizedWeight.from_matrices("bf16", tuple(stacked.shape), matrices)


def route(tokens: int, layer: dict):
    generator = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, layer["hidden"], generator=generator, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(tokens, layer["experts"], generator=generator, device="cuda")
    weights, indices = torch.softmax(logits, dim=-1).topk(layer["top_k"], dim=-1)
    return x, indices, weights / weights.sum(dim=-1, keepdim=True)


def kernel_profile(fn, calls: int = 10) -> str:
    """Where moec's time goes: the GPU time of each kernel it launches (torch's profiler), and the host's
    time to issue one call (no synchronization)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host_us = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=40)
    return f"{table}\nhost time to issue one call: {host_us:.0f} us"


def bench_layer(name: str, layer: dict, tokens_list: list[int], repeats: int, peaks: tuple[float, float],
                profile: bool = False) -> list[dict]:
    from moec.backend.triton_tiles import pick, shape_key, tiles_for_shape
    from moec.frontend.blocks import ExpertsSpec

    config, experts = build_experts(layer)
    spec = ExpertsSpec(layer["experts"], layer["hidden"], layer["ffn"], "silu", gated=True)
    tile_rows = tiles_for_shape(shape_key(spec.num_experts, spec.hidden, spec.intermediate, layer["top_k"], "bf16"))
    w_in, w_out = experts.gate_up_proj.data, experts.down_proj.data
    expert_bytes = (w_in[0].numel() + w_out[0].numel()) * 2
    quantized = quantize_experts(w_in, 4, 128), quantize_experts(w_out, 4, 128)
    compiled = torch.compile(experts, dynamic=True)
    peak_tflops, peak_gbs = peaks
    rows = []
    for tokens in tokens_list:
        x, indices, weights = route(tokens, layer)
        tiles = pick(tile_rows, tokens)
        impls = implementations(config, experts, compiled, spec, tiles, x, indices, weights, quantized)
        row = {"layer": name, "tokens": tokens, "tiles": tiles.__dict__, "ms": {}, "skipped": {}}
        with torch.inference_mode():
            config._experts_implementation = "eager"
            expected = experts(x, indices, weights).float()
            for label, fn in impls.items():
                try:
                    row["ms"][label] = cuda_time_ms(fn, repeats)
                    got = fn()  # after the timing: for the graphed calls, a replay
                    row.setdefault("max_abs_diff_vs_hf_eager", {})[label] = (got.float() - expected).abs().max().item()
                except Exception as err:  # an implementation this torch/transformers/GPU lacks: reported, not fatal
                    row["skipped"][label] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
                    torch.cuda.empty_cache()
        hf_times = {k: v for k, v in row["ms"].items() if k.startswith("hf_")}
        best = min(hf_times, key=hf_times.get)
        row["hf_best"] = best
        kind = "bandwidth" if tokens <= DECODE_MAX_TOKENS else "bf16"
        if kind == "bandwidth":  # bytes of the distinct experts the routing needs
            work, peak = indices.unique().numel() * expert_bytes, peak_gbs * 1e9
        else:  # FLOPs of the T*k expert evaluations
            work, peak = 2 * tokens * layer["top_k"] * 3 * layer["hidden"] * layer["ffn"], peak_tflops * 1e12
        line = f"{name:>12} T={tokens:<5}"
        for label in ("moec", "moec_graphs"):
            if label not in row["ms"]:
                continue
            ms = row["ms"][label]
            row[f"{label}_speedup_vs_hf_best"] = hf_times[best] / ms
            if "torch_compile" in row["ms"]:
                row[f"{label}_speedup_vs_torch_compile"] = row["ms"]["torch_compile"] / ms
            row[f"{label}_fraction_of_peak_{kind}"] = work / (ms / 1e3) / peak
            line += (f" | {label} {ms:7.3f} ms x{row[f'{label}_speedup_vs_hf_best']:.2f} "
                     f"{row[f'{label}_fraction_of_peak_{kind}']:.0%} {kind}")
        line += f" | {best} {hf_times[best]:7.3f} ms | torch.compile {row['ms'].get('torch_compile', float('nan')):7.3f} ms"
        if profile:
            print(kernel_profile(impls["moec"]))
        rows.append(row)
        print(line)
    return rows


def implementations(config, experts, compiled, spec, tiles, x, indices, weights, quantized) -> dict:
    """label -> a call running the experts on (x, indices, weights)."""
    from moec.backend.cuda_graphs import GraphedCall
    from moec.kernels import triton_ops

    w_in, w_out = experts.gate_up_proj.data, experts.down_proj.data
    impls = {"moec": lambda: triton_ops.experts(x, indices, weights, w_in, w_out, None, None, spec, tiles)}

    def hf(impl):
        def run():
            config._experts_implementation = impl
            return experts(x, indices, weights)
        return run

    for impl in ("eager", "batched_mm", "grouped_mm"):
        impls[f"hf_{impl}"] = hf(impl)
    impls["torch_compile"] = lambda: compiled(x, indices, weights)
    impls["moec_int4"] = lambda: triton_ops.experts(x, indices, weights, *quantized, None, None, spec, tiles)
    # What the Triton backend runs on a GPU: the same calls replayed from a CUDA graph (captured on the
    # second call of a shape, i.e. during the warm-up), inputs copied in and the output copied out.
    graphed = GraphedCall(lambda *a: triton_ops.experts(*a, w_in, w_out, None, None, spec, tiles))
    impls["moec_graphs"] = lambda: graphed(x, indices, weights)
    graphed_int4 = GraphedCall(lambda *a: triton_ops.experts(*a, *quantized, None, None, spec, tiles))
    impls["moec_int4_graphs"] = lambda: graphed_int4(x, indices, weights)
    return impls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"tokens {QUICK_TOKENS} only, fewer repeats")
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--profile", action="store_true", help="also print the GPU time of each moec kernel")
    parser.add_argument("--peak-gbs", type=float, help="peak memory bandwidth, GB/s (default: spec sheet)")
    parser.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s (default: spec sheet)")
    parser.add_argument("--out", default="bench-results/triton_moe.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    reason = skip_reason()
    if reason is not None:
        print(f"skipped: {reason}")
        out.write_text(json.dumps({"skipped": reason}, indent=2))
        return 0
    device = torch.cuda.get_device_name()
    sheet = next((peak for key, peak in PEAKS.items() if key in device), (float("nan"), float("nan")))
    peaks = (args.peak_tflops or sheet[0], args.peak_gbs or sheet[1])
    print(f"device {device}: peaks {peaks[0]:g} TFLOP/s bf16, {peaks[1]:g} GB/s")
    rows = []
    for name in args.layers:
        rows += bench_layer(name, LAYERS[name], QUICK_TOKENS if args.quick else TOKENS, 10 if args.quick else 30, peaks,
                            args.profile)
    import triton

    result = {"device": device, "peak_tflops_bf16": peaks[0], "peak_gbs": peaks[1], "torch": torch.__version__,
              "triton": triton.__version__, "rows": rows}
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
