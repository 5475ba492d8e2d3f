"""Benchmark: the CPU GEMMs an MoE layer's experts could run on, for expert-sized (skinny) inputs.

One expert matrix of the Mixtral-style block of ``moe_block.py`` (gate/up 7168 x 1024 and down 1024 x 3584,
float32) times M rows, M = 1 .. 64 (a 64-token top-2 batch over 8 experts gives each expert about 16).
Every candidate cycles through ``--matrices`` distinct weights (350 MB by default, far more than the
last-level cache), so each call streams its weight from memory as in a real MoE layer. Candidates,
measured in one process, interleaved round by round, median over rounds:

* ``mkl_sgemm``         ``F.linear``: torch's MKL ``sgemm``, which packs the weight on every call
* ``onednn``            ``torch.ops.mkldnn._linear_pointwise`` on the plain weight (``moe_cpu``'s kernel)
* ``onednn_prepacked``  the same on a weight reordered once by ``mkldnn._reorder_linear_weight(w, M)``
* ``mkl_prepacked``     ``torch.ops.mkl._mkl_linear`` on ``mkl._mkl_reorder_linear_weight(w, M)``
  (``cblas_sgemm_pack``, packed for exactly M rows)
* ``onnxruntime``       a ``Gemm`` (transB) whose weight is a session constant, packed once by MLAS when the
  session is built: moec's float32 experts kernel (``moec.kernels.moe_onnxruntime``)
* ``inductor_cpp``      (``--inductor``) ``torch.compile`` with freezing and max-autotune, CPU GEMM backends
  ``CPP,ATEN``: inductor's C++ GEMM template with the weight packed at compile time (one compiled graph
  per M running all the matrices; a C++ compiler is needed, and each M takes seconds to compile)

Each result is checked against ``F.linear`` (max abs diff <= 1e-3 on outputs of magnitude ~100) before
timing. Prints ms per GEMM and the weight bytes streamed per second; writes JSON.

Run:  python tools/bench/expert_gemm.py [--threads 1] [--inductor] [--quick]
(one intra-op thread by default: with two, torch's OpenMP workers and onnxruntime's pool spin against each
other on a 2-core machine, see docs/BENCHMARKS.md "Caveats").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_util import output_file, positive_int

SHAPES = {"gate_up": (7168, 1024), "down": (1024, 3584)}  # (out, in) of one Mixtral-sized expert matrix

Gemm = Callable[[torch.Tensor, int], object]  # (x, matrix index) -> x @ weights[index].T


def onnxruntime_gemms(weights: list[torch.Tensor], threads: int) -> Gemm:
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    sessions = []
    for weight in weights:
        out_features, in_features = weight.shape
        graph = helper.make_graph(
            [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], "gemm",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", in_features])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", out_features])],
            [numpy_helper.from_array(weight.numpy(), "w")])
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        sessions.append(onnxruntime.InferenceSession(model.SerializeToString(), options,
                                                     providers=["CPUExecutionProvider"]))
    return lambda x, i: sessions[i].run(None, {"x": x.numpy()})[0]


def inductor_gemms(weights: list[torch.Tensor], rows: int) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """One compiled graph computing ``x @ w.T`` for every weight, the weights frozen and packed at compile."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    inductor_config.max_autotune = True
    inductor_config.max_autotune_gemm_backends = "CPP,ATEN"

    class AllMatrices(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linears = torch.nn.ModuleList()
            for weight in weights:
                linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
                linear.weight.data = weight
                self.linears.append(linear)

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            return [linear(x) for linear in self.linears]

    torch._dynamo.reset()  # one fresh graph per M: dynamo's recompile limit would fall back to eager
    compiled = torch.compile(AllMatrices().eval(), dynamic=False)
    with torch.no_grad():
        compiled(torch.zeros(rows, weights[0].shape[1]))
    return compiled


def candidates(weights: list[torch.Tensor], rows: int, threads: int) -> dict[str, Gemm]:
    onednn_packed = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in weights]
    mkl_packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, rows) for w in weights]
    return {
        "mkl_sgemm": lambda x, i: F.linear(x, weights[i]),
        "onednn": lambda x, i: torch.ops.mkldnn._linear_pointwise(x, weights[i], None, "none", [], ""),
        "onednn_prepacked": lambda x, i: torch.ops.mkldnn._linear_pointwise(x, onednn_packed[i], None, "none", [], ""),
        "mkl_prepacked": lambda x, i: torch.ops.mkl._mkl_linear(x, mkl_packed[i], weights[i], None, rows),
        "onnxruntime": onnxruntime_gemms(weights, threads),
    }


def _check(name: str, got: object, want: torch.Tensor) -> None:
    got = torch.as_tensor(got)
    error = (got - want).abs().max().item()
    if error > 1e-3:
        raise SystemExit(f"{name} disagrees with F.linear by {error:.2e}; its timing would mean nothing")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=positive_int, default=1, help="intra-op threads for torch and onnxruntime (default 1)")
    parser.add_argument("--rows", default=None,
                        help="comma-separated row counts M (default: 1,2,4,8,16,32,64; --quick: 1,4,16)")
    parser.add_argument("--matrices", type=positive_int, default=None,
                        help="distinct weights cycled per shape (default 12: 350 MB for gate_up; --quick: 4)")
    parser.add_argument("--rounds", type=positive_int, default=None,
                        help="interleaved timing rounds per row count, median taken (default 7; --quick: 3)")
    parser.add_argument("--inductor", action="store_true", help="also time inductor's C++ GEMM template (slow to compile)")
    parser.add_argument("--quick", action="store_true", help="fewer rows, matrices and rounds (options given win)")
    parser.add_argument("--out", default="bench-results/expert_gemm.json", help="the JSON result (default: %(default)s)")
    args = parser.parse_args(argv)
    args.out = output_file(args.out)
    quick_rows, quick_matrices, quick_rounds = ("1,4,16", 4, 3) if args.quick else ("1,2,4,8,16,32,64", 12, 7)
    args.rows = args.rows or quick_rows
    args.matrices = args.matrices or quick_matrices
    args.rounds = args.rounds or quick_rounds
    try:
        row_counts = [positive_int(part) for part in args.rows.split(",")]
    except argparse.ArgumentTypeError as err:
        parser.error(f"--rows {args.rows}: {err}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    print(f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
          f"load average {load_before[0]:.2f}", flush=True)
    results = []
    for shape_name, (out_features, in_features) in SHAPES.items():
        weights = [torch.randn(out_features, in_features) / in_features**0.5 for _ in range(args.matrices)]
        megabytes = out_features * in_features * 4 / 1e6
        print(f"\n{shape_name}: {out_features} x {in_features} ({megabytes:.1f} MB per matrix, {args.matrices} matrices)")
        for rows in row_counts:
            x = torch.randn(rows, in_features) * 100
            want = [F.linear(x, w) for w in weights]
            gemms = candidates(weights, rows, args.threads)
            for name, gemm in gemms.items():
                _check(name, gemm(x, 0), want[0])
            runs: dict[str, Callable[[], object]] = {
                name: (lambda gemm=gemm, x=x: [gemm(x, i) for i in range(args.matrices)]) for name, gemm in gemms.items()
            }
            if args.inductor:
                all_matrices = inductor_gemms(weights, rows)
                with torch.no_grad():
                    _check("inductor_cpp", all_matrices(x)[0], want[0])
                runs["inductor_cpp"] = lambda compiled=all_matrices, x=x: compiled(x)
            samples: dict[str, list[float]] = {name: [] for name in runs}
            with torch.no_grad():
                for run in runs.values():
                    run()  # warm up
                for _ in range(args.rounds):
                    for name, run in runs.items():
                        start = time.perf_counter()
                        run()
                        samples[name].append((time.perf_counter() - start) / args.matrices)
            ms = {name: statistics.median(values) * 1e3 for name, values in samples.items()}
            best = min(ms, key=ms.__getitem__)
            cells = "  ".join(f"{name} {value:6.2f} ms {megabytes / value:5.1f} GB/s" for name, value in ms.items())
            print(f"  M={rows:3d}  {cells}  best: {best}", flush=True)
            results.append({"matrix": shape_name, "shape": [out_features, in_features], "rows": rows, "ms": ms,
                            "gb_per_s": {name: megabytes / value for name, value in ms.items()}, "best": best})
    out = args.out
    out.write_text(json.dumps({"threads": args.threads, "matrices": args.matrices, "rounds": args.rounds,
                               "torch": torch.__version__, "load_before": load_before, "load_after": os.getloadavg(),
                               "results": results}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
