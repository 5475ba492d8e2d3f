"""Host side of the Triton MoE kernels: check inputs, allocate outputs, launch.

Each function takes ``kernels``, the module holding the ``@triton.jit`` kernels: the library's own
:mod:`moec.kernels.triton_moe` by default, or a plan's generated copy (:mod:`moec.backend.triton_codegen`).
Importing this module imports triton; set ``TRITON_INTERPRET=1`` first to run the kernels on the CPU.

Shapes and dtypes::

    route:    x [T, H] float, router [E, H], bias [E] | None  ->  indices int64 [T, k], weights float32 [T, k]
    align:    indices int64 [T, k]  ->  Alignment (sorted pair ids, expert of each tile, used length)
    experts:  x [T, H] float32|bfloat16|float16, indices/weights [T, k], w_in [E, F_in, H], w_out [E, H, F]
              (tensors of x's dtype, or moec.kernels.quant.QuantizedWeight, a plan's packed storage:
              codes dequantized tile by tile),
              b_in [E, F_in] | None, b_out [E, H] | None  ->  y [T, H] in x's dtype
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import triton

from moec.frontend.blocks import ExpertsSpec, RouteSpec
from moec.kernels import triton_moe
from moec.kernels.quant import QuantizedWeight

EXPERT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch options of the grouped GEMMs (one entry of the block-size table)."""

    BLOCK_M: int = 16
    BLOCK_N: int = 32
    BLOCK_K: int = 32
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 2


Weight = torch.Tensor | QuantizedWeight


def quantized_pointers(weight: QuantizedWeight) -> tuple[torch.Tensor, ...]:
    """A kernel's quantized-weight arguments for stacked experts [E, R, C]: packed codes, scales, zeros,
    bits [E] int32 and the byte offset of each expert's matrix [E] int64, on the weight's device."""
    qtype, device = weight.type, weight.qweight.device
    if qtype.rank != 3:
        raise ValueError(f"the Triton experts kernels take stacked [E, R, C] quantized weights, got {qtype}")
    offsets = [qtype.matrix_offset(e) for e in range(qtype.num_matrices)]
    return (weight.qweight, weight.scales, weight.zeros, torch.tensor(qtype.bits, dtype=torch.int32, device=device),
            torch.tensor(offsets, dtype=torch.int64, device=device))


def weight_format(weight: Weight) -> str:
    """The kernels' FORMAT for a weight (see ``triton_moe.load_weight_tile``): "plain", "int4"/"int8" when
    every expert has that width (whole-byte loads), else "mixed"."""
    if not isinstance(weight, QuantizedWeight):
        return "plain"
    widths = set(weight.type.bits)
    return f"int{widths.pop()}" if widths in ({4}, {8}) else "mixed"


def weight_args(weight: Weight) -> tuple[torch.Tensor, tuple, str, int]:
    """(plain pointer, quantized pointers, format, group) for a kernel; unused pointers get a stand-in.
    Only "mixed" reads the per-expert widths and offsets (made here: a small host-to-device copy per call)."""
    if not isinstance(weight, QuantizedWeight):
        weight = weight.contiguous()
        return weight, (weight,) * 5, "plain", 1
    w_format = weight_format(weight)
    if w_format == "mixed":
        pointers = quantized_pointers(weight)
    else:
        pointers = (weight.qweight, weight.scales, weight.zeros, weight.qweight, weight.qweight)
    return weight.qweight, pointers, w_format, weight.type.group


@dataclass(frozen=True)
class Alignment:
    """Pairs grouped by expert, each group padded to a multiple of ``block_m``.

    ``sorted_pairs`` int32 [max_padded] (padding holds ``num_pairs``), ``block_experts`` int32
    [max_padded // block_m] (the expert of each tile); both are unwritten past ``padded_total``, where the
    GEMMs never read,
    ``padded_total`` int32 [1] (on the device, so nothing waits for the host).
    """

    sorted_pairs: torch.Tensor
    block_experts: torch.Tensor
    padded_total: torch.Tensor
    num_pairs: int
    block_m: int


def next_power_of_two(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(n))


def route(
    x: torch.Tensor, router: torch.Tensor, bias: torch.Tensor | None, spec: RouteSpec,
    kernels: ModuleType = triton_moe, block_t: int = 16, logit_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing of every row of ``x`` (the semantics of :func:`moec.kernels.reference.route`;
    ``bias`` is its ``router_bias``, ``logit_bias`` its ``router_logit_bias``)."""
    if spec.n_group > 1:
        raise ValueError("the Triton router does not implement group-limited routing (n_group > 1)")
    num_tokens, hidden = x.shape
    if router.shape != (spec.num_experts, hidden):
        raise ValueError(f"router must be [{spec.num_experts}, {hidden}], got {list(router.shape)}")
    x, router = x.contiguous(), router.contiguous()
    indices = torch.empty(num_tokens, spec.top_k, dtype=torch.int64, device=x.device)
    weights = torch.empty(num_tokens, spec.top_k, dtype=torch.float32, device=x.device)
    if num_tokens == 0:
        return indices, weights
    kernels.router_topk_kernel[(triton.cdiv(num_tokens, block_t),)](
        x, router, bias if bias is not None else router, logit_bias if logit_bias is not None else router,
        indices, weights,
        num_tokens,
        HIDDEN=hidden, NUM_EXPERTS=spec.num_experts, TOP_K=spec.top_k,
        SCORING=spec.scoring, SCORE_FIRST=spec.order == "score_then_topk",
        RENORMALIZE=spec.renormalize, RENORM_EPS=float(spec.renorm_eps), SCALING=float(spec.scaling),
        HAS_BIAS=bias is not None, HAS_LOGIT_BIAS=logit_bias is not None, ROUND_LOGITS=spec.round_logits,
        BLOCK_T=block_t, BLOCK_E=next_power_of_two(spec.num_experts, 16),
        BLOCK_H=min(64, next_power_of_two(hidden, 16)), BLOCK_KS=next_power_of_two(spec.top_k),
    )
    return indices, weights


def align(indices: torch.Tensor, num_experts: int, block_m: int, kernels: ModuleType = triton_moe,
          scan_block: int = 1024) -> Alignment:
    """Group the (token, slot) pairs of ``indices`` [T, k] by expert, padding each group to ``block_m``; pairs
    with a negative expert index are left out."""
    flat = indices.reshape(-1).contiguous()
    num_pairs = flat.numel()
    # Each expert wastes at most block_m - 1 padding slots.
    max_padded = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m
    device = indices.device
    sorted_pairs = torch.empty(max_padded, dtype=torch.int32, device=device)
    block_experts = torch.empty(max_padded // block_m, dtype=torch.int32, device=device)
    padded_total = torch.empty(1, dtype=torch.int32, device=device)
    scan = min(scan_block, next_power_of_two(num_pairs, 16))
    block_e = next_power_of_two(num_experts)
    kernels.align_kernel[(num_experts,)](
        flat, sorted_pairs, block_experts, padded_total, num_pairs,
        NUM_EXPERTS=num_experts, BLOCK_E=block_e, BLOCK_M=block_m, BLOCK=scan,
        COUNT_BLOCK=min(scan, max(16, 8192 // block_e)),  # a bounded compare matrix per step
    )
    return Alignment(sorted_pairs, block_experts, padded_total, num_pairs, block_m)


def dot_precision(dtype: torch.dtype) -> str:
    """The kernels' PRECISION: "ieee" (float32 products) for float32 data and in the interpreter, else "tf32"
    (tensor cores on the data's own dtype); see ``triton_moe.multiply_accumulate``."""
    return "ieee" if dtype == torch.float32 or triton.knobs.runtime.interpret else "tf32"


def gate_up(x: torch.Tensor, w_in: Weight, b_in: torch.Tensor | None, alignment: Alignment,
            spec: ExpertsSpec, top_k: int, tiles: TileConfig, kernels: ModuleType = triton_moe) -> torch.Tensor:
    """h [num_pairs, F] in x's dtype: each pair's ``act(gate) * up`` (or ``act(up)``) for its expert."""
    h = torch.empty(alignment.num_pairs, spec.intermediate, dtype=x.dtype, device=x.device)
    num_tiles_m = alignment.block_experts.numel()
    grid = (num_tiles_m * triton.cdiv(spec.intermediate, tiles.BLOCK_N),)
    plain, quantized, w_format, group = weight_args(w_in)
    kernels.gate_up_kernel[grid](
        x, plain, *quantized, b_in if b_in is not None else plain, h,
        alignment.sorted_pairs, alignment.block_experts, alignment.padded_total,
        alignment.num_pairs, num_tiles_m,
        HIDDEN=spec.hidden, INTERMEDIATE=spec.intermediate, TOP_K=top_k, GATED=spec.gated, ACT=spec.act,
        LIMIT=float(spec.limit or 0.0), UP_OFFSET=float(spec.up_offset),
        HAS_BIAS=b_in is not None, PRECISION=dot_precision(x.dtype), W_IN_FORMAT=w_format, GROUP=group,
        BLOCK_M=tiles.BLOCK_M, BLOCK_N=tiles.BLOCK_N, BLOCK_K=tiles.BLOCK_K, GROUP_M=tiles.GROUP_M,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return h


def down(h: torch.Tensor, w_out: Weight, b_out: torch.Tensor | None, routing: torch.Tensor,
         alignment: Alignment, spec: ExpertsSpec, tiles: TileConfig, kernels: ModuleType = triton_moe) -> torch.Tensor:
    """y [num_pairs, H] in h's dtype: each pair's expert output times its routing weight (zero for pairs the
    alignment left out: those with a negative expert index)."""
    y = torch.zeros(alignment.num_pairs, spec.hidden, dtype=h.dtype, device=h.device)
    num_tiles_m = alignment.block_experts.numel()
    grid = (num_tiles_m * triton.cdiv(spec.hidden, tiles.BLOCK_N),)
    plain, quantized, w_format, group = weight_args(w_out)
    kernels.down_kernel[grid](
        h, plain, *quantized, b_out if b_out is not None else plain, routing.reshape(-1).float().contiguous(), y,
        alignment.sorted_pairs, alignment.block_experts, alignment.padded_total,
        alignment.num_pairs, num_tiles_m,
        HIDDEN=spec.hidden, INTERMEDIATE=spec.intermediate, HAS_BIAS=b_out is not None,
        PRECISION=dot_precision(h.dtype), W_OUT_FORMAT=w_format, GROUP=group,
        BLOCK_M=tiles.BLOCK_M, BLOCK_N=tiles.BLOCK_N, BLOCK_K=tiles.BLOCK_K, GROUP_M=tiles.GROUP_M,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return y


def experts(
    x: torch.Tensor, indices: torch.Tensor, routing: torch.Tensor,
    w_in: Weight, w_out: Weight, b_in: torch.Tensor | None, b_out: torch.Tensor | None,
    spec: ExpertsSpec, tiles: TileConfig = TileConfig(), kernels: ModuleType = triton_moe,
) -> torch.Tensor:
    """Routed experts combined: ``y[t] = sum_j routing[t, j] * expert_{indices[t, j]}(x[t])`` (for experts that
    weigh their input, ``sum_j expert_{indices[t, j]}(routing[t, j] * x[t])``); a pair whose expert index is
    negative is skipped (contributes nothing, costs nothing).

    Align, then the fused gate/up GEMM (with the activation), then the down GEMM (scaled by the routing
    weight); the k scaled outputs of a token are summed last. ``w_in``/``w_out`` may be quantized
    (``QuantizedWeight``): tiles are dequantized in registers, never in memory.
    """
    if x.dtype not in EXPERT_DTYPES:
        raise ValueError(f"the Triton experts kernels take {EXPERT_DTYPES}, got {x.dtype}")
    num_tokens, top_k = indices.shape
    if num_tokens == 0:
        return torch.zeros_like(x)
    x = x.contiguous()
    alignment = align(indices, spec.num_experts, tiles.BLOCK_M, kernels)
    if spec.weighted_input:  # one weighted row per pair, which the gate/up kernel reads as a token of its own
        pair_rows = x.repeat_interleave(top_k, dim=0) * routing.reshape(-1, 1).to(x.dtype)
        h = gate_up(pair_rows, w_in, b_in, alignment, spec, 1, tiles, kernels)
        routing = torch.ones_like(routing)
    else:
        h = gate_up(x, w_in, b_in, alignment, spec, top_k, tiles, kernels)
    y = down(h, w_out, b_out, routing, alignment, spec, tiles, kernels)
    return y.view(num_tokens, top_k, spec.hidden).sum(dim=1) if top_k > 1 else y
