"""Routing traces: which experts every token chose in every MoE layer.

A ``RoutingTrace`` is one int64 tensor ``experts[tokens, layers, k]`` plus the layer keys (the ``block``
of each ``moe.experts`` op, in program order) and each layer's expert count. That is all placement and
scheduling need, and it is what calibration statistics can hand over directly.

Traces come from two places:

* ``collect_trace``: run a program through the torch runner and record the experts every ``moe.experts``
  op is given;
* ``synthetic_trace``: a seeded generator with a controllable popularity skew (Zipf exponent) and
  inter-layer affinity (the probability that a token's next-layer expert follows a fixed successor
  of its current one), for tests with a known structure and for scale studies.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from moec.analysis.real_tokens import real_token_rows, token_mask_of
from moec.backend.torch_runner import TorchRunner
from moec.errors import MoecError
from moec.ir.ops import ExpertsOp
from moec.ir.program import Program
from moec.kernels import reference
from moec.paths import user_path


@dataclass(frozen=True)
class RoutingTrace:
    """``experts[t, l, j]`` is the j-th expert token t chose in layer ``layers[l]``."""

    experts: torch.Tensor  # int64 [tokens, layers, k]
    layers: tuple[str, ...]
    num_experts: int

    def __post_init__(self) -> None:
        if self.experts.dim() != 3 or self.experts.dtype != torch.int64:
            raise MoecError(f"a routing trace is int64 [tokens, layers, k], got {self.experts.dtype} {list(self.experts.shape)}")
        if self.experts.shape[1] != len(self.layers):
            raise MoecError(f"the trace has {self.experts.shape[1]} layers but names {len(self.layers)}")
        if self.experts.numel() and not 0 <= int(self.experts.min()) <= int(self.experts.max()) < self.num_experts:
            raise MoecError(f"expert ids must lie in 0..{self.num_experts - 1}")

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def num_layers(self) -> int:
        return self.experts.shape[1]

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]

    def expert_load(self) -> torch.Tensor:
        """float64 [layers, E]: how many (token, slot) pairs each expert receives."""
        load = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64)
        for layer in range(self.num_layers):
            load[layer] = torch.bincount(self.experts[:, layer].reshape(-1), minlength=self.num_experts).double()
        return load

    def transitions(self) -> torch.Tensor:
        """float64 [layers - 1, E, E]: ``T[l, a, b]`` = expected token moves from expert a (layer l) to
        expert b (layer l+1). Each token sends its k x k slot pairs with weight 1/k, so for k = 1 this
        is a plain count and in general a token contributes k units per layer boundary, the number of
        expert inputs layer l+1 receives from it."""
        E, k = self.num_experts, self.top_k
        out = torch.zeros(max(self.num_layers - 1, 0), E, E, dtype=torch.float64)
        for layer in range(self.num_layers - 1):
            src = self.experts[:, layer].unsqueeze(2).expand(-1, k, k)
            dst = self.experts[:, layer + 1].unsqueeze(1).expand(-1, k, k)
            flat = (src * E + dst).reshape(-1)
            out[layer] = torch.bincount(flat, minlength=E * E).double().reshape(E, E) / k
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write the trace as JSON (plain lists; small traces only, large ones are regenerated)."""
        data = {"layers": list(self.layers), "num_experts": self.num_experts, "experts": self.experts.tolist()}
        user_path(path).write_text(json.dumps(data))

    @staticmethod
    def load(path: str | os.PathLike) -> RoutingTrace:
        try:
            data = json.loads(user_path(path).read_text())
            experts = torch.tensor(data["experts"], dtype=torch.int64)
            return RoutingTrace(experts, tuple(data["layers"]), int(data["num_experts"]))
        except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
            raise MoecError(f"{path} is not a routing trace written by RoutingTrace.save ({err})") from None


def collect_trace(program: Program, batches: list[list[torch.Tensor]]) -> RoutingTrace:
    """Run ``program`` on each batch of flat graph inputs and record the experts each ``moe.experts`` op is
    given for each real token (padding that an ``attention_mask`` marks is left out): a ``moe.route``'s
    choice, or that of the model's own router code, as the stored experts that run (through the op's
    ``expert_map`` after a merge), which are what placement distributes.

    Every routed layer must share one expert count and top-k (true of every supported family)."""
    if not isinstance(batches, (list, tuple)) or not all(isinstance(batch, (list, tuple)) for batch in batches):
        raise TypeError("collect_trace takes a list of batches, each the program's flat inputs: "
                        "[program.flatten_inputs((), batch) for batch in batches]")
    routes = program.graph.ops_of(ExpertsOp)
    if not routes:
        raise MoecError("the program has no moe.experts ops, so there is no routing to trace")
    specs = {(op.spec.num_experts, op.top_k) for op in routes}
    if len(specs) != 1:
        raise MoecError(f"routed layers differ in (experts, top-k): {sorted(specs)}; trace them separately")
    (num_experts, _), = specs
    position = {id(op): index for index, op in enumerate(routes)}
    runner = TorchRunner(program)
    per_batch = []
    for inputs in batches:
        chosen: dict[int, torch.Tensor] = {}  # position in routes -> its indices
        token_mask = token_mask_of(program, inputs)

        def observe(op, args, result, chosen=chosen, token_mask=token_mask):
            if id(op) in position:
                indices = reference.remap_experts(args[1], op.expert_map)
                chosen[position[id(op)]] = real_token_rows(indices, token_mask).clone()

        runner.run(inputs, observe=observe)
        per_batch.append(torch.stack([chosen[layer] for layer in range(len(routes))], dim=1))
    return RoutingTrace(torch.cat(per_batch), tuple(op.block for op in routes), num_experts)


def synthetic_trace(tokens: int, layers: int, num_experts: int, top_k: int = 1, *, skew: float = 0.0,
                    affinity: float = 0.0, seed: int = 0) -> RoutingTrace:
    """A seeded trace with known structure.

    ``skew`` is a Zipf exponent on expert popularity (0: uniform). With probability ``affinity`` a
    token's experts in layer l+1 are the fixed successors (a random permutation per layer boundary) of
    its experts in layer l; otherwise they are k distinct experts drawn from the popularity distribution.
    """
    if top_k > num_experts:
        raise MoecError(f"top_k={top_k} exceeds num_experts={num_experts}")
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, num_experts + 1, dtype=torch.float64)
    popularity = [(ranks ** -skew)[torch.randperm(num_experts, generator=gen)] for _ in range(layers)]
    successor = [torch.randperm(num_experts, generator=gen) for _ in range(layers)]
    experts = torch.empty(tokens, layers, top_k, dtype=torch.int64)
    for layer in range(layers):
        probs = popularity[layer].expand(tokens, -1)
        experts[:, layer] = torch.multinomial(probs, top_k, generator=gen)  # distinct, by popularity
        if layer > 0 and affinity > 0:
            follow = (torch.rand(tokens, generator=gen) < affinity).unsqueeze(1)
            experts[:, layer] = torch.where(follow, successor[layer][experts[:, layer - 1]], experts[:, layer])
    return RoutingTrace(experts, tuple(f"layer{index}" for index in range(layers)), num_experts)
