"""What quantization reads from calibration: FFN inputs and each stored expert's routing."""

from __future__ import annotations

import torch

from moec.analysis.ffn_activations import collect
from moec.kernels import reference
from moec.passes.quantize import calibration_rows
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
