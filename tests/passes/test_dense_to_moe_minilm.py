"""dense-to-moe on the real all-MiniLM-L6-v2 weights: the quality floor at half the FFN active, on held-out
standard-library docstring text, and the fitted router against random and oracle routing."""

from __future__ import annotations

import pytest
import transformers

from moec.analysis.calibration import calibrate
from moec.analysis.corpus import calibration_and_held_out, tokenized_batches
from moec.analysis.quality import conversion_quality
from moec.backend.torch_runner import TorchRunner
from moec.frontend.capture import capture
from moec.frontend.zoo import build_preset, minilm_path
from moec.ir.parser import parse_graph
from moec.ir.printer import print_graph
from moec.ir.program import Program
from moec.passes import PassContext, build_passes, run_passes

COSINE_FLOOR, NN_FLOOR, GAP_FLOOR = 0.97, 0.90, 0.80


@pytest.fixture(scope="module")
def minilm_setup():
    model, example = build_preset("minilm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    cal_text, held_text = calibration_and_held_out(128, 128)
    program = capture(model, (), example)
    calibration = calibrate(program, tokenized_batches(tokenizer, cal_text), progress=False)
    runner = TorchRunner(program)
    return program, calibration, tokenized_batches(tokenizer, held_text), runner


def test_half_active_ffn_keeps_sentence_embeddings(minilm_setup):
    program, calibration, held_out, runner = minilm_setup
    converted = Program(parse_graph(print_graph(program.graph)), dict(program.weights), program.in_spec, program.out_spec)
    run_passes(converted, build_passes({"passes": [{"dense_to_moe": {"experts": 16, "top_k": 8}}]}),
               PassContext(calibration=calibration, progress=False))
    quality = conversion_quality(lambda b: runner.run(program.flatten_inputs((), b))[0], converted, held_out)
    assert quality["active_ffn_fraction"] == 0.5
    assert quality["router"]["cosine"] >= COSINE_FLOOR, quality
    assert quality["router"]["nn_agreement"] >= NN_FLOOR, quality
    assert quality["random"]["cosine"] < quality["router"]["cosine"] <= quality["oracle"]["cosine"] + 0.01
    assert quality["gap_closed"] >= GAP_FLOOR, quality
