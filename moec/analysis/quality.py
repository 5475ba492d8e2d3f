"""Quality of a converted model against the original: sentence-embedding agreement, and routing baselines.

``embedding_quality`` compares mean-pooled, L2-normalized sentence embeddings of two runs over the same
batches: the mean cosine between a sentence's two embeddings, and nearest-neighbour agreement (the
fraction of sentences whose most similar other sentence is the same under both models).

``RoutedRunner`` runs a converted program with its routers replaced by a baseline, to place a router
between the two natural bounds: ``"random"`` (top-k experts drawn uniformly per token) and ``"oracle"``
(the top-k experts by the true norm of their output on that token, which a router can only approximate).
Both choose among the stored experts: after a merge that keeps every router row (an ``expert_map``), a
merged expert is one candidate, not one per member. Chosen experts get weight 1 in both, as the
``dense-to-moe`` routers give them. The share of the random-to-oracle gap a router closes is reported only
when the gap is at least ``MIN_GAP`` (below it the two bounds agree and the share is noise).

``NeuronOracleRunner`` bounds what any expert split can reach at a given active fraction: it runs the
*original* dense program keeping, per token, the neurons with the largest true contribution to the FFN's
output (``|h_i - m_i| * |w_down[:, i]|``) and replacing the others by their calibration mean ``m_i`` (the
mean compensation ``dense-to-moe`` applies), as if every neuron were its own expert with a perfect router.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from moec.backend.torch_runner import TorchRunner
from moec.ir.core import Operation
from moec.ir.ops import DenseFFNOp, ExpertsOp, RouteOp, SpecOp
from moec.ir.program import Program
from moec.ir.quant import QuantizedType
from moec.kernels.quant import QuantizedWeight
from moec.kernels.reference import activation, gated_activation

BASELINES = ("random", "oracle")
MIN_GAP = 1e-3  # the smallest random-to-oracle cosine gap whose closed share is reported


def mean_pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, H] unit sentence embeddings: the mean of ``hidden`` [B, S, H] over unmasked tokens."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def embedding_cosine(reference: torch.Tensor, candidate: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean cosine between the sentence embeddings of two [B, S, H] token-state tensors of the same batch."""
    return float((mean_pooled(reference, mask) * mean_pooled(candidate, mask)).sum(-1).mean())


def sentence_embeddings(run: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                        batches: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
    """[N, H] embeddings of every sentence; ``run(batch)`` returns the last hidden state [B, S, H]."""
    with torch.inference_mode():
        return torch.cat([mean_pooled(run(batch), batch["attention_mask"]) for batch in batches])


def embedding_quality(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Mean cosine and nearest-neighbour agreement of two [N, H] unit embedding sets of the same sentences."""
    cosine = (reference * candidate).sum(-1).mean().item()

    def neighbours(embeddings: torch.Tensor) -> torch.Tensor:
        similarity = embeddings @ embeddings.T
        similarity.fill_diagonal_(-float("inf"))
        return similarity.argmax(-1)

    agreement = (neighbours(reference) == neighbours(candidate)).float().mean().item()
    return {"cosine": cosine, "nn_agreement": agreement}


def stored_as_float(name: str, program: Program) -> torch.Tensor:
    """The program's weight ``name`` in float32, dequantized where it is stored quantized."""
    stored = program.graph.weights.get(name)
    if isinstance(stored, QuantizedType):
        return QuantizedWeight.from_storage(name, stored, program.weights).dequantize()
    return program.weights[name].float()


def float_weight(op: SpecOp, role: str, program: Program) -> torch.Tensor | None:
    """The float32 weight of ``op``'s ``role``, or None if the op has none."""
    ref = op.weight(role)
    return None if ref is None else stored_as_float(ref.name, program)


def required_float_weight(op: SpecOp, role: str, program: Program) -> torch.Tensor:
    """The float32 weight of a role ``op`` must have (see ``SpecOp.required_weight``)."""
    return stored_as_float(op.required_weight(role).name, program)


def expert_output_norms(x: torch.Tensor, op: ExpertsOp, program: Program) -> torch.Tensor:
    """[T, E] norm of every expert's output on every token row of ``x`` [T, H]."""
    spec = op.spec
    w_in, w_out = required_float_weight(op, "w_in", program), required_float_weight(op, "w_out", program)
    b_in, b_out = float_weight(op, "b_in", program), float_weight(op, "b_out", program)
    act = activation(spec.act)
    norms = []
    for e in range(spec.num_experts):
        h = torch.nn.functional.linear(x, w_in[e], None if b_in is None else b_in[e])
        h = gated_activation(h[:, : spec.intermediate], h[:, spec.intermediate :], spec) if spec.gated else act(h)
        norms.append(torch.nn.functional.linear(h, w_out[e], None if b_out is None else b_out[e]).norm(dim=-1))
    return torch.stack(norms, dim=1)


class RoutedRunner(TorchRunner):
    """The torch runner with every ``moe.route`` op replaced by a baseline router (see the module docstring)."""

    def __init__(self, program: Program, baseline: str, seed: int = 0) -> None:
        if baseline not in BASELINES:
            raise ValueError(f"baseline {baseline!r} is not one of {', '.join(BASELINES)}")
        self.baseline = baseline
        self.generator = torch.Generator().manual_seed(seed)
        self.experts_of = {id(op.args[1]): op for op in program.graph.ops_of(ExpertsOp)}
        super().__init__(program)

    def prepare(self, op: Operation) -> Callable[[list[Any]], Any]:
        if not isinstance(op, RouteOp):
            return super().prepare(op)
        top_k = op.spec.top_k
        experts = self.experts_of[id(op.results[0])]
        router_id = router_ids(experts)

        def choose(args: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
            x = args[0]
            rows = x.reshape(-1, x.shape[-1]).float()
            if self.baseline == "random":
                scores = torch.rand(rows.shape[0], experts.spec.num_experts, generator=self.generator)
            else:
                scores = expert_output_norms(rows, experts, self.program)
            stored = scores.topk(top_k, dim=-1).indices
            indices = router_id[stored].reshape(*x.shape[:-1], top_k)
            return indices, torch.ones(indices.shape, dtype=torch.float32)

        return choose


def router_ids(op: ExpertsOp) -> torch.Tensor:
    """[E] for each stored expert of ``op``, a router expert that runs it (the first, under an ``expert_map``)."""
    mapping = op.expert_map
    if mapping is None:
        return torch.arange(op.spec.num_experts)
    return torch.tensor([mapping.index(stored) for stored in range(op.spec.num_experts)])


class NeuronOracleRunner(TorchRunner):
    """The torch runner with each ``ffn.dense`` op keeping only ``fraction`` of its neurons per token (the
    largest true contributions), the rest at their mean from ``means`` (block -> [F]); see the module
    docstring."""

    def __init__(self, program: Program, fraction: float, means: dict[str, torch.Tensor]) -> None:
        self.fraction, self.means = fraction, means
        super().__init__(program)

    def prepare(self, op: Operation) -> Callable[[list[Any]], Any]:
        if not isinstance(op, DenseFFNOp):
            return super().prepare(op)
        spec, mean, program = op.spec, self.means[op.block], self.program
        w_up = required_float_weight(op, "w_up", program)
        w_down = required_float_weight(op, "w_down", program)
        w_gate = required_float_weight(op, "w_gate", program) if spec.gated else None
        b_gate, b_up, b_down = (float_weight(op, role, program) for role in ("b_gate", "b_up", "b_down"))
        act, column_norms = activation(spec.act), w_down.norm(dim=0)
        keep = max(1, round(self.fraction * spec.intermediate))

        def run(args: list[Any]) -> torch.Tensor:
            x = args[0].float()
            up = torch.nn.functional.linear(x, w_up, b_up)
            h = gated_activation(torch.nn.functional.linear(x, w_gate, b_gate), up, spec) if w_gate is not None \
                else act(up)
            chosen = ((h - mean).abs() * column_norms).topk(keep, dim=-1).indices
            kept = torch.zeros_like(h, dtype=torch.bool).scatter_(-1, chosen, True)
            return torch.nn.functional.linear(torch.where(kept, h, mean), w_down, b_down).to(args[0].dtype)

        return run


def active_ffn_fraction(program: Program) -> float:
    """The fraction of the original model's FFN neurons that run per token, averaged over the MoE blocks of
    ``program``: top_k of the experts a block held before expert pruning or merging (from the program's pass
    records), plus its shared experts, which always run. Under an ``expert_map`` it is an upper bound: two
    chosen members of one merged expert run it once."""
    from moec.ir.ops import SharedExpertOp

    shared = {op.block: op.spec.intermediate for op in program.graph.ops_of(SharedExpertOp)}
    held = experts_before_compression(program)
    fractions = []
    for op in program.graph.ops_of(ExpertsOp):
        spec = op.spec
        always, experts = shared.get(op.block, 0), held.get(op.block, spec.num_experts)
        fractions.append((op.top_k * spec.intermediate + always) / (experts * spec.intermediate + always))
    return sum(fractions) / len(fractions) if fractions else 1.0


def experts_before_compression(program: Program) -> dict[str, int]:
    """Per MoE block, the routed experts it held before the first pass that pruned or merged them."""
    held: dict[str, int] = {}
    for record in program.metadata.get("passes", []):
        layers = record.get("summary", {}).get("layers") if record.get("modified", True) else None
        for layer in layers if isinstance(layers, list) else []:  # dense-to-moe's is a count
            if isinstance(layer, dict) and "experts_before" in layer:
                held.setdefault(layer["layer"], layer["experts_before"])
    return held


def conversion_quality(reference: Callable[[dict[str, torch.Tensor]], torch.Tensor], program: Program,
                       batches: Sequence[dict[str, torch.Tensor]], baselines: bool = True) -> dict[str, Any]:
    """Embedding quality of ``program`` (its first output, mean-pooled) against ``reference(batch)`` on
    ``batches``; with ``baselines``, also of the same experts under random and oracle routing, and
    (``gap_closed``, when that gap is at least ``MIN_GAP``) the share of the random-to-oracle cosine gap that
    the program's own routers close."""
    expected = sentence_embeddings(reference, batches)

    def quality(runner: TorchRunner) -> dict[str, float]:
        run = lambda batch: runner.run(program.flatten_inputs((), batch))[0]  # noqa: E731
        return embedding_quality(expected, sentence_embeddings(run, batches))

    result: dict[str, Any] = {"active_ffn_fraction": active_ffn_fraction(program), "router": quality(TorchRunner(program))}
    if baselines and program.graph.ops_of(RouteOp):
        for baseline in BASELINES:
            result[baseline] = quality(RoutedRunner(program, baseline))
        gap = result["oracle"]["cosine"] - result["random"]["cosine"]
        if gap >= MIN_GAP:
            result["gap_closed"] = (result["router"]["cosine"] - result["random"]["cosine"]) / gap
    return result
