"""Benchmark: expert merging and pruning on the real all-MiniLM-L6-v2 made an MoE by dense-to-moe.

In one run: MiniLM's 6 FFNs become 16 experts each, top-4 (``dense-to-moe``, fitted routers); then, from that
same MoE, each row below compresses every layer to ``--keep`` experts (default 8):

* ``merge (importance-aligned)``: ``expert-merge`` with its defaults: members' neurons paired (Hungarian
  matching) so that keeping the more important neuron of each pair keeps the most importance, that neuron
  kept, one router row per group, and the merged experts' output weights refitted on the calibration rows.
* ``merge (weight-aligned)``, ``merge (activation-aligned)``: the same, pairing neurons by weight similarity
  or by activation correlation (MC-SMoE's alignments).
* ``merge (no alignment)``: the ablation, neuron i of every member competing with neuron i.
* ``merge (no refit)``: the defaults without the output refit.
* ``MC-SMoE merge (weight-aligned)`` and ``(no alignment)``: the original recipe: frequency-weighted
  average of the aligned members, router kept with an expert map, no refit; with and without alignment.
* ``prune (frequency)``, ``prune (weight mass)``, ``prune (similarity)``: ``expert-prune`` by each criterion.

Quality on held-out sentences: mean cosine of mean-pooled sentence embeddings vs the original dense model
(the figure the targets use), the same vs the unmerged MoE, and nearest-neighbour agreement. Size: each
compressed program is saved as a plan folder and the parameters and bytes of every layer's weights *in its
weights.safetensors* are checked against the pass's report, exactly.

Text: sentences of Python standard-library docstrings (``moec.analysis.corpus``), split into disjoint
calibration and held-out parts. Calibration is shared: the dense model's for dense-to-moe, then the MoE's
(computed once, reused by every compression row); ``--rows`` (default 8192) calibration rows are kept per
layer, which is every token of the 256 calibration sentences, for the fits (router, merge refit).

Run:  python tools/bench/compress_experts.py [--quick] [--keep 8] [--rows 8192] [--out bench-results/compress_experts.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import safetensors
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench_util import output_file, positive_int  # noqa: E402

from moec.analysis.calibration import calibrate  # noqa: E402
from moec.analysis.corpus import calibration_and_held_out, tokenized_batches  # noqa: E402
from moec.analysis.quality import embedding_quality, sentence_embeddings  # noqa: E402
from moec.backend.torch_runner import TorchRunner  # noqa: E402
from moec.frontend.capture import capture  # noqa: E402
from moec.frontend.zoo import build_preset, minilm_path  # noqa: E402
from moec.ir.parser import parse_graph  # noqa: E402
from moec.ir.plan import WEIGHTS_FILE, save_plan  # noqa: E402
from moec.ir.printer import print_graph  # noqa: E402
from moec.ir.program import Program  # noqa: E402
from moec.passes import PassContext, build_passes, run_passes  # noqa: E402
from moec.passes.moe_layers import moe_layers  # noqa: E402

MC_SMOE = {"combine": "average", "router": "members", "refit": False}
ROWS = {
    "merge (importance-aligned)": {"expert-merge": {}},
    "merge (weight-aligned)": {"expert-merge": {"align": "weight"}},
    "merge (activation-aligned)": {"expert-merge": {"align": "activation"}},
    "merge (no alignment)": {"expert-merge": {"align": "none"}},
    "merge (no refit)": {"expert-merge": {"refit": False}},
    "MC-SMoE merge (weight-aligned)": {"expert-merge": {"align": "weight", **MC_SMOE}},
    "MC-SMoE merge (no alignment)": {"expert-merge": {"align": "none", **MC_SMOE}},
    "prune (frequency)": {"expert-prune": {"criterion": "frequency"}},
    "prune (weight mass)": {"expert-prune": {"criterion": "weight_mass"}},
    "prune (similarity)": {"expert-prune": {"criterion": "similarity"}},
}


def copy_program(program: Program) -> Program:
    """An independent copy (graph re-parsed from its text; the weight dict copied, tensors shared)."""
    return Program(parse_graph(print_graph(program.graph)), dict(program.weights), program.in_spec,
                   program.out_spec, dict(program.metadata))


def run_recipe(program: Program, context: PassContext, entry: dict) -> tuple[Program, dict, float]:
    result = copy_program(program)
    start = time.perf_counter()
    (record,) = run_passes(result, build_passes({"passes": [entry]}), context)
    return result, record, time.perf_counter() - start


def saved_sizes(program: Program) -> dict[str, tuple[int, int]]:
    """(parameters, bytes) of each MoE layer's weights as read back from a saved plan's weights file."""
    with tempfile.TemporaryDirectory() as folder:
        plan = save_plan(program, Path(folder) / "plan")
        with safetensors.safe_open(str(plan / WEIGHTS_FILE), framework="pt") as weights:
            tensors = {name: weights.get_tensor(name) for name in weights.keys()}  # noqa: SIM118
    sizes = {}
    for layer in moe_layers(program, "bench"):
        stored = [tensors[name] for name in layer.weight_names()]
        sizes[layer.name] = (sum(t.numel() for t in stored), sum(t.numel() * t.element_size() for t in stored))
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sentences")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--keep", type=int, default=8)
    parser.add_argument("--rows", type=int, default=8192, help="calibration rows kept per layer")
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--out", default="bench-results/compress_experts.json")
    args = parser.parse_args()
    args.out = output_file(args.out)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    n_cal, n_held = (128, 128) if args.quick else (256, 256)

    import transformers

    model, example = build_preset("minilm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    cal_text, held_text = calibration_and_held_out(n_cal, n_held)
    cal_batches, held_batches = tokenized_batches(tokenizer, cal_text), tokenized_batches(tokenizer, held_text)
    dense = capture(model, (), example)
    context = PassContext(calibration=calibrate(dense, cal_batches, max_rows=args.rows, progress=False), progress=False)
    moe, _, convert_s = run_recipe(dense, context, {"dense-to-moe": {"experts": args.experts, "top_k": args.top_k,
                                                                  "method": "weights"}})

    def embeddings(program: Program) -> torch.Tensor:
        runner = TorchRunner(program)
        return sentence_embeddings(lambda batch: runner.run(program.flatten_inputs((), batch))[0], held_batches)

    original, unmerged = embeddings(dense), embeddings(moe)
    moe_quality = embedding_quality(original, unmerged)
    print(f"MiniLM -> {args.experts} experts/layer, top-{args.top_k} (dense-to-moe, {convert_s:.1f} s): "
          f"cosine vs original {moe_quality['cosine']:.4f}, nn agreement {moe_quality['nn_agreement']:.1%}")
    print(f"{'row':32s} {'cos vs dense':>12s} {'vs MoE':>8s} {'drop':>7s} {'nn agr':>7s} {'experts':>8s} "
          f"{'MB before':>9s} {'MB after':>9s} {'s':>6s}")
    rows = []
    for label, entry in ROWS.items():
        (name, options), = entry.items()
        program, record, seconds = run_recipe(moe, context, {name: {**options, "keep": args.keep}})
        candidate = embeddings(program)
        quality = embedding_quality(original, candidate)
        vs_moe = embedding_quality(unmerged, candidate)
        layers = record["summary"]["layers"]
        saved = saved_sizes(program)
        sizes_match = all(saved[layer["layer"]] == (layer["params_after"], layer["bytes_after"]) for layer in layers)
        if not sizes_match:
            raise SystemExit(f"{label}: reported sizes {layers} differ from the saved weights {saved}")
        row = {
            "row": label, "recipe": {name: {**options, "keep": args.keep}}, "seconds": seconds,
            "cosine_vs_dense": quality["cosine"], "nn_agreement_vs_dense": quality["nn_agreement"],
            "cosine_vs_moe": vs_moe["cosine"], "drop_vs_moe": moe_quality["cosine"] - quality["cosine"],
            "bytes_before": sum(r["bytes_before"] for r in layers), "bytes_after": sum(r["bytes_after"] for r in layers),
            "params_before": sum(r["params_before"] for r in layers), "params_after": sum(r["params_after"] for r in layers),
            "sizes_match_saved_weights": sizes_match, "layers": layers,
        }
        rows.append(row)
        print(f"{label:32s} {row['cosine_vs_dense']:12.4f} {row['cosine_vs_moe']:8.4f} {row['drop_vs_moe']:7.4f} "
              f"{row['nn_agreement_vs_dense']:7.1%} {args.experts:>3d} -> {args.keep:<2d} "
              f"{row['bytes_before'] / 1e6:9.2f} {row['bytes_after'] / 1e6:9.2f} {seconds:6.1f}", flush=True)
    by_row = {row["row"]: row for row in rows}
    checks = {
        "merge_within_0.02_of_moe": by_row["merge (importance-aligned)"]["drop_vs_moe"] <= 0.02,
        "merge_beats_frequency_prune": by_row["merge (importance-aligned)"]["cosine_vs_dense"]
        > by_row["prune (frequency)"]["cosine_vs_dense"],
        "alignment_beats_no_alignment": by_row["merge (importance-aligned)"]["cosine_vs_dense"]
        > by_row["merge (no alignment)"]["cosine_vs_dense"],
        "mc_smoe_alignment_beats_no_alignment": by_row["MC-SMoE merge (weight-aligned)"]["cosine_vs_dense"]
        > by_row["MC-SMoE merge (no alignment)"]["cosine_vs_dense"],
        "sizes_match_saved_weights": all(row["sizes_match_saved_weights"] for row in rows),
    }
    for check, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'} {check}")

    out = args.out
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "load_average": os.getloadavg()},
        "options": {**vars(args), "out": str(args.out)}, "calibration_sentences": n_cal, "held_out_sentences": n_held,
        "moe": {"experts": args.experts, "top_k": args.top_k, **moe_quality}, "rows": rows, "checks": checks,
    }
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
