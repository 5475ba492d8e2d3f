"""Benchmark: the peak memory of each step of compiling, running, saving, loading and exporting an MoE model,
in units of the model's own weight bytes, with Hugging Face eager's forward and torch.compile's first call
measured the same way side by side.

Each step runs in a fresh process, so that no step's peak hides in another's: the process builds the model
(a float32 Mixtral from its config, seeded), runs what the step needs before it, reads its resident memory,
resets the kernel's record of its peak (``/proc/self/clear_refs``, Linux), runs the step and reads the peak
(``VmHWM``). A step's figure is that peak over the memory held just before it, divided by the weight bytes:
0.0 means the step needed no memory beyond what was already held, 1.0 one more copy of the weights.

Steps:

* ``hf_forward``      the model's own eager forward on ``--tokens`` tokens
* ``torch_compile``   ``torch.compile(model)``'s first call on them (inductor; the compile included)
* ``moec_compile``    ``moec.compile(model, example)`` (capture, passes, the size-one probe)
* ``moec_call``       the compiled model's first call on ``--tokens`` tokens (the kernel race included: where
                      onnxruntime's experts take part, their packed copy of the expert weights)
* ``moec_call_fixed`` the same with ``expert_kernel="torch"`` (no race, no packed copy)
* ``save``            ``compiled.save`` of the plan folder
* ``load``            ``moec.load`` of that plan in a process that never built the model: its peak over the
                      interpreter with torch and moec imported (the weights themselves: 1.0 at least)
* ``loaded_call``     the loaded model's first call (as ``moec_call``)
* ``export_onnx``     ``compiled.export_onnx`` (portable lowering; onnx.checker, shape inference and the
                      onnxruntime parity run included), weights as external data

Run:  python tools/bench/memory.py [--layers 2] [--tokens 64] [--out bench-results/memory.json]
      (about 3 minutes for the default 0.77 GB model on 2 cores; Linux only)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_util import output_file, positive_int, run_facts

STEPS = ("hf_forward", "torch_compile", "moec_compile", "moec_call", "moec_call_fixed", "save", "load",
         "loaded_call", "export_onnx")


def memory_status() -> dict[str, int]:
    """This process's resident memory now (``VmRSS``) and its peak since the last reset (``VmHWM``), bytes."""
    text = Path("/proc/self/status").read_text()
    return {key: int(kib) * 1024 for key, kib in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M)}


class Peak:
    """``with Peak() as peak:`` the peak resident memory the block reached over what was held before it."""

    def __enter__(self) -> Peak:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
        self.before = memory_status()["VmRSS"]
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
        self.extra = memory_status()["VmHWM"] - self.before


def build_model(layers: int):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=8192, hidden_size=1024, intermediate_size=3584, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=4096,
    )
    model = transformers.MixtralForCausalLM(config).eval()
    model.config.use_cache = False
    return model


def example(tokens: int):
    import torch

    return torch.randint(0, 8192, (1, tokens), generator=torch.Generator().manual_seed(tokens))


def run_step(step: str, layers: int, tokens: int, folder: Path) -> dict[str, float]:
    """One step in this process (a child of ``main``): its peak over what was held before it, and its time."""
    import torch

    import moec

    plan = folder / "plan"
    if step in ("load", "loaded_call"):
        with Peak() as peak:
            compiled = moec.load(plan)
        if step == "loaded_call":
            with torch.inference_mode(), Peak() as peak:
                compiled(example(tokens))
        return {"extra_bytes": peak.extra, "seconds": peak.seconds}
    model = build_model(layers)
    ids = example(tokens)
    with torch.inference_mode():
        if step == "hf_forward":
            with Peak() as peak:
                model(ids)
        elif step == "torch_compile":
            compiled_fn = torch.compile(model)
            with Peak() as peak:
                compiled_fn(ids)
        elif step == "moec_compile":
            with Peak() as peak:
                moec.compile(model, (example(8),))
        elif step in ("moec_call", "moec_call_fixed"):
            fixed = {"expert_kernel": "torch"} if step == "moec_call_fixed" else {}
            compiled = moec.compile(model, (example(8),), **fixed)
            with Peak() as peak:
                compiled(ids)
        elif step == "save":
            compiled = moec.compile(model, (example(8),))
            with Peak() as peak:
                compiled.save(plan)
        elif step == "export_onnx":
            compiled = moec.compile(model, (example(8),))
            with Peak() as peak:
                compiled.export_onnx(folder / "onnx" / "model.onnx", external_data=True)
        else:
            raise SystemExit(f"unknown step {step!r}; steps: {', '.join(STEPS)}")
    return {"extra_bytes": peak.extra, "seconds": peak.seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=positive_int, default=2, help="Mixtral layers (default 2: 0.77 GB)")
    parser.add_argument("--tokens", type=positive_int, default=64, help="tokens of the measured calls (default 64)")
    parser.add_argument("--out", default="bench-results/memory.json")
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # one step, in a child process
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:
        import warnings

        warnings.filterwarnings("ignore")
        print(json.dumps(run_step(args.step, args.layers, args.tokens, Path(args.folder))))
        return 0
    if not Path("/proc/self/clear_refs").exists():
        raise SystemExit("this benchmark reads peak memory from Linux's /proc/self/status; it runs on Linux only")
    out = output_file(args.out)
    model = build_model(args.layers)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    print(f"Mixtral, {args.layers} layers, 8 experts of 1024 x 3584, float32: {weight_bytes / 1e9:.2f} GB of weights; "
          f"calls of {args.tokens} tokens; load average at start {os.getloadavg()[0]:.1f}")
    print("| step | peak over what was held (GB) | x weights | seconds |")
    print("|---|---:|---:|---:|")
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for step in STEPS:  # save before load: load reads the plan save wrote
            command = [sys.executable, __file__, "--step", step, "--layers", str(args.layers), "--tokens",
                       str(args.tokens), "--folder", folder]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise SystemExit(f"step {step} failed:\n{result.stderr[-3000:]}")
            row = json.loads(result.stdout.strip().splitlines()[-1])
            row["x_weights"] = row["extra_bytes"] / weight_bytes
            rows[step] = row
            print(f"| {step} | {row['extra_bytes'] / 1e9:.2f} | {row['x_weights']:.2f} | {row['seconds']:.1f} |",
                  flush=True)
    ratios = {
        "moec_call / hf_forward": rows["moec_call"]["extra_bytes"] / max(rows["hf_forward"]["extra_bytes"], 1),
        "moec_call_fixed / hf_forward": rows["moec_call_fixed"]["extra_bytes"] / max(rows["hf_forward"]["extra_bytes"], 1),
        "moec_compile / torch_compile": rows["moec_compile"]["extra_bytes"] / max(rows["torch_compile"]["extra_bytes"], 1),
    }
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.2f}x")
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    out.write_text(json.dumps({**run_facts(layers=args.layers, tokens=args.tokens), "weight_bytes": weight_bytes,
                               "steps": rows, "ratios": ratios}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
