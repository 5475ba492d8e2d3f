"""The Hugging Face built-ins: recognizers of the FFN and MoE blocks of Hugging Face families, by class
(``BUILTIN_BLOCKS``), with the families whose blocks the swap wraps in their own way (``ROUTER_SCORES_FAMILIES``
...); and the probed recognizers of modules of unlisted classes: a Llama-style gated MLP (``probed_gated_mlp``)
and a Hugging Face experts module (``probed_hf_experts``)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TypeGuard, TypeVar

import torch
from torch import nn
from torch.nn import functional as F

from moec.frontend.blocks import BlockSpec, ExpertsSpec, FFNSpec, RouteSpec, required_part
from moec.frontend.probing import probe_tolerance, random_choice, row_errors, rows_reaching_probe_peaks
from moec.kernels import reference

# A recognizer: describes a module as a BlockSpec, or returns None to leave it alone.
ToSpec = Callable[[nn.Module], BlockSpec | None]


# ---- probed recognizers of unlisted classes --------------------------------------------------------


def probed_gated_mlp(mlp: nn.Module) -> BlockSpec | None:
    """A module of an unlisted class with a gated MLP's parts, when the probe confirms it
    (``_gated_mlp_probe_agrees``). Its family is its class name."""
    gate, up, down = (getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj"))
    act_fn = _mlp_act_fn(mlp)
    if not (isinstance(gate, nn.Linear) and isinstance(up, nn.Linear) and isinstance(down, nn.Linear)
            and isinstance(act_fn, nn.Module)):
        return None
    ffn = _gated_mlp_ffn_spec(mlp)
    if ffn is None or not _gated_mlp_probe_agrees(mlp, ffn):
        return None
    return BlockSpec(kind="ffn", family=type(mlp).__name__, module="", weights=_gated_mlp_weights(mlp), ffn=ffn)


def _gated_mlp_probe_agrees(mlp: nn.Module, ffn: FFNSpec) -> bool:
    """Whether the gated MLP's forward on a few random rows (scaled to ``PROBE_PEAKS``) equals
    ``down(act(gate(x)) * up(x))``, clamped as ``ffn`` says, computed from its parts (same ops, so the same
    rounding)."""
    gate, up, down = (_attribute(mlp, name, nn.Linear) for name in ("gate_proj", "up_proj", "down_proj"))
    act_fn = _mlp_act_fn(mlp)
    if not callable(act_fn):
        return False
    weight = up.weight
    x = torch.randn(8, ffn.hidden, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    try:
        with torch.no_grad():
            x = rows_reaching_probe_peaks(x, lambda rows: torch.cat([gate(rows), up(rows)], dim=-1))
            g, u = gate(x), up(x)
            if ffn.limit is not None:
                g, u = g.clamp(max=ffn.limit), u.clamp(min=-ffn.limit, max=ffn.limit)
            actual, expected = mlp(x), down(act_fn(g) * u)
            return isinstance(actual, torch.Tensor) and actual.shape == expected.shape and torch.equal(actual, expected)
    except Exception:  # a forward with other arguments or shapes is not this MLP
        return False


def probed_hf_experts(experts: nn.Module) -> BlockSpec | None:
    """A Hugging Face experts module (``forward(hidden_states, top_k_index, top_k_weights)``, the stacked
    ``gate_up_proj`` (E, 2F, H) or ``up_proj`` (E, F, H), ``down_proj`` (E, H, F), each maybe stored
    transposed, gate and up rows maybe interleaved, optional biases), when its forward on random rows and a
    random choice of experts equals moec's experts op.

    This covers the MoE blocks whose router moec does not model (PhiMoE, DeepSeek-V4, Zaya, Gemma 4, NemotronH
    with latent experts ...): their experts become a ``moe.experts`` op and their router stays the model's own
    code (``_moe_block`` uses it for the experts of blocks whose router moec does model). Experts with their
    own gating function are taken when it is one of the clamped forms moec models (``ExpertsSpec.limit``,
    ``up_offset``); experts with a norm after each expert are left alone.
    """
    layout = {flag: getattr(experts, flag, None) for flag in ("is_transposed", "is_concatenated", "has_post_expert_norm")}
    if not is_hf_experts(experts) or None in layout.values() or layout["has_post_expert_norm"]:
        return None  # flags an older transformers may not set read as an unsupported layout
    gated = bool(getattr(experts, "has_gate", False))
    w_in_name = "gate_up_proj" if gated else "up_proj"
    w_in, w_out = getattr(experts, w_in_name, None), getattr(experts, "down_proj", None)
    if not isinstance(w_in, torch.Tensor) or not isinstance(w_out, torch.Tensor) or w_out.dim() != 3:
        return None
    transposed = ("w_in", "w_out") if layout["is_transposed"] else ()
    num_experts, hidden, intermediate = w_out.transpose(-2, -1).shape if transposed else w_out.shape
    f_in = 2 * intermediate if gated else intermediate
    if w_in.shape != ((num_experts, hidden, f_in) if transposed else (num_experts, f_in, hidden)):
        return None
    weights = {"w_in": w_in_name, "w_out": "down_proj"}
    if getattr(experts, "has_bias", False):
        weights |= {"b_in": f"{w_in_name}_bias", "b_out": "down_proj_bias"}
    interleaved = tuple(role for role in ("w_in", "b_in") if role in weights) if gated and not layout["is_concatenated"] else ()
    for act, limit, up_offset in _gating_candidates(experts, gated):
        spec = ExpertsSpec(num_experts=num_experts, hidden=hidden, intermediate=intermediate, act=act, gated=gated,
                           has_bias="b_in" in weights, limit=limit, up_offset=up_offset)
        block = BlockSpec(kind="experts", family=type(experts).__name__, module="", weights=weights, experts=spec,
                          transposed=transposed, interleaved=interleaved)
        if _experts_probe_agrees(experts, block):
            return block
    return None


def _gating_candidates(experts: nn.Module, gated: bool) -> list[tuple[str, float | None, float]]:
    """The (activation, limit, up_offset) an experts module may compute, for the probe to decide between.

    Hugging Face's default gating is ``act_fn(gate) * up``. Experts with their own ``_apply_gate`` may
    clamp at ``self.limit`` (DeepSeek-V4: SiLU) or ``self.swiglu_limit`` (HY-V4: SiLU written out, no
    ``act_fn``), and add 1 to up with ``gate * sigmoid(alpha * gate)`` (GPT-OSS: ``alpha`` 1.702, which is
    moec's ``quick_gelu``; MiniMax-M3-VL: ``swiglu_alpha``)."""
    act = activation_name(getattr(experts, "act_fn", None))
    if getattr(type(experts), "_apply_gate", None) in (None, _hf_default_apply_gate()) or not gated:
        return [] if act is None else [(act, None, 0.0)]
    alpha = getattr(experts, "alpha", getattr(experts, "swiglu_alpha", None))
    acts = [act] if act is not None else []
    acts += [name for name, a in (("silu", 1.0), ("quick_gelu", 1.702)) if alpha == a and name not in acts]
    if not acts and alpha is None:
        acts = ["silu"]
    limit = getattr(experts, "limit", getattr(experts, "swiglu_limit", None))
    limits = [float(limit)] if _is_clamp(limit) else []
    return [(name, bound, offset) for name in acts for bound in limits for offset in (0.0, 1.0)]


def is_hf_experts(module: nn.Module) -> bool:
    """Whether ``module`` was built by Hugging Face's experts interface (``use_experts_implementation``): it
    carries the layout flags (``has_gate``, ``is_concatenated`` ...) and a config that picks its implementation."""
    return hasattr(module, "is_concatenated") and hasattr(getattr(module, "config", None), "_experts_implementation")


def _hf_default_apply_gate() -> Callable | None:
    """Hugging Face's ``act(gate) * up`` for experts modules (others have their own gating, GPT-OSS's)."""
    try:
        from transformers.integrations.moe import _default_apply_gate as default
    except ImportError:
        return None
    return default


def _experts_probe_agrees(experts: nn.Module, block: BlockSpec) -> bool:
    """Whether ``experts(x, indices, weights)`` matches moec's experts op on 8 random rows (scaled to
    ``PROBE_PEAKS``), each routed to two random experts, to ``probe_tolerance``."""
    spec = required_part(block.experts, "experts", block)
    tensors = {role: reference.oriented_weight(getattr(experts, name), role, block)
               for role, name in block.weights.items()}
    w_in = tensors["w_in"]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, spec.hidden, generator=generator).to(w_in.device, w_in.dtype)
    indices, routing = random_choice(8, spec.num_experts, generator, w_in.device)
    try:
        with torch.no_grad():
            x = rows_reaching_probe_peaks(x, lambda rows: rows @ w_in.reshape(-1, spec.hidden).T)
            actual = experts(x, indices, routing)
            expected = reference.experts(x, indices, routing, w_in, tensors["w_out"], tensors.get("b_in"),
                                         tensors.get("b_out"), spec)
    except Exception:  # another forward signature: not this kind of experts module
        return False
    if not isinstance(actual, torch.Tensor) or actual.shape != expected.shape:
        return False
    return bool((row_errors(actual, expected) <= probe_tolerance(w_in.dtype)).all())


# ---- Hugging Face built-ins ------------------------------------------------------------------------


def activation_name(act: object) -> str | None:
    """moec's name for a Hugging Face / torch activation module or ``torch.nn.functional`` activation
    function (LFM2-MoE's experts call ``F.silu``), or None when moec does not model it.

    Decided from what actually runs (not the config string), so aliases such as
    ``gelu_new``/``gelu_pytorch_tanh``/``gelu_fast`` (all tanh GELU) or ``swish`` resolve alike.
    """
    from transformers import activations as hf_act  # here, not at the top: it imports much of transformers

    functions: dict[object, str] = {F.silu: "silu", F.gelu: "gelu", F.relu: "relu"}
    if callable(act) and act in functions:
        return functions[act]
    if isinstance(act, (hf_act.SiLUActivation, nn.SiLU)):
        return "silu"
    if isinstance(act, hf_act.GELUActivation) or (isinstance(act, nn.GELU) and act.approximate == "none"):
        return "gelu"
    tanh_gelus = (hf_act.NewGELUActivation, hf_act.GELUTanh, hf_act.FastGELUActivation)
    if isinstance(act, tanh_gelus) or (isinstance(act, nn.GELU) and act.approximate == "tanh"):
        return "gelu_tanh"
    if isinstance(act, hf_act.QuickGELUActivation):
        return "quick_gelu"
    if type(act) is nn.ReLU:
        return "relu"
    if isinstance(act, hf_act.ReLUSquaredActivation):
        return "relu2"
    return None


_Kind = TypeVar("_Kind")


def _attribute(module: nn.Module, path: str, kind: type[_Kind]) -> _Kind:
    """The attribute at the dotted ``path`` of ``module``, which the module's class (the one its recognizer is
    registered for) makes a ``kind``: a submodule, a parameter, a setting copied from the config."""
    value: object = module
    for name in path.split("."):
        value = getattr(value, name)
    if not isinstance(value, kind):
        raise TypeError(f"{type(module).__name__}.{path} is of type {type(value).__name__}, "
                        f"expected {kind.__name__}")
    return value


def _mlp_act_fn(mlp: nn.Module) -> object:
    """A gated MLP's activation: its ``act_fn``, or its ``activation_fn`` (Llama 4); None if it has neither."""
    act_fn = getattr(mlp, "act_fn", None)
    return getattr(mlp, "activation_fn", None) if act_fn is None else act_fn


def _gated_mlp_ffn_spec(mlp: nn.Module) -> FFNSpec | None:
    """gate_proj/up_proj/down_proj Linear layers with an activation (Llama, Mistral, Qwen, Gemma, the MoE
    families' dense MLPs); a ``swiglu_limit`` or ``limit`` the MLP keeps is read as its clamp (GLM-5-Next,
    DeepSeek-V4), which only the probe confirms."""
    act = activation_name(_mlp_act_fn(mlp))
    if act is None:
        return None
    gate_proj = _attribute(mlp, "gate_proj", nn.Linear)
    limit = getattr(mlp, "swiglu_limit", getattr(mlp, "limit", None))
    return FFNSpec(
        hidden=gate_proj.in_features,
        intermediate=gate_proj.out_features,
        act=act,
        gated=True,
        has_bias=gate_proj.bias is not None,
        limit=float(limit) if _is_clamp(limit) else None,
    )


def _is_clamp(limit: object) -> TypeGuard[float]:
    """Whether a module's ``limit`` setting is a clamp (a positive finite number; inf or None: none)."""
    return isinstance(limit, (int, float)) and not isinstance(limit, bool) and 0 < limit < math.inf


def _gated_mlp_weights(mlp: nn.Module, prefix: str = "", role_prefix: str = "") -> dict[str, str]:
    weights = {}
    for role, linear in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
        weights[f"{role_prefix}w_{role}"] = f"{prefix}{linear}.weight"
        if getattr(mlp, linear).bias is not None:
            weights[f"{role_prefix}b_{role}"] = f"{prefix}{linear}.bias"
    return weights


def _gated_mlp(family: str) -> ToSpec:
    def to_spec(mlp: nn.Module) -> BlockSpec | None:
        ffn = _gated_mlp_ffn_spec(mlp)
        if ffn is None:
            return None
        return BlockSpec(kind="ffn", family=family, module="", weights=_gated_mlp_weights(mlp), ffn=ffn)

    return to_spec


def _plain_mlp_parts(mlp: nn.Module, up: str, down: str, act: str, prefix: str = "",
                     role_prefix: str = "") -> tuple[FFNSpec, dict[str, str]] | None:
    """The spec and weights of ``up`` Linear -> activation ``act`` -> ``down`` Linear, both with biases or
    neither; None for a module without those parts or an activation moec does not model."""
    act_name = activation_name(getattr(mlp, act, None))
    up_linear, down_linear = getattr(mlp, up, None), getattr(mlp, down, None)
    if not (isinstance(up_linear, nn.Linear) and isinstance(down_linear, nn.Linear)):
        return None
    has_bias = up_linear.bias is not None
    if act_name is None or (down_linear.bias is not None) != has_bias:
        return None
    names = {"w_up": f"{up}.weight", "w_down": f"{down}.weight"}
    if has_bias:
        names |= {"b_up": f"{up}.bias", "b_down": f"{down}.bias"}
    ffn = FFNSpec(hidden=up_linear.in_features, intermediate=up_linear.out_features, act=act_name, gated=False,
                  has_bias=has_bias)
    return ffn, {f"{role_prefix}{role}": f"{prefix}{name}" for role, name in names.items()}


def _plain_mlp(family: str, up: str, down: str, act: str = "act") -> ToSpec:
    """``up`` Linear -> activation ``act`` -> ``down`` Linear, both with biases or neither (a dropout after
    them is the identity for inference)."""

    def to_spec(mlp: nn.Module) -> BlockSpec | None:
        parts = _plain_mlp_parts(mlp, up, down, act)
        if parts is None:
            return None
        ffn, weights = parts
        return BlockSpec(kind="ffn", family=family, module="", weights=weights, ffn=ffn)

    return to_spec


def _gpt2_mlp(mlp: nn.Module) -> BlockSpec | None:
    # Conv1D stores its weight (in, out); the dropout after c_proj is the identity in eval mode.
    act = activation_name(mlp.act)
    if act is None:
        return None
    hidden, intermediate = _attribute(mlp, "c_fc.weight", torch.Tensor).shape
    return BlockSpec(
        kind="ffn",
        family="gpt2",
        module="",
        weights={
            "w_up": "c_fc.weight",
            "b_up": "c_fc.bias",
            "w_down": "c_proj.weight",
            "b_down": "c_proj.bias",
        },
        ffn=FFNSpec(hidden=hidden, intermediate=intermediate, act=act, gated=False, has_bias=True),
        transposed=("w_up", "w_down"),
    )


def _t5_ffn(mlp: nn.Module) -> BlockSpec | None:
    """T5's ``DenseReluDense``: wi -> act -> wo, or gated wi_0 (gate) and wi_1 (up); no biases. A ``wo`` kept
    in another dtype than the rest (flan-t5 in half precision) is left to generic ops."""
    act = activation_name(mlp.act)
    gated = hasattr(mlp, "wi_0")
    up = _attribute(mlp, "wi_1" if gated else "wi", nn.Linear)
    if act is None or _attribute(mlp, "wo.weight", torch.Tensor).dtype != up.weight.dtype:
        return None
    weights = {"w_gate": "wi_0.weight", "w_up": "wi_1.weight"} if gated else {"w_up": "wi.weight"}
    return BlockSpec(
        kind="ffn",
        family="t5",
        module="",
        weights={**weights, "w_down": "wo.weight"},
        ffn=FFNSpec(hidden=up.in_features, intermediate=up.out_features, act=act, gated=gated, has_bias=False),
    )


BERT_STYLE_FAMILIES = ("bert", "roberta", "xlm_roberta", "camembert", "electra")


def _bert_layer(family: str) -> ToSpec:
    """BERT-style encoder layers: the block is intermediate.dense -> act -> output.dense; output's dropout,
    residual and LayerNorm stay outside (see swap.py for how the layer is patched)."""

    def to_spec(layer: nn.Module) -> BlockSpec | None:
        act = activation_name(layer.get_submodule("intermediate").intermediate_act_fn)
        if act is None:
            return None
        up = _attribute(layer, "intermediate.dense", nn.Linear)
        return BlockSpec(
            kind="ffn",
            family=family,
            module="",
            weights={
                "w_up": "intermediate.dense.weight",
                "b_up": "intermediate.dense.bias",
                "w_down": "output.dense.weight",
                "b_down": "output.dense.bias",
            },
            ffn=FFNSpec(hidden=up.in_features, intermediate=up.out_features, act=act, gated=False, has_bias=True),
        )

    return to_spec


def _stacked_experts(experts: nn.Module) -> BlockSpec | None:
    """Hugging Face stacked experts in the standard layout (``gate_up_proj`` (E, 2F, H), gate rows first;
    ``down_proj`` (E, H, F); an ``act_fn`` moec models), taken as they are, without a probe."""
    act = activation_name(experts.act_fn)
    if act is None:
        return None
    num_experts, hidden, intermediate = _attribute(experts, "down_proj", torch.Tensor).shape
    spec = ExpertsSpec(num_experts=num_experts, hidden=hidden, intermediate=intermediate, act=act, gated=True)
    return BlockSpec(kind="experts", family=type(experts).__name__, module="",
                     weights={"w_in": "gate_up_proj", "w_out": "down_proj"}, experts=spec)


def _llama4_experts(experts: nn.Module) -> BlockSpec | None:
    """Llama 4's experts: ``gate_up_proj`` (E, H, 2F) and ``down_proj`` (E, F, H), both stored (in, out), gate
    columns first; its block scales each expert's input rows by their routing weight (``weighted_input``)."""
    act = activation_name(experts.act_fn)
    if act is None:
        return None
    num_experts, intermediate, hidden = _attribute(experts, "down_proj", torch.Tensor).shape
    spec = ExpertsSpec(num_experts=num_experts, hidden=hidden, intermediate=intermediate, act=act, gated=True,
                       weighted_input=True)
    return BlockSpec(kind="experts", family=type(experts).__name__, module="",
                     weights={"w_in": "gate_up_proj", "w_out": "down_proj"}, experts=spec,
                     transposed=("w_in", "w_out"))


def _dbrx_experts(experts: nn.Module) -> BlockSpec | None:
    """DBRX's experts: gate ``mlp.w1`` and up ``mlp.v1``, (E * F, H) each, and ``mlp.w2`` (E * F, H), each
    expert's down projection stored (in, out); an ``activation_fn`` moec models."""
    mlp = experts.get_submodule("mlp")
    act = activation_name(mlp.activation_fn)
    if act is None:
        return None
    num_experts = _attribute(experts, "num_experts", int)
    rows, hidden = _attribute(mlp, "w2", torch.Tensor).shape
    spec = ExpertsSpec(num_experts=num_experts, hidden=hidden, intermediate=rows // num_experts, act=act, gated=True)
    return BlockSpec(kind="experts", family=type(experts).__name__, module="",
                     weights={"w_in.gate": "mlp.w1", "w_in.up": "mlp.v1", "w_out": "mlp.w2"}, experts=spec,
                     transposed=("w_out",), flattened=("w_in.gate", "w_in.up", "w_out"))


# Families whose MoE block returns (hidden states, its router's second output) rather than the hidden states
# alone: GPT-OSS's (and the OpenAI privacy filter's) router scores, Llama 4's router logits.
ROUTER_SCORES_FAMILIES = ("gpt_oss", "openai_privacy_filter", "llama4")


# Families whose MoE block returns (its output flattened to 1-D, its router's logits flattened), for a caller
# that assigns them to one modality's token positions (Ernie 4.5-VL).
FLAT_OUTPUT_FAMILIES = ("ernie4_5_vl_moe",)


# Families whose MoE block ends with a norm module of its own on (routed + shared): its attribute. The swapped
# block applies it, as the model's code, to moec's output.
OUTPUT_NORMS = {"axk1": "post_mlp_layernorm"}


RouteOf = Callable[[nn.Module, int], tuple[RouteSpec, dict[str, str]] | None]


def _moe_block(family: str, route_of: RouteOf, shared: str = "", shared_gate: str = "",
               experts_of: ToSpec = probed_hf_experts) -> ToSpec:
    """An MoE block: its ``experts`` module as ``experts_of`` describes it (by default the experts probe, for
    any Hugging Face layout: transposed, interleaved, biased, clamped; ``_stacked_experts`` for the standard
    layout), routed as ``route_of(block, num_experts)`` says (its spec and router weights; None: a routing
    moec does not model), plus the always-on shared expert at attribute ``shared`` when the block has one (a
    gated MLP, or ``up_proj`` -> ``act_fn`` -> ``down_proj``), with a sigmoid gate at ``shared_gate``."""

    def to_spec(block: nn.Module) -> BlockSpec | None:
        experts = experts_of(block.get_submodule("experts"))
        if experts is None:
            return None
        routing = route_of(block, required_part(experts.experts, "experts", experts).num_experts)
        if routing is None:
            return None
        route, weights = routing
        if _router_rounds_its_logits(block, weights["router"]):
            route = dataclasses.replace(route, round_logits=True)
        weights = {**weights, **{role: f"experts.{name}" for role, name in experts.weights.items()}}
        shared_spec = None
        shared_mlp = getattr(block, shared, None) if shared else None
        if shared_mlp is not None:
            shared_parts = _shared_expert(shared_mlp, f"{shared}.")
            if shared_parts is None:
                return None
            shared_spec, shared_weights = shared_parts
            weights |= shared_weights
            if shared_gate:
                shared_spec = dataclasses.replace(shared_spec, has_output_gate=True)
                weights["shared_gate"] = f"{shared_gate}.weight"
        return dataclasses.replace(experts, kind="moe", family=family, weights=weights, route=route, shared=shared_spec)

    return to_spec


def _router_rounds_its_logits(block: nn.Module, weight: str) -> bool:
    """Whether the module holding the router weight at ``weight`` (a path in ``block``) returns its logits in
    the weight's 16-bit dtype (an ``nn.Linear``, or a Hugging Face router whose ``F.linear`` runs in the
    model's dtype), asked on a few random rows; False for float32 weights and for a router that computes
    in float32 (DeepSeek-V3's) or cannot be called on rows alone."""
    owner_path, _, name = weight.rpartition(".")
    if not owner_path:  # a weight of the block itself: calling the block would not give logits
        return False
    owner = block.get_submodule(owner_path)
    router = getattr(owner, name, None)
    if not isinstance(router, torch.Tensor) or router.dtype not in (torch.bfloat16, torch.float16) or router.dim() != 2:
        return False
    rows = torch.randn(4, router.shape[1], generator=torch.Generator().manual_seed(0)).to(router.device, router.dtype)
    try:
        with torch.no_grad():
            output = owner(rows)
    except Exception:  # a router that takes more than the hidden states
        return False
    logits = output[0] if isinstance(output, (tuple, list)) and output else output
    return isinstance(logits, torch.Tensor) and logits.dtype == router.dtype and logits.shape[-1] == router.shape[0]


def _shared_expert(mlp: nn.Module, prefix: str) -> tuple[FFNSpec, dict[str, str]] | None:
    """A shared expert's spec and weights (roles ``shared_*``): a gated MLP, or a plain one (NemotronH)."""
    if not hasattr(mlp, "gate_proj"):
        return _plain_mlp_parts(mlp, "up_proj", "down_proj", "act_fn", prefix, role_prefix="shared_")
    spec = _gated_mlp_ffn_spec(mlp)
    if spec is None or (spec.limit is not None and not _gated_mlp_probe_agrees(mlp, spec)):
        return None
    return spec, _gated_mlp_weights(mlp, prefix=prefix, role_prefix="shared_")


def _setting(block: nn.Module, path: str) -> object:
    """The value at the dotted ``path`` of ``block`` (a setting copied from the config)."""
    value: object = block
    for name in path.split("."):
        value = getattr(value, name)
    return value


def _route(*, weight: str = "gate.weight", top_k: str = "gate.top_k", scoring: str = "softmax",
           order: str = "score_then_topk", renormalize: bool | str = True, renorm_eps: float = 0.0,
           scaling: str = "", bias: str = "", logit_bias: str = "", groups: str = "",
           group_score: str = "top2_sum") -> RouteOf:
    """A routing read from where the block keeps it; every path is relative to the block.

    ``weight`` and ``top_k``: the router's weight (E, H) and k. ``renormalize``: fixed, or the path of the
    flag (``norm_topk_prob``; None reads as no). ``scaling``: the path of the factor the chosen weights are
    multiplied by (in the router or applied to the experts' sum: the same, the sum being linear in them).
    ``bias``: a score-correction bias for the choice only; ``logit_bias``: the router's own bias, added to
    its logits. ``groups``: the module with ``num_group`` and ``topk_group`` (group-limited top-k, groups
    scored by ``group_score``; a ``num_group`` of None means no groups); one whose allowed groups hold fewer
    than k experts is not modelled (the block then stays the model's code)."""

    def route_of(block: nn.Module, num_experts: int) -> tuple[RouteSpec, dict[str, str]] | None:
        k = _attribute(block, top_k, int)
        renorm = renormalize if isinstance(renormalize, bool) else bool(_setting(block, renormalize))
        factor = _setting(block, scaling) if scaling else 1.0
        if not isinstance(factor, (int, float)):
            raise TypeError(f"{type(block).__name__}.{scaling} is {factor!r}, not a number")
        n_group, topk_group = 1, 1
        if groups and _setting(block, f"{groups}.num_group") is not None:  # None: no groups (A.X-K2-Light)
            n_group = _attribute(block, f"{groups}.num_group", int)
            topk_group = _attribute(block, f"{groups}.topk_group", int)
        if k > topk_group * (num_experts // n_group):
            return None
        route = RouteSpec(num_experts=num_experts, top_k=k, scoring=scoring, order=order, renormalize=renorm,
                          renorm_eps=renorm_eps, scaling=float(factor), n_group=n_group, topk_group=topk_group,
                          group_score=group_score, has_bias=bool(bias), has_logit_bias=bool(logit_bias))
        weights = {"router": weight}
        if bias:
            weights["router_bias"] = bias
        if logit_bias:
            weights["router_logit_bias"] = logit_bias
        return route, weights

    return route_of


def _ernie_route(block: nn.Module, num_experts: int) -> tuple[RouteSpec, dict[str, str]] | None:
    """Softmax scores, a score-correction bias (stored (1, E)) for the choice only, and the chosen scores
    divided by ``max(sum, norm_min)``: the same as ``sum + norm_min`` in float32, since k softmax scores
    chosen first sum to at least k / E, far above ``norm_min`` (1e-12 in its configs; a larger one is not
    modelled)."""
    norm_min = getattr(block.get_submodule("gate"), "norm_min", None)
    if not isinstance(norm_min, (int, float)) or not 0 <= norm_min <= 1e-6:
        return None
    return _route(renorm_eps=float(norm_min), bias="gate.moe_statics.e_score_correction_bias")(block, num_experts)


def _laguna_route(block: nn.Module, num_experts: int) -> tuple[RouteSpec, dict[str, str]] | None:
    """Sigmoid scores with a score-correction bias, renormalized, the experts' sum scaled by the block; a
    router with tanh soft-capped logits is not modelled."""
    if _setting(block, "gate.router_logit_softcapping"):
        return None
    return _route(scoring="sigmoid", bias="gate.e_score_correction_bias", scaling="routed_scaling_factor")(
        block, num_experts)


def _dbrx_route(block: nn.Module, num_experts: int) -> tuple[RouteSpec, dict[str, str]] | None:
    """Softmax then top-k, the chosen weights divided by their p-norm, p = ``moe_normalize_expert_weights``
    (None: not divided): p = 1 is renormalization, the weights being positive; another p is not modelled."""
    p = block.moe_normalize_expert_weights
    if p is not None and p != 1:
        return None
    return _route(weight="router.layer.weight", top_k="top_k", renormalize=p is not None)(block, num_experts)


def _deepseek_v2_route(block: nn.Module, num_experts: int) -> tuple[RouteSpec, dict[str, str]] | None:
    """Softmax scores, top-k from all experts (``greedy``) or from the best groups, a group scored by its
    best expert (``group_limited_greedy``), scaled and not renormalized."""
    method = _setting(block, "gate.topk_method")
    if method not in ("greedy", "group_limited_greedy"):
        return None
    groups = "gate" if method == "group_limited_greedy" else ""
    return _route(renormalize=False, scaling="gate.routed_scaling_factor", groups=groups, group_score="max")(
        block, num_experts)


def _lfm2_moe_route(block: nn.Module, num_experts: int) -> tuple[RouteSpec, dict[str, str]] | None:
    """Sigmoid scores, the block's expert bias for the choice only (when it has one), renormalized with eps
    1e-6 when the router says so, and scaled."""
    bias = "expert_bias" if _setting(block, "use_expert_bias") else ""
    return _route(scoring="sigmoid", renormalize="gate.norm_topk_prob", renorm_eps=1e-6,
                  scaling="gate.routed_scaling_factor", bias=bias)(block, num_experts)


def _cohere2_moe_route(block: nn.Module, num_experts: int) -> tuple[RouteSpec, dict[str, str]] | None:
    """Top-k of the logits, then softmax over the chosen k or their sigmoids (renormalized when the router
    says so); a shared expert averaged with the routed ones (not summed) is not modelled."""
    if getattr(block, "num_shared_experts", 0) and block.shared_expert_combination_strategy != "sum":
        return None
    selection = _setting(block, "gate.expert_selection_fn")
    if selection == "softmax":
        return _route(order="topk_then_score", renormalize=False)(block, num_experts)
    if selection == "sigmoid":
        return _route(scoring="sigmoid", order="topk_then_score", renormalize="gate.norm_topk_prob")(
            block, num_experts)
    return None


def _nemotron_h_route(block: nn.Module, num_experts: int) -> tuple[RouteSpec, dict[str, str]] | None:
    """DeepSeek-V3's routing; a block whose experts run in a latent space (``moe_latent_size``: projections
    around the experts) is not modelled."""
    if not isinstance(block.get_submodule("fc1_latent_proj"), nn.Identity):
        return None
    return _DEEPSEEK_V3_ROUTE(block, num_experts)


def _axk2_route(block: nn.Module, num_experts: int) -> tuple[RouteSpec, dict[str, str]] | None:
    """DeepSeek-V3's routing for a router that chooses from all experts; with expert groups (``num_group``),
    A.X-K2 gives the experts of the groups left out a choice value of 0, not -inf, so one of them wins over
    an expert whose biased score is negative: not modelled."""
    if _setting(block, "gate.num_group") is not None:
        return None
    return _DEEPSEEK_V3_ROUTE(block, num_experts)


def _longcat_flash_route(block: nn.Module, num_experts: int) -> tuple[RouteSpec, dict[str, str]] | None:
    """Softmax scores, a score-correction bias for the choice only, not renormalized, scaled (the router's
    ``classifier.bias`` is never applied by the model); zero-compute (identity) experts, ``zero_expert_num``,
    are not modelled."""
    # transformers 5.25 keeps the setting on the block, 5.24 on its experts
    if getattr(block, "zero_expert_num", None) or getattr(block.experts, "zero_expert_num", None):
        return None
    return _route(weight="router.classifier.weight", top_k="router.top_k", renormalize=False,
                  scaling="router.routed_scaling_factor", bias="router.e_score_correction_bias")(block, num_experts)


def _step3p7_route(block: nn.Module, num_experts: int) -> tuple[RouteSpec, dict[str, str]] | None:
    """Sigmoid scores, a score-correction bias for the choice only, renormalized, the experts' sum scaled by
    the block; a layer whose routed or shared experts clamp after the activation (``swiglu_limits``) is not
    modelled."""
    if any(_is_clamp(_setting(block, path)) for path in ("experts.limit", "shared_experts.limit")):
        return None
    return _route(scoring="sigmoid", bias="gate.e_score_correction_bias", scaling="routed_scaling_factor")(
        block, num_experts)


# Routings several families share: DeepSeek-V3's (sigmoid scores, a score-correction bias for the choice
# only, group-limited top-k, renormalized and scaled weights), and top-k of the logits of the block's
# ``router`` then softmax over the chosen k (GraniteMoE), and softmax then top-k renormalized when the
# ``gate`` router's ``norm_topk_prob`` says so (OLMoE, the Qwen MoEs).
_DEEPSEEK_V3_ROUTE = _route(scoring="sigmoid", renormalize="gate.norm_topk_prob", renorm_eps=1e-20,
                            scaling="gate.routed_scaling_factor", bias="gate.e_score_correction_bias", groups="gate")
_ROUTER_TOPK_THEN_SOFTMAX = _route(weight="router.weight", top_k="router.top_k", order="topk_then_score",
                                   renormalize=False)
_SOFTMAX_TOPK_ROUTE = _route(renormalize="gate.norm_topk_prob")


def _stacked_moe(family: str, route_of: RouteOf, shared: str = "", shared_gate: str = "") -> ToSpec:
    return _moe_block(family, route_of, shared, shared_gate, experts_of=_stacked_experts)


def _deepseek_v3_moe(family: str) -> ToSpec:
    """DeepSeek-V3-style blocks: its routing, standard-layout experts and always-on shared experts."""
    return _stacked_moe(family, _DEEPSEEK_V3_ROUTE, "shared_experts")


# The built-in recognizers, by the import path of their class; the registry of ``moec.frontend.recognize``
# starts with them.
HF = "transformers.models"
BUILTIN_BLOCKS: list[tuple[str, ToSpec]] = [
    (f"{HF}.llama.modeling_llama.LlamaMLP", _gated_mlp("llama")),
    (f"{HF}.mistral.modeling_mistral.MistralMLP", _gated_mlp("mistral")),
    (f"{HF}.qwen2.modeling_qwen2.Qwen2MLP", _gated_mlp("qwen2")),
    (f"{HF}.qwen3.modeling_qwen3.Qwen3MLP", _gated_mlp("qwen3")),
    (f"{HF}.gemma.modeling_gemma.GemmaMLP", _gated_mlp("gemma")),
    (f"{HF}.qwen2_moe.modeling_qwen2_moe.Qwen2MoeMLP", _gated_mlp("qwen2_moe")),
    (f"{HF}.qwen3_moe.modeling_qwen3_moe.Qwen3MoeMLP", _gated_mlp("qwen3_moe")),
    (f"{HF}.olmoe.modeling_olmoe.OlmoeMLP", _gated_mlp("olmoe")),
    (f"{HF}.deepseek_v3.modeling_deepseek_v3.DeepseekV3MLP", _gated_mlp("deepseek_v3")),
    (f"{HF}.gpt2.modeling_gpt2.GPT2MLP", _gpt2_mlp),
    (f"{HF}.gpt_neox.modeling_gpt_neox.GPTNeoXMLP", _plain_mlp("gpt_neox", "dense_h_to_4h", "dense_4h_to_h")),
    (f"{HF}.gptj.modeling_gptj.GPTJMLP", _plain_mlp("gptj", "fc_in", "fc_out")),
    (f"{HF}.falcon.modeling_falcon.FalconMLP", _plain_mlp("falcon", "dense_h_to_4h", "dense_4h_to_h")),
    (f"{HF}.clip.modeling_clip.CLIPMLP", _plain_mlp("clip", "fc1", "fc2", act="activation_fn")),
    (f"{HF}.t5.modeling_t5.T5DenseActDense", _t5_ffn),
    (f"{HF}.t5.modeling_t5.T5DenseGatedActDense", _t5_ffn),
    (f"{HF}.bert.modeling_bert.BertLayer", _bert_layer("bert")),
    (f"{HF}.roberta.modeling_roberta.RobertaLayer", _bert_layer("roberta")),
    (f"{HF}.xlm_roberta.modeling_xlm_roberta.XLMRobertaLayer", _bert_layer("xlm_roberta")),
    (f"{HF}.camembert.modeling_camembert.CamembertLayer", _bert_layer("camembert")),
    (f"{HF}.electra.modeling_electra.ElectraLayer", _bert_layer("electra")),
    (f"{HF}.mixtral.modeling_mixtral.MixtralSparseMoeBlock", _stacked_moe("mixtral", _route())),
    (f"{HF}.olmoe.modeling_olmoe.OlmoeSparseMoeBlock", _stacked_moe("olmoe", _SOFTMAX_TOPK_ROUTE)),
    (f"{HF}.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock",
     _stacked_moe("qwen2_moe", _SOFTMAX_TOPK_ROUTE, "shared_expert", "shared_expert_gate")),
    (f"{HF}.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock", _stacked_moe("qwen3_moe", _SOFTMAX_TOPK_ROUTE)),
    (f"{HF}.deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE", _deepseek_v3_moe("deepseek_v3")),
    (f"{HF}.glm4_moe.modeling_glm4_moe.Glm4MoeMLP", _gated_mlp("glm4_moe")),
    (f"{HF}.glm4_moe.modeling_glm4_moe.Glm4MoeMoE", _deepseek_v3_moe("glm4_moe")),
    (f"{HF}.dots1.modeling_dots1.Dots1MLP", _gated_mlp("dots1")),
    (f"{HF}.dots1.modeling_dots1.Dots1MoE", _deepseek_v3_moe("dots1")),
    (f"{HF}.flex_olmo.modeling_flex_olmo.FlexOlmoSparseMoeBlock", _stacked_moe("flex_olmo", _SOFTMAX_TOPK_ROUTE)),
    (f"{HF}.minimax.modeling_minimax.MiniMaxSparseMoeBlock", _stacked_moe("minimax", _route())),
    (f"{HF}.granitemoe.modeling_granitemoe.GraniteMoeMoE", _stacked_moe("granitemoe", _ROUTER_TOPK_THEN_SOFTMAX)),
    (f"{HF}.gpt_oss.modeling_gpt_oss.GptOssMLP",
     _moe_block("gpt_oss", _route(weight="router.weight", top_k="router.top_k", order="topk_then_score",
                                  renormalize=False, logit_bias="router.bias"))),
    (f"{HF}.qwen3_next.modeling_qwen3_next.Qwen3NextSparseMoeBlock",
     _moe_block("qwen3_next", _SOFTMAX_TOPK_ROUTE, "shared_expert", "shared_expert_gate")),
    (f"{HF}.hunyuan_v1_moe.modeling_hunyuan_v1_moe.HunYuanMoEV1Moe",
     _moe_block("hunyuan_v1_moe", _route(weight="gate.wg.weight"), "shared_mlp")),
    (f"{HF}.minimax_m2.modeling_minimax_m2.MiniMaxM2SparseMoeBlock",
     _moe_block("minimax_m2", _route(top_k="top_k", scoring="sigmoid", bias="e_score_correction_bias"))),
    (f"{HF}.ernie4_5_moe.modeling_ernie4_5_moe.Ernie4_5_MoeSparseMoeBlock",
     _moe_block("ernie4_5_moe", _ernie_route, "shared_experts")),
    (f"{HF}.exaone_moe.modeling_exaone_moe.ExaoneMoeSparseMoEBlock", _deepseek_v3_moe("exaone_moe")),
    (f"{HF}.solar_open.modeling_solar_open.SolarOpenMoE", _deepseek_v3_moe("solar_open")),
    (f"{HF}.glm4_moe_lite.modeling_glm4_moe_lite.Glm4MoeLiteMoE", _deepseek_v3_moe("glm4_moe_lite")),
    (f"{HF}.kimi_linear.modeling_kimi_linear.KimiLinearMoE", _deepseek_v3_moe("kimi_linear")),
    (f"{HF}.bailing_hybrid.modeling_bailing_hybrid.BailingHybridMoE", _deepseek_v3_moe("bailing_hybrid")),
    (f"{HF}.deepseek_v2.modeling_deepseek_v2.DeepseekV2Moe",
     _moe_block("deepseek_v2", _deepseek_v2_route, "shared_experts")),
    (f"{HF}.mistral4.modeling_mistral4.Mistral4MoE",
     _moe_block("mistral4", _route(renormalize="gate.norm_topk_prob", renorm_eps=1e-20,
                                    scaling="gate.routed_scaling_factor", groups="gate"), "shared_experts")),
    (f"{HF}.mimo_v2_flash.modeling_mimo_v2_flash.MiMoV2FlashMoE",
     _moe_block("mimo_v2_flash", _DEEPSEEK_V3_ROUTE)),
    (f"{HF}.hy_v4.modeling_hy_v4.HYV4MoE", _moe_block("hy_v4", _DEEPSEEK_V3_ROUTE, "shared_experts")),
    (f"{HF}.qwen3_5_moe.modeling_qwen3_5_moe.Qwen3_5MoeSparseMoeBlock",
     _moe_block("qwen3_5_moe", _route(), "shared_expert", "shared_expert_gate")),
    (f"{HF}.qwen4_exp.modeling_qwen4_exp.Qwen4ExpTextSparseMoeBlock",
     _moe_block("qwen4_exp", _SOFTMAX_TOPK_ROUTE, "shared_expert", "shared_expert_gate")),
    (f"{HF}.mellum.modeling_mellum.MellumSparseMoeBlock", _moe_block("mellum", _SOFTMAX_TOPK_ROUTE)),
    (f"{HF}.lara_mini.modeling_lara_mini.LaraMiniSparseMoeBlock",
     _moe_block("lara_mini", _SOFTMAX_TOPK_ROUTE, "shared_expert")),
    (f"{HF}.granitemoe_swa.modeling_granitemoe_swa.GraniteMoeSWAMoE",
     _moe_block("granitemoe_swa", _ROUTER_TOPK_THEN_SOFTMAX)),
    (f"{HF}.aria.modeling_aria.AriaTextMoELayer", _moe_block("aria", _ROUTER_TOPK_THEN_SOFTMAX, "shared_experts")),
    (f"{HF}.kolibri1.modeling_kolibri1.Kolibri1SparseMoeBlock",
     _moe_block("kolibri1", _route(scoring="sigmoid", order="topk_then_score", renormalize="gate.norm_topk_prob",
                                    bias="gate.e_score_correction_bias"), "shared_experts")),
    (f"{HF}.hy_v3.modeling_hy_v3.HYV3MoE",
     _moe_block("hy_v3", _route(scoring="sigmoid", renorm_eps=1e-20, scaling="gate.router_scaling_factor",
                                 bias="e_score_correction_bias"), "shared_experts")),
    (f"{HF}.afmoe.modeling_afmoe.AfmoeSparseMoeBlock",
     _moe_block("afmoe", _route(weight="router.gate.weight", top_k="router.top_k", scoring="sigmoid",
                                 renorm_eps=1e-20, scaling="router.route_scale", bias="expert_bias"),
                 "shared_experts")),
    (f"{HF}.laguna.modeling_laguna.LagunaSparseMoeBlock", _moe_block("laguna", _laguna_route, "shared_experts")),
    (f"{HF}.lfm2_moe.modeling_lfm2_moe.Lfm2MoeSparseMoeBlock", _moe_block("lfm2_moe", _lfm2_moe_route)),
    (f"{HF}.deepseek_v32.modeling_deepseek_v32.DeepseekV32MoE", _deepseek_v3_moe("deepseek_v32")),
    (f"{HF}.dots3_note.modeling_dots3_note.Dots3NoteTextMoE", _deepseek_v3_moe("dots3_note")),
    (f"{HF}.axk1.modeling_axk1.AXK1MoE", _deepseek_v3_moe("axk1")),
    (f"{HF}.axk2.modeling_axk2.AXK2MoE", _moe_block("axk2", _axk2_route, "shared_experts")),
    (f"{HF}.beam.modeling_beam.BeamMoE",
     _stacked_moe("beam", _route(scoring="sigmoid", renormalize="gate.norm_topk_prob", renorm_eps=1e-20,
                                 scaling="routed_scaling_factor", bias="gate.e_score_correction_bias", groups="gate"))),
    (f"{HF}.deepseek_ocr2.modeling_deepseek_ocr2.DeepseekOcr2TextMoe",
     _moe_block("deepseek_ocr2", _deepseek_v2_route, "shared_experts")),
    (f"{HF}.unlimited_ocr.modeling_unlimited_ocr.UnlimitedOcrTextMoe",
     _moe_block("unlimited_ocr", _deepseek_v2_route, "shared_experts")),
    (f"{HF}.mistral_large4.modeling_mistral_large4.MistralLarge4TextMoE",
     _moe_block("mistral_large4", _route(renorm_eps=1e-20, scaling="gate.routed_scaling_factor", groups="gate"),
                "shared_experts")),
    (f"{HF}.nemotron_h.modeling_nemotron_h.NemotronHMoE",
     _moe_block("nemotron_h", _nemotron_h_route, "shared_experts")),
    (f"{HF}.longcat_flash.modeling_longcat_flash.LongcatFlashMoE",
     _stacked_moe("longcat_flash", _longcat_flash_route)),
    (f"{HF}.step3p7.modeling_step3p7.Step3p7SparseMoeBlock",
     _stacked_moe("step3p7", _step3p7_route, "shared_experts")),
    (f"{HF}.qwen3_vl_moe.modeling_qwen3_vl_moe.Qwen3VLMoeTextSparseMoeBlock", _stacked_moe("qwen3_vl_moe", _route())),
    (f"{HF}.qwen3_omni_moe.modeling_qwen3_omni_moe.Qwen3OmniMoeThinkerTextSparseMoeBlock",
     _stacked_moe("qwen3_omni_moe", _SOFTMAX_TOPK_ROUTE)),
    (f"{HF}.openai_privacy_filter.modeling_openai_privacy_filter.OpenAIPrivacyFilterMLP",
     _moe_block("openai_privacy_filter", _route(weight="router.weight", top_k="router.top_k",
                                                order="topk_then_score", renormalize=False, logit_bias="router.bias"))),
    (f"{HF}.glm4v_moe.modeling_glm4v_moe.Glm4vMoeTextMoE", _deepseek_v3_moe("glm4v_moe")),
    (f"{HF}.glm_moe_dsa.modeling_glm_moe_dsa.GlmMoeDsaMoE", _deepseek_v3_moe("glm_moe_dsa")),
    (f"{HF}.glm5_next.modeling_glm5_next.Glm5NextTextMoE",
     _moe_block("glm5_next", _DEEPSEEK_V3_ROUTE, "shared_experts")),  # clamped experts and shared expert
    (f"{HF}.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe.Ernie4_5_VLMoeSparseMoeBlock",
     _moe_block("ernie4_5_vl_moe", _ernie_route)),  # one per modality; the shared expert is the outer block's
    (f"{HF}.hy_v4_vl.modeling_hy_v4_vl.HYV4VLMoE", _moe_block("hy_v4_vl", _DEEPSEEK_V3_ROUTE, "shared_experts")),
    (f"{HF}.flint.modeling_flint.FlintSparseMoeBlock",
     _moe_block("flint", _route(scoring="sigmoid", renormalize="gate.norm_topk_prob"), "shared_expert")),
    (f"{HF}.granitemoehybrid.modeling_granitemoehybrid.GraniteMoeHybridMoE",
     _stacked_moe("granitemoehybrid", _ROUTER_TOPK_THEN_SOFTMAX)),
    (f"{HF}.granitemoeshared.modeling_granitemoeshared.GraniteMoeSharedMoE",  # its shared MLP: a dense FFN
     _stacked_moe("granitemoeshared", _ROUTER_TOPK_THEN_SOFTMAX)),
    (f"{HF}.jamba.modeling_jamba.JambaSparseMoeBlock",
     _moe_block("jamba", _route(weight="router.weight", top_k="router.top_k", renormalize=False))),
    (f"{HF}.llama4.modeling_llama4.Llama4TextMoe",
     _moe_block("llama4", _route(weight="router.weight", top_k="router.top_k", scoring="sigmoid",
                                 order="topk_then_score", renormalize=False), "shared_expert",
                experts_of=_llama4_experts)),
    (f"{HF}.cohere2_moe.modeling_cohere2_moe.Cohere2MoeSparseMoeBlock",
     _moe_block("cohere2_moe", _cohere2_moe_route, "shared_experts")),
    (f"{HF}.dbrx.modeling_dbrx.DbrxFFN", _moe_block("dbrx", _dbrx_route, experts_of=_dbrx_experts)),
    (f"{HF}.dbrx.modeling_dbrx.DbrxExperts", _dbrx_experts),  # under a router moec does not model
]
