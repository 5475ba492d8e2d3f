"""Quantization benchmark: LP bit allocation vs uniform widths, bytes on disk, dynamic skip, CPU kernels.

Everything is measured side by side in one run and written as JSON (``--out``; default bench-results/quantize.json):

1. ``lp``: solve time of the allocation LP for 64 layers x 64 experts x 4 widths (random tables).
2. ``quality``: 1 - embedding cosine on real all-MiniLM-L6-v2 (128 held-out standard-library docstring
   sentences, 128 others calibrate; 32 and 32 with ``--quick``) and 1 - output-row cosine on a tiny MoE,
   for uniform widths and the LP allocation at 3.0 and 2.5 average bits (2.5 is compared with the best of
   a few uniform 2/3-bit mixes: alternate units, first or second half at 3 bits), on exact dequantization.
3. ``bytes``: expert bytes in the saved plan at 3.0 average bits vs float32.
4. ``skip``: fraction of expert evaluations dynamic-skip removes, and its quality cost.
5. ``kernels``: expert blocks of 1, 4, 8, 16 (decode) and 64, 256, 1024 tokens (prefill): the float32 plan (on
   the float kernel the runner measures fastest for the size) vs 2-, 3-, 4- and 8-bit experts (4 only with
   ``--quick``) on each CPU path that takes the width (``dequant``, ``int4pack``, ``onnxruntime``:
   MatMulNBits on int8 activations, ``onnxruntime_float``: on float32 ones), and ``auto``: what the runner
   runs (``quantized_experts``; its first call races the kernels from 16 tokens on, ``auto_chose`` names the
   winner). Then, for 4 bits, rows with ``activations``: the two MatMulNBits paths timed interleaved at
   256-2048 tokens (medians, and the rounds float32 activations won). Errors are relative to the
   output's largest magnitude: each path's against the float path on the dequantized weights, and
   ``weights_max_rel_error`` (the rounding of the weights themselves) against the float32 plan.
6. ``linears``: MiniLM's FFN linears at 4 bits, 16-4096 rows: float32, each quantized kernel, and ``auto``
   (the runner races ``int4pack``, MatMulNBits and ``dequant`` for a quantized dense linear).
7. ``converted``: the real-weights MoE, all-MiniLM-L6-v2 made an MoE by dense-to-moe (16 experts, top-8,
   calibrated on standard-library docstring sentences; per-linear units, routing-mass importance):
   ``quality`` and ``skip`` as above, 1 - embedding cosine on held-out sentences against the float converted model.

    python tools/bench/quantize.py [--quick] [--parts lp,kernels,linears,moe,minilm,converted]
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import transformers
from bench_util import output_file, positive_int, require_close, run_facts  # noqa: E402
from moe_block import CacheEviction, median_seconds  # this folder, first on sys.path when run as a script

import moec
from moec.analysis import bit_allocation
from moec.analysis.corpus import calibration_and_held_out, tokenized_batches
from moec.analysis.quality import embedding_cosine
from moec.api import CompiledModel
from moec.backend.torch_runner import (
    EXPERT_KERNEL_CHOICE,
    LINEAR_KERNEL_CHOICE,
    TorchRunner,
    WeightReader,
    expert_kernel_key,
    float_experts,
    linear_kernel_key,
    onnxruntime_experts,
    quantized_experts,
    quantized_linear,
)
from moec.frontend.blocks import ExpertsSpec
from moec.frontend.capture import capture
from moec.frontend.zoo import build_preset, minilm_path
from moec.ir import parse_graph, print_graph
from moec.ir.program import Program
from moec.ir.quant import QuantizedType
from moec.kernels import reference as reference_kernels
from moec.kernels.matmul_nbits import single_matmul_session
from moec.kernels.quant import QuantizedWeight, quantize_matrix
from moec.kernels.quant_matmul import (
    INT4_MAX_BITS,
    QuantizedExperts,
    auto_kernel,
    onnxruntime_linear,
    prepare_linear,
)
from moec.passes import PassContext, build_passes, run_passes
from moec.passes.dynamic_skip import skip_statistics
from moec.passes.quantize import quantizable_units, quantize_units


def clone(program: Program) -> Program:
    return Program(parse_graph(print_graph(program.graph)), dict(program.weights), program.in_spec, program.out_spec, {})


def bench_lp() -> dict:
    """Solve time for 64 layers x 64 experts x 4 widths (random tables), with reduced-cost fixing and,
    side by side, with every width handed to the solver; both exact, so their objectives must agree."""
    rng = random.Random(0)
    units, widths = 64 * 64, (2, 3, 4, 8)
    params = [rng.randint(1, 4) * 1_000_000 for _ in range(units)]
    importance = [rng.random() for _ in range(units)]
    error = [sorted((rng.random() * 2.0**-b for b in widths), reverse=True) for _ in range(units)]
    out = {"units": units, "widths": list(widths), "budgets": {}}
    for budget in (3.0, 2.5):
        row = {}
        for label, fixing in (("fixing", True), ("full", False)):
            start = time.perf_counter()
            allocation = bit_allocation.solve(params, importance, error, widths, budget, reduced_cost_fixing=fixing)
            row[label] = {"seconds": time.perf_counter() - start, "objective": allocation.objective,
                          "lower_bound": allocation.lower_bound, "core_units": allocation.core_units,
                          "average_bits": allocation.average_bits}
        row["speedup"] = row["full"]["seconds"] / row["fixing"]["seconds"]
        out["budgets"][str(budget)] = row
    return out


def quality_runs(name: str, program: Program, calibration: list, held_out: list, loss, group: int,
                 dense: bool, per_linear: bool, importance: str = "output") -> dict:
    """Loss of uniform widths, uniform mixes and LP allocations at 3.0 and 2.5 bits, all on one program.

    Quantized programs run on exact dequantization (``quant_kernel="dequant"``): the loss is the weights'
    rounding alone, the same in every run, whichever kernel ``auto`` would time fastest on this host (int4pack
    rounds activations to bfloat16, MatMulNBits below 512 rows to int8)."""
    reference = [TorchRunner(program).run(batch)[0] for batch in held_out]

    def measure(prog: Program) -> float:
        runner = TorchRunner(prog, quant_kernel="dequant")
        return float(np.mean([loss(ref, runner.run(batch)[0], batch) for ref, batch in zip(reference, held_out, strict=True)]))

    def with_bits(bits: list[int]) -> float:
        prog = clone(program)
        units = quantizable_units(prog, dense, per_linear)
        quantize_units(prog, units, bits, group, "rtn", None)
        return measure(prog)

    units = quantizable_units(program, dense, per_linear)
    out = {"model": name, "units": len(units), "importance": importance, "uniform": {}, "mixes_2_5": {}, "lp": {}}
    for width in (2, 3, 4):
        out["uniform"][str(width)] = with_bits([width] * len(units))
    half = len(units) // 2
    params = [u.params for u in units]
    mixes = {"alternate": [3 if i % 2 else 2 for i in range(len(units))],
             "first_half_3": [3 if i < half else 2 for i in range(len(units))],
             "second_half_3": [2 if i < half else 3 for i in range(len(units))]}
    for label, bits in mixes.items():
        if bit_allocation.average_bits(bits, params) <= 2.5 + 1e-9:
            out["mixes_2_5"][label] = with_bits(bits)
    for budget in (3.0, 2.5):
        prog = clone(program)
        context = PassContext(calibration=calibration)
        start = time.perf_counter()
        recipe = {"passes": [{"bit-allocation": {"budget": budget, "group": group, "dense": dense, "per_linear": per_linear,
                                                 "importance": importance}}]}
        run_passes(prog, build_passes(recipe), context)
        report = context.report["bit_allocation"]
        out["lp"][str(budget)] = {"loss": measure(prog), "bits": [row["bits"] for row in report["table"]],
                                  "objective": report["objective"], "average_bits": report["average_bits"],
                                  "uniform_objectives": report["uniform"], "kept": report["kept"],
                                  "measured_on_calibration": report.get("measured"), "pass_seconds": time.perf_counter() - start}
    return out


def minilm_quality(quick: bool) -> dict:
    """LP vs uniform widths on dense all-MiniLM-L6-v2 (per-linear units, output-error importance), calibrated
    and measured on different sentences in batches of 32."""
    model, example = build_preset("minilm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    program = moec.compile(model, example).program
    sentences = 32 if quick else 128
    cal_text, held_text = calibration_and_held_out(sentences, sentences)
    held_batches = tokenized_batches(tokenizer, held_text)
    held_out = [program.flatten_inputs((), batch) for batch in held_batches]
    masks = {id(flat): batch["attention_mask"] for flat, batch in zip(held_out, held_batches, strict=True)}

    def loss(reference, candidate, batch):
        return 1 - embedding_cosine(reference, candidate, masks[id(batch)])

    quality = quality_runs("minilm (dense FFNs, per linear)", program, tokenized_batches(tokenizer, cal_text),
                           held_out, loss, 64, True, True)
    quality["sentences"] = {"calibration": sentences, "held_out": sentences}
    return quality


def row_cosine_loss(reference, candidate, batch) -> float:
    return float(1 - torch.nn.functional.cosine_similarity(reference.double(), candidate.double(), dim=-1).mean())


def moe_quality(preset: str) -> tuple[dict, Program, list]:
    model, example = build_preset(preset)
    program = moec.compile(model, example).program
    generator = torch.Generator().manual_seed(1)
    vocab = example["input_ids"].max().item() + 1

    def batch(seed_rows: int):
        ids = torch.randint(0, int(vocab), (seed_rows, 16), generator=generator)
        return program.flatten_inputs((), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})

    calibration, held_out = [batch(8)], [batch(8)]
    return quality_runs(f"{preset} (experts only)", program, calibration, held_out, row_cosine_loss, 32, False, False), program, held_out


def expert_bytes(program: Program) -> dict:
    """Expert weight bytes of the float plan and of the plan at 3.0 average bits, read back from the saved files."""
    def saved_expert_bytes(prog: Program) -> int:
        with tempfile.TemporaryDirectory() as folder:
            path = CompiledModel(prog).save(Path(folder) / "plan")
            tensors = safetensors.torch.load_file(str(path / "weights.safetensors"))
            return sum(t.numel() * t.element_size() for n, t in tensors.items() if ".experts." in n)

    float_bytes = saved_expert_bytes(program)
    prog = clone(program)
    units = quantizable_units(prog, dense=False)
    quantize_units(prog, units, [3] * len(units), 32, "rtn", None)
    quantized_bytes = saved_expert_bytes(prog)
    types = [t for t in prog.graph.weights.values() if isinstance(t, QuantizedType)]
    return {"float32_bytes": float_bytes, "quantized_bytes": quantized_bytes, "ratio": float_bytes / quantized_bytes,
            "reported_bytes": sum(t.storage_bytes for t in types), "group": 32}


def skip_costs(program: Program, held_out: list, loss) -> list[dict]:
    reference = [CompiledModel(program).runner.run(batch)[0] for batch in held_out]
    rows = []
    for threshold in (0.3, 0.5, 0.7, 0.9):
        prog = clone(program)
        run_passes(prog, build_passes({"passes": [{"dynamic-skip": {"threshold": threshold}}]}), PassContext())
        runner = CompiledModel(prog).runner
        losses = [loss(ref, runner.run(b)[0], b) for ref, b in zip(reference, held_out, strict=True)]
        rows.append({"threshold": threshold, **skip_statistics(prog, held_out), "loss": float(np.mean(losses))})
    return rows


def converted_minilm(quick: bool) -> dict:
    """LP vs uniform widths and dynamic skip on all-MiniLM-L6-v2 converted by dense-to-moe (16 experts of 96
    neurons, top-8, fitted router; router and allocation calibrated on the same sentences), measured against
    the float converted model on held-out sentences."""
    model, example = build_preset("minilm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    sentences = 64 if quick else 128
    cal_text, held_text = calibration_and_held_out(sentences, sentences)
    program = capture(model, (), example)
    start = time.perf_counter()
    conversion = PassContext(calibration=tokenized_batches(tokenizer, cal_text), progress=False)
    run_passes(program, build_passes({"passes": [{"dense-to-moe": {"experts": 16, "top_k": 8, "method": "weights"}}]}), conversion)
    convert_seconds = time.perf_counter() - start

    def one_batch(text: list[str]) -> dict:
        return dict(tokenizer(text, padding=True, truncation=True, max_length=128, return_tensors="pt"))

    held = one_batch(held_text)
    held_out = [program.flatten_inputs((), held)]

    def loss(reference, candidate, batch):
        return 1 - embedding_cosine(reference, candidate, held["attention_mask"])

    # Each expert linear is a unit, weighted by the expert's routing mass (one calibration run; measuring
    # each of the 192 units' error at the model output would take one run per unit and width). Group 32:
    # an expert's FFN width (1536 / 16 = 96) is not a multiple of 64.
    quality = quality_runs("minilm converted (16 experts, top-8, per linear)", program,
                           [one_batch(cal_text)], held_out, loss, 32, False, True, importance="routing")
    quality["convert_seconds"] = convert_seconds
    quality["sentences"] = {"calibration": sentences, "held_out": sentences}
    return {"quality": quality, "skip": skip_costs(program, held_out, loss)}


def time_call(fn, repeats: int, evict: CacheEviction | None = None) -> float:
    """Median milliseconds of ``fn()`` after one warm-up call; ``evict()`` runs before every timed call."""
    return median_seconds(fn, repeats, 1, evict) * 1e3


def ort_matmul_nbits(matrix, int8_activations: bool):
    """onnxruntime's MatMulNBits on one 4-bit matrix [N, K], on float32 or int8 activations."""
    session = single_matmul_session(matrix, int8_activations, threads=torch.get_num_threads())
    return lambda x: session.run(None, {"x": x})[0]


def bench_kernels(quick: bool) -> list[dict]:
    """An MoE block (8 experts, top-2, hidden 1024, FFN 3584, gated) at 1-256 tokens, float32 vs quantized
    experts of each width (group 64) on each CPU path that takes that width."""
    generator = torch.Generator().manual_seed(0)
    experts, hidden, ffn = 8, 1024, 3584
    spec = ExpertsSpec(num_experts=experts, hidden=hidden, intermediate=ffn, act="silu", gated=True)
    w_in = torch.randn(experts, 2 * ffn, hidden, generator=generator) * 0.02
    w_out = torch.randn(experts, hidden, ffn, generator=generator) * 0.02
    float32 = float32_plan(spec, w_in, w_out)
    evict = CacheEviction()  # every timed block call streams its experts from memory, as inside a model
    rows = []
    for bits in (4,) if quick else (2, 3, 4, 8):
        q_in = QuantizedWeight.from_matrices("f32", tuple(w_in.shape), [quantize_matrix(w_in[e], bits, 64) for e in range(experts)])
        q_out = QuantizedWeight.from_matrices("f32", tuple(w_out.shape), [quantize_matrix(w_out[e], bits, 64) for e in range(experts)])
        kernels = ("dequant", "int4pack") if bits <= INT4_MAX_BITS else ("dequant",)
        paths = {kernel: QuantizedExperts(q_in, q_out, None, None, spec, kernel) for kernel in kernels}
        if bits <= INT4_MAX_BITS:  # MatMulNBits on int8 or float32 activations, the runner's other candidate
            paths["onnxruntime"] = onnxruntime_experts(q_in, q_out, None, None, spec, drop_zero_weight=True)
            paths["onnxruntime_float"] = onnxruntime_experts(q_in, q_out, None, None, spec, drop_zero_weight=True,
                                                             int8_activations=False)
            for key in [key for key in EXPERT_KERNEL_CHOICE.chosen if key[-1] == "quantized"]:
                del EXPERT_KERNEL_CHOICE.chosen[key]  # each width races anew (the runner keys shapes, not widths)
            reader = WeightReader(None, None, "auto", "auto")  # type: ignore[arg-type]  # only its kernel cache is used
            paths["auto"] = lambda x, indices, weights, reader=reader, q_in=q_in, q_out=q_out: quantized_experts(
                reader, x, indices, weights, (q_in, q_out, None, None), spec)
        reference = QuantizedExperts(q_in.dequantize(), q_out.dequantize(), None, None, spec)  # float path, dequantized weights
        for tokens in (1, 16) if quick else (1, 4, 8, 16, 64, 256, 1024):
            rows.append(measure_tokens(bits, tokens, hidden, experts, spec, (w_in, w_out), float32, paths, reference,
                                       q_in.matrix(0), generator, evict))
        if bits == 4 and not quick:
            rows += [activation_rounds(paths, tokens, hidden, experts, generator, evict) for tokens in (256, 512, 1024, 2048)]
    return rows


def bench_dense_linears(quick: bool) -> list[dict]:
    """MiniLM's FFN linears (384 -> 1536 and 1536 -> 384), 4-bit, group 64, at 16 to 4096 rows: the float32
    linear against each quantized kernel and ``auto`` (what the runner runs for a quantized dense linear; its
    first call of a size races the kernels, ``auto_chose`` names the winner). Weights warm in cache, as a dense
    model's small FFN matrices often are; median of 9 interleaved rounds."""
    generator = torch.Generator().manual_seed(0)
    rows_out = []
    for out_features, in_features in ((1536, 384), (384, 1536)):
        weight = torch.randn(out_features, in_features, generator=generator) * 0.05
        matrix = quantize_matrix(weight, 4, 64)
        reader = WeightReader(None, None, "auto", "auto")  # type: ignore[arg-type]  # only its kernel cache is used
        q_weight = QuantizedWeight.from_matrices("f32", (1, out_features, in_features), [matrix])
        kernels = {
            "float32": functools.partial(torch.nn.functional.linear, weight=weight),
            "dequant": prepare_linear(matrix, None, "dequant"),
            "int4pack": prepare_linear(matrix, None, "int4pack"),
            "onnxruntime_int8": onnxruntime_linear(matrix, None, int8_activations=True),
            "onnxruntime_float": onnxruntime_linear(matrix, None, int8_activations=False),
            "auto": functools.partial(quantized_linear, reader, "w_up", q_weight, None),
        }
        for rows in (16, 128) if quick else (16, 128, 1024, 4096):
            x = torch.randn(rows, in_features, generator=generator)
            row = {"linear": f"{in_features} -> {out_features}", "rows": rows,
                   **time_linears(kernels, x, torch.nn.functional.linear(x, matrix.dequantize()))}
            row["auto_chose"] = LINEAR_KERNEL_CHOICE.chosen.get(linear_kernel_key(q_weight.type, rows), "int4pack")
            row["speedup_auto_vs_int4pack"] = row["int4pack_ms"] / row["auto_ms"]
            row["speedup_auto_vs_float32"] = row["float32_ms"] / row["auto_ms"]
            print(json.dumps(row), flush=True)
            rows_out.append(row)
    return rows_out


def time_linears(kernels: dict, x: torch.Tensor, want: torch.Tensor, rounds: int = 9) -> dict:
    """Each kernel's error against ``want`` (quantized ones) and median ms over interleaved rounds on ``x``."""
    row: dict = {}
    samples: dict[str, list[float]] = {name: [] for name in kernels}
    for name, fn in kernels.items():
        got = fn(x)  # warm-up; ``auto`` races here
        if name != "float32":
            row[f"{name}_max_rel_error"] = float((got - want).abs().max() / want.abs().max())
    for _ in range(rounds):
        for name, fn in kernels.items():
            start = time.perf_counter()
            fn(x)
            samples[name].append(time.perf_counter() - start)
    return row | {f"{name}_ms": statistics.median(times) * 1e3 for name, times in samples.items()}


def activation_rounds(paths, tokens, hidden, experts, generator, evict, rounds: int = 15) -> dict:
    """MatMulNBits on int8 against float32 activations for one block call of ``tokens``, timed interleaved round
    by round (caches evicted before each call): the evidence for ``QUANTIZED_FLOAT_ACTIVATIONS_MIN_TOKENS``."""
    x = torch.randn(tokens, hidden, generator=generator)
    weights, indices = torch.softmax(torch.randn(tokens, experts, generator=generator), -1).topk(2, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    kernels = {"int8": paths["onnxruntime"], "float32": paths["onnxruntime_float"]}
    samples: dict[str, list[float]] = {name: [] for name in kernels}
    for fn in kernels.values():
        fn(x, indices, weights)  # warm-up
    for _ in range(rounds):
        for name, fn in kernels.items():
            evict()
            start = time.perf_counter()
            fn(x, indices, weights)
            samples[name].append(time.perf_counter() - start)
    row = {"activations": True, "tokens": tokens, "rounds": rounds,
           **{f"{name}_ms": statistics.median(times) * 1e3 for name, times in samples.items()},
           "float32_faster_rounds": sum(f < i for f, i in zip(samples["float32"], samples["int8"], strict=True))}
    print(json.dumps(row), flush=True)
    return row


def float32_plan(spec: ExpertsSpec, w_in: torch.Tensor, w_out: torch.Tensor):
    """The float32 plan's experts as the torch runner runs them: the kernel it measures fastest for each size."""
    onnxruntime_kernel = onnxruntime_experts(w_in, w_out, None, None, spec)
    return lambda x, indices, weights: float_experts("auto", x, indices, weights, w_in, w_out, None, None, spec,
                                                     lambda: onnxruntime_kernel)


def measure_tokens(bits, tokens, hidden, experts, spec, float_weights, float32, paths, reference, matrix, generator,
                   evict) -> dict:
    w_in, w_out = float_weights
    x = torch.randn(tokens, hidden, generator=generator)
    logits = torch.randn(tokens, experts, generator=generator)
    weights, indices = torch.softmax(logits, -1).topk(2, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    want = reference(x, indices, weights)
    exact = float32(x, indices, weights)  # the runner races its kernels here; then checked before it is timed
    require_close("the float32 plan", exact, reference_kernels.experts(x, indices, weights, w_in, w_out, None, None, spec),
                  1e-4, f"at {tokens} tokens")
    float32_ms = time_call(lambda: float32(x, indices, weights), 5, evict)
    row = {"bits": bits, "tokens": tokens,
           "float32_kernel": EXPERT_KERNEL_CHOICE.chosen[expert_kernel_key(spec, 2, tokens)],
           "float32_ms": float32_ms}
    row["weights_max_rel_error"] = float((want - exact).abs().max() / exact.abs().max())
    for kernel, fn in paths.items():
        got = fn(x, indices, weights)
        row[f"{kernel}_ms"] = time_call(lambda fn=fn: fn(x, indices, weights), 5, evict)
        row[f"{kernel}_max_rel_error"] = float((got - want).abs().max() / want.abs().max())
        row[f"speedup_{kernel}_vs_float32"] = row["float32_ms"] / row[f"{kernel}_ms"]
    if "auto" in paths:
        row["auto_chose"] = EXPERT_KERNEL_CHOICE.chosen.get(expert_kernel_key(spec, 2, tokens, "quantized"),
                                                            auto_kernel(bits, torch.device("cpu")))
    if bits == 4:  # one 7168 x 1024 matrix, all tokens
        xs = x.numpy()
        single = torch.nn.functional.linear(x, matrix.dequantize())
        ort_float, ort_int8 = ort_matmul_nbits(matrix, False), ort_matmul_nbits(matrix, True)
        row["one_matrix_ms"] = {
            "float32": time_call(lambda: torch.nn.functional.linear(x, w_in[0]), 5),
            "int4pack": time_call(lambda: paths["int4pack"].input_linears[0](x), 5),
            "ort_matmulnbits": time_call(lambda: ort_float(xs), 5),
            "ort_matmulnbits_int8": time_call(lambda: ort_int8(xs), 5),
        }
        row["ort_max_rel_error"] = float((torch.from_numpy(ort_float(xs)) - single).abs().max() / single.abs().max())
        row["ort_int8_max_rel_error"] = float((torch.from_numpy(ort_int8(xs)) - single).abs().max() / single.abs().max())
    print(json.dumps(row), flush=True)
    return row


PARTS = ("lp", "kernels", "linears", "moe", "minilm", "converted")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes, repeats and sentences")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--out", default=None, help="the JSON result (default: bench-results/quantize.json, or "
                                                    "bench-results/quantize-<parts>.json for a subset of the parts)")
    args = parser.parse_args()
    parts = args.parts.split(",")
    if unknown := set(parts) - set(PARTS):
        parser.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    name = "quantize.json" if parts == list(PARTS) else f"quantize-{'-'.join(parts)}.json"
    out = output_file(args.out or f"bench-results/{name}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results: dict = {**run_facts(quick=args.quick), "parts": parts}
    if "lp" in parts:
        results["lp"] = bench_lp()
        print("lp", json.dumps(results["lp"]), flush=True)
    if "kernels" in parts:
        results["kernels"] = bench_kernels(args.quick)
    if "linears" in parts:
        results["dense_linears"] = bench_dense_linears(args.quick)
    if "moe" in parts:
        moe, moe_program, moe_held_out = moe_quality("tiny-olmoe")
        results["quality_moe"] = moe
        print("quality moe", json.dumps(moe), flush=True)
        results["bytes"] = expert_bytes(moe_program)
        print("bytes", json.dumps(results["bytes"]), flush=True)
        results["skip"] = skip_costs(moe_program, moe_held_out, row_cosine_loss)
        print("skip", json.dumps(results["skip"]), flush=True)
    if "minilm" in parts:
        results["quality_minilm"] = minilm_quality(args.quick)
        print("quality minilm", json.dumps(results["quality_minilm"]), flush=True)
    if "converted" in parts:
        results["converted_minilm"] = converted_minilm(args.quick)
        print("converted minilm", json.dumps(results["converted_minilm"]), flush=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
