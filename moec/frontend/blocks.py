"""Block specs: what a recognizer learns about an FFN or MoE block, in moec's own terms.

A recognizer turns a framework module (a Hugging Face sparse MoE block or experts module, a Llama MLP, a
user module) into one of these specs. The spec names each weight by its *role* (``router``, ``w_in`` ...) and says
where that weight lives in the model (a parameter or buffer name). Capture passes the weights to a
``moec`` custom op in ``roles`` order together with ``spec.to_json()``; lowering reads them back.

Weight layouts (moec's convention; ``transposed`` roles are stored (in, out) by the framework and are
transposed once when lowered):

* ``router``: (E, H)             ``router_logit_bias``: (E,)  added to the logits (GPT-OSS)
  ``router_bias``: (E,)  added to the scores for the choice only (DeepSeek-V3); either bias may be stored
  (1, E) (Ernie 4.5) and is flattened once when lowered
* ``w_in``:   (E, F_in, H)       F_in = 2F when gated (gate rows first, then up rows), else F; a role in
  ``interleaved`` alternates gate and up rows instead and is reordered once when lowered; a gated ``w_in``
  stored as two tensors is given as the roles ``w_in.gate`` and ``w_in.up`` (E, F, H) (DBRX), joined once
  when lowered into one weight named ``<block>.w_in``
* an experts role in ``flattened`` is stored with its experts stacked along its rows, (E * R, C) for
  (E, R, C) (DBRX); it is unflattened before any transposition
* ``b_in``:   (E, F_in)          ``w_out``: (E, H, F)    ``b_out``: (E, H)
* dense FFN / shared expert: ``w_gate`` (F, H), ``w_up`` (F, H), ``w_down`` (H, F),
  ``b_gate`` (F,), ``b_up`` (F,), ``b_down`` (H,), shared ``gate`` (1, H) (sigmoid gate on the output)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TypeVar

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "quick_gelu", "relu2")  # relu2: relu(x) ** 2
SCORINGS = ("softmax", "sigmoid")
ORDERS = ("score_then_topk", "topk_then_score")
GROUP_SCORES = ("top2_sum", "max")
ROUTER_BIAS_ROLES = ("router_bias", "router_logit_bias")
GATE_UP_PARTS = ("w_in.gate", "w_in.up")  # a gated w_in stored as two tensors (DBRX), in the order they join
# Each kind of block: the parts (``BlockSpec`` fields) it needs, and the ones it may have besides.
KIND_PARTS = {"ffn": (("ffn",), ()), "moe": (("route", "experts"), ("shared",)), "experts": (("experts",), ())}


@dataclass(frozen=True)
class RouteSpec:
    """How a router turns hidden states into (expert indices, routing weights) per token.

    logits = x @ router.T (computed in float32), plus ``router_logit_bias`` when the router has one
    (``has_logit_bias``, GPT-OSS), rounded to the activations' dtype when ``round_logits`` (a router whose
    linear runs in a 16-bit model's dtype, as most Hugging Face routers do: rounding decides ties and near
    ties, so the same experts are chosen; DeepSeek-V3's router computes in float32); scores = scoring(logits) over all experts
    (``score_then_topk``) or over the top-k logits only (``topk_then_score``). With ``router_bias``
    the bias is added to the scores for choosing experts only (DeepSeek-V3). With ``n_group`` the
    experts are split in groups, a group's score is the sum of its top-2 choice values (``group_score``
    ``top2_sum``, DeepSeek-V3) or its best one (``max``, DeepSeek-V2), and only the best ``topk_group``
    groups may be chosen. Chosen weights are renormalized to sum 1 (``renormalize``,
    with ``renorm_eps`` added to the denominator), then multiplied by ``scaling``.
    """

    num_experts: int
    top_k: int
    scoring: str = "softmax"
    order: str = "score_then_topk"
    renormalize: bool = True
    renorm_eps: float = 0.0
    scaling: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "top2_sum"
    has_bias: bool = False
    has_logit_bias: bool = False
    round_logits: bool = False

    def counts_problem(self) -> str | None:
        """Why ``top_k``, ``n_group`` or ``topk_group`` do not fit ``num_experts``, or None."""
        if self.num_experts < 1:
            return f"'num_experts' is {self.num_experts}; it must be at least 1"
        if not 1 <= self.top_k <= self.num_experts:
            return f"'top_k' is {self.top_k}; it must be in 1..{self.num_experts} ('num_experts')"
        if self.num_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            return (f"'n_group' is {self.n_group}; it must divide 'num_experts' ({self.num_experts}), and "
                    f"'topk_group' ({self.topk_group}) must be in 1..{self.n_group}")
        return None


@dataclass(frozen=True)
class FFNSpec:
    """A dense feed-forward network: down(act(gate(x)) * up(x)) when gated, else down(act(up(x))).

    A gated FFN may clamp as gated experts do (``ExpertsSpec``; GLM-5-Next's and DeepSeek-V4's MLPs):
    ``act(min(gate, limit)) * (clamp(up, -limit, limit) + up_offset)``.
    """

    hidden: int
    intermediate: int
    act: str
    gated: bool
    has_bias: bool = False
    has_output_gate: bool = False  # shared expert: y *= sigmoid(x @ gate.T)
    limit: float | None = None
    up_offset: float = 0.0

    @property
    def plain_gating(self) -> bool:
        """Whether the FFN gates as ``act(gate) * up``, with no clamp or offset."""
        return self.limit is None and self.up_offset == 0.0


@dataclass(frozen=True)
class ExpertsSpec:
    """E routed experts with stacked weights, each an FFN of width ``intermediate``.

    Gated experts compute ``act(gate) * up``; with ``limit`` (GPT-OSS, DeepSeek-V4) the gate is first
    clamped to at most ``limit`` and up to [-limit, limit], and ``up_offset`` is added to up after that
    (GPT-OSS: 1), so ``act(min(gate, limit)) * (clamp(up, -limit, limit) + up_offset)``.

    A routing weight scales its expert's output, ``sum_j w_j * expert_j(x)``; with ``weighted_input``
    (Llama 4) it scales the expert's input instead, ``sum_j expert_j(w_j * x)``, and the experts have no
    biases, so that a pair of weight 0 contributes nothing either way.
    """

    num_experts: int
    hidden: int
    intermediate: int
    act: str
    gated: bool
    has_bias: bool = False
    limit: float | None = None
    up_offset: float = 0.0
    weighted_input: bool = False

    @property
    def plain_gating(self) -> bool:
        """Whether the experts gate as ``act(gate) * up``, with no clamp or offset."""
        return self.limit is None and self.up_offset == 0.0


@dataclass(frozen=True)
class BlockSpec:
    """One recognized block: a dense FFN (``kind='ffn'``), an MoE block (``kind='moe'``), or the routed
    experts alone (``kind='experts'``: the module gets the router's choice as arguments, and the router
    stays the model's own code).

    ``weights`` maps each role to the parameter/buffer name it comes from (model-relative, dotted),
    in the order the custom op receives them. ``transposed`` lists roles stored (in, out); ``interleaved``
    lists gated roles whose gate and up rows alternate (after any transposition; GPT-OSS); ``flattened``
    lists experts roles stored (E * R, C) (DBRX).
    """

    kind: str
    family: str
    module: str
    weights: dict[str, str]
    ffn: FFNSpec | None = None
    route: RouteSpec | None = None
    experts: ExpertsSpec | None = None
    shared: FFNSpec | None = None
    transposed: tuple[str, ...] = field(default_factory=tuple)
    interleaved: tuple[str, ...] = field(default_factory=tuple)
    flattened: tuple[str, ...] = field(default_factory=tuple)

    @property
    def roles(self) -> list[str]:
        return list(self.weights)

    def to_json(self) -> str:
        # No sort_keys: the order of ``weights`` is the custom op's argument order and must survive.
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> BlockSpec:
        data = json.loads(text)
        return BlockSpec(
            kind=data["kind"],
            family=data["family"],
            module=data["module"],
            weights=dict(data["weights"]),
            ffn=FFNSpec(**data["ffn"]) if data.get("ffn") else None,
            route=RouteSpec(**data["route"]) if data.get("route") else None,
            experts=ExpertsSpec(**data["experts"]) if data.get("experts") else None,
            shared=FFNSpec(**data["shared"]) if data.get("shared") else None,
            transposed=tuple(data.get("transposed", ())),
            interleaved=tuple(data.get("interleaved", ())),
            flattened=tuple(data.get("flattened", ())),
        )


_Part = TypeVar("_Part", FFNSpec, RouteSpec, ExpertsSpec)


def required_part(part: _Part | None, name: str, spec: BlockSpec) -> _Part:
    """``spec``'s ``name`` part (``spec.route`` ...), which a block of its kind has: a spec without it is a
    recognizer's bug."""
    if part is None:
        raise ValueError(f"block {spec.module!r} ({spec.family}, kind={spec.kind!r}) has no {name!r} spec")
    return part
