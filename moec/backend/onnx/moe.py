"""How moec's MoE ops become ONNX: two lowerings, chosen per export.

* ``portable``: standard ONNX ops only. ``moe.route`` is moec's reference router (MatMul, Softmax or
  Sigmoid, TopK, GatherElements ...); ``moe.experts`` runs each expert on the rows routed to it
  (``experts_portable``: Equal, NonZero, Gather, MatMul, ScatterND with add), so a token costs k expert
  evaluations, as in the torch runner.
* ``ort``: onnxruntime's fused ``com.microsoft.MoE`` op for a ``moe.route`` + ``moe.experts`` pair. The
  op takes router logits and does softmax, top-k and (optionally) renormalization itself. Routings it
  cannot express (sigmoid scores, a choice bias, grouped top-k, scaled weights) are chosen by the
  portable router and handed to the op as logits that make it pick the same experts with proportional
  weights, its output rescaled per token (``choice_logits``); so are routings the model computes with its
  own ops, where the graph proves the weights >= 0 and a token's experts distinct
  (``moec.ir.routing_facts``), and routings that ``moe.experts`` itself changes (an ``expert_map`` from
  merging, a dynamic-skip threshold), applied before the choice becomes logits. Experts whose activation
  the op does not compute exactly (``ort_experts_support`` says why) fall back to the portable lowering
  with a warning.

com.microsoft.MoE, as checked against onnxruntime 1.32's CPU kernel and its schema:
  input [T, H]; router_probs [T, E] (raw logits: the op applies softmax itself);
  fc1_experts_weights [E, F_in, H] and fc2_experts_weights [E, H, F] (moec's own ``w_in``/``w_out``
  layouts); fc1/fc2 biases [E, F_in] / [E, H]. Gated experts use ``activation_type="swiglu"``, which
  computes ``g * sigmoid(activation_alpha * g) * (u + activation_beta)`` after clamping
  ``g <= swiglu_limit`` and ``|u| <= swiglu_limit`` when that attribute is set: alpha 1 is silu, alpha
  1.702 moec's ``quick_gelu``, and beta and the limit carry GPT-OSS's clamped gating (``up_offset``,
  ``limit``) exactly. The CPU kernel accepts only the interleaved gate/up layout (``swiglu_fusion=1``:
  rows g0, u0, g1, u1 ...; it rejects 2 with "CPU MoE only supports interleaved SwiGLU format"). Its
  ``gelu`` is an approximation (3e-4 from erf-gelu on unit-scale inputs), so ungated experts are fused
  only with silu and relu.

Speed on the CPU execution provider (onnxruntime 1.32, float32): the MoE kernel has no weight
pre-packing and hands MLAS each expert's [out, in] weights with TransB on every call, so MLAS
transposes and packs them again per call, where the portable lowering's Gemms get their initializers
packed once at session creation; it also runs SwiGLU as a scalar loop. The [E, in, out] layout it
accepts by shape is still read as [out, in] (wrong results), and swiglu_fusion 0 or 2 is rejected, so
no layout or attribute avoids this. On CPU, ``ort`` ran at 0.5x to 0.9x the speed of ``portable`` for
hidden 512 / FFN 1536 experts at 1 to 256 tokens; it wins only where the portable graph's per-node cost
dominates (small experts, few tokens). See tools/bench/onnx_moe_op.py and docs/BENCHMARKS.md.

com.microsoft.QMoE takes quantized experts the same way (checked against onnxruntime 1.32 by running
it): fc1/fc2 weights uint8 ``[E, R, C * bits / 8]`` (moec's packed rows, matrix after matrix), with
``block_size`` = moec's group, scales ``[E, R, C / group]`` in the input's type and zero points packed
like the codes, ``[E, R, ceil(C / group * bits / 8)]``; gated fc1 rows interleaved as for MoE. Its CPU
kernel matches moec's 4-bit experts (~1e-7 relative). At 2 bits it reads the weights right (one-hot inputs
read them back exactly) but its results on other inputs depart from the dequantized experts' by 0.2-0.9%
relative once an expert's hidden or FFN size reaches 128, past the export's parity bound; 3-bit experts
need float16 activations there and 8-bit ones come out 1% off moec's affine dequantization, so those
(and experts of mixed widths) use the portable lowering. It renormalizes the chosen routing weights even
with ``normalize_routing_weights=0``, so softmax routing without renormalization (OLMoE) reaches it as a
choice (``choice_logits``, whose weights sum to 1 already).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import onnx
import onnxscript
import torch
import torch.nn.functional as F
from torch._ops import OpOverload

from moec.frontend.blocks import ExpertsSpec, RouteSpec
from moec.ir.quant import QuantizedType
from moec.kernels import reference
from moec.kernels.quant import QuantizedWeight, dequantize_codes, pack_codes, unpack_codes
from moec.kernels.skip import skipped_pairs

LOWERINGS = ("portable", "ort")

MICROSOFT = onnxscript.values.Opset("com.microsoft", 1)


def contrib_op(name: str, inputs: list[tuple[str, str]], attributes: dict[str, str],
               types: dict[str, list[str]], optional: tuple[str, ...] = ()) -> onnxscript.values.Op:
    """A com.microsoft op for translations, with the signature moec uses (the onnx package ships none).

    ``inputs`` are (name, type parameter) pairs, those named in ``optional`` optional; ``attributes`` map
    names to ``int``, ``float`` or ``string``; the output has the first input's type.
    """
    param = onnx.defs.OpSchema.FormalParameter
    option = onnx.defs.OpSchema.FormalParameterOption
    formal = [param(n, t, param_option=option.Optional if n in optional else option.Single) for n, t in inputs]
    kinds = {"int": onnx.defs.OpSchema.AttrType.INT, "float": onnx.defs.OpSchema.AttrType.FLOAT,
             "string": onnx.defs.OpSchema.AttrType.STRING}
    attrs = [onnx.defs.OpSchema.Attribute(n, kinds[kind], "") for n, kind in attributes.items()]
    schema = onnx.defs.OpSchema(name, MICROSOFT.domain, MICROSOFT.version, inputs=formal,
                                outputs=[param("output", inputs[0][1])],
                                type_constraints=[(t, allowed, "") for t, allowed in types.items()],
                                attributes=attrs)
    return onnxscript.values.Op(MICROSOFT, name, schema)


MOE = contrib_op(
    "MoE",
    inputs=[("input", "T"), ("router_probs", "T"), ("fc1_experts_weights", "T"), ("fc1_experts_bias", "T"),
            ("fc2_experts_weights", "T"), ("fc2_experts_bias", "T")],
    attributes={"k": "int", "normalize_routing_weights": "int", "activation_type": "string",
                "activation_alpha": "float", "activation_beta": "float", "swiglu_fusion": "int",
                "swiglu_limit": "float"},
    types={"T": ["tensor(float)", "tensor(float16)"]},
    optional=("fc1_experts_bias", "fc2_experts_bias"),
)
QMOE = contrib_op(
    "QMoE",
    inputs=[("input", "T"), ("router_probs", "T"), ("fc1_experts_weights", "T1"), ("fc1_scales", "T"),
            ("fc1_experts_bias", "T"), ("fc2_experts_weights", "T1"), ("fc2_scales", "T"),
            ("fc2_experts_bias", "T"), ("fc3_experts_weights", "T1"), ("fc3_scales", "T"),
            ("fc3_experts_bias", "T"), ("fc1_zero_points", "T1"), ("fc2_zero_points", "T1")],
    attributes={"k": "int", "normalize_routing_weights": "int", "activation_type": "string",
                "activation_alpha": "float", "activation_beta": "float", "swiglu_fusion": "int",
                "swiglu_limit": "float", "expert_weight_bits": "int", "block_size": "int", "weights_prepacked": "int"},
    types={"T": ["tensor(float)", "tensor(float16)"], "T1": ["tensor(uint8)"]},
    optional=("fc1_experts_bias", "fc2_experts_bias", "fc3_experts_weights", "fc3_scales", "fc3_experts_bias"),
)
QMOE_WIDTHS = (4,)
ORT_ACTIVATIONS = {"silu": "silu", "relu": "relu"}  # moec act -> MoE activation_type (ungated)
SWIGLU_ALPHAS = {"silu": 1.0, "quick_gelu": 1.702}  # moec act of gated experts -> swiglu's activation_alpha


# ----------------------------------------------------------------------------------------------
# portable: standard ONNX ops, traced from torch code
# ----------------------------------------------------------------------------------------------


def route_portable(x: torch.Tensor, router: torch.Tensor, router_bias: torch.Tensor | None, spec: RouteSpec,
                   router_logit_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference router: every op it uses has a standard ONNX form."""
    return reference.route(x, router, router_bias, spec, router_logit_bias)


def experts_portable(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                     w_in: torch.Tensor, w_out: torch.Tensor, b_in: torch.Tensor | None,
                     b_out: torch.Tensor | None, spec: ExpertsSpec, expert_map: list[int] | None = None,
                     skip_threshold: float = 0.0) -> torch.Tensor:
    """Routed experts with only exportable ops: x [..., H], indices/weights [..., k] -> [..., H].

    ``expert_map`` and ``skip_threshold`` are ``moe.experts``' attributes: router ids become stored ids
    through a Gather on the map (two pairs of a token may then reach one expert: their weights add), and
    the pairs ``moec.kernels.skip.skipped_pairs`` drops do not run. The loop over experts is unrolled at
    export; each expert picks the tokens routed to it with one NonZero, so it runs on its own rows only,
    and adds its weighted output (or its output on weighted rows) with a scatter-add.
    """
    tokens = x.reshape(-1, x.shape[-1])  # [T, H]
    top_k = indices.shape[-1]
    flat_indices = reference.remap_experts(indices, expert_map).reshape(-1, top_k)  # [T, k] stored ids
    flat_weights = weights.reshape(-1, top_k).float()  # [T, k]
    kept = ~skipped_pairs(flat_weights, skip_threshold) if skip_threshold else None  # [T, k]
    out = torch.zeros_like(tokens)
    for expert in range(spec.num_experts):
        chosen = flat_indices == expert  # [T, k]
        if kept is not None:
            chosen = chosen & kept
        token_ids = torch.nonzero(chosen.any(dim=-1)).squeeze(-1)  # [n]
        token_weights = (flat_weights * chosen).sum(dim=-1)  # [T]: the expert's routing weight, 0 if unrouted
        rows = reference.weighted_rows(tokens[token_ids], token_weights[token_ids], spec)
        hidden = F.linear(rows, w_in[expert], None if b_in is None else b_in[expert])
        if spec.gated:
            gate, up = hidden.chunk(2, dim=-1)
            hidden = reference.gated_activation(gate, up, spec)
        else:
            hidden = reference.activation(spec.act)(hidden)
        y = F.linear(hidden, w_out[expert], None if b_out is None else b_out[expert])  # [n, H]
        y = reference.weighted_outputs(y, token_weights[token_ids], spec)
        out = out.index_put((token_ids,), y.to(out.dtype), accumulate=True)
    return out.reshape(x.shape)


# ----------------------------------------------------------------------------------------------
# ort: com.microsoft.MoE
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OrtMoESupport:
    """Whether a route + experts pair maps onto com.microsoft.MoE, and how.

    ``routes_itself``: the op computes the routing from router logits (with ``normalize``); otherwise the
    portable router chooses and the op gets that choice as logits (``choice_logits``); ``reason`` says why.
    """

    ok: bool
    reason: str = ""
    normalize: bool = False
    routes_itself: bool = True


def ort_experts_support(experts: ExpertsSpec) -> str:
    """Why com.microsoft.MoE cannot compute these experts exactly ("" if it can)."""
    if experts.weighted_input:
        return "experts that take the routing weight on their input (the op scales their outputs)"
    if experts.gated and experts.act not in SWIGLU_ALPHAS:
        return f"gated {experts.act} experts (the op gates with x * sigmoid(alpha * x) only)"
    if not experts.gated and experts.act not in ORT_ACTIVATIONS:
        return f"{experts.act} experts (the op's activations do not match it exactly)"
    return ""


def ort_moe_support(route: RouteSpec, experts: ExpertsSpec, packed: bool = False) -> OrtMoESupport:
    """Whether com.microsoft.MoE (QMoE for ``packed`` experts) can run these experts exactly, and whether it
    can also do the routing.

    The op scores with softmax over all experts and picks the top k; ``normalize_routing_weights``
    renormalizes the chosen k. Softmax then renormalize equals softmax over the chosen logits, so
    ``topk_then_score`` softmax routing maps to ``normalize=1`` too. onnxruntime's CPU QMoE renormalizes
    whatever the attribute says, so unrenormalized softmax routing reaches it as a choice. Any other routing
    with weights >= 0 (sigmoid, choice bias, groups, scaling) is chosen by the portable router and handed
    over as logits.
    """
    unsupported = ort_experts_support(experts)
    if unsupported:
        return OrtMoESupport(False, unsupported)
    if route.scaling < 0:
        return OrtMoESupport(False, f"routing weights scaled by {route.scaling} (the op takes weights >= 0)")
    own_routing = route_beyond_the_op(route)
    if own_routing:
        return OrtMoESupport(True, own_routing, routes_itself=False)
    normalize = route.renormalize or route.order == "topk_then_score"
    if packed and not normalize:
        return OrtMoESupport(True, "softmax routing without renormalization (onnxruntime's CPU QMoE renormalizes "
                                   "the chosen weights regardless of normalize_routing_weights)", routes_itself=False)
    return OrtMoESupport(True, normalize=normalize)


def route_beyond_the_op(route: RouteSpec) -> str:
    """Why the op's own softmax + top-k cannot compute this routing ("" if it can)."""
    if route.scoring != "softmax":
        return f"{route.scoring} router scoring (the op scores with softmax)"
    if route.has_bias:
        return "a router score-correction bias (the op has no selection bias)"
    if route.n_group > 1:
        return "grouped top-k routing (the op picks from all experts)"
    if route.scaling != 1.0:
        return f"routing weights scaled by {route.scaling} (the op cannot scale them)"
    if route.renormalize and route.renorm_eps > 1e-6:
        return f"renormalization with eps {route.renorm_eps} (the op adds none)"
    return ""


CHOICE_FLOOR = -1e4  # logit of an expert not chosen: exp(-1e4 - max) is 0 in float32 for any chosen weight


def choice_logits(indices: torch.Tensor, weights: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] under which the op (softmax, top-k, no renormalization) computes the routing
    ``indices``/``weights`` [T, k] (weights >= 0), and the per-token sum ``sum(w)`` [T, 1] that turns the op's
    output into ``sum_i w_i f_i(x)``: each expert's log-weight (the weights of a token's pairs that reach
    one expert added), ``CHOICE_FLOOR`` for experts of weight 0, so the op weighs them exactly 0.
    """
    weights = weights.float()
    dense = torch.zeros((indices.shape[0], num_experts), dtype=torch.float32, device=weights.device)
    dense = dense.scatter_add(1, indices, weights)  # [T, E]
    logits = torch.where(dense > 0, dense.log(), CHOICE_FLOOR)
    return logits, weights.sum(dim=-1, keepdim=True)


def qmoe_support(w_in: QuantizedType | None, w_out: QuantizedType | None) -> str:
    """Why com.microsoft.QMoE cannot take these expert weights ("" if it can; both None: float experts)."""
    if w_in is None and w_out is None:
        return ""
    if w_in is None or w_out is None:
        return "experts with one float and one quantized weight (QMoE quantizes both)"
    widths = set(w_in.bits) | set(w_out.bits)
    if len(widths) > 1 or w_in.group != w_out.group:
        return f"experts of mixed widths {sorted(widths)} (QMoE takes one width and one group size)"
    if widths - set(QMOE_WIDTHS):
        return f"{widths.pop()}-bit experts (onnxruntime's CPU QMoE matches moec's dequantized experts for 4 bits only)"
    return ""


def interleave_gate_up(tensor: torch.Tensor) -> torch.Tensor:
    """[E, 2F, ...] with gate rows then up rows -> rows g0, u0, g1, u1 ... (swiglu_fusion=1)."""
    gate, up = tensor.chunk(2, dim=1)
    return torch.stack([gate, up], dim=2).reshape(tensor.shape)


def deinterleave_gate_up(tensor: torch.Tensor) -> torch.Tensor:
    """The inverse of ``interleave_gate_up``."""
    num_experts, rows = tensor.shape[:2]
    paired = tensor.reshape(num_experts, rows // 2, 2, *tensor.shape[2:])
    return torch.cat([paired[:, :, 0], paired[:, :, 1]], dim=1)


@torch.library.custom_op("moec_onnx::ort_moe", mutates_args=())
def ort_moe(x: torch.Tensor, router_logits: torch.Tensor, fc1: torch.Tensor, fc1_bias: torch.Tensor | None,
            fc2: torch.Tensor, fc2_bias: torch.Tensor | None, top_k: int, normalize: bool,
            activation: str, alpha: float, beta: float, limit: float | None) -> torch.Tensor:
    """com.microsoft.MoE's semantics in torch (x [T, H], router_logits [T, E], fc* in the op's layouts;
    ``alpha``, ``beta``, ``limit``: swiglu's attributes, see ``swiglu_attributes``).

    Only its shape matters for export; the eager body documents the op and lets tests check the layouts.
    """
    gated = activation == "swiglu"
    w_in = deinterleave_gate_up(fc1) if gated else fc1
    b_in = None if fc1_bias is None else (deinterleave_gate_up(fc1_bias) if gated else fc1_bias)
    scores, indices = router_logits.float().softmax(dim=-1).topk(top_k, dim=-1)
    if normalize:
        scores = scores / scores.sum(dim=-1, keepdim=True)
    act = {a: name for name, a in SWIGLU_ALPHAS.items()}[alpha] if gated else activation
    spec = ExpertsSpec(num_experts=fc1.shape[0], hidden=fc1.shape[2], intermediate=fc2.shape[2], act=act,
                       gated=gated, limit=limit if gated else None, up_offset=beta if gated else 0.0)
    return reference.experts(x, indices, scores, w_in, fc2, b_in, fc2_bias, spec)


@ort_moe.register_fake
def _(x, router_logits, fc1, fc1_bias, fc2, fc2_bias, top_k, normalize, activation, alpha, beta, limit):
    return torch.empty_like(x)


def swiglu_attributes(activation: str, alpha: float, beta: float, limit: float | None) -> dict[str, Any]:
    """The MoE/QMoE attributes of gated experts: ``act(min(g, limit)) * (clamp(u, -limit, limit) + beta)``
    with ``act(x) = x * sigmoid(alpha * x)``, weights interleaved; none for ungated experts."""
    if activation != "swiglu":
        return {}
    clamp = {} if limit is None else {"swiglu_limit": limit}
    return {"activation_alpha": alpha, "activation_beta": beta, "swiglu_fusion": 1, **clamp}


def swiglu_parameters(experts: ExpertsSpec) -> tuple[float, float, float | None]:
    """``alpha, beta, limit`` of ``swiglu_attributes`` for these experts (ignored when ungated)."""
    return SWIGLU_ALPHAS.get(experts.act, 1.0), experts.up_offset, experts.limit


def ort_moe_onnx(x, router_logits, fc1, fc1_bias, fc2, fc2_bias, top_k: int, normalize: bool, activation: str,
                 alpha: float, beta: float, limit: float | None):
    """The ONNX translation of ``moec_onnx::ort_moe``: one com.microsoft.MoE node."""
    return MOE(
        x, router_logits, fc1, fc1_bias, fc2, fc2_bias,
        k=top_k, normalize_routing_weights=int(normalize), activation_type=activation,
        **swiglu_attributes(activation, alpha, beta, limit),
    )


def qmoe_operands(weight: QuantizedWeight, gated_rows: bool) -> dict[str, torch.Tensor]:
    """One expert weight [E, R, C] in QMoE's layout, keyed by storage suffix; ``gated_rows`` interleaves them."""
    t = weight.type
    packed = weight.qweight.reshape(t.static_shape[0], t.rows, -1)
    scales, zeros = weight.scales.float(), weight.zeros
    if gated_rows:
        packed, scales, zeros = interleave_gate_up(packed), interleave_gate_up(scales), interleave_gate_up(zeros)
    blocks, bits = zeros.shape[-1], t.bits[0]
    padded = torch.cat([zeros, zeros.new_zeros(*zeros.shape[:-1], -blocks % 8)], dim=-1)  # whole bytes
    packed_zeros = pack_codes(padded.reshape(-1, padded.shape[-1]), bits).reshape(*zeros.shape[:-1], -1)
    packed_zeros = packed_zeros[..., : -(-blocks * bits // 8)]
    return {"qweight": packed.contiguous(), "scales": scales.contiguous(), "zeros": packed_zeros.contiguous()}


def dequantize_qmoe(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """The float [E, R, C] weight of ``qmoe_operands``."""
    experts, rows = packed.shape[:2]
    codes = unpack_codes(packed.reshape(experts * rows, -1), bits)
    zero_codes = unpack_codes(zeros.reshape(experts * rows, -1), bits)[:, : scales.shape[-1]]
    return dequantize_codes(codes, scales.reshape(experts * rows, -1), zero_codes).reshape(experts, rows, -1)


@torch.library.custom_op("moec_onnx::ort_qmoe", mutates_args=())
def ort_qmoe(x: torch.Tensor, router_logits: torch.Tensor, fc1: torch.Tensor, fc1_scales: torch.Tensor,
             fc1_zeros: torch.Tensor, fc1_bias: torch.Tensor | None, fc2: torch.Tensor, fc2_scales: torch.Tensor,
             fc2_zeros: torch.Tensor, fc2_bias: torch.Tensor | None, top_k: int, normalize: bool, activation: str,
             alpha: float, beta: float, limit: float | None, bits: int, group: int) -> torch.Tensor:
    """com.microsoft.QMoE's semantics on onnxruntime's CPU kernel: ``ort_moe`` on the weights ``qmoe_operands``
    packs, the chosen weights renormalized whatever ``normalize`` says (measured on onnxruntime 1.32)."""
    return ort_moe(x, router_logits, dequantize_qmoe(fc1, fc1_scales, fc1_zeros, bits), fc1_bias,
                   dequantize_qmoe(fc2, fc2_scales, fc2_zeros, bits), fc2_bias, top_k, True, activation,
                   alpha, beta, limit)


@ort_qmoe.register_fake
def _(x, router_logits, fc1, fc1_scales, fc1_zeros, fc1_bias, fc2, fc2_scales, fc2_zeros, fc2_bias, top_k,
      normalize, activation, alpha, beta, limit, bits, group):
    return torch.empty_like(x)


def ort_qmoe_onnx(x, router_logits, fc1, fc1_scales, fc1_zeros, fc1_bias, fc2, fc2_scales, fc2_zeros, fc2_bias,
                  top_k: int, normalize: bool, activation: str, alpha: float, beta: float, limit: float | None,
                  bits: int, group: int):
    """The ONNX translation of ``moec_onnx::ort_qmoe``: one com.microsoft.QMoE node on raw packed weights."""
    return QMOE(
        x, router_logits, fc1, fc1_scales, fc1_bias, fc2, fc2_scales, fc2_bias, None, None, None,
        fc1_zeros, fc2_zeros, k=top_k, normalize_routing_weights=int(normalize), activation_type=activation,
        expert_weight_bits=bits, block_size=group, weights_prepacked=0,
        **swiglu_attributes(activation, alpha, beta, limit),
    )


@dataclass(frozen=True)
class PackedExperts:
    """An expert weight as QMoE operands (``qmoe_operands``): packed codes, scales, zero points."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group: int


def ort_experts(x: torch.Tensor, logits: torch.Tensor, fc1: torch.Tensor | PackedExperts,
                fc1_bias: torch.Tensor | None, fc2: torch.Tensor | PackedExperts, fc2_bias: torch.Tensor | None,
                experts: ExpertsSpec, top_k: int, normalize: bool) -> torch.Tensor:
    """Routed experts as one com.microsoft.MoE (float weights) or QMoE (``PackedExperts``): x [..., H],
    router logits [T, E] for the T = x.numel() / H tokens."""
    tokens = x.reshape(-1, x.shape[-1])
    activation = "swiglu" if experts.gated else ORT_ACTIVATIONS[experts.act]
    swiglu = swiglu_parameters(experts)
    if isinstance(fc1, PackedExperts) and isinstance(fc2, PackedExperts):
        y = ort_qmoe(tokens, logits, fc1.qweight, fc1.scales, fc1.zeros, fc1_bias, fc2.qweight, fc2.scales,
                     fc2.zeros, fc2_bias, top_k, normalize, activation, *swiglu, fc1.bits, fc1.group)
    else:
        y = ort_moe(tokens, logits, fc1, fc1_bias, fc2, fc2_bias, top_k, normalize, activation, *swiglu)
    return y.reshape(x.shape)


Translations = dict[OpOverload, Callable[..., Any]]  # custom op -> the onnxscript function that translates it

TRANSLATIONS: Translations = {
    torch.ops.moec_onnx.ort_moe.default: ort_moe_onnx,
    torch.ops.moec_onnx.ort_qmoe.default: ort_qmoe_onnx,
}
