import pytest
import torch

import moec
from moec.analysis.traces import RoutingTrace, collect_trace, synthetic_trace
from moec.errors import MoecError
from moec.frontend.zoo import build_preset
from moec.ir.ops import RouteOp
from moec.kernels import reference
from tests.ir.test_expert_map import MERGED, merged_weights
from tests.passes.moe_programs import program_of, token_samples


@pytest.fixture(scope="module")
def compiled_olmoe():
    model, example = build_preset("tiny-olmoe")
    program = moec.compile(model, example).program
    return program, program.flatten_inputs((), example)


def test_synthetic_trace_follows_affinity_and_skew():
    trace = synthetic_trace(4000, 3, 8, top_k=2, skew=1.0, affinity=0.9, seed=1)
    assert trace.experts.shape == (4000, 3, 2)
    assert (trace.experts[..., 0] != trace.experts[..., 1]).all()  # distinct experts per token
    transitions = trace.transitions()
    # Slot by slot, each expert's fixed successor gets about 90% of its tokens (plus a share of the rest).
    first_slot = torch.zeros(8, 8)
    first_slot.index_put_((trace.experts[:, 0, 0], trace.experts[:, 1, 0]), torch.ones(4000), accumulate=True)
    assert (first_slot.max(dim=1).values / first_slot.sum(dim=1)).min() > 0.85
    assert transitions.sum().item() == pytest.approx(4000 * 2 * 2)  # k units per token and boundary
    load = trace.expert_load()[0]
    assert load.max() > 3 * load.min()  # Zipf skew 1.0 over 8 experts
    assert torch.equal(synthetic_trace(50, 2, 4, seed=3).experts, synthetic_trace(50, 2, 4, seed=3).experts)


def test_trace_json_round_trip(tmp_path):
    trace = synthetic_trace(20, 2, 4, top_k=2, seed=0)
    trace.save(tmp_path / "t.json")
    again = RoutingTrace.load(tmp_path / "t.json")
    assert torch.equal(again.experts, trace.experts) and again.layers == trace.layers


def test_trace_rejects_out_of_range_experts():
    with pytest.raises(MoecError, match="expert ids"):
        RoutingTrace(torch.tensor([[[5]]]), ("a",), 4)


def test_collect_trace_records_every_route(compiled_olmoe):
    program, inputs = compiled_olmoe
    seen = []
    from moec.backend.torch_runner import TorchRunner

    TorchRunner(program).run(inputs, observe=lambda op, args, out: seen.append(out[0]) if isinstance(op, RouteOp) else None)
    trace = collect_trace(program, [inputs, inputs])
    tokens = inputs[0].numel()
    assert trace.experts.shape == (2 * tokens, 2, 2)
    assert trace.layers == tuple(op.block for op in program.graph.ops_of(RouteOp))
    for layer, chosen in enumerate(seen):
        assert torch.equal(trace.experts[:tokens, layer], chosen.reshape(-1, 2))


def test_padding_is_left_out_of_the_trace(compiled_olmoe):
    """The same real tokens give the same trace whether their batch is padded or not (placement reads it)."""
    program, _ = compiled_olmoe
    generator = torch.Generator().manual_seed(0)
    sentences = [torch.randint(2, 100, (1, 6), generator=generator) for _ in range(3)]
    unpadded = [program.flatten_inputs((), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
                for ids in sentences]
    ids = torch.zeros(3, 11, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sentence in enumerate(sentences):
        ids[row, :6], mask[row, :6] = sentence[0], 1
    padded = [program.flatten_inputs((), {"input_ids": ids, "attention_mask": mask})]
    trace = collect_trace(program, padded)
    assert trace.num_tokens == 18
    assert torch.equal(trace.experts, collect_trace(program, unpadded).experts)


def test_a_merged_layer_is_traced_as_the_stored_experts_that_run():
    weights = merged_weights()
    program = program_of(MERGED, weights)
    (x,) = token_samples(count=1)[0]
    trace = collect_trace(program, [[x]])
    router_ids, _ = reference.route(x, weights["gate"], None, program.graph.ops[0].spec)
    assert trace.num_experts == 2 and torch.equal(trace.experts[:, 0], router_ids % 2)
