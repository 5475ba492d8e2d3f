"""Benchmark: dense-to-moe on the real all-MiniLM-L6-v2, quality against the original and CPU speed.

In one run:

* **Cost**: calibration on the calibration sentences plus conversion of all 6 FFN layers (wall time).
* **Quality** on held-out sentences, for active-FFN fractions 1/2, 1/4, 1/8 (``--experts`` E experts,
  top_k = E/2, E/4, E/8): mean cosine of mean-pooled sentence embeddings vs the original model, and
  nearest-neighbour agreement; the same experts under a random router and an oracle router (top-k by
  true expert output norm), and the share of the random-to-oracle cosine gap the fitted router closes; and
  the *neuron oracle* on the original model (per token, the same fraction of neurons with the largest true
  contributions, the rest at their calibration mean), a bound for any split into experts.
* **Speed**: a batch of 32 x 128 tokens through the original (captured, torch runner) and the converted
  program at each fraction, median of repeats interleaved, and the ratio.

Text: sentences of Python standard-library docstrings (``moec.analysis.corpus``), split into disjoint
calibration and held-out parts.

Run:  python tools/bench/dense_to_moe.py [--quick] [--out bench-results/dense_to_moe.json]
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

from bench_util import output_file, positive_int  # noqa: E402

from moec.analysis.calibration import calibrate  # noqa: E402
from moec.analysis.corpus import calibration_and_held_out, tokenized_batches  # noqa: E402
from moec.analysis.quality import (  # noqa: E402,E501
    NeuronOracleRunner,
    conversion_quality,
    embedding_quality,
    sentence_embeddings,
)
from moec.backend.torch_runner import TorchRunner, kernel_choice_lines  # noqa: E402
from moec.frontend.capture import capture  # noqa: E402
from moec.frontend.zoo import build_preset, minilm_path  # noqa: E402
from moec.ir.parser import parse_graph  # noqa: E402
from moec.ir.printer import print_graph  # noqa: E402
from moec.ir.program import Program  # noqa: E402
from moec.passes import PassContext, build_passes, run_passes  # noqa: E402


def copy_program(program: Program) -> Program:
    """An independent copy (graph re-parsed from its text; the weight dict copied, tensors shared)."""
    return Program(parse_graph(print_graph(program.graph)), dict(program.weights), program.in_spec,
                   program.out_spec, dict(program.metadata))


def convert(program: Program, context: PassContext, options: dict) -> tuple[Program, float]:
    converted = copy_program(program)
    start = time.perf_counter()
    run_passes(converted, build_passes({"passes": [{"dense_to_moe": options}]}), context)
    return converted, time.perf_counter() - start


def time_runs(programs: dict[str, Program], batch: dict, repeats: int) -> dict[str, float]:
    """Median seconds per forward pass of each program, interleaved repeat by repeat."""
    runners = {name: TorchRunner(p) for name, p in programs.items()}
    flat = {name: p.flatten_inputs((), batch) for name, p in programs.items()}
    times: dict[str, list[float]] = {name: [] for name in programs}
    for name in programs:  # warm-up
        runners[name].run(flat[name])
    for _ in range(repeats):
        for name, runner in runners.items():
            start = time.perf_counter()
            runner.run(flat[name])
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sentences and repeats")
    parser.add_argument("--experts", type=int, default=16,
                        help="experts per FFN, a multiple of 8 (top-k E/2, E/4 and E/8 give the three fractions)")
    parser.add_argument("--shared", type=float, default=0.0, help="fraction of neurons in an always-on shared expert")
    parser.add_argument("--method", default=None, choices=["weights", "coactivation"],
                        help="neuron clustering (default: the pass's, coactivation with a fitted router)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default="bench-results/dense_to_moe.json", help="the JSON result (default: %(default)s)")
    args = parser.parse_args()
    if args.experts < 8 or args.experts % 8:
        parser.error(f"--experts {args.experts}: give a multiple of 8, so that E/8 experts are active at 1/8")
    args.out = output_file(args.out)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    n_cal, n_held, repeats = (128, 128, 3) if args.quick else (256, 256, 7)

    import transformers

    model, example = build_preset("minilm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    cal_text, held_text = calibration_and_held_out(n_cal, n_held)
    cal_batches, held_batches = tokenized_batches(tokenizer, cal_text), tokenized_batches(tokenizer, held_text)
    program = capture(model, (), example)

    start = time.perf_counter()
    calibration = calibrate(program, cal_batches, progress=False)
    calibration_s = time.perf_counter() - start
    context = PassContext(calibration=calibration, progress=False)
    reference = TorchRunner(program)

    def run_reference(batch):
        return reference.run(program.flatten_inputs((), batch))[0]

    means = {block: stats.hidden.mean(0) for block, stats in calibration.dense.items()}
    expected = sentence_embeddings(run_reference, held_batches)

    def neuron_oracle(fraction: float) -> dict[str, float]:
        runner = NeuronOracleRunner(program, fraction, means)
        embeddings = sentence_embeddings(lambda batch: runner.run(program.flatten_inputs((), batch))[0], held_batches)
        return embedding_quality(expected, embeddings)

    rows, converted = [], {}
    for divisor in (2, 4, 8):
        top_k = args.experts // divisor
        options = {"experts": args.experts, "top_k": top_k, "shared": args.shared, "method": args.method}
        converted[f"1/{divisor}"], convert_s = convert(program, context, options)
        quality = conversion_quality(run_reference, converted[f"1/{divisor}"], held_batches)
        quality["neuron_oracle"] = neuron_oracle(quality["active_ffn_fraction"])
        rows.append({"fraction": f"1/{divisor}", "top_k": top_k, "convert_s": convert_s, **quality})
        print(f"active 1/{divisor} ({quality['active_ffn_fraction']:.3f}), top-{top_k} of {args.experts}: "
              f"convert {convert_s:.1f} s", flush=True)
        for label in ("router", "random", "oracle", "neuron_oracle"):
            q = quality[label]
            print(f"  {label:13s} cosine {q['cosine']:.4f}  nn agreement {q['nn_agreement']:.1%}")
        if "gap_closed" in quality:  # absent when random and oracle routing agree (no gap to close)
            print(f"  router closes {quality['gap_closed']:.0%} of the random-to-oracle gap", flush=True)

    speed_batch = dict(tokenizer((list(held_text) * 2)[:32], padding="max_length", truncation=True, max_length=128,
                                 return_tensors="pt"))
    seconds = time_runs({"original": program, **converted}, speed_batch, repeats)
    print(f"calibration on {n_cal} sentences: {calibration_s:.1f} s; + conversion of 6 layers (1/2): "
          f"{calibration_s + rows[0]['convert_s']:.1f} s")
    print(f"speed, batch 32 x 128 tokens, median of {repeats}:")
    for name, s in seconds.items():
        print(f"  {name:9s} {s * 1000:8.1f} ms   x{seconds['original'] / s:.2f} vs original")
    kernels = kernel_choice_lines()
    print("experts kernels the runner timed and chose in this run (each one's best time):")
    for line in kernels:
        print(f"  {line}")

    out = args.out
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "load_average": os.getloadavg()},
        "options": {**vars(args), "out": str(args.out)}, "calibration_sentences": n_cal, "held_out_sentences": n_held,
        "calibration_s": calibration_s, "quality": rows,
        "speed_ms": {k: v * 1000 for k, v in seconds.items()},
        "speedup_vs_original": {k: seconds["original"] / v for k, v in seconds.items()},
        "expert_kernels": kernels,
    }
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
