"""Benchmark: whole models at small sizes, where the runtime's cost per op weighs: moec vs HF eager and torch.compile.

Models:

* ``minilm``: all-MiniLM-L6-v2 (real weights, dense: moec gains nothing from MoE kernels here), batch x
  sequence 1x8, 4x16 and 8x64, returning the last hidden state;
* ``mixtral``: a Mixtral-style causal LM, 2 layers, hidden 512, FFN 1536, 8 experts, top-2, vocab 1024
  (seeded random weights; the model of ``onnx_runtime.py``), one sequence of 1, 16 and 256 tokens without
  a cache, returning the logits;
* ``qwen3-moe``: the same with fine-grained experts, Qwen3-MoE's block: 64 experts of 256, top-8;
* ``llama``: the same without experts, a dense FFN of 1536 (Llama's).

``--tokens`` sets the causal LMs' sequence lengths (long ones show attention's share).

``--dtype bfloat16`` runs every model in bfloat16; its outputs are then checked against the float32 model:
moec's error may not exceed 1.5x HF eager's own (routing flips under bfloat16 rounding) plus 1e-2.

Compared in the same process and interleaved repeat by repeat (median of ``--repeats``):

* ``hf_eager``       the transformers model as shipped, under ``torch.inference_mode``
* ``torch_compile``  ``torch.compile(model)`` (inductor, default mode; its compile time per size is printed)
* ``moec``           ``moec.compile(model, example)`` run by the torch runner

Ratios are other time / moec time (> 1: moec faster).

Run:  python tools/bench/whole_model.py [--models minilm,mixtral,qwen3-moe,llama] [--threads 2] [--no-torch-compile]
                                        [--dtype bfloat16] [--tokens 512,2048] [--out bench-results/whole_model.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench_util import output_file, positive_int, require_close, run_facts, token_counts  # noqa: E402

import moec  # noqa: E402
from moec.frontend.zoo import build_preset  # noqa: E402

MODELS = ("minilm", "mixtral", "qwen3-moe", "llama")


def minilm_case(tokens: list[int]):
    """MiniLM at its own sizes (``tokens``, the causal LMs' lengths, does not apply)."""
    model, example = build_preset("minilm")

    def inputs(batch: int, seq: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seq))
        return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids)}

    sizes = [((1, 8), inputs(1, 8)), ((4, 16), inputs(4, 16)), ((8, 64), inputs(8, 64))]
    return model, example, sizes, lambda out: out.last_hidden_state


def mixtral_case(tokens: list[int]):
    config = transformers.MixtralConfig(
        vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096,
        num_local_experts=8, num_experts_per_tok=2, use_cache=False,
    )
    torch.manual_seed(0)
    return causal_lm_case(transformers.MixtralForCausalLM(config).eval(), tokens)


def qwen3_moe_case(tokens: list[int]):
    config = transformers.Qwen3MoeConfig(
        vocab_size=1024, hidden_size=512, moe_intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, max_position_embeddings=4096, num_experts=64, num_experts_per_tok=8,
        use_cache=False,
    )
    torch.manual_seed(0)
    return causal_lm_case(transformers.Qwen3MoeForCausalLM(config).eval(), tokens)


def llama_case(tokens: list[int]):
    config = transformers.LlamaConfig(
        vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=4096, use_cache=False,
    )
    torch.manual_seed(0)
    return causal_lm_case(transformers.LlamaForCausalLM(config).eval(), tokens)


def causal_lm_case(model, tokens: list[int]):
    example = {"input_ids": torch.randint(0, 1024, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}

    def inputs(tokens: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 1024, (1, tokens), generator=torch.Generator().manual_seed(tokens))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    return model, example, [((1, n), inputs(n)) for n in tokens], lambda out: out.logits


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


CASES = {"minilm": minilm_case, "mixtral": mixtral_case, "qwen3-moe": qwen3_moe_case, "llama": llama_case}


def bench_model(name: str, repeats: int, with_torch_compile: bool, dtype: torch.dtype, tokens: list[int]) -> list[dict]:
    model, example, sizes, output_of = CASES[name](tokens)
    float32_model = copy.deepcopy(model) if dtype != torch.float32 else None  # the reference for other dtypes
    model.to(dtype)
    start = time.perf_counter()
    compiled = moec.compile(model, example)
    print(f"{name}: moec.compile {time.perf_counter() - start:.1f} s, {len(compiled.program.graph.ops)} ops", flush=True)
    inductor = torch.compile(model) if with_torch_compile else None
    rows = []
    for (batch, seq), inputs in sizes:
        runners = {
            "hf_eager": lambda inputs=inputs: output_of(model(**inputs)),
            "moec": lambda inputs=inputs: output_of(compiled(**inputs)),
        }
        if inductor is not None:
            runners["torch_compile"] = lambda inputs=inputs: output_of(inductor(**inputs))
        with torch.inference_mode():
            reference = runners["hf_eager"]()
            first_call = {runner: timed(fn) for runner, fn in runners.items()}  # torch.compile compiles here
            agreement = {runner: float((fn() - reference).abs().max()) for runner, fn in runners.items()}
            if float32_model is None:
                for runner, fn in runners.items():  # not timing a wrong result
                    require_close(runner, fn(), reference, 1e-4, f"of {name} at {batch}x{seq}")
            else:  # as close to the float32 model as HF eager is in this dtype
                exact = output_of(float32_model(**inputs))
                hf_error = require_close("hf_eager", reference, exact, 1.0)
                for runner, fn in runners.items():
                    require_close(runner, fn(), exact, 1.5 * hf_error + 1e-2,
                                  f"of {name} at {batch}x{seq} (HF eager: {hf_error:.3g} relative)")
            times: dict[str, list[float]] = {runner: [] for runner in runners}
            for _ in range(repeats):
                for runner, fn in runners.items():
                    times[runner].append(timed(fn))
        ms = {runner: statistics.median(samples) * 1e3 for runner, samples in times.items()}
        row = {"model": name, "batch": batch, "seq": seq, "ms": ms, "max_abs_diff_vs_hf": agreement,
               "first_call_seconds": first_call,
               "vs_moec": {runner: ms[runner] / ms["moec"] for runner in ms if runner != "moec"}}
        rows.append(row)
        ratios = ", ".join(f"{runner} {ratio:.2f}x" for runner, ratio in row["vs_moec"].items())
        print(f"  {batch}x{seq}: " + ", ".join(f"{runner} {value:.3f} ms" for runner, value in ms.items())
              + f"; other / moec: {ratios}"
              + (f"; torch.compile first call {first_call['torch_compile']:.1f} s" if inductor is not None else ""),
              flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--repeats", type=positive_int, default=41,
                        help="timed runs per runner and size, median taken (default: %(default)s)")
    parser.add_argument("--no-torch-compile", action="store_true", help="leave torch.compile out (it compiles each size)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the models' dtype (default: %(default)s)")
    parser.add_argument("--tokens", type=token_counts, default=[1, 16, 256],
                        help="the causal LMs' sequence lengths (default: 1,16,256)")
    parser.add_argument("--out", default="bench-results/whole_model.json", help="the JSON result (default: %(default)s)")
    args = parser.parse_args(argv)
    args.out = output_file(args.out)
    models = args.models.split(",")
    if unknown := set(models) - set(MODELS):
        parser.error(f"unknown models {sorted(unknown)}; choose from {', '.join(MODELS)}")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} thread(s), "
          f"load average at start {os.getloadavg()[0]:.1f}", flush=True)
    dtype = getattr(torch, args.dtype)
    rows = [row for name in models for row in bench_model(name, args.repeats, not args.no_torch_compile, dtype, args.tokens)]
    args.out.write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "dtype": args.dtype,
                                    **run_facts(), "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
