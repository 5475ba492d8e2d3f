"""What quantization reads from calibration: FFN inputs and each stored expert's routing."""

from __future__ import annotations

import pytest
import torch

from moec.analysis import ffn_activations
from moec.analysis.ffn_activations import collect
from moec.kernels import reference
from moec.passes.quantize import calibration_rows
from tests.analysis.test_calibration import samples_like
from tests.ir.test_expert_map import MERGED, merged_weights
from tests.passes.moe_programs import program_of, token_samples


def test_a_merged_layer_bins_router_choices_into_the_stored_experts_they_run():
    """Router experts 0 and 2 run stored expert 0, 1 and 3 run stored expert 1 (``expert_map=[0, 1, 0, 1]``)."""
    weights = merged_weights()
    program = program_of(MERGED, weights)
    (x,) = token_samples(count=1)[0]
    record = collect(program, [[x]]).ops[1]
    router_ids, routing = reference.route(x, weights["gate"], None, program.graph.ops[0].spec)
    stored = router_ids % 2
    assert torch.equal(record.indices, stored)
    assert record.frequency.shape == record.mass.shape == (2,)
    torch.testing.assert_close(record.mass, torch.stack([routing[stored == e].sum() for e in (0, 1)]) / x.shape[0])
    rows = calibration_rows(program, collect(program, [[x]]), 1, expert=1)
    assert rows.shape[0] == int((stored == 1).any(dim=-1).sum())  # the tokens of router experts 1 and 3


def flat(program, samples):
    return [program.flatten_inputs((), sample) for sample in samples]


@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-llama"])
def test_padding_positions_are_left_out_of_rows_and_routing_statistics(captured, preset):
    """Sequences padded at the end record exactly what the same sequences cut before the padding record
    (causal models: the real positions do not see the padding)."""
    model, example, program = captured(preset)
    padded = samples_like(example, 2, seed=3, pad_last=3)
    cut = [{name: tensor[:, :-3] for name, tensor in sample.items()} for sample in padded]
    with_padding, without = collect(program, flat(program, padded)), collect(program, flat(program, cut))
    assert with_padding.ops.keys() == without.ops.keys() and with_padding.ops
    for key, record in with_padding.ops.items():
        expected = without.ops[key]
        assert record.inputs.shape[0] == sum(int(s["attention_mask"].sum()) for s in padded)
        torch.testing.assert_close(record.inputs, expected.inputs, rtol=1e-5, atol=1e-5)
        if expected.frequency is not None:
            assert torch.equal(record.indices, expected.indices)
            torch.testing.assert_close(record.frequency, expected.frequency)
            torch.testing.assert_close(record.mass, expected.mass)


def test_rows_beyond_the_limit_are_a_seeded_sample_of_every_batch_with_their_routing(captured, monkeypatch):
    model, example, program = captured("tiny-mixtral")
    batches = flat(program, samples_like(example, 4, seed=5))
    everything = collect(program, batches)
    monkeypatch.setattr(ffn_activations, "MAX_ROWS", 6)
    sampled, again = collect(program, batches), collect(program, batches)
    key = next(k for k, r in everything.ops.items() if r.indices is not None)
    full, part = everything.ops[key], sampled.ops[key]
    assert part.inputs.shape[0] == 6 and torch.equal(part.inputs, again.ops[key].inputs)
    # each kept row is one of the full run's rows, kept in arrival order with its own routing
    positions = [int((full.inputs == row).all(dim=1).nonzero()[0]) for row in part.inputs]
    assert positions == sorted(positions) and len(set(positions)) == 6
    assert torch.equal(part.indices, full.indices[positions]) and torch.equal(part.weights, full.weights[positions])
    tokens_per_batch = example["input_ids"].numel()
    assert max(positions) >= tokens_per_batch  # not only the first batch's rows
    assert torch.equal(part.frequency, full.frequency)  # statistics still count every token
