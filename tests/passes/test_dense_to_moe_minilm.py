"""dense-to-moe on the real all-MiniLM-L6-v2 weights: quality at half the FFN active, on held-out
standard-library docstring text, and the fitted router against random and oracle routing.

The floors are what the pass achieves today with its default clustering (coactivation: measured 0.893
cosine, 62% nearest-neighbour agreement, 97% of the random-to-oracle gap closed), kept a little below so that
they guard against regressions; clustering by input weights gives 0.852 in the same setting, and the test
checks the default stays ahead. The issue's target (0.97 / 90%) is not reached: even oracle routing over these
experts gives 0.911, and the neuron oracle (every neuron its own expert; the benchmark's 256 + 256 sentences)
0.979 / 81%, so the loss is in dropping half of MiniLM's GELU neurons, not in the router. Slow: about 4 minutes.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

import moec
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

COSINE_FLOOR, NN_FLOOR, GAP_FLOOR = 0.87, 0.60, 0.80


@pytest.fixture(scope="module")
def minilm_setup():
    model, example = build_preset("minilm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    cal_text, held_text = calibration_and_held_out(128, 128)
    program = capture(model, (), example)
    calibration = calibrate(program, tokenized_batches(tokenizer, cal_text), progress=False)
    runner = TorchRunner(program)
    return program, calibration, tokenized_batches(tokenizer, held_text), runner


@pytest.mark.slow
def test_half_active_ffn_keeps_sentence_embeddings(minilm_setup):
    program, calibration, held_out, runner = minilm_setup

    def converted(**options) -> Program:
        copy = Program(parse_graph(print_graph(program.graph)), dict(program.weights), program.in_spec, program.out_spec)
        run_passes(copy, build_passes({"passes": [{"dense_to_moe": {"experts": 16, "top_k": 8, **options}}]}),
                   PassContext(calibration=calibration, progress=False))
        return copy

    def reference(batch):
        return runner.run(program.flatten_inputs((), batch))[0]

    quality = conversion_quality(reference, converted(), held_out)
    by_weights = conversion_quality(reference, converted(method="weights"), held_out, baselines=False)
    assert quality["router"]["cosine"] > by_weights["router"]["cosine"], (quality, by_weights)
    assert quality["active_ffn_fraction"] == 0.5
    assert quality["router"]["cosine"] >= COSINE_FLOOR, quality
    assert quality["router"]["nn_agreement"] >= NN_FLOOR, quality
    assert quality["random"]["cosine"] < quality["router"]["cosine"] <= quality["oracle"]["cosine"] + 0.01
    assert quality["gap_closed"] >= GAP_FLOOR, quality


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mean_compensation_that_rounds_coarsely_in_half_precision_is_warned_about(dtype):
    """MiniLM's compensation terms reach about 20 while its FFN outputs are a few units: in bfloat16 they round
    by a fifth of the output's RMS, which the converted layer's sum does not cancel; float32 holds them."""
    model, example = build_preset("minilm")
    recipe = {"passes": [{"dense_to_moe": {"experts": 16, "top_k": 16, "layers": [0]}}]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        moec.compile(model.to(dtype), example, recipe=recipe, calibration=[example])
    warned = [str(w.message) for w in caught if "mean compensation" in str(w.message)]
    if dtype == torch.float32:
        assert not warned
    else:
        assert len(warned) == 1 and "of the FFN output's RMS in block 'encoder.layer.0'" in warned[0]
