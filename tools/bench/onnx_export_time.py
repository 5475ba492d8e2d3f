"""Benchmark: where an ONNX export's time goes, for every family of the tiny zoo and both lowerings.

Each family is compiled once, then exported with the ``portable`` and ``ort`` lowerings (checks
included: onnx.checker, strict shape inference, onnxruntime parity). The phases of
``moec.backend.onnx.export`` are timed by wrapping its functions (wall time, no profiler):

* ``trace``     torch.export of the program module, preparation for translation, translation to ONNX
                (``trace_to_onnx`` minus ``optimize``)
* ``optimize``  constant folding, rewrite rules and fusions (``optimize_onnx``)
* ``checks``    onnx.checker + shape inference (``check_model``) and the parity run (``check_parity``)

The first export of the process also builds torch.onnx's translation registry (a few seconds, once).

Run:  python tools/bench/onnx_export_time.py [--quick] [--out bench-results/onnx_export_time.json]
      (``--quick``: tiny-mixtral and tiny-llama only)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench_util import output_file  # noqa: E402

import moec  # noqa: E402
from moec.backend.onnx import export as onnx_export  # noqa: E402
from moec.frontend.zoo import build_preset  # noqa: E402

FAMILIES = ("tiny-mixtral", "tiny-qwen2-moe", "tiny-olmoe", "tiny-deepseek-v3",
            "tiny-llama", "tiny-gpt2", "tiny-bert", "minilm")
PHASES = {"trace_to_onnx": "trace", "optimize_onnx": "optimize", "check_model": "checks", "check_parity": "checks"}


def timing_wrappers(seconds: dict[str, float]) -> None:
    """Replace the export's phase functions by timed ones adding their wall time to ``seconds`` (those this
    version of moec has: before the export ran its own optimizer, ``trace`` included it)."""
    for function_name, phase in PHASES.items():
        original = getattr(onnx_export, function_name, None)
        if original is None:
            continue

        def timed(*args, _original=original, _phase=phase, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                seconds[_phase] += time.perf_counter() - start

        setattr(onnx_export, function_name, timed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny-mixtral and tiny-llama only")
    parser.add_argument("--out", default="bench-results/onnx_export_time.json")
    args = parser.parse_args(argv)
    args.out = output_file(args.out)
    warnings.filterwarnings("ignore")
    seconds: dict[str, float] = defaultdict(float)
    timing_wrappers(seconds)
    families = ("tiny-mixtral", "tiny-llama") if args.quick else FAMILIES
    print(f"load average at start {os.getloadavg()[0]:.1f}")
    print("| family | compile s | lowering | export s | trace s | optimize s | checks s |")
    print("|---|---:|---|---:|---:|---:|---:|")
    rows, start_all = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for name in families:
            start = time.perf_counter()
            compiled = moec.compile(*build_preset(name))
            compile_s = time.perf_counter() - start
            for lowering in ("portable", "ort"):
                seconds.clear()
                start = time.perf_counter()
                compiled.export_onnx(Path(folder) / f"{name}-{lowering}.onnx", lowering=lowering)
                total = time.perf_counter() - start
                trace = seconds["trace"] - seconds["optimize"]  # optimize runs inside trace_to_onnx
                row = {"family": name, "lowering": lowering, "compile_s": compile_s, "export_s": total,
                       "trace_s": trace, "optimize_s": seconds["optimize"], "checks_s": seconds["checks"]}
                rows.append(row)
                print(f"| {name} | {compile_s:.1f} | {lowering} | {total:.1f} | {trace:.1f} | "
                      f"{seconds['optimize']:.1f} | {seconds['checks']:.1f} |", flush=True)
    total_s = time.perf_counter() - start_all
    print(f"all: {total_s:.0f} s (compiles included); load average at end {os.getloadavg()[0]:.1f}")
    out = args.out
    out.write_text(json.dumps({"rows": rows, "total_s": total_s, "load_average_end": os.getloadavg()[0]}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
