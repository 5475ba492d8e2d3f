"""Benchmark: one MoE layer in onnxruntime, com.microsoft.MoE against the portable expert graph.

Why the ``ort`` lowering is slower than ``portable`` on the CPU execution provider, measured on one
layer (Mixtral-style: hidden 512, FFN 1536, 8 experts, top-2, swiglu, float32, seeded random weights;
``--quick``: hidden 64, FFN 128, 4 experts). Graphs are built directly with onnx.helper:

* ``portable``   the shape of moec's portable lowering: softmax, top-k, renormalize, then per expert
                 Equal + NonZero + GatherND of its rows, Gemm (gate/up, transB), Split, silu * up, Gemm
                 (down), routing weight, ScatterND(add). Expert weights are initializers.
* ``moe``        one com.microsoft.MoE node as moec emits it (fc1 [E, 2F, H] gate/up rows interleaved,
                 swiglu_fusion=1; fc2 [E, H, F]).

Both are checked against ``moec_onnx::ort_moe``'s eager torch body (the op's semantics) before timing.
A probe then times the GEMM each expert does, x [rows, H] @ W_in^T with W_in [2F, H], as one ONNX
Gemm with ``transB=1``: W_in as an initializer (onnxruntime packs it once, at session creation, as the
portable graph's Gemms get) against W_in as a graph input (packed on every call, as the MoE kernel's
MLAS call does: it passes the [out, in] weights with TransB and never pre-packs). ``rows`` = T * k / E
at T = 16 and 256 tokens (the average rows per expert), and 1.

Times are medians over repeats, the variants interleaved repeat by repeat; 1 intra-op thread by default.

Run:  python tools/bench/onnx_moe_op.py [--quick] [--threads 1] [--out bench-results/onnx_moe_op.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench_util import output_file, positive_int, require_close, run_facts  # noqa: E402

from moec.backend.onnx.moe import interleave_gate_up, ort_moe  # noqa: E402

TOKENS = (1, 16, 256)
TOP_K = 2
OPSETS = [helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]


def make_weights(quick: bool) -> dict[str, np.ndarray]:
    """Expert weights in moec's layouts: w_in [E, 2F, H] (gate rows, then up rows), w_out [E, H, F]."""
    hidden, ffn, experts = (64, 128, 4) if quick else (512, 1536, 8)
    generator = torch.Generator().manual_seed(0)
    return {
        "w_in": (torch.randn(experts, 2 * ffn, hidden, generator=generator) * 0.02).numpy(),
        "w_out": (torch.randn(experts, hidden, ffn, generator=generator) * 0.02).numpy(),
    }


def tensor_info(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def moe_graph(w_in: np.ndarray, w_out: np.ndarray) -> onnx.ModelProto:
    """One com.microsoft.MoE node, attributes and layouts as moec's ``ort`` lowering emits them."""
    experts, _, hidden = w_in.shape
    fc1 = interleave_gate_up(torch.from_numpy(w_in)).numpy()
    node = helper.make_node(
        "MoE", ["x", "logits", "fc1", "", "fc2"], ["y"], domain="com.microsoft", k=TOP_K,
        normalize_routing_weights=1, activation_type="swiglu", activation_alpha=1.0, activation_beta=0.0,
        swiglu_fusion=1,
    )
    graph = helper.make_graph(
        [node], "moe", [tensor_info("x", ["T", hidden]), tensor_info("logits", ["T", experts])],
        [tensor_info("y", ["T", hidden])],
        initializer=[numpy_helper.from_array(fc1, "fc1"), numpy_helper.from_array(w_out, "fc2")],
    )
    return helper.make_model(graph, opset_imports=OPSETS)


def portable_graph(w_in: np.ndarray, w_out: np.ndarray) -> onnx.ModelProto:
    """The portable lowering's experts: per expert, NonZero-selected rows through two Gemms, ScatterND-added."""
    experts, _, hidden = w_in.shape
    nodes, inits = [], [numpy_helper.from_array(np.array([TOP_K], np.int64), "k"),
                        numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    node = helper.make_node
    nodes += [
        node("Softmax", ["logits"], ["probs"], axis=-1),
        node("TopK", ["probs", "k"], ["top_probs", "indices"], axis=-1),
        node("ReduceSum", ["top_probs", "axis1"], ["top_sum"], keepdims=1),
        node("Div", ["top_probs", "top_sum"], ["route_weights"]),  # [T, k]
        node("Mul", ["x", "zero"], ["out_0"]),  # zeros [T, H]
    ]
    inits.append(numpy_helper.from_array(np.zeros((), np.float32), "zero"))
    for e in range(experts):
        inits += [numpy_helper.from_array(np.array(e, np.int64), f"id_{e}"),
                  numpy_helper.from_array(w_in[e], f"w_in_{e}"), numpy_helper.from_array(w_out[e], f"w_out_{e}")]
        nodes += [
            node("Equal", ["indices", f"id_{e}"], [f"chosen_{e}"]),  # [T, k]
            node("Cast", [f"chosen_{e}"], [f"chosen_f_{e}"], to=TensorProto.FLOAT),
            node("Mul", ["route_weights", f"chosen_f_{e}"], [f"masked_{e}"]),
            node("ReduceSum", [f"masked_{e}", "axis1"], [f"weight_{e}"], keepdims=1),  # [T, 1]
            node("ReduceMax", [f"chosen_f_{e}", "axis1"], [f"any_f_{e}"], keepdims=0),
            node("Cast", [f"any_f_{e}"], [f"any_{e}"], to=TensorProto.BOOL),
            node("NonZero", [f"any_{e}"], [f"nz_{e}"]),  # [1, n]
            node("Transpose", [f"nz_{e}"], [f"rows_{e}"], perm=[1, 0]),  # [n, 1]
            node("GatherND", ["x", f"rows_{e}"], [f"x_{e}"]),  # [n, H]
            node("Gemm", [f"x_{e}", f"w_in_{e}"], [f"h_{e}"], transB=1),  # [n, 2F]
            node("Split", [f"h_{e}"], [f"gate_{e}", f"up_{e}"], axis=-1, num_outputs=2),
            node("Sigmoid", [f"gate_{e}"], [f"sig_{e}"]),
            node("Mul", [f"gate_{e}", f"sig_{e}"], [f"silu_{e}"]),
            node("Mul", [f"silu_{e}", f"up_{e}"], [f"act_{e}"]),
            node("Gemm", [f"act_{e}", f"w_out_{e}"], [f"y_{e}"], transB=1),  # [n, H]
            node("GatherND", [f"weight_{e}", f"rows_{e}"], [f"w_rows_{e}"]),  # [n, 1]
            node("Mul", [f"y_{e}", f"w_rows_{e}"], [f"weighted_{e}"]),
            node("ScatterND", [f"out_{e}", f"rows_{e}", f"weighted_{e}"], [f"out_{e + 1}"], reduction="add"),
        ]
    nodes.append(node("Identity", [f"out_{experts}"], ["y"]))
    graph = helper.make_graph(nodes, "portable", [tensor_info("x", ["T", hidden]),
                                                  tensor_info("logits", ["T", experts])],
                              [tensor_info("y", ["T", hidden])], initializer=inits)
    return helper.make_model(graph, opset_imports=OPSETS[:1])


def gemm_graph(weight: np.ndarray, as_initializer: bool) -> onnx.ModelProto:
    """x [M, K] @ weight^T, weight [N, K]: an initializer (pre-packed) or an input (packed per call)."""
    rows, cols = weight.shape
    inputs = [tensor_info("x", ["M", cols])] + ([] if as_initializer else [tensor_info("w", [rows, cols])])
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], "gemm", inputs, [tensor_info("y", ["M", rows])],
        initializer=[numpy_helper.from_array(weight, "w")] if as_initializer else [],
    )
    return helper.make_model(graph, opset_imports=OPSETS[:1])


def interleaved_medians(runs: dict[str, tuple[onnxruntime.InferenceSession, dict]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each (session, feeds) run, the runs interleaved repeat by repeat."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (session, feeds) in runs.items():
            start = time.perf_counter()
            session.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small layer and fewer repeats")
    parser.add_argument("--threads", type=positive_int, default=1, help="intra-op threads for onnxruntime")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timed runs per variant and size, median taken (default: 21; --quick: 5)")
    parser.add_argument("--out", default="bench-results/onnx_moe_op.json", help="the JSON result (default: %(default)s)")
    args = parser.parse_args(argv)
    args.out = output_file(args.out)
    repeats = args.repeats or (5 if args.quick else 21)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1

    def session(model: onnx.ModelProto) -> onnxruntime.InferenceSession:
        return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    weights = make_weights(args.quick)
    w_in, w_out = weights["w_in"], weights["w_out"]
    experts, _, hidden = w_in.shape
    sessions = {"portable": session(portable_graph(w_in, w_out)), "moe": session(moe_graph(w_in, w_out))}
    print(f"one MoE layer: hidden {hidden}, FFN {w_out.shape[2]}, {experts} experts, top-{TOP_K}, swiglu, float32; "
          f"onnxruntime {onnxruntime.__version__}, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f}")

    rows = []
    for tokens in TOKENS:
        generator = torch.Generator().manual_seed(tokens)
        x, logits = torch.randn(tokens, hidden, generator=generator), torch.randn(tokens, experts, generator=generator)
        fc1 = interleave_gate_up(torch.from_numpy(w_in))
        expected = ort_moe(x, logits, fc1, None, torch.from_numpy(w_out), None, TOP_K, True, "swiglu", 1.0, 0.0, None).numpy()
        feeds = {"x": x.numpy(), "logits": logits.numpy()}
        diffs = {name: float(np.abs(s.run(None, feeds)[0] - expected).max()) for name, s in sessions.items()}
        for name, s in sessions.items():  # not timing a wrong result
            require_close(name, torch.from_numpy(s.run(None, feeds)[0]), torch.from_numpy(expected), 1e-5,
                          f"at {tokens} tokens")
        ms = interleaved_medians({name: (s, feeds) for name, s in sessions.items()}, repeats)
        rows.append({"tokens": tokens, "ms": ms, "max_abs_diff_vs_torch": diffs})

    print("| tokens | portable ms | com.microsoft.MoE ms | MoE vs portable | max abs diff (portable / MoE) |")
    print("|---:|---:|---:|---:|---|")
    for row in rows:
        ms, diff = row["ms"], row["max_abs_diff_vs_torch"]
        print(f"| {row['tokens']} | {ms['portable']:.2f} | {ms['moe']:.2f} | {ms['portable'] / ms['moe']:.2f}x | "
              f"{diff['portable']:.1e} / {diff['moe']:.1e} |")
    print("MoE vs portable: portable time / MoE time (> 1: the MoE op is faster)")

    probe = []
    weight = np.ascontiguousarray(w_in[0])  # [2F, H]
    gemms = {"prepacked": session(gemm_graph(weight, True)), "per_call": session(gemm_graph(weight, False))}
    for expert_rows in sorted({1, 16 * TOP_K // experts, 256 * TOP_K // experts}):
        x = np.random.default_rng(expert_rows).standard_normal((expert_rows, hidden)).astype(np.float32)
        runs = {"prepacked": (gemms["prepacked"], {"x": x}), "per_call": (gemms["per_call"], {"x": x, "w": weight})}
        for name, (gemm, feeds) in runs.items():  # checked, and each new session's first run left out of the timing
            require_close(f"Gemm {name}", torch.from_numpy(gemm.run(None, feeds)[0]), torch.from_numpy(x @ weight.T),
                          1e-5, f"at {expert_rows} rows")
        probe.append({"rows": expert_rows, "ms": interleaved_medians(runs, repeats * 3)})
    print(f"\nGemm x [rows, {hidden}] @ W^T, W [{weight.shape[0]}, {hidden}] (one expert's gate/up):")
    print("| rows | W pre-packed ms | W packed per call ms | per call / pre-packed |")
    print("|---:|---:|---:|---:|")
    for row in probe:
        ms = row["ms"]
        print(f"| {row['rows']} | {ms['prepacked']:.3f} | {ms['per_call']:.3f} | {ms['per_call'] / ms['prepacked']:.2f}x |")

    for row in rows:
        row["moe_vs_portable"] = row["ms"]["portable"] / row["ms"]["moe"]
    for row in probe:
        row["per_call_vs_prepacked"] = row["ms"]["per_call"] / row["ms"]["prepacked"]
    args.out.write_text(json.dumps({
        "hidden": hidden, "ffn": int(w_out.shape[2]), "experts": experts, "top_k": TOP_K, "threads": args.threads,
        "repeats": repeats, **run_facts(quick=args.quick), "rows": rows, "gemm_probe": probe,
    }, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
