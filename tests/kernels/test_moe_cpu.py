"""Parity of moec's CPU experts kernels (grouped by expert on oneDNN or ``F.linear``, and on ``F.grouped_mm``)
with Hugging Face's MixtralExperts and a per-slot loop.

Tolerance: 1e-5 relative (to the output's max magnitude) in float32; the kernel sums the same products
in the same expert order as HF, so only GEMM blocking differs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moec.frontend.blocks import ExpertsSpec
from moec.kernels import moe_cpu
from moec.kernels.moe_cpu import experts_forward, experts_grouped_mm, grouped_mm_fits

transformers = pytest.importorskip("transformers")
from transformers import MixtralConfig  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralExperts  # noqa: E402

RTOL = 1e-5

# The runner's torch kernels for float experts, by their expert_kernel name.
KERNELS = {
    "torch": experts_forward,
    "torch-blas": lambda *args, **kwargs: experts_forward(*args, **kwargs, onednn=False),
    "torch-grouped": experts_grouped_mm,
}


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12))


def _acts(name: str):
    return {
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
        "relu": F.relu,
        "quick_gelu": lambda v: v * torch.sigmoid(1.702 * v),
    }[name]


def loop_reference(x, indices, weights, w_in, w_out, b_in, b_out, spec: ExpertsSpec) -> torch.Tensor:
    """The definition, one (token, slot) at a time, in float64."""
    act = _acts(spec.act)
    x64 = x.double()
    y = torch.zeros_like(x64)
    for t in range(x.shape[0]):
        for j in range(indices.shape[1]):
            e = int(indices[t, j])
            h = w_in[e].double() @ x64[t]
            if b_in is not None:
                h = h + b_in[e].double()
            if spec.gated:
                f = spec.intermediate
                h = act(h[:f]) * h[f:]
            else:
                h = act(h)
            o = w_out[e].double() @ h
            if b_out is not None:
                o = o + b_out[e].double()
            y[t] += float(weights[t, j]) * o
    return y


def _routing(num_tokens: int, num_experts: int, top_k: int, gen: torch.Generator, skip: tuple[int, ...] = ()):
    """Distinct experts per token (like top-k), never choosing the experts in ``skip``."""
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    logits[:, list(skip)] = -float("inf")
    probs = logits.softmax(-1)
    w, idx = probs.topk(top_k, dim=-1)
    return idx, (w / w.sum(-1, keepdim=True)).float()


def _hf_experts(num_experts: int, hidden: int, inter: int, act: str, gen: torch.Generator) -> MixtralExperts:
    config = MixtralConfig(
        hidden_size=hidden, intermediate_size=inter, num_local_experts=num_experts, hidden_act=act
    )
    experts = MixtralExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=gen) * 0.2)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=gen) * 0.2)
    return experts


@pytest.mark.parametrize(
    ("num_tokens", "top_k", "skip"),
    [(1, 2, ()), (1, 1, ()), (1, 4, ()), (7, 1, ()), (13, 2, (0, 5)), (33, 4, (3,)), (64, 2, ())],
)
@pytest.mark.parametrize("act", ["silu", "gelu"])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_matches_hf_mixtral_experts(num_tokens, top_k, skip, act, kernel):
    gen = torch.Generator().manual_seed(num_tokens * 10 + top_k)
    num_experts, hidden, inter = 8, 48, 40
    hf = _hf_experts(num_experts, hidden, inter, act, gen)
    x = torch.randn(num_tokens, hidden, generator=gen)
    indices, weights = _routing(num_tokens, num_experts, top_k, gen, skip)
    spec = ExpertsSpec(num_experts=num_experts, hidden=hidden, intermediate=inter, act=act, gated=True)
    with torch.inference_mode():
        want = hf(x, indices, weights)
        got = KERNELS[kernel](x, indices, weights, hf.gate_up_proj, hf.down_proj, None, None, spec)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert _rel_err(got, want) < RTOL


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "relu", "quick_gelu"])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("num_tokens", [1, 9])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_bias_and_activations_match_loop(act, gated, num_tokens, kernel):
    gen = torch.Generator().manual_seed(7)
    num_experts, hidden, inter, top_k = 6, 32, 24, 3
    f_in = 2 * inter if gated else inter
    w_in = torch.randn(num_experts, f_in, hidden, generator=gen) * 0.3
    w_out = torch.randn(num_experts, hidden, inter, generator=gen) * 0.3
    b_in = torch.randn(num_experts, f_in, generator=gen)
    b_out = torch.randn(num_experts, hidden, generator=gen)
    x = torch.randn(num_tokens, hidden, generator=gen)
    indices, weights = _routing(num_tokens, num_experts, top_k, gen, skip=(2,))
    spec = ExpertsSpec(num_experts, hidden, inter, act=act, gated=gated, has_bias=True)
    want = loop_reference(x, indices, weights, w_in, w_out, b_in, b_out, spec)
    got = KERNELS[kernel](x, indices, weights, w_in, w_out, b_in, b_out, spec)
    assert _rel_err(got, want) < RTOL


@pytest.mark.parametrize("num_tokens", [1, 9])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, RTOL), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_clamped_gating_matches_reference(num_tokens, dtype, tolerance, kernel):
    """GPT-OSS's gating (limit 2 here, up + 1) on weights large enough that the clamps bind; one token takes
    the decode path."""
    from moec.kernels import reference

    gen = torch.Generator().manual_seed(7)
    spec = ExpertsSpec(6, 32, 24, act="quick_gelu", gated=True, has_bias=True, limit=2.0, up_offset=1.0)
    w_in, w_out = torch.randn(6, 48, 32, generator=gen), torch.randn(6, 32, 24, generator=gen) * 0.3
    b_in, b_out = torch.randn(6, 48, generator=gen), torch.randn(6, 32, generator=gen)
    x = torch.randn(num_tokens, 32, generator=gen)
    indices, weights = _routing(num_tokens, 6, 3, gen, skip=())
    want = reference.experts(x, indices, weights, w_in, w_out, b_in, b_out, spec)
    x, w_in, w_out, b_in, b_out = (t.to(dtype) for t in (x, w_in, w_out, b_in, b_out))
    got = KERNELS[kernel](x, indices, weights, w_in, w_out, b_in, b_out, spec)
    assert _rel_err(got.float(), want) < tolerance


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_repeated_expert_in_one_token_counts_twice(kernel):
    gen = torch.Generator().manual_seed(3)
    spec = ExpertsSpec(4, 16, 8, act="silu", gated=True)
    w_in = torch.randn(4, 16, 16, generator=gen)
    w_out = torch.randn(4, 16, 8, generator=gen)
    x = torch.randn(3, 16, generator=gen)
    indices = torch.tensor([[1, 1], [0, 1], [3, 3]])
    weights = torch.rand(3, 2, generator=gen)
    want = loop_reference(x, indices, weights, w_in, w_out, None, None, spec)
    for rows in (slice(0, 1), slice(0, 3)):  # decode path and grouped path
        got = KERNELS[kernel](x[rows], indices[rows], weights[rows], w_in, w_out, None, None, spec)
        assert _rel_err(got, want[rows]) < RTOL


def test_fallback_without_onednn_matches(monkeypatch):
    """With the oneDNN probe forced off, the F.linear path gives the same answer."""
    gen = torch.Generator().manual_seed(11)
    spec = ExpertsSpec(5, 24, 16, act="silu", gated=True, has_bias=True)
    w_in = torch.randn(5, 32, 24, generator=gen)
    w_out = torch.randn(5, 24, 16, generator=gen)
    b_in, b_out = torch.randn(5, 32, generator=gen), torch.randn(5, 24, generator=gen)
    x = torch.randn(10, 24, generator=gen)
    indices, weights = _routing(10, 5, 2, gen)
    want = loop_reference(x, indices, weights, w_in, w_out, b_in, b_out, spec)
    monkeypatch.setattr(moe_cpu, "_PROBED", {}, raising=True)
    monkeypatch.setattr(moe_cpu, "_onednn_op", lambda: None)
    for rows in (slice(0, 1), slice(0, 10)):
        got = experts_forward(x[rows], indices[rows], weights[rows], w_in, w_out, b_in, b_out, spec)
        assert _rel_err(got, want[rows]) < RTOL
    assert not any(moe_cpu._PROBED.values())


def _biased_gated_case(seed: int):
    """5 gated SiLU experts with biases (hidden 24, FFN 16) and 10 tokens routed to 2 of them each."""
    gen = torch.Generator().manual_seed(seed)
    spec = ExpertsSpec(5, 24, 16, act="silu", gated=True, has_bias=True)
    w_in, w_out = torch.randn(5, 32, 24, generator=gen), torch.randn(5, 24, 16, generator=gen)
    b_in, b_out = torch.randn(5, 32, generator=gen), torch.randn(5, 24, generator=gen)
    x = torch.randn(10, 24, generator=gen)
    indices, weights = _routing(10, 5, 2, gen)
    return spec, x, indices, weights, w_in, w_out, b_in, b_out


def test_onednn_off_runs_every_matmul_on_f_linear(monkeypatch):
    """``onednn=False`` (the runner's ``torch-blas`` kernel) computes the same on ``F.linear`` alone."""
    spec, x, indices, weights, w_in, w_out, b_in, b_out = _biased_gated_case(12)
    want = loop_reference(x, indices, weights, w_in, w_out, b_in, b_out, spec)
    linear_calls = []
    linear = F.linear
    monkeypatch.setattr(moe_cpu.F, "linear", lambda *args: linear_calls.append(1) or linear(*args))
    for rows in (slice(0, 1), slice(0, 10)):
        linear_calls.clear()
        got = experts_forward(x[rows], indices[rows], weights[rows], w_in, w_out, b_in, b_out, spec, onednn=False)
        assert _rel_err(got, want[rows]) < RTOL
        used = len(set(indices[rows].flatten().tolist()))
        assert len(linear_calls) == 2 * used, "one F.linear for gate and up, one for down, per expert used"


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_bfloat16_close_to_float32(kernel):
    gen = torch.Generator().manual_seed(5)
    spec = ExpertsSpec(4, 32, 16, act="silu", gated=True)
    w_in = torch.randn(4, 32, 32, generator=gen) * 0.2
    w_out = torch.randn(4, 32, 16, generator=gen) * 0.2
    x = torch.randn(6, 32, generator=gen)
    indices, weights = _routing(6, 4, 2, gen)
    want = experts_forward(x, indices, weights, w_in, w_out, None, None, spec)
    got = KERNELS[kernel](x.bfloat16(), indices, weights, w_in.bfloat16(), w_out.bfloat16(), None, None, spec)
    assert got.dtype == torch.bfloat16
    assert _rel_err(got, want) < 5e-2


def test_empty_and_bad_shapes():
    spec = ExpertsSpec(2, 4, 4, act="relu", gated=False)
    w_in, w_out = torch.randn(2, 4, 4), torch.randn(2, 4, 4)
    empty = experts_forward(
        torch.zeros(0, 4),
        torch.zeros(0, 1, dtype=torch.long),
        torch.zeros(0, 1),
        w_in,
        w_out,
        None,
        None,
        spec,
    )
    assert empty.shape == (0, 4)
    with pytest.raises(ValueError, match="expected x"):
        experts_forward(
            torch.zeros(3, 4),
            torch.zeros(2, 1, dtype=torch.long),
            torch.zeros(2, 1),
            w_in,
            w_out,
            None,
            None,
            spec,
        )


def test_grouped_mm_runs_two_grouped_gemms_and_pairs_of_weight_zero_cost_nothing(monkeypatch):
    """All experts in one ``F.grouped_mm`` per projection, whatever the number of experts used; the pairs
    ``drop_zero_weight`` drops (dynamic skipping, merged experts' repeats) are not computed."""
    spec, x, indices, weights, w_in, w_out, b_in, b_out = _biased_gated_case(13)
    weights[::2, 1] = 0.0
    rows = []
    grouped_mm = F.grouped_mm
    monkeypatch.setattr(moe_cpu.F, "grouped_mm", lambda a, b, **kw: rows.append(len(a)) or grouped_mm(a, b, **kw))
    got = experts_grouped_mm(x, indices, weights, w_in, w_out, b_in, b_out, spec, drop_zero_weight=True)
    assert rows == [15, 15], "10 tokens x 2 slots, less the 5 pairs of weight 0, in one call per projection"
    want = loop_reference(x, indices, weights, w_in, w_out, b_in, b_out, spec)
    assert _rel_err(got, want) < RTOL


@pytest.mark.parametrize(("dtype", "hidden", "intermediate", "fits"), [
    (torch.float32, 24, 16, True),
    (torch.bfloat16, 24, 16, True),
    (torch.float32, 24, 7, False),  # rows of 28 bytes
    (torch.bfloat16, 12, 16, False),  # rows of 24 bytes
    (torch.float16, 24, 16, False),
    (torch.float64, 24, 16, False),
])
def test_grouped_mm_fits_only_the_layouts_it_takes(dtype, hidden, intermediate, fits):
    spec = ExpertsSpec(3, hidden, intermediate, act="silu", gated=True)
    assert grouped_mm_fits(dtype, torch.device("cpu"), spec) == fits
    if fits:  # and it then runs
        x = torch.randn(4, hidden, dtype=dtype)
        w_in, w_out = torch.randn(3, 2 * intermediate, hidden, dtype=dtype), torch.randn(3, hidden, intermediate, dtype=dtype)
        indices, weights = _routing(4, 3, 2, torch.Generator().manual_seed(0))
        want = experts_forward(x.float(), indices, weights, w_in.float(), w_out.float(), None, None, spec)
        got = experts_grouped_mm(x, indices, weights, w_in, w_out, None, None, spec)
        assert _rel_err(got, want) < (RTOL if dtype == torch.float32 else 2e-2)
