"""Calibration statistics against the Hugging Face modules they describe, their bounds, storage and reuse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moec
from moec.analysis.calibration import Calibration, calibrate
from moec.errors import MoecError
from moec.frontend.capture import capture
from moec.frontend.zoo import build_preset
from moec.passes import PassContext


def samples_like(example, count, seed=0, pad_last=0):
    """``count`` batches shaped like ``example`` with fresh token ids; the last ``pad_last`` positions masked."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, 100, example["input_ids"].shape, generator=generator)
        mask = torch.ones_like(ids)
        if pad_last:
            mask[:, -pad_last:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def mlp_inputs(model, layers, samples):
    """The real (unmasked) token rows each layer's MLP received, concatenated over samples."""
    seen = {i: [] for i in range(len(layers))}
    hooks = [layer.mlp.register_forward_hook(lambda m, a, o, i=i: seen[i].append(a[0])) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for sample in samples:
                model(**sample, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    out = {}
    for i, chunks in seen.items():
        rows = [c.reshape(-1, c.shape[-1])[s["attention_mask"].reshape(-1).bool()] for c, s in zip(chunks, samples, strict=True)]
        out[i] = torch.cat(rows)
    return out


def test_dense_rows_are_the_real_mlp_inputs_and_hidden_is_the_mlp_activation(captured):
    model, example, program = captured("tiny-llama")
    samples = samples_like(example, 3, pad_last=2)
    cal = calibrate(program, samples, max_rows=10, progress=False)
    real = mlp_inputs(model, model.model.layers, samples)
    assert cal.tokens == sum(int(s["attention_mask"].sum()) for s in samples) == real[0].shape[0]
    assert list(cal.dense) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for i, block in enumerate(cal.dense):
        stats = cal.dense[block]
        assert stats.inputs.shape == (10, 32) and stats.hidden.shape == (10, 64)
        torch.testing.assert_close(stats.inputs, real[i][cal.row_tokens], rtol=1e-5, atol=1e-5)
        mlp = model.model.layers[i].mlp
        with torch.no_grad():
            expected = mlp.act_fn(mlp.gate_proj(stats.inputs)) * mlp.up_proj(stats.inputs)
        torch.testing.assert_close(stats.hidden, expected, rtol=1e-5, atol=1e-5)
        assert stats.tokens == cal.tokens
        # over every real token: a neuron is active where its |hidden| exceeds the token's mean |hidden|
        with torch.no_grad():
            magnitude = (mlp.act_fn(mlp.gate_proj(real[i])) * mlp.up_proj(real[i])).abs()
        active = magnitude > magnitude.mean(1, keepdim=True)
        # a neuron within rounding of its token's mean may flip: one token's worth of tolerance
        torch.testing.assert_close(stats.frequency, active.float().mean(0), rtol=0, atol=1.01 / cal.tokens)
        torch.testing.assert_close(stats.magnitude, magnitude.mean(0), rtol=1e-5, atol=1e-6)
    assert len(set(cal.row_tokens.tolist())) == 10


def test_routing_trace_matches_the_hf_router_and_statistics_add_up(captured):
    model, example, program = captured("tiny-mixtral")
    samples = samples_like(example, 2, pad_last=1)
    cal = calibrate(program, samples, max_rows=6, progress=False)
    layers = model.model.layers
    real = mlp_inputs(model, layers, samples)
    blocks = list(cal.moe)
    assert len(blocks) == 2
    for i, block in enumerate(blocks):
        stats = cal.moe[block]
        with torch.no_grad():
            _, expected_weights, expected = layers[i].mlp.gate(real[i])  # transformers 5: (logits, weights, indices)
        torch.testing.assert_close(stats.weights, expected_weights)
        assert torch.equal(stats.indices, expected)
        assert stats.counts.sum() == cal.tokens * 2
        assert torch.equal(stats.coactivation.diagonal().long(), stats.counts)
        torch.testing.assert_close(stats.weight_mass.sum(), torch.tensor(float(cal.tokens)))
        assert stats.inputs.shape == (6, 32)
    affinity = cal.affinity(blocks[0], blocks[1])
    used = cal.moe[blocks[0]].counts > 0
    torch.testing.assert_close(affinity[used].sum(1), torch.full((int(used.sum()),), 2.0))
    assert cal.traces().shape == (cal.tokens, 2, 2)


def test_statistics_are_ordinary_tensors_that_autograd_takes(captured):
    """The runner records in inference mode; what calibrate returns must serve a user's fitting code."""
    _, example, program = captured("tiny-olmoe")
    cal = calibrate(program, samples_like(example, 2), progress=False)
    stats = next(iter(cal.moe.values()))
    tensors = [stats.inputs, stats.indices, stats.weights, cal.row_tokens]
    tensors += [t for dense in cal.dense.values() for t in (dense.inputs, dense.hidden)]
    assert tensors and not any(t.is_inference() for t in tensors)
    router = torch.ones(stats.num_experts, stats.inputs.shape[1], requires_grad=True)
    torch.nn.functional.linear(stats.inputs, router).square().sum().backward()
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_save_and_load_round_trip(tmp_path, captured):
    model, example, program = captured("tiny-mixtral")
    cal = calibrate(program, samples_like(example, 2), max_rows=4, progress=False)
    again = Calibration.load(cal.save(tmp_path / "cal"))
    assert again.fingerprint == cal.fingerprint and again.tokens == cal.tokens
    for block in cal.moe:
        assert torch.equal(again.moe[block].indices, cal.moe[block].indices)
        assert torch.equal(again.moe[block].inputs, cal.moe[block].inputs)
    assert all(torch.equal(a, b) for a, b in zip(again.flat_samples[1], cal.flat_samples[1], strict=True))
    assert not list((tmp_path / "cal").glob(".*"))


def test_stored_samples_are_matched_to_another_capture_by_input_name(tmp_path):
    """An example that gives its inputs in another order captures a program taking them in that order: a stored
    calibration's samples are rerun by name, not by position (an attention mask read as token ids)."""
    from moec.analysis.calibration import flatten_samples

    model, example = build_preset("tiny-bert")
    program = capture(model, (), example)
    reordered = capture(model, (), dict(reversed(list(example.items()))))
    assert reordered.graph.input_names == list(reversed(program.graph.input_names))
    samples = [{key: value.roll(i, dims=1) for key, value in example.items()} for i in range(2)]
    calibration = Calibration.load(calibrate(program, samples, progress=False).save(tmp_path / "cal"))
    assert calibration.input_names == program.graph.input_names
    for stored, given in zip(calibration.samples_for(reordered), flatten_samples(reordered, samples), strict=True):
        assert all(torch.equal(a, b) for a, b in zip(stored, given, strict=True))
    calibration.input_names = ["input_ids", "attention_mask", "labels"]
    with pytest.raises(MoecError, match=r"the calibration's samples give the inputs .*'labels'.*pass sample inputs "
                                        "for this model"):
        calibration.samples_for(program)


def test_the_fingerprint_tells_a_permuted_weight_apart(captured):
    """A model whose weights hold the same values in another order (neurons permuted) is another program: its
    statistics differ, so a calibration of one must not pass for the other's."""
    from moec.analysis.calibration import fingerprint

    _, _, program = captured("tiny-llama")
    before = fingerprint(program)
    name = next(name for name, tensor in program.weights.items() if tensor.dim() == 2 and tensor.shape[0] > 1)
    original = program.weights[name]
    program.weights[name] = original.flip(0)
    try:
        assert fingerprint(program) != before
    finally:
        program.weights[name] = original
    assert fingerprint(program) == before


def test_the_fingerprint_sees_a_weight_changed_in_place_though_it_keeps_each_weights_digest(captured):
    """Each weight's digest is kept between fingerprints (hashing a large model for every pass costs more than
    the pass); a change in place, which torch counts, is seen, and so is one inside inference mode."""
    from moec.analysis.calibration import fingerprint

    _, _, program = captured("tiny-llama")
    before = fingerprint(program)
    weight = next(tensor for tensor in program.weights.values() if tensor.dim() == 2)
    value = float(weight[0, 0])
    with torch.no_grad():
        weight[0, 0] = value + 1.0
    changed = fingerprint(program)
    assert changed != before
    with torch.inference_mode():
        weight[0, 0] = value + 2.0
    assert fingerprint(program) not in (before, changed)
    with torch.no_grad():
        weight[0, 0] = value
    assert fingerprint(program) == before


def test_samples_that_share_memory_are_saved(tmp_path, captured):
    """Rows of one batch given as samples (views of one tensor), and one sample given twice."""
    model, example, program = captured("tiny-bert")
    batch = samples_like(example, 1)[0]
    rows = [{key: value[i : i + 1] for key, value in batch.items()} for i in range(batch["input_ids"].shape[0])]
    cal = calibrate(program, [*rows, rows[0]], progress=False)
    again = Calibration.load(cal.save(tmp_path / "cal"))
    assert len(again.flat_samples) == len(rows) + 1
    for loaded, given in zip(again.flat_samples, cal.flat_samples, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(loaded, given, strict=True))


class TwoTokenCounts(torch.nn.Module):
    """Two FFNs, the second on the first two positions only (like a decoder, or a downsampled stage)."""

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
        self.second = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))

    def forward(self, x):
        return self.second(self.first(x)[:, :2])


def test_blocks_that_see_different_token_counts_are_calibrated_each_on_its_own_tokens():
    torch.manual_seed(0)
    model = TwoTokenCounts().eval()
    samples = [(torch.randn(3, 5, 8),), (torch.randn(2, 4, 8),)]
    recipe = {"passes": [{"dense_to_moe": {"experts": 4, "top_k": 4}}]}
    compiled = moec.compile(model, samples[0], recipe=recipe, calibration=samples)
    stats = compiled.calibration.dense
    assert {block: s.tokens for block, s in stats.items()} == {"first": 3 * 5 + 2 * 4, "second": 3 * 2 + 2 * 2}
    with torch.no_grad():
        second_inputs = torch.cat([model.first(x)[:, :2].reshape(-1, 8) for (x,) in samples])
    kept = stats["second"].inputs
    assert all((second_inputs - row).abs().amax(1).min() < 1e-6 for row in kept)  # real rows of that block
    x = torch.randn(2, 6, 8)
    torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-5)  # every expert active: same function


def test_context_reuses_statistics_until_the_program_changes(captured):
    model, example, program = captured("tiny-bert")
    context = PassContext(calibration=samples_like(example, 2), progress=False)
    first = context.statistics(program, "test")
    assert context.statistics(program, "test") is first
    weight = program.graph.ops_of(moec.ir.DenseFFNOp)[0].weight("w_up").name
    program.weights[weight] = program.weights[weight] * 2  # a rewrite of the weights
    second = context.statistics(program, "test")
    assert second is not first and second.fingerprint != first.fingerprint
    block = next(iter(first.dense))
    torch.testing.assert_close(second.dense[block].inputs, first.dense[block].inputs)
    assert not torch.allclose(second.dense[block].hidden, first.dense[block].hidden)


def test_a_calibration_saved_in_a_plan_is_reused_without_the_samples(tmp_path, captured):
    model, example, program = captured("tiny-bert")
    cal = calibrate(program, samples_like(example, 2), progress=False)
    compiled = moec.compile(model, example, calibration=cal)
    assert compiled.calibration is cal
    loaded = moec.load(compiled.save(tmp_path / "plan"))
    assert loaded.calibration.fingerprint == cal.fingerprint
    context = PassContext(calibration=loaded.calibration)
    assert context.statistics(captured("tiny-bert")[2], "test").fingerprint == cal.fingerprint


def test_a_calibration_of_another_model_is_not_stored_as_the_plans():
    """A calibration of another model (here another preset) lends only its samples: the plan stores the
    statistics they give on this model, or, where no pass reads statistics, no calibration."""
    prune = {"passes": [{"expert-prune": {"keep": 3}}]}
    mixtral, mixtral_example = build_preset("tiny-mixtral")
    foreign = moec.compile(mixtral, mixtral_example, recipe=prune, calibration=[mixtral_example]).calibration
    qwen, qwen_example = build_preset("tiny-qwen2-moe")
    given_foreign = moec.compile(qwen, qwen_example, recipe=prune, calibration=foreign).calibration
    given_samples = moec.compile(qwen, qwen_example, recipe=prune, calibration=[mixtral_example]).calibration
    assert given_foreign.fingerprint == given_samples.fingerprint != foreign.fingerprint
    block = next(iter(given_samples.moe))
    assert torch.equal(given_foreign.moe[block].counts, given_samples.moe[block].counts)
    gptq = {"passes": [{"quantize": {"bits": 4, "group": 32, "method": "gptq"}}]}
    assert moec.compile(qwen, qwen_example, recipe=gptq, calibration=foreign).calibration is None
    own = moec.compile(mixtral, mixtral_example, recipe=gptq, calibration=foreign).calibration
    assert own is foreign  # the statistics of this very program, kept for reuse


def one_input_program():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    return moec.compile(model, (torch.randn(4, 8),)).program


def test_a_model_with_one_input_takes_tensors_as_samples(captured):
    program = one_input_program()
    tensors = [torch.randn(5, 8), torch.randn(3, 8)]
    from_tensors = calibrate(program, tensors, progress=False)
    from_tuples = calibrate(program, [(t,) for t in tensors], progress=False)
    assert from_tensors.tokens == from_tuples.tokens == 8
    (block,) = from_tuples.dense
    torch.testing.assert_close(from_tensors.dense[block].hidden, from_tuples.dense[block].hidden)
    _, example, bert = captured("tiny-bert")
    with pytest.raises(MoecError, match=rf"sample 0 is one tensor, and the model takes {len(example)} inputs \(input_ids"):
        calibrate(bert, [example["input_ids"]], progress=False)


def test_one_batch_given_as_a_dict_or_a_tensor_is_one_sample(captured):
    _, example, bert = captured("tiny-bert")
    from_dict = PassContext(calibration=example, progress=False).statistics(bert, "test")
    assert len(from_dict.flat_samples) == 1 and from_dict.tokens == int(example["attention_mask"].sum())
    program = one_input_program()
    batch = torch.randn(2, 5, 8)
    from_tensor = PassContext(calibration=batch, progress=False).statistics(program, "test")
    assert len(from_tensor.flat_samples) == 1 and torch.equal(from_tensor.flat_samples[0][0], batch)


def test_a_tuple_sample_is_the_models_positional_arguments(captured):
    """BERT takes (input_ids, attention_mask, token_type_ids) but its graph orders its inputs otherwise: a
    tuple is read as the forward's positional arguments, like a call of the compiled model."""
    model, example, _ = captured("tiny-bert")
    (padded,) = samples_like(example, 1, pad_last=2)
    ids, mask = padded["input_ids"], padded["attention_mask"]
    sample = {"input_ids": ids, "token_type_ids": (torch.arange(ids.shape[1]) >= 3).long().expand_as(ids),
              "attention_mask": mask}  # in a tokenizer's order
    bert = capture(model, (), sample)
    assert bert.graph.input_names == list(sample)
    positional = calibrate(bert, [(ids, mask, sample["token_type_ids"])], progress=False)
    by_name = calibrate(bert, [sample], progress=False)
    assert positional.tokens == by_name.tokens == int(sample["attention_mask"].sum())
    for block, stats in by_name.dense.items():
        torch.testing.assert_close(positional.dense[block].inputs, stats.inputs, rtol=0, atol=0)


@pytest.mark.parametrize(("sample", "where", "kind"), [({"input_ids": [[5, 6, 7]]}, "'input_ids'", "list"),
                                                      (([5, 6, 7],), "argument 0", "list")])
def test_token_ids_as_python_lists_are_told_to_be_tensors(sample, where, kind):
    with pytest.raises(MoecError, match=rf"calibration sample 1: {where} is a {kind}; give torch tensors \(a "
                                        r"tokenizer does with return_tensors='pt'\)"):
        PassContext(calibration=[{"input_ids": torch.ones(1, 3, dtype=torch.long)}, sample])


def test_none_as_a_sample_names_its_type():
    with pytest.raises(MoecError, match="calibration sample 0 is of type NoneType; give each sample as torch tensors"):
        PassContext(calibration=[None])


@pytest.mark.parametrize("sample", [torch.randn(5, 6), (torch.randn(5, 6),), {"input": torch.randn(5, 6)}])
def test_a_sample_of_the_wrong_width_is_one_error_naming_the_sample_and_the_input(sample):
    """Whatever form it comes in, a sample whose fixed size differs from the model's is refused before it
    runs (the model takes [*, 8]; this one has 6)."""
    program = one_input_program()
    with pytest.raises(MoecError, match=r"calibration sample 1 does not fit the model's inputs: input '.*' has shape "
                                        r"\[5, 6\], but the compiled model takes"):
        calibrate(program, [torch.randn(3, 8), sample], progress=False)


@pytest.mark.parametrize("given", ["plan/", 3, np.zeros((2, 8))], ids=["path", "number", "ndarray"])
def test_a_path_or_a_number_as_calibration_names_the_accepted_forms(given):
    with pytest.raises(MoecError, match=r"not calibration data; give a list of sample inputs .* one batch"):
        PassContext(calibration=given)


@pytest.mark.parametrize(("given", "kind"), [(["some text"], "str"), ([np.zeros((2, 8))], "ndarray")])
def test_text_or_numpy_samples_are_told_to_be_torch_tensors(given, kind):
    with pytest.raises(MoecError, match=rf"calibration sample 0 is of type {kind}; give each sample as torch "
                                        r"tensors \(tokenize text first\)"):
        PassContext(calibration=given)


def test_a_generator_is_read_once_so_every_pass_sees_every_sample():
    program = one_input_program()
    batches = [torch.randn(4, 8) for _ in range(3)]
    context = PassContext(calibration=(batch for batch in batches), progress=False)
    assert len(context.flat_samples(program, "pass 'quantize'")) == len(batches)
    assert context.statistics(program, "pass 'dense-to-moe'").tokens == 4 * len(batches)


def test_samples_that_are_all_padding_are_left_out_and_none_left_is_an_error(captured):
    _, example, program = captured("tiny-bert")
    real, padding = samples_like(example, 2)
    padding["attention_mask"].zero_()
    with pytest.warns(UserWarning, match=r"samples \[1\] are left out, their attention_mask is all zeros"):
        cal = calibrate(program, [real, padding], progress=False)
    assert len(cal.flat_samples) == 1 and cal.tokens == int(real["attention_mask"].sum())
    assert all(not stats.hidden.isnan().any() for stats in cal.dense.values())
    with pytest.raises(MoecError, match="the attention_mask of every sample is all zeros"):
        calibrate(program, [padding, padding], progress=False)


@pytest.mark.parametrize(("change", "message"), [
    (lambda ids, mask: {"input_ids": ids[:0], "attention_mask": mask[:0]},
     r"^calibration sample 1: input 'input_ids' \[0, 8\] is empty along axis 0; give samples of at least one row "
     r"and one token$"),
    (lambda ids, mask: {"input_ids": ids[0], "attention_mask": mask[0]},
     r"^calibration sample 1: input 'input_ids' has 1 dimension \[8\], where the compiled model takes .*, and the "
     r"model fails on it \(IndexError: .*\); give samples with inputs of the example's rank$"),
    (lambda ids, mask: {"input_ids": ids + 1000, "attention_mask": mask},
     r"^calibration sample 1: input 'input_ids' holds ids \d+..\d+, outside its embedding table's 128 rows .*; "
     r"give samples with ids the model's vocabulary has$"),
])
def test_a_sample_the_model_cannot_take_is_named_with_what_is_wrong(captured, change, message):
    _, example, program = captured("tiny-mixtral")
    ids, mask = example["input_ids"], example["attention_mask"]
    with pytest.raises(MoecError, match=message):
        calibrate(program, [example, change(ids, mask)], progress=False)
