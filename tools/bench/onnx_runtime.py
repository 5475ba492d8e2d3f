"""Benchmark: an exported MoE model in onnxruntime vs Hugging Face eager and moec's torch runner.

Model: a Mixtral-style causal LM, 2 layers, hidden 512, FFN 1536, 8 experts, top-2, vocab 1024,
float32 (seeded random weights; ``--quick``: the tiny-mixtral preset). It is compiled once, exported
with both MoE lowerings (``portable``: standard ONNX ops; ``ort``: com.microsoft.MoE) and each export is
checked (onnx.checker, shape inference, onnxruntime parity with the torch runner).

Compared on one sequence of 1, 16 and 256 tokens, in the same process and interleaved repeat by repeat
(so background load hits all alike), median time of the full forward pass returning logits:

* ``hf_eager``       the transformers model as shipped (``use_cache=False``, ``torch.inference_mode``)
* ``moec_torch``     moec's compiled model (the torch runner)
* ``ort_portable``   onnxruntime CPU session on the portable export
* ``ort_fused``      onnxruntime CPU session on the ort export

torch and onnxruntime use the same number of intra-op threads (``--threads``). With ``--bits B`` the
compiled model's experts are quantized first (``quantize`` pass, group 32), so the exports carry packed
weights (``ort``: com.microsoft.QMoE for 2 and 4 bits) and the file sizes are printed beside the float
weights' bytes; HF eager then differs from the others by the quantization error.

Run:  python tools/bench/onnx_runtime.py [--quick] [--threads 1] [--bits 4] [--out bench-results/onnx_runtime.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import onnxruntime
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench_util import output_file, positive_int, require_close, run_facts  # noqa: E402

import moec  # noqa: E402
from moec.frontend.zoo import build_preset  # noqa: E402

TOKENS = (1, 16, 256)
RUNNERS = ("hf_eager", "moec_torch", "ort_portable", "ort_fused")


def build_model(quick: bool):
    if quick:
        model, _ = build_preset("tiny-mixtral")
        return model, "tiny-mixtral (2 layers, hidden 32, 4 experts, top-2)"
    config = transformers.MixtralConfig(
        vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
        num_local_experts=8, num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config).eval(), "Mixtral-style, 2 layers, hidden 512, FFN 1536, 8 experts, top-2"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_runners(model, compiled, sessions, inputs):
    """One zero-argument callable per runner, each returning the logits for ``inputs``."""
    feeds = {name: tensor.numpy() for name, tensor in inputs.items()}

    def hf_eager():
        with torch.inference_mode():
            return model(**inputs, use_cache=False).logits

    return {
        "hf_eager": hf_eager,
        "moec_torch": lambda: compiled(**inputs).logits,
        "ort_portable": lambda: sessions["ort_portable"].run(None, feeds)[0],
        "ort_fused": lambda: sessions["ort_fused"].run(None, feeds)[0],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny-mixtral preset and fewer repeats")
    parser.add_argument("--threads", type=positive_int, default=1, help="intra-op threads for torch and onnxruntime")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timed runs per runner and size, median taken (default: 11; --quick: 5)")
    parser.add_argument("--bits", type=int, default=None, help="quantize the experts to this width before export")
    parser.add_argument("--out", default="bench-results/onnx_runtime.json", help="the JSON result (default: %(default)s)")
    args = parser.parse_args(argv)
    args.out = output_file(args.out)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (5 if args.quick else 11)

    model, description = build_model(args.quick)
    vocab = model.config.vocab_size
    example = {"input_ids": torch.randint(0, vocab, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    recipe = {"passes": [{"quantize": {"bits": args.bits, "group": 32}}]} if args.bits else None
    compiled = moec.compile(model, example, recipe=recipe)
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    sessions, checks = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for lowering, runner in (("portable", "ort_portable"), ("ort", "ort_fused")):
            start = time.perf_counter()
            path = compiled.export_onnx(Path(folder) / f"{lowering}.onnx", lowering=lowering)
            checks[lowering] = dict(compiled.report["onnx"], export_seconds=round(time.perf_counter() - start, 1),
                                    file_bytes=path.stat().st_size)
            sessions[runner] = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    if args.bits:
        description += f", experts quantized to {args.bits} bits (group 32)"
    print(f"model: {description}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
          f"{args.threads} thread(s), load average at start {os.getloadavg()[0]:.1f}")
    for lowering, check in checks.items():
        print(f"export {lowering}: {check['export_seconds']} s, parity max abs diff {check['parity_max_abs_diff']}, "
              f"{check['fused_moe_ops']} fused MoE ops, file {check['file_bytes'] / 1e6:.2f} MB "
              f"(float32 weights {float_bytes / 1e6:.2f} MB)")
    if not checks["ort"]["fused_moe_ops"]:
        raise SystemExit("the ort export fused no MoE op, so it is the portable graph and there is nothing fused to "
                         f"time: {'; '.join(sorted(set(checks['ort']['portable_fallbacks'].values())))}")

    rows = []
    for tokens in TOKENS:
        ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(tokens))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        runs = make_runners(model, compiled, sessions, inputs)
        reference = runs["hf_eager"]()  # every runner runs once before timing (warmup and agreement)
        agreement = {name: float((torch.as_tensor(fn()) - reference).abs().max()) for name, fn in runs.items()}
        plan = runs["moec_torch"]()  # the plan the exports were made from: HF's model unless quantized
        if not args.bits:
            require_close("moec_torch", plan, reference, 1e-4, f"at {tokens} tokens (against hf_eager)")
        for name in ("ort_portable", "ort_fused"):
            require_close(name, torch.as_tensor(runs[name]()), plan, 1e-4, f"at {tokens} tokens (against moec_torch)")
        times: dict[str, list[float]] = {name: [] for name in RUNNERS}
        for _ in range(repeats):  # interleaved, one timing of each per round
            for name in RUNNERS:
                times[name].append(timed(runs[name]))
        ms = {name: statistics.median(values) * 1e3 for name, values in times.items()}
        ratios = {f"fused_vs_{name.removeprefix('ort_')}": ms[name] / ms["ort_fused"]
                  for name in ("hf_eager", "moec_torch", "ort_portable")}
        rows.append({"tokens": tokens, "ms": ms, "max_abs_diff_vs_hf": agreement, "ratios": ratios})

    header = "| tokens | hf_eager ms | moec_torch ms | ort_portable ms | ort_fused ms | fused vs hf | fused vs moec | fused vs portable |"
    print(header)
    print("|" + "---:|" * 8)
    for row in rows:
        ms = row["ms"]
        print(f"| {row['tokens']} | {ms['hf_eager']:.2f} | {ms['moec_torch']:.2f} | {ms['ort_portable']:.2f} | "
              f"{ms['ort_fused']:.2f} | {ms['hf_eager'] / ms['ort_fused']:.2f}x | {ms['moec_torch'] / ms['ort_fused']:.2f}x | "
              f"{ms['ort_portable'] / ms['ort_fused']:.2f}x |")
    print("ratios: other time / ort_fused time (> 1: the fused onnxruntime model is faster)")
    for check in checks.values():
        check.pop("path", None)  # a temporary folder, gone by now
    args.out.write_text(json.dumps({
        "model": description, "threads": args.threads, "repeats": repeats, **run_facts(quick=args.quick),
        "bits": args.bits, "float_weight_bytes": float_bytes, "exports": checks, "rows": rows,
    }, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
