"""The quality table's baselines and numbers: random and oracle routing among the stored experts (also
after a merge that keeps every router row), the active FFN fraction, and the gap share only where there is
a gap."""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from moec.analysis.quality import RoutedRunner, active_ffn_fraction, conversion_quality
from moec.backend.torch_runner import TorchRunner
from moec.ir import parse_graph, verify
from moec.ir.ops import ExpertsOp
from moec.ir.program import Program, dump_treespec
from moec.passes import PassContext, build_passes, run_passes
from moec.passes.expert_merge import ExpertMerge
from moec.passes.expert_prune import ExpertPrune
from tests.passes.test_dense_to_moe import GELU_FFN, program_from
from tests.passes.test_dense_to_moe import token_samples as dense_samples

STORED = 4


def moe_text(router_experts: int, top_k: int, expert_map: list[int] | None = None) -> str:
    mapping = f", expert_map={expert_map}" if expert_map is not None else ""
    return f"""\
graph @main(%x: f32[s0, s1, 8], %attention_mask: i64[s0, s1]) {{
  weight @gate: f32[{router_experts}, 8]
  weight @w_in: f32[{STORED}, 16, 8]
  weight @w_out: f32[{STORED}, 8, 16]
  %0, %1 = moe.route(%x, router=@gate, num_experts={router_experts}, top_k={top_k}, scoring="softmax", \
order="topk_then_score", renormalize=true, renorm_eps=0.0, scaling=1.0, n_group=1, topk_group=1, block="moe") \
: i64[s0, s1, {top_k}], f32[s0, s1, {top_k}]
  %2 = moe.experts(%x, %0, %1, w_in=@w_in, w_out=@w_out, num_experts={STORED}, hidden=8, intermediate=16, \
act="gelu", gated=false, block="moe"{mapping}) : f32[s0, s1, 8]
  return %2
}}
"""


def moe_program(router_experts: int = STORED, top_k: int = 2, expert_map: list[int] | None = None) -> Program:
    """One MoE layer over ``STORED`` experts (the same weights whatever the router), taking ``x`` and an
    ``attention_mask`` by keyword."""
    graph = parse_graph(moe_text(router_experts, top_k, expert_map))
    verify(graph)
    generator = torch.Generator().manual_seed(0)
    weights = {"gate": torch.randn(router_experts, 8, generator=generator),
               "w_in": torch.randn(STORED, 16, 8, generator=torch.Generator().manual_seed(1)) / 8**0.5,
               "w_out": torch.randn(STORED, 8, 16, generator=torch.Generator().manual_seed(2)) / 4}
    example = {"x": torch.zeros(1, 2, 8), "attention_mask": torch.ones(1, 2, dtype=torch.int64)}
    in_spec = dump_treespec(pytree.tree_flatten(((), example))[1])
    return Program(graph, weights, in_spec, dump_treespec(pytree.tree_flatten(example["x"])[1]))


def batches(count: int = 3) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    return [{"x": torch.randn(8, 6, 8, generator=generator), "attention_mask": torch.ones(8, 6, dtype=torch.int64)}
            for _ in range(count)]


def test_baselines_after_a_merge_choose_among_the_stored_experts():
    """Eight router experts over four stored ones: a baseline routes exactly as on the four experts alone."""
    merged = moe_program(router_experts=8, expert_map=[3, 2, 1, 0, 0, 1, 2, 3])
    alone = moe_program()
    x, mask = batches(1)[0].values()
    for baseline in ("random", "oracle"):
        torch.testing.assert_close(RoutedRunner(merged, baseline).run([x, mask])[0],
                                   RoutedRunner(alone, baseline).run([x, mask])[0])
    assert active_ffn_fraction(merged) == active_ffn_fraction(alone) == 2 / STORED


def test_the_active_fraction_counts_the_experts_held_before_pruning_and_merging():
    """A dense FFN made 4 experts (top-2), pruned to 3, then merged into 2: top-2 of the original 4 run per
    token, so the fraction stays 1/2 of the original FFN, not 2/3 or 2/2 of what is stored."""
    program = program_from(GELU_FFN)
    context = PassContext(calibration=dense_samples(), progress=False)
    run_passes(program, build_passes({"passes": [{"dense_to_moe": {"experts": 4, "top_k": 2}}]}), context)
    assert active_ffn_fraction(program) == 2 / 4
    run_passes(program, [ExpertPrune(keep=3)], context)
    assert active_ffn_fraction(program) == 2 / 4
    run_passes(program, [ExpertMerge(keep=2)], context)
    (experts,) = program.graph.ops_of(ExpertsOp)
    assert experts.spec.num_experts == 2
    assert active_ffn_fraction(program) == 2 / 4


def test_the_gap_share_is_reported_only_where_random_and_oracle_differ():
    def reference(batch):
        program = moe_program(top_k=STORED)
        return TorchRunner(program).run(program.flatten_inputs((), batch))[0]

    every_expert = conversion_quality(reference, moe_program(top_k=STORED), batches())
    assert every_expert["random"]["cosine"] == every_expert["oracle"]["cosine"]
    assert "gap_closed" not in every_expert
    one_expert = conversion_quality(reference, moe_program(top_k=1), batches())
    assert one_expert["oracle"]["cosine"] > one_expert["random"]["cosine"]
    assert "gap_closed" in one_expert


def test_the_oracle_reads_quantized_experts_dequantized():
    """Quantized experts are stored packed under other names; the oracle computes their outputs from the packed
    weights dequantized (it looked the float names up: the quality table of ``moec compile`` with dense-to-moe
    then quantize died with a KeyError after the whole compile)."""
    import transformers

    import moec
    from moec.frontend.zoo import tiny_decoder

    model, example = tiny_decoder(transformers.LlamaForCausalLM, transformers.LlamaConfig, intermediate_size=128)
    generator = torch.Generator().manual_seed(0)
    samples = [{"input_ids": torch.randint(0, 128, (2, 12), generator=generator),
                "attention_mask": torch.ones(2, 12, dtype=torch.int64)} for _ in range(4)]
    recipe = {"passes": [{"dense_to_moe": {"experts": 4, "top_k": 1}}, {"quantize": {"bits": 4, "group": 32}}]}
    compiled = moec.compile(model, example, recipe=recipe, calibration=samples)
    with torch.no_grad():
        quality = conversion_quality(lambda batch: model(**batch).logits, compiled.program, samples[:2])
    assert quality["oracle"]["cosine"] > quality["random"]["cosine"]
