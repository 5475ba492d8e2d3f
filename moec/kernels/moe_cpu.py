"""Routed experts grouped by expert, on torch's matmuls: the torch runner's ``moe.experts`` kernel for every
dtype and device (for float32 and bfloat16 on the CPU, the runner times it, with oneDNN's matmuls, with
``F.linear`` and with ``F.grouped_mm``, against ``moec.kernels.moe_onnxruntime`` for float32, and runs the
fastest: ``torch_runner.float_experts``).

Contract (the same as the plain reference in ``moec.kernels.reference``)::

    x        [T, H]      float32 or bfloat16   hidden states, one row a token
    indices  [T, k]      int64                 chosen expert per (token, slot)
    weights  [T, k]      float32               routing weight per (token, slot)
    w_in     [E, F_in, H]                      F_in = 2F when gated: gate rows first, then up rows
    w_out    [E, H, F]
    b_in     [E, F_in] or None                 b_out [E, H] or None
    y        [T, H]      dtype of x            y[t] = sum_j weights[t, j] * expert_{indices[t, j]}(x[t])
                                               (spec.weighted_input: sum_j expert_{indices[t, j]}(weights[t, j] * x[t]))

    expert_e(v) = w_out[e] @ h + b_out[e],   h = act(g) * u  (gated; [g; u] = w_in[e] @ v + b_in[e])
                                             h = act(w_in[e] @ v + b_in[e])  (not gated)

How it runs (why each choice, measured on a 2-core AMD EPYC, Mixtral-sized experts, see
``tools/bench/moe_block.py`` and docs/BENCHMARKS.md):

* **Grouped by expert.** The T*k (token, slot) pairs are sorted by expert (a stable argsort + bincount),
  their rows gathered once into a contiguous buffer (on the CPU one kept between calls,
  ``moec.kernels.workspace``), and each expert that got tokens runs two GEMMs on
  its slice. Every used expert's weights are read exactly once per call; experts with no tokens are
  never touched. The Python loop is over experts, never over tokens.
* **oneDNN matmul where available** (``onednn=True``, the default). For the skinny GEMMs of MoE (a few to
  a few hundred rows against a 7168 x 1024 weight), MKL's ``sgemm`` behind ``torch.mm``/``F.linear`` on the
  AMD machine reaches only a fraction of memory bandwidth; oneDNN's matmul
  (``torch.ops.mkldnn._linear_pointwise``, the op inductor's CPU fusion uses, fed the plain weight, no
  prepacking) is about 2x faster there at 1-128 rows and still faster at 512. On an Intel Xeon (Emerald
  Rapids) MKL is the faster of the two at 1-4 rows and at 512 (``tools/bench/expert_gemm.py``), hence
  ``onednn=False``. oneDNN is probed once per dtype for presence *and* agreement with ``F.linear``;
  without it the same code runs on ``F.linear``.
* **Fused activation.** For silu/gelu/relu gates oneDNN applies the activation as a post-op of the gate
  GEMM and multiplies by the up projection as a binary post-op of the up GEMM, so ``act(g) * u`` never
  exists as separate tensors.
* **Combine.** Each expert's outputs are scaled by their routing weight in place and summed into ``y``
  with ``index_add_``, expert by expert (the order Hugging Face's eager loop uses, so float32 results agree to
  rounding).
* **Decode (T == 1).** No sorting at all: the k chosen experts are read directly, one matvec pair each;
  the gate and up rows go through one matvec of all 2F rows and the activation runs after it (on the
  Mixtral-sized block with 2 threads 4.3-5.0 ms for two experts against 4.7-5.5 ms with the activation
  fused into two matvecs; 1.4 vs 1.7 ms on 512 x 1536 experts).
* ``.tolist()`` of the per-expert counts is a host copy of E integers, not a device sync, on the CPU.

``experts_grouped_mm`` computes the same with two ``F.grouped_mm`` calls over all experts at once (torch's
grouped GEMM, a loop over the experts in C++), so no Python runs per expert: on an Intel Xeon the fastest of
the torch kernels from 16 tokens on, in bfloat16 and for many small experts in float32
(``tools/bench/experts_kernels.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moec.frontend.blocks import ACTIVATIONS, ExpertsSpec
from moec.kernels.reference import (
    activation,
    gated_activation,
    group_by_expert,
    weighted_outputs,
    weighted_rows,
)
from moec.kernels.workspace import gathered_rows

__all__ = ["experts_forward", "experts_grouped_mm", "grouped_mm_fits", "onednn_available"]


# oneDNN post-op name and algorithm for the activations it can fuse into the gate GEMM.
_ONEDNN_ACT = {
    "silu": ("swish", ""),
    "gelu": ("gelu", "none"),
    "gelu_tanh": ("gelu", "tanh"),
    "relu": ("relu", ""),
}


# ----------------------------------------------------------------------------------------------
# oneDNN linear: probed once per (dtype, act), falls back to F.linear
# ----------------------------------------------------------------------------------------------

_PROBED: dict[tuple[torch.dtype, str], bool] = {}


def _onednn_op():
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


def onednn_available(dtype: torch.dtype = torch.float32, act: str = "none") -> bool:
    """Whether oneDNN's linear (with fused ``act``, or ``"none"``) runs here and matches ``F.linear``.

    Probed once per (dtype, act) on a small random problem; a missing op, an exception or a result
    off by more than the dtype's rounding turns the fast path off for that combination.
    """
    key = (dtype, act)
    if key in _PROBED:
        return _PROBED[key]
    ok = False
    op = _onednn_op()
    if op is not None and torch.backends.mkldnn.is_available():
        try:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(5, 64, generator=gen).to(dtype)
            w = torch.randn(24, 64, generator=gen).to(dtype)
            b = torch.randn(24, generator=gen).to(dtype)
            o = torch.randn(5, 24, generator=gen).to(dtype)
            tol = 1e-4 if dtype == torch.float32 else 5e-2
            if act == "none":
                got = op(x, w, b, "none", [], "")
                want = F.linear(x, w, b)
            elif act == "mul":
                got = op.binary(x, o, w, b, "mul")
                want = F.linear(x, w, b) * o
            else:
                name, algo = _ONEDNN_ACT[act]
                got = op(x, w, b, name, [], algo)
                want = activation(act)(F.linear(x, w, b))
            scale = want.abs().max().clamp_min(1.0)
            ok = bool(got.shape == want.shape and ((got - want).abs().max() / scale) < tol)
        except Exception:  # noqa: BLE001 - any failure just disables the fast path
            ok = False
    _PROBED[key] = ok
    return ok


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, fast: bool) -> torch.Tensor:
    """x [M, K] @ w[N, K].T (+ b[N]) -> [M, N]."""
    if fast:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return F.linear(x, w, b)


def _gated_hidden(
    xs: torch.Tensor,
    w_in_e: torch.Tensor,
    b_in_e: torch.Tensor | None,
    spec: ExpertsSpec,
    fast: bool,
    fused: bool,
) -> torch.Tensor:
    """One expert's hidden activations for the rows ``xs`` [M, H] -> [M, F]."""
    f = spec.intermediate
    if not spec.gated:
        h = _linear(xs, w_in_e, b_in_e, fast)
        return activation(spec.act)(h)
    if fused:
        op = torch.ops.mkldnn._linear_pointwise
        name, algo = _ONEDNN_ACT[spec.act]
        bg = None if b_in_e is None else b_in_e[:f]
        bu = None if b_in_e is None else b_in_e[f:]
        gate = op(xs, w_in_e[:f], bg, name, [], algo)  # act(x @ Wg.T + bg)
        return op.binary(xs, gate, w_in_e[f:], bu, "mul")  # (x @ Wu.T + bu) * act(...)
    h = _linear(xs, w_in_e, b_in_e, fast)  # [M, 2F]
    if not spec.plain_gating:
        return gated_activation(h[:, :f], h[:, f:], spec)
    return activation(spec.act)(h[:, :f]).mul_(h[:, f:])


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def experts_forward(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    b_in: torch.Tensor | None,
    b_out: torch.Tensor | None,
    spec: ExpertsSpec,
    onednn: bool = True,
    drop_zero_weight: bool = False,
) -> torch.Tensor:
    """Routed experts, grouped by expert. Shapes and semantics: see the module docstring. ``onednn=False``
    runs every matmul on ``F.linear`` (the BLAS torch was built with, MKL on x86) even where oneDNN runs;
    ``drop_zero_weight`` skips the pairs of routing weight exactly 0 (the repeats of a merged expert)."""
    if x.dim() != 2 or indices.shape != weights.shape or indices.shape[0] != x.shape[0]:
        raise ValueError(
            f"experts_forward: expected x [T, H] and indices/weights [T, k]; got x {tuple(x.shape)}, "
            f"indices {tuple(indices.shape)}, weights {tuple(weights.shape)}"
        )
    if spec.act not in ACTIVATIONS:
        raise ValueError(f"experts_forward: unknown activation {spec.act!r}; known: {ACTIVATIONS}")
    num_tokens = x.shape[0]
    top_k = indices.shape[1]
    dtype = x.dtype
    if num_tokens == 0 or top_k == 0:
        return torch.zeros_like(x)

    x = x.contiguous()
    w_in = w_in.to(dtype).contiguous()
    w_out = w_out.to(dtype).contiguous()
    b_in = None if b_in is None else b_in.to(dtype).contiguous()
    b_out = None if b_out is None else b_out.to(dtype).contiguous()

    fast = onednn and onednn_available(dtype)
    fused = (
        fast
        and spec.gated
        and spec.plain_gating
        and spec.act in _ONEDNN_ACT
        and onednn_available(dtype, spec.act)
        and onednn_available(dtype, "mul")
    )

    if num_tokens == 1:
        return _decode(x, indices, weights, w_in, w_out, b_in, b_out, spec, fast, drop_zero_weight)

    groups = group_by_expert(indices, weights, spec.num_experts, drop_zero_weight)
    xs = gathered_rows(x, groups.token_of)  # [S, H] the rows of the pairs, sorted by expert
    y = torch.zeros_like(x)
    for expert, pairs in groups.slices():
        b_in_e = None if b_in is None else b_in[expert]
        b_out_e = None if b_out is None else b_out[expert]
        weight = groups.weight[pairs]
        h = _gated_hidden(weighted_rows(xs[pairs], weight, spec), w_in[expert], b_in_e, spec, fast, fused)  # [M, F]
        out = weighted_outputs(_linear(h, w_out[expert], b_out_e, fast), weight, spec)  # [M, H]
        y.index_add_(0, groups.token_of[pairs], out)
    return y


def _decode(x, indices, weights, w_in, w_out, b_in, b_out, spec, fast, drop_zero_weight) -> torch.Tensor:
    """T == 1: read only the k chosen experts, one matvec pair each (gate and up rows in one matvec, the
    activation after it: faster than the two post-op-fused matvecs), in expert order."""
    order = indices[0].argsort(stable=True)
    if drop_zero_weight:
        order = order[weights[0, order] != 0]
    y = torch.zeros_like(x)  # [1, H]
    for expert, weight in zip(indices[0, order].tolist(), weights[0, order].split(1), strict=True):
        b_in_e = None if b_in is None else b_in[expert]
        b_out_e = None if b_out is None else b_out[expert]
        h = _gated_hidden(weighted_rows(x, weight, spec), w_in[expert], b_in_e, spec, fast, fused=False)  # [1, F]
        y.add_(weighted_outputs(_linear(h, w_out[expert], b_out_e, fast), weight, spec))
    return y


def grouped_mm_fits(dtype: torch.dtype, device: torch.device, spec: ExpertsSpec) -> bool:
    """Whether ``experts_grouped_mm`` runs these experts: ``F.grouped_mm`` takes float32 and bfloat16 on the
    CPU, with every row of its operands a multiple of 16 bytes long."""
    if not hasattr(F, "grouped_mm") or device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    f_in = 2 * spec.intermediate if spec.gated else spec.intermediate
    return all(size * dtype.itemsize % 16 == 0 for size in (spec.hidden, spec.intermediate, f_in))


def experts_grouped_mm(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    b_in: torch.Tensor | None,
    b_out: torch.Tensor | None,
    spec: ExpertsSpec,
    drop_zero_weight: bool = False,
) -> torch.Tensor:
    """``experts_forward``'s result with one ``F.grouped_mm`` for every expert's input projection and one for
    the output projections (where ``grouped_mm_fits``); the same contract, the pairs summed in expert order."""
    dtype = x.dtype
    if x.shape[0] == 0 or indices.shape[1] == 0:
        return torch.zeros_like(x)
    groups = group_by_expert(indices, weights, spec.num_experts, drop_zero_weight)
    counts = torch.tensor(groups.counts)
    ends = counts.cumsum(0, dtype=torch.int32)
    rows = weighted_rows(gathered_rows(x.contiguous(), groups.token_of), groups.weight, spec)  # [S, H]
    h = F.grouped_mm(rows, w_in.to(dtype).transpose(1, 2), offs=ends)  # [S, F_in]
    if b_in is not None:  # each expert's bias repeated for its rows
        h.add_(b_in.to(dtype).repeat_interleave(counts, dim=0))
    f = spec.intermediate
    if not spec.gated:
        h = activation(spec.act)(h)
    elif spec.plain_gating:
        h = activation(spec.act)(h[:, :f]).mul_(h[:, f:])
    else:
        h = gated_activation(h[:, :f], h[:, f:], spec)
    out = F.grouped_mm(h.contiguous(), w_out.to(dtype).transpose(1, 2), offs=ends)  # [S, H]
    if b_out is not None:
        out.add_(b_out.to(dtype).repeat_interleave(counts, dim=0))
    return torch.zeros_like(x).index_add_(0, groups.token_of, weighted_outputs(out, groups.weight, spec))
