"""Models moec does not recognize still compile; models it cannot export get one clear error."""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest
import torch
from torch import nn

import moec
from moec.analysis.traces import synthetic_trace
from moec.ir import AtenOp


class TanhMLP(nn.Module):
    """No recognizer knows it, and tanh is not an FFN activation moec folds: it stays generic ATen ops."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))

    def forward(self, x):
        return self.net(x) + x


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Branchy()

    def forward(self, x):
        return self.inner(x)


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python branch: not exportable
            return x * 2
        return x


@torch.library.custom_op("moec_test::double", mutates_args=())
def double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@double.register_fake
def _(x):
    return torch.empty_like(x)


class UsesCustomOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(8, 8))
        self.inner.register_forward_hook(lambda module, args, out: double(out))

    def forward(self, x):
        return self.inner(x)


class PinsItsWidth(nn.Module):
    """The view pins the input's second dim to 8 (2 x 4) at capture."""

    def forward(self, x):
        return x.view(x.shape[0], 2, 4).sum(-1)


class UnbindsOne(nn.Module):
    """``unbind`` of a dim of size 1: an op whose one result the runner gets as a list of one."""

    def forward(self, x):
        (row,) = x.unsqueeze(-2).unbind(-2)
        return row * 2


class WantsTwoInputs(nn.Module):
    def forward(self, x, y=None):
        if y is None:
            raise ValueError("y is required")
        return x + y


def test_unrecognized_model_compiles_to_generic_ops():
    torch.manual_seed(0)
    model = TanhMLP()
    compiled = moec.compile(model, (torch.randn(4, 8),))
    assert all(isinstance(op, AtenOp) for op in compiled.program.graph.ops)
    x = torch.randn(7, 8)
    assert torch.allclose(compiled(x), model(x), atol=1e-6)


def test_unexportable_model_names_the_module_and_nothing_else_is_printed(capfd):
    """torch logs fake-tensor tracebacks and prints the partial graph of a failing export: the one
    CaptureError says it all."""
    capfd.readouterr()
    with pytest.raises(moec.CaptureError, match=r"module 'inner' \(Branchy\)"):
        moec.compile(DataDependent(), (torch.randn(3, 4),))
    assert capfd.readouterr() == ("", "")


def test_a_model_with_weights_on_the_meta_device_is_told_to_load_them():
    """A meta-device model exports (shapes only), but its plan could neither run nor be saved."""
    with pytest.raises(moec.CaptureError, match=r"TanhMLP has weights on the meta device \('.+' first\).*load the "
                                                r"weights first"):
        moec.compile(TanhMLP().to("meta"), (torch.randn(4, 8),))


@pytest.mark.parametrize("backend", ["onnx", "Triton", ""])
def test_an_unknown_backend_names_those_there_are_and_where_onnx_lives(backend):
    with pytest.raises(moec.MoecError, match=rf"^unknown backend '{backend}'; available: torch, triton \(ONNX files "
                                             r"come from compiled.export_onnx, expert-parallel runs from torchrun"):
        moec.compile(TanhMLP(), (torch.randn(4, 8),), backend=backend)


class LoopsOverTokens(nn.Module):
    """A Python loop over the sequence (as a plain-PyTorch state-space scan has): export fixes its length."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        total = h[:, 0]
        for t in range(1, input_ids.shape[1]):
            total = total + h[:, t]
        return total


def test_token_sizes_the_models_code_fixes_are_warned_about_at_compile_time():
    with pytest.warns(UserWarning, match=r"LoopsOverTokens's code fixes sizes of its inputs at the example's "
                                         r"\(input_ids dim 1 at 5\): the compiled model takes only those there"):
        compiled = moec.compile(model := LoopsOverTokens(), (torch.randint(0, 10, (2, 5)),))
    ids = torch.randint(0, 10, (3, 5))  # the batch stays dynamic
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), model(ids))


def test_wrong_example_inputs_are_named():
    with pytest.raises(moec.CaptureError, match="do not fit TanhMLP.forward"):
        moec.compile(TanhMLP(), (torch.randn(2, 8), torch.randn(2, 8)))


def test_an_input_whose_fixed_size_differs_is_named():
    compiled = moec.compile(PinsItsWidth(), (torch.randn(3, 8),))
    assert compiled(torch.randn(5, 8)).shape == (5, 2)  # the free dim may change
    with pytest.raises(ValueError, match=r"input 'x' has shape \[5, 6\], but the compiled model takes f32\[\w+, 8\]"):
        compiled(torch.randn(5, 6))


class SumsOverTokens(nn.Module):
    def forward(self, x):
        return x.sum(dim=1)


def test_an_input_of_another_rank_that_the_model_fails_on_is_named():
    compiled = moec.compile(SumsOverTokens(), (torch.randn(2, 3, 4),))
    with pytest.raises(ValueError, match=r"^input 'x' has 1 dimension \[4\], where the compiled model takes "
                                         r"f32\[\w+, \w+, \w+\], and the compiled model fails on it \(IndexError: .*\); "
                                         r"call it with inputs of the example's rank$"):
        compiled(torch.randn(4))


def test_an_input_of_another_dtype_that_the_model_fails_on_is_named():
    compiled = moec.compile(TanhMLP(), (torch.randn(3, 8),))
    with pytest.raises(ValueError, match=r"^input 'x' is torch.float64, where the compiled model takes f32\[\w+, 8\], "
                                         r"and the compiled model fails on it \(RuntimeError: .*\); call it with "
                                         r"inputs of the example's dtypes$"):
        compiled(torch.randn(3, 8, dtype=torch.float64))


class MasksEachRow(nn.Module):
    """Reads its mask row by row, as Hugging Face's mask builders do: the mask's batch is its own size."""

    def forward(self, x, mask):
        return x * mask[torch.arange(x.shape[0])]


def test_inputs_whose_sizes_no_longer_agree_are_named_with_the_failing_op():
    compiled = moec.compile(MasksEachRow(), (torch.randn(2, 4), torch.ones(2, 4)))
    with pytest.raises(ValueError, match=r"^input 'mask' \[1, 4\] differs from input 'x' \[3, 4\] along axis 0, "
                                         r"where the example's sizes were equal \(2\), and the compiled model fails "
                                         r"on it \(IndexError: .*\); call it with inputs whose sizes agree as the "
                                         r"example's did$") as caught:
        compiled(torch.randn(3, 4), torch.ones(1, 4))
    notes = caught.value.__cause__.__notes__
    assert len(notes) == 1
    assert re.match(r"moec: raised by the op at line \d+ of the IR, `%\d+ = aten\.index\.Tensor\(", notes[0])
    assert notes[0].endswith("in the model (no recognized block around it)")


def test_an_input_of_another_rank_runs_where_the_graph_allows_it():
    """An MLP's ops do not care how many leading dimensions there are: nothing to refuse."""
    model = TanhMLP()
    compiled = moec.compile(model, (torch.randn(3, 8),))
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize(("example", "recipe", "message"), [
    (torch.randn(3, 8), None, r"^example_inputs is a single tensor; pass a tuple of the model's positional "
                              r"arguments, such as \(input_ids,\), or a dict of its keyword arguments$"),
    (None, None, r"^example_inputs is a NoneType; pass a tuple"),
    ((torch.randn(3, 8),), [{"quantize": {"bits": 4}}], r"^recipe is a list; pass a dict with a 'passes' list "
                                                         r"\(\{'passes': \[\.\.\.\]\} around this list\), such as"),
])
def test_compile_arguments_of_the_wrong_kind_say_how_to_pass_them(example, recipe, message):
    with pytest.raises(TypeError, match=message):
        moec.compile(TanhMLP(), example, recipe=recipe)


def test_check_inputs_of_the_wrong_kind_say_how_to_pass_them():
    model = TanhMLP()
    compiled = moec.compile(model, (torch.randn(3, 8),))
    with pytest.raises(TypeError, match=r"^inputs is a single tensor; pass a tuple of the model's positional"):
        compiled.check(model, torch.randn(3, 8))


def test_a_recipe_that_needs_calibration_without_it_fails_before_capture(monkeypatch):
    monkeypatch.setattr("moec.api.capture_for_sizes_of_one", lambda *args: pytest.fail("the model was captured"))
    with pytest.raises(moec.PassError, match=r"^pass 'expert-prune' needs calibration data: pass calibration="):
        moec.compile(TanhMLP(), (torch.randn(3, 8),), recipe={"passes": [{"expert-prune": {"keep": 2}}]})


def test_a_pass_that_calibrates_only_with_some_options_says_so_when_calibration_is_missing(monkeypatch):
    monkeypatch.setattr("moec.api.capture_for_sizes_of_one", lambda *args: pytest.fail("the model was captured"))
    recipe = {"passes": [{"dense-to-moe": {"experts": 2, "shared": 0.5, "method": "weights", "router": "centroid"}}]}
    with pytest.raises(moec.PassError, match=r"^pass 'dense-to-moe', with these options \(it calibrates with router "
                                             r"fitted, method coactivation or shared above 0\), needs calibration data"):
        moec.compile(TanhMLP(), (torch.randn(3, 8),), recipe=recipe)


@pytest.mark.parametrize(("calibration", "message"), [
    (synthetic_trace(16, 2, 4, top_k=2), r"^pass 'expert-prune' runs sample inputs through the model, and "
                                         r"calibration= is a RoutingTrace \(only expert-placement reads one\)"),
    ([], r"^calibration needs at least one sample")], ids=["trace", "empty"])
def test_calibration_that_cannot_serve_the_recipe_fails_before_capture(monkeypatch, calibration, message):
    monkeypatch.setattr("moec.api.capture_for_sizes_of_one", lambda *args: pytest.fail("the model was captured"))
    with pytest.raises(moec.MoecError, match=message):
        moec.compile(TanhMLP(), (torch.randn(3, 8),), recipe={"passes": [{"expert-prune": {"keep": 2}}]},
                     calibration=calibration)


def test_an_op_returning_a_list_of_one_tensor_runs():
    compiled = moec.compile(UnbindsOne(), (torch.randn(3, 8),))
    x = torch.randn(4, 8)
    torch.testing.assert_close(compiled(x), x * 2, rtol=0, atol=0)


def test_a_custom_op_of_another_library_names_the_op_and_the_module():
    with pytest.raises(moec.CaptureError, match=r"moec_test.double.default \(a custom op of the 'moec_test' library\) "
                                                r"in module 'inner'"):
        moec.compile(UsesCustomOp(), (torch.randn(3, 8),))


def test_a_model_that_fails_on_its_example_inputs_is_told_so():
    """Not a tracing problem: the model raises on these inputs without moec, and the error says that."""
    with pytest.raises(moec.CaptureError, match="fails on the example inputs themselves.*y is required"):
        moec.compile(WantsTwoInputs(), (torch.randn(3, 8),))


def test_a_model_that_export_traces_but_that_fails_on_its_example_is_told_so():
    """A bfloat16 Llama whose norms were kept in float32: export's fake tensors let the mixed matmul through, so
    compile returned a plan whose every call failed with torch's dtype error."""
    from moec.frontend.zoo import build_preset

    model, example = build_preset("tiny-llama", torch.bfloat16)
    for name, module in model.named_modules():
        if name.endswith("norm"):
            module.float()
    with pytest.raises(moec.CaptureError, match=r"fails on the example inputs themselves, without moec: module "
                                                r"'model.layers.0.self_attn.q_proj' \(Linear\).*same dtype"):
        moec.compile(model, example)


def test_an_example_of_one_token_is_told_to_use_two():
    from moec.frontend.zoo import build_preset

    model, example = build_preset("tiny-llama")
    with pytest.raises(moec.CaptureError) as caught:
        moec.compile(model, {name: tensor[:, :1] for name, tensor in example.items()})
    first_line, *rest = str(caught.value).splitlines()
    assert re.fullmatch(r"cannot export LlamaForCausalLM on an example with a size of 1 after the batch dimension "
                        r"\(input_ids \[2, 1\], attention_mask \[2, 1\]\): .*; use an example with at least 2 "
                        r"tokens there", first_line), first_line
    assert rest and rest[0].startswith("(export failed in module "), rest  # torch's own words come after


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-llama"])
def test_an_example_of_batch_one_compiles_for_every_batch(name, preset):
    """Traced on one sequence, Hugging Face's position ids keep a batch of 1 beside the inputs' dynamic one;
    moec traces such an example repeated to a batch of 2, so other batches run."""
    model, example = preset(name)
    compiled = moec.compile(model, (example["input_ids"][:1],))
    ids = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


class MaskedLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.linear(features) * mask  # mask [batch, seq, 1] broadcasts over the features


def test_a_size_of_one_that_broadcasts_is_fixed_with_a_warning_and_the_rest_stays_dynamic():
    """Export cannot keep the mask's last size dynamic (it must stay 1 to broadcast): moec exports again with
    it fixed and says so; batch and sequence still vary, and another size there is refused by name."""
    torch.manual_seed(0)
    model = MaskedLinear()
    with pytest.warns(UserWarning, match=r"sizes of 1 after the batch dimension fixed \(mask \[2, 3, 1\]\)"):
        compiled = moec.compile(model, {"features": torch.randn(2, 3, 8), "mask": torch.ones(2, 3, 1)})
    features, mask = torch.randn(4, 5, 8), (torch.rand(4, 5, 1) > 0.5).float()
    torch.testing.assert_close(compiled(features=features, mask=mask), model(features, mask), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"input 'mask' has shape \[4, 5, 8\]"):
        compiled(features=features, mask=torch.ones(4, 5, 8))


def test_an_example_argument_through_forwards_kwargs_is_one_error_saying_what_to_do():
    from moec.frontend.zoo import build_preset

    model, example = build_preset("tiny-mixtral")
    with pytest.raises(moec.CaptureError, match=r"\['output_hidden_states'\] through MixtralForCausalLM.forward's "
                       r"\*\*kwargs.*model.config.output_hidden_states = True"):
        moec.compile(model, {**example, "output_hidden_states": True})
    model.config.output_hidden_states = True  # what the error says to do
    compiled = moec.compile(model, example)
    assert len(compiled(**example).hidden_states) == model.config.num_hidden_layers + 1


def model_returning(output_class: type) -> nn.Module:
    class ReturnsItsOwnClass(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return output_class(hidden=self.proj(x))

    return ReturnsItsOwnClass()


class ReturnsAConstant(nn.Module):
    def __init__(self, extra):
        super().__init__()
        self.extra = extra
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x), self.extra


@pytest.mark.parametrize("extra", [None, 3, 0.5])
def test_a_constant_beside_the_tensor_outputs_is_one_error_naming_it(extra):
    with pytest.raises(moec.CaptureError, match=rf"the model returns {extra!r} \(output 1 of its flattened result\) "
                                                r"beside its tensors; moec compiles tensor outputs only"):
        moec.compile(ReturnsAConstant(extra), (torch.randn(2, 3, 4),))


class Pair(typing.NamedTuple):
    first: torch.Tensor
    second: torch.Tensor


class ReturnsANamedTuple(nn.Module):
    def forward(self, x):
        return Pair(x * 2, x + 1)


def test_a_named_tuple_output_torch_cannot_store_is_named_with_what_to_do():
    with pytest.raises(moec.CaptureError, match=r"returns a structure moec cannot store in a plan .*return a tuple, a "
                                                r"dict or a ModelOutput instead, or register a NamedTuple class"):
        moec.compile(ReturnsANamedTuple(), (torch.randn(2, 3),))


class TakesAMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x, mask=None, scale=None):
        y = self.proj(x)
        return y if mask is None else y * mask[..., None]


def test_an_example_input_that_is_none_is_told_to_be_left_out():
    with pytest.raises(moec.CaptureError, match=r"model input 'mask' is None in the example; leave it out"):
        moec.compile(TakesAMask(), {"x": torch.randn(2, 3, 4), "mask": None})


def test_an_unregistered_dataclass_output_is_named_with_the_call_that_registers_it():
    @dataclasses.dataclass
    class Output:
        hidden: torch.Tensor

    registration = (f'torch.utils._pytree.register_dataclass({Output.__qualname__}, '
                    f'serialized_type_name="{__name__}.{Output.__qualname__}")')
    with pytest.raises(moec.CaptureError) as info:
        moec.compile(model_returning(Output), (torch.randn(2, 3, 8),))
    assert str(info.value) == (f"ReturnsItsOwnClass.forward returns {Output.__qualname__}, a class torch.export cannot "
                               f"look inside; register it as a pytree before compiling: {registration}")


def test_an_output_class_registered_without_a_serialized_name_is_named_and_the_advised_one_compiles():
    @dataclasses.dataclass
    class Unnamed:  # registered for this test only
        hidden: torch.Tensor

    @dataclasses.dataclass
    class Named:  # registered for this test only, as the error advises
        hidden: torch.Tensor

    torch.utils._pytree.register_dataclass(Unnamed)
    with pytest.raises(moec.CaptureError, match=r"returns .*Unnamed, a class registered as a pytree without a "
                                                r"serialized_type_name.*register_dataclass\(.*Unnamed, serialized"):
        moec.compile(model_returning(Unnamed), (torch.randn(2, 3, 8),))
    torch.utils._pytree.register_dataclass(Named, serialized_type_name=f"{__name__}.{Named.__qualname__}")
    model, x = model_returning(Named), torch.randn(4, 5, 8)
    out = moec.compile(model, (torch.randn(2, 3, 8),))(x)
    assert isinstance(out, Named)
    torch.testing.assert_close(out.hidden, model(x).hidden)


def test_an_unregistered_dataclass_input_is_named_and_the_advised_registration_compiles():
    @dataclasses.dataclass
    class Batch:  # registered for this test only, as the error advises
        features: torch.Tensor
        mask: torch.Tensor

    class TakesABatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, batch):
            return self.proj(batch.features) * batch.mask

    model = TakesABatch()
    example = Batch(torch.randn(2, 3, 8), torch.ones(2, 3, 8))
    registration = (f'torch.utils._pytree.register_dataclass({Batch.__qualname__}, '
                    f'serialized_type_name="{__name__}.{Batch.__qualname__}")')
    with pytest.raises(moec.CaptureError) as info:
        moec.compile(model, (example,))
    assert str(info.value) == (f"TakesABatch.forward takes {Batch.__qualname__}, a class torch.export cannot look "
                               f"inside; register it as a pytree before compiling: {registration}")
    torch.utils._pytree.register_dataclass(Batch, serialized_type_name=f"{__name__}.{Batch.__qualname__}")
    other = Batch(torch.randn(4, 5, 8), (torch.rand(4, 5, 8) > 0.5).float())
    torch.testing.assert_close(moec.compile(model, (example,))(other), model(other), atol=1e-6, rtol=0)
