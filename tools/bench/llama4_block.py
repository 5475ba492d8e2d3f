"""Benchmark: one Llama 4 MoE block on the CPU, Hugging Face eager and torch.compile vs moec.

Block: ``Llama4TextMoe`` (a sigmoid router choosing top-1 of 16 experts, the routing weight scaling each
expert's input, plus an always-on shared expert), hidden 1024, FFN 1536, float32 (302 MB of routed expert
weights). Hugging Face runs every expert on every token (the unchosen ones on zero rows); moec runs each
token's chosen expert only (``moe.route`` + ``moe.experts`` with ``weighted_input``).

Compared in one process, interleaved repeat by repeat, median of ``--repeats`` after a warmup:

* ``hf_eager``        the block as shipped;
* ``hf_compiled``     ``torch.compile`` of the same block (inductor, default mode);
* ``moec``            ``moec.compile`` of the block: the torch runner, its default CPU kernels.

Every implementation is checked against ``hf_eager`` on each size before timing (the run stops if one differs by more
than 1e-4 of the output's largest value; the max abs differences are reported).

Run:  python tools/bench/llama4_block.py [--quick] [--threads N] [--out bench-results/llama4_block.json]
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
from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench_util import output_file, positive_int, require_close, run_facts  # noqa: E402

import moec  # noqa: E402

HIDDEN, FFN, EXPERTS, TOP_K = 1024, 1536, 16, 1


def block() -> Llama4TextMoe:
    config = transformers.Llama4TextConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_local_experts=EXPERTS,
                                           num_experts_per_tok=TOP_K, hidden_act="silu")
    torch.manual_seed(0)
    moe = Llama4TextMoe(config).eval()
    with torch.no_grad():
        for weight in (moe.experts.gate_up_proj, moe.experts.down_proj):
            weight.normal_(0.0, weight.shape[1] ** -0.5)  # gate_up is zeros and down_proj empty at init
    return moe


def timed(fn, repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tokens 1 and 64 only, 3 repeats unless --repeats")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timed runs per runner and size, median taken (default: 7; --quick: 3)")
    parser.add_argument("--threads", type=positive_int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--out", default="bench-results/llama4_block.json", help="the JSON result (default: %(default)s)")
    args = parser.parse_args()
    args.out = output_file(args.out)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = [1, 64] if args.quick else [1, 16, 128, 512]
    repeats = args.repeats or (3 if args.quick else 7)

    moe = block()
    example = torch.randn(1, 8, HIDDEN)
    start = time.perf_counter()
    compiled = moec.compile(moe, (example,))
    moec_compile_s = time.perf_counter() - start
    hf_compiled = torch.compile(moe)

    runners = {
        "hf_eager": lambda x: moe(x)[0],
        "hf_compiled": lambda x: hf_compiled(x)[0],
        "moec": lambda x: compiled(x)[0],
    }
    rows = []
    with torch.inference_mode():
        for tokens in sizes:
            x = torch.randn(1, tokens, HIDDEN, generator=torch.Generator().manual_seed(tokens))
            want = runners["hf_eager"](x).reshape(tokens, HIDDEN)
            diffs = {}
            for name, run in runners.items():
                got = run(x).reshape(tokens, HIDDEN)  # also the warmup (and torch.compile's compile)
                diffs[name] = float((got - want).abs().max())
                require_close(name, got, want, 1e-4, f"at {tokens} tokens")  # not timing a wrong result
            samples = {name: [] for name in runners}
            for _ in range(repeats):
                for name, run in runners.items():
                    samples[name] += timed(lambda run=run, x=x: run(x), 1)
            ms = {name: statistics.median(values) for name, values in samples.items()}
            row = {"tokens": tokens, "ms": ms, "max_abs_diff": diffs,
                   "moec_vs": {name: ms[name] / ms["moec"] for name in runners if name != "moec"}}
            rows.append(row)
            print(f"{tokens:5d} tokens  " + "  ".join(f"{name} {value:8.2f} ms" for name, value in ms.items())
                  + f"  moec x{row['moec_vs']['hf_eager']:.2f} vs eager, x{row['moec_vs']['hf_compiled']:.2f} "
                  f"vs compiled  (max abs diff {max(diffs.values()):.1e})", flush=True)

    result = {"block": {"hidden": HIDDEN, "ffn": FFN, "experts": EXPERTS, "top_k": TOP_K, "dtype": "float32"},
              "repeats": repeats, "moec_compile_s": moec_compile_s, **run_facts(quick=args.quick), "rows": rows}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
