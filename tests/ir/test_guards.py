"""Export's guards on input sizes: moec's interpreter of them, and a compiled model that refuses sizes its graph
does not hold for (the graph would compute another branch of the model's code) while running batch-1 and
one-token inputs, which export sets apart."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moec
from moec.frontend.zoo import build_preset
from moec.ir.guards import InputGuards, readable


def sizes(*shape: int) -> dict[str, torch.Tensor]:
    return {"x": torch.empty(shape)}


def test_the_interpreter_evaluates_exports_forms():
    guards = InputGuards(["min(64, L['x'].size()[1]) == L['x'].size()[1]",
                          "((L['x'].size()[0]*L['x'].size()[1]) % 4) == 0 or L['x'].size()[2] > 5",
                          "not (-L['x'].size()[2] >= 0)", "1 < L['x'].size()[2] <= 16"])
    assert len(guards.checks) == 4
    assert guards.broken(sizes(2, 8, 3)) is None
    assert guards.broken(sizes(2, 65, 3)) == "min(64, x.shape[1]) == x.shape[1]"
    assert guards.broken(sizes(3, 3, 3)) == "((x.shape[0]*x.shape[1]) % 4) == 0 or x.shape[2] > 5"
    assert guards.broken(sizes(3, 3, 6)) is None
    assert guards.broken(sizes(2, 8, 17)) == "1 < x.shape[2] <= 16"


def test_code_in_a_guard_is_never_run(tmp_path):
    """A plan's guards are data: calls, attributes and names other than min/max/abs, size() and L are not
    evaluated, so the guard is left unchecked."""
    marker = tmp_path / "ran"
    guards = InputGuards([f"__import__('pathlib').Path({str(marker)!r}).touch() is None",
                          "L['x'].size()[0].__class__ == int", "open('/etc/passwd') != 0"])
    assert guards.checks == []
    assert guards.broken(sizes(2, 3)) is None
    assert not marker.exists()


def test_a_guard_that_only_sets_size_one_apart_lets_it_pass():
    guards = InputGuards(["L['x'].size()[1] != 1", "(8*L['x'].size()[1]) != 8", "L['x'].size()[0] > 1",
                          "(L['x'].size()[1] % 2) == 0"])
    assert guards.broken(sizes(1, 2)) is None
    assert guards.broken(sizes(1, 1)) == "(x.shape[1] % 2) == 0"  # holds at 2 and 4, not at 3: a real condition
    assert guards.broken(sizes(2, 3)) == "(x.shape[1] % 2) == 0"


def test_guards_on_inputs_inside_a_dict_or_a_dataclass_are_checked():
    guards = InputGuards(["L['batch']['input_ids'].size()[1] <= 8", "L['pair'].first.size()[0] == 2"])
    assert len(guards.checks) == 2 and guards.unreadable == []

    class Pair:
        def __init__(self, first: torch.Tensor) -> None:
            self.first = first

    assert guards.broken({"batch": {"input_ids": torch.empty(2, 8)}, "pair": Pair(torch.empty(2))}) is None
    assert guards.broken({"batch": {"input_ids": torch.empty(2, 9)}}) == "batch['input_ids'].shape[1] <= 8"
    assert guards.broken({"pair": Pair(torch.empty(3))}) == "pair.first.shape[0] == 2"
    assert InputGuards(["L['pair']._secret.size()[0] == 2"]).unreadable  # private attributes are not read


class BranchAtOne(nn.Module):
    """Code that treats a batch of 1 or a single token apart: export's ``!= 1`` guards are real conditions here."""

    def __init__(self, dim: int, factor: float = 3.0) -> None:
        super().__init__()
        self.dim, self.factor = dim, factor
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        return y * self.factor if x.shape[self.dim] == 1 else y


@pytest.mark.parametrize(("dim", "factor"), [(0, 3.0), (1, 3.0), (1, 1 + 5e-4)])  # a small change counts too
def test_a_branch_at_size_one_keeps_its_guard(dim, factor):
    model = BranchAtOne(dim, factor).eval()
    compiled = moec.compile(model, (torch.randn(2, 5, 4),))
    assert compiled.program.metadata["input_guards_kept_at_one"] == [f"L['x'].size()[{dim}] != 1"]
    x = torch.randn(3, 6, 4)
    torch.testing.assert_close(compiled(x), model(x))
    one = torch.randn(*(1 if axis == dim else size for axis, size in enumerate((3, 6))), 4)
    with pytest.raises(ValueError, match=rf"x.shape\[{dim}\] != 1, so the compiled graph does not hold"):
        compiled(one)  # the graph would not multiply by 3


def test_rounding_of_large_half_precision_outputs_is_no_branch_at_size_one():
    """bfloat16 logits of about 40 differ from the eager model's by a rounding step (0.25) on the example itself:
    a one-token cut that differs as much is no sign of a branch, so decoding inputs still run."""
    model, example = build_preset("tiny-mixtral", torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight.mul_(100)
    compiled = moec.compile(model, example)
    assert not compiled.program.metadata.get("input_guards_kept_at_one")
    one_token = {key: value[:, :1] for key, value in example.items()}
    with torch.no_grad():
        expected = model(**one_token).logits.float()
    assert (compiled(**one_token).logits.float() - expected).abs().max() <= 0.02 * expected.abs().max()


def test_a_batch_one_example_of_code_that_branches_at_batch_one_is_captured_at_batch_one():
    """A batch-1 example is traced at batch 2 (so that other batches run); where the code branches at batch 1
    that graph would refuse its own example, so it is captured again at batch 1."""
    model = BranchAtOne(0).eval()
    example = torch.randn(1, 5, 4)
    compiled = moec.compile(model, (example,))
    torch.testing.assert_close(compiled(example), model(example))
    with pytest.raises(ValueError, match=r"x \[3, 5, 4\]"):
        compiled(torch.randn(3, 5, 4))


def test_a_guard_naming_an_argument_the_call_does_not_give_is_skipped():
    assert InputGuards(["L['mask'].size()[1] == L['x'].size()[1]"]).broken(sizes(2, 3)) is None
    assert readable("L['input_ids'].size()[1] > L['x'].size()[0]") == "input_ids.shape[1] > x.shape[0]"


class ByParity(nn.Module):
    """Two branches on the sequence length: export keeps the example's, under the guard ``seq % 2 == 0``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.shape[1] % 2 == 0 else x * 3


def test_a_compiled_model_refuses_sizes_its_graph_does_not_hold_for(tmp_path):
    model = ByParity()
    compiled = moec.compile(model, (torch.randn(2, 8, 4),))
    x = torch.randn(3, 6, 4)
    torch.testing.assert_close(compiled(x), model(x))
    message = (r"^inputs of these sizes \(x \[3, 5, 4\]\) break a condition the model's code held when it was "
               r"captured, \(x.shape\[1\] % 2\) == 0, so the compiled graph does not hold for them: compile with an "
               r"example of this size if the model runs at it \(a bound, such as the length of a position table, "
               r"holds for every example\)$")
    with pytest.raises(ValueError, match=message):
        compiled(torch.randn(3, 5, 4))  # the graph would multiply by 2, the model by 3
    with pytest.raises(ValueError, match=r"x \[3, 1, 4\]"):
        compiled(torch.randn(3, 1, 4))
    with pytest.raises(ValueError, match=r"x \[3, 5, 4\]"):
        moec.load(compiled.save(tmp_path / "plan"))(torch.randn(3, 5, 4))


@pytest.mark.parametrize("name", ["tiny-gpt-oss", "tiny-bert", "tiny-gpt2", "tiny-mixtral"])
def test_batch_one_and_one_token_inputs_pass_the_guards(name):
    """GPT-OSS's export holds ``8 * seq != 8``, BERT's ``seq <= 64`` (its position table) among others; GPT-2's
    mask has dims of its own that only guards tie to the ids' (the size-one probe cuts them together). BERT's
    bound came back from torch's re-trace as ``seq < 64`` until capture left its guard check out of it."""
    model, example = build_preset(name)
    compiled = moec.compile(model, example)
    assert compiled.program.metadata["input_guards"]
    ids = torch.randint(0, 100, (1, 1))
    inputs = {key: ids if key == "input_ids" else torch.ones_like(ids) if key == "attention_mask"
              else torch.zeros_like(ids) for key in example}
    with torch.no_grad():
        expected = model(**inputs)[0]
    torch.testing.assert_close(compiled(**inputs)[0], expected, rtol=1e-4, atol=1e-4)
    if name == "tiny-bert":  # the position table's own length runs; one token more is refused
        longest = {key: value.expand(1, 64) for key, value in inputs.items()}
        with torch.no_grad():
            expected = model(**longest)[0]
        torch.testing.assert_close(compiled(**longest)[0], expected, rtol=1e-4, atol=1e-4)
        long = {key: value.expand(1, 65) for key, value in inputs.items()}
        with pytest.raises(ValueError, match=r"input_ids.shape\[1\] == min\(64, input_ids.shape\[1\]\)"):
            compiled(**long)


@pytest.mark.parametrize("guard", [
    "L['x'].size()[0] < 9**9**9",                  # a power too large to compute: skipped, never a hang
    "L['x'].size()[0] < (10**-1)**-10000",         # a negative exponent: no condition on sizes
    "'a' * 10**8 != ''",                           # strings stand only as argument names
    "min('') > 0",
    "L['x'].size()[0] == " + "-" * 100_000 + "1",  # past the length export writes
])
def test_a_guard_of_a_tampered_plan_is_skipped_quickly_and_never_raises(guard):
    guards = InputGuards([guard, 5, "L['x'].size()[0] > 2"])  # and a non-string one
    assert guards.broken({"x": torch.zeros(4)}) is None
    assert guards.broken({"x": torch.zeros(2)}) == "x.shape[0] > 2"


def test_guards_that_are_not_a_list_are_none():
    assert InputGuards("L['x'].size()[0] > 2").checks == []  # type: ignore[arg-type]
