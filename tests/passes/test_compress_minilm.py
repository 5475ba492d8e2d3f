"""expert-merge and expert-prune on the real all-MiniLM-L6-v2 made an MoE (16 experts, top-4) by dense-to-moe:
alignment beats no alignment in the same run, and the reported sizes are those of the saved weights file.
(The full comparison with pruning is ``tools/bench/compress_experts.py``; figures in docs/BENCHMARKS.md.)"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import transformers

from moec.analysis.calibration import calibrate
from moec.analysis.corpus import calibration_and_held_out, tokenized_batches
from moec.analysis.quality import embedding_quality, sentence_embeddings
from moec.backend.torch_runner import TorchRunner
from moec.frontend.capture import capture
from moec.frontend.zoo import build_preset, minilm_path
from moec.passes import PassContext

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "bench"))
from compress_experts import run_recipe, saved_sizes  # noqa: E402

LAYERS = (0, 1)  # two of MiniLM's six FFNs keep the test fast; the benchmark converts all six


@functools.cache
def minilm_moe():
    model, example = build_preset("minilm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    cal_text, held_text = calibration_and_held_out(48, 48)
    dense = capture(model, (), example)
    context = PassContext(calibration=calibrate(dense, tokenized_batches(tokenizer, cal_text), progress=False),
                          progress=False)
    moe, _, _ = run_recipe(dense, context, {"dense-to-moe": {"experts": 16, "top_k": 4, "layers": list(LAYERS)}})
    held = tokenized_batches(tokenizer, held_text)
    return dense, moe, context, held


def embeddings(program, batches):
    runner = TorchRunner(program)
    return sentence_embeddings(lambda batch: runner.run(program.flatten_inputs((), batch))[0], batches)


def test_aligned_merge_beats_unaligned_and_sizes_match_the_saved_weights():
    dense, moe, context, held = minilm_moe()
    original = embeddings(dense, held)
    cosine = {}
    for align in ("weight", "none"):
        merged, record, _ = run_recipe(moe, context, {"expert-merge": {"keep": 8, "align": align}})
        cosine[align] = embedding_quality(original, embeddings(merged, held))["cosine"]
        layers = record["summary"]["layers"]
        assert [r["experts_after"] for r in layers] == [8] * len(LAYERS)
        saved = saved_sizes(merged)
        assert {r["layer"]: (r["params_after"], r["bytes_after"]) for r in layers} == saved
    assert cosine["weight"] > cosine["none"]


def test_prune_to_8_reports_the_saved_sizes_and_keeps_top_k_valid():
    _, moe, context, held = minilm_moe()
    pruned, record, _ = run_recipe(moe, context, {"expert-prune": {"keep": 8}})
    layers = record["summary"]["layers"]
    assert {r["layer"]: (r["params_after"], r["bytes_after"]) for r in layers} == saved_sizes(pruned)
    assert all(r["params_after"] < r["params_before"] / 1.9 for r in layers)
    TorchRunner(pruned).run(pruned.flatten_inputs((), held[0]))
