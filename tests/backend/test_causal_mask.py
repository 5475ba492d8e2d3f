"""Captured attention masks left out once the inputs show what they hold (``moec.backend.causal_mask``).

Each case checks the compiled model against the original on every call (1e-4 absolute, the runner's parity
bound), and counts the ATen ops a call runs to see whether the mask's ops ran.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

import moec
from moec.backend import causal_mask
from moec.backend.causal_mask import mask_skips
from moec.backend.torch_runner import TorchRunner
from moec.frontend.zoo import build_preset
from moec.ir import parse_graph, verify
from moec.ir.program import Program


class OpCount(TorchDispatchMode):
    """Counts the ATen ops run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def run_and_count(compiled, model, ids: torch.Tensor, mask: torch.Tensor) -> int:
    """The number of ATen ops ``compiled`` runs on these inputs, after checking its output against ``model``."""
    with OpCount() as counter:
        got = compiled(input_ids=ids, attention_mask=mask)[0]
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask)[0]
    assert (got - want).abs().max() <= 1e-4
    return counter.count


def token_ids(batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(length))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_unpadded_calls_after_the_first_of_their_shapes_leave_the_mask_out(name):
    model, example = build_preset(name)
    compiled = moec.compile(model, example)
    (skip,) = compiled.runner.skips
    ids = token_ids(2, 9)
    ones = torch.ones_like(ids)
    padded = ones.clone()
    padded[1, :3] = 0
    learning = run_and_count(compiled, model, ids, ones)  # computes the mask and learns its kind
    skipping = run_and_count(compiled, model, ids, ones)
    assert skipping <= learning - len(skip.ops)
    assert run_and_count(compiled, model, ids, padded) >= learning  # padding: the mask is built and used
    assert run_and_count(compiled, model, ids, ones) == skipping
    longer = token_ids(2, 13)  # other shapes are learned anew
    assert run_and_count(compiled, model, longer, torch.ones_like(longer)) >= learning
    assert run_and_count(compiled, model, longer, torch.ones_like(longer)) == skipping


def test_a_sliding_window_mask_is_left_out_only_while_it_is_the_lower_triangle():
    config = transformers.MistralConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4, use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(config).eval()
    compiled = moec.compile(model, {"input_ids": token_ids(1, 8), "attention_mask": torch.ones(1, 8, dtype=torch.long)})
    within, beyond = token_ids(1, 4), token_ids(1, 9)  # the window covers 4 tokens: all of the first
    counts = [run_and_count(compiled, model, ids, torch.ones_like(ids)) for ids in (within, within, beyond, beyond)]
    assert counts[1] < counts[0]  # causal within the window: left out once learned
    assert counts[3] == counts[2]  # beyond it the mask is no lower triangle: computed on every call


def test_the_mask_cache_forgets_past_its_size(monkeypatch):
    monkeypatch.setattr(causal_mask, "MAX_SHAPES", 2)
    model, example = build_preset("tiny-llama")
    compiled = moec.compile(model, example)
    guard = compiled.runner.skips[0].check.__self__
    for length in (3, 4, 5, 3):
        ids = token_ids(1, length)
        run_and_count(compiled, model, ids, torch.ones_like(ids))
        assert len(guard.kinds) <= 2
    assert list(guard.kinds) == [(((1, 5), torch.int64), ((1, 5), torch.int64)),
                                 (((1, 3), torch.int64), ((1, 3), torch.int64))]


def test_an_observed_run_sees_every_op_of_a_mask_already_learned():
    model, example = build_preset("tiny-llama")
    compiled = moec.compile(model, example)
    ids = token_ids(2, 6)
    for _ in range(2):
        compiled(input_ids=ids, attention_mask=torch.ones_like(ids))
    seen = []
    runner: TorchRunner = compiled.runner
    got = runner.run([ids, torch.ones_like(ids)], observe=lambda op, args, result: seen.append(op))
    assert seen == runner.program.graph.ops
    with torch.no_grad():
        assert (got[0] - model(input_ids=ids, attention_mask=torch.ones_like(ids))[0]).abs().max() <= 1e-4


# A mask from an input's values (%keep) and a causal triangle built from sizes; %w is a weight.
ATTENTION = """\
graph @main(%x: f32[1, 2, s0, 4], %keep: i64[1, s0]) {
  weight @allowed: bool[1, 1, 1, s0]
  %0 = aten.sym_size.int(%x, 2) : index
  %1 = aten.arange.default(%0, device=device("cpu"), pin_memory=false) : i64[s0]
  %2 = aten.unsqueeze.default(%1, 1) : i64[s0, 1]
  %3 = aten.le.Tensor(%1, %2) : bool[s0, s0]
  %4 = aten.gt.Scalar(%keep, 0) : bool[1, s0]
  %5 = aten.unsqueeze.default(%4, 1) : bool[1, 1, s0]
  %6 = aten.unsqueeze.default(%5, 1) : bool[1, 1, 1, s0]
  %7 = aten.bitwise_and.Tensor(%6, MASK_OPERAND) : bool[1, 1, s0, s0]
  %8 = aten.scaled_dot_product_attention.default(%x, %x, %x, %7) : f32[1, 2, s0, 4]
  return %8, %3
}
"""


@pytest.mark.parametrize("case", ["from the inputs", "from a weight", "a triangle also returned"])
def test_only_a_mask_decided_by_the_inputs_alone_is_left_out(case):
    text = ATTENTION.replace("MASK_OPERAND", "@allowed" if case == "from a weight" else "%3")
    if case != "a triangle also returned":
        text = text.replace("return %8, %3", "return %8")
    graph = parse_graph(text)
    verify(graph)
    runner = TorchRunner(Program(graph, {"allowed": torch.ones(1, 1, 1, 5, dtype=torch.bool)}, "", ""))
    skips = mask_skips(graph, list(runner.callees))
    if case == "from the inputs":
        (skip,) = skips
        assert sorted(skip.ops) == list(range(len(graph.ops) - 1))  # all but the SDPA op
    elif case == "from a weight":
        assert skips == []
    else:  # the triangle has another reader, so it stays; the rest of the mask is still left out
        (skip,) = skips
        assert sorted(skip.ops) == [4, 5, 6, 7]  # the triangle (3) and what it reads stay
    x = torch.randn(1, 2, 5, 4)
    for keep in (torch.ones(1, 5, dtype=torch.long), torch.tensor([[1, 1, 0, 1, 1]]), torch.ones(1, 5, dtype=torch.long)):
        mask = (keep > 0)[:, None, None, :] & (torch.ones(5, 5, dtype=torch.bool).tril() if case != "from a weight" else True)
        want = torch.nn.functional.scaled_dot_product_attention(x, x, x, attn_mask=mask)
        assert (runner.run([x, keep])[0] - want).abs().max() <= 1e-6
