"""Capture a PyTorch model as a moec ``Program``: recognize blocks, swap them for moec ops, export, lower,
then fold the FFNs no recognizer claimed (``moec.frontend.ffn_patterns``).

The model is captured for inference: in eval mode, without a KV cache or router logits in its outputs
(``INFERENCE_CONFIG``), with every tensor input dimension dynamic unless the model pins it. The model is
left as it was. Example inputs that share memory (``labels`` given as the ``input_ids`` tensor itself) are
captured as separate inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import logging
import os
import threading
import unittest.mock
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.fx.experimental._config as fx_config
from torch import nn
from torch.export import Dim
from torch.export.dynamic_shapes import _tree_map_with_path

from moec.errors import CaptureError, VerifyError, warn
from moec.frontend.blocks import BlockSpec
from moec.frontend.ffn_patterns import fold_dense_ffns
from moec.frontend.hf_blocks import is_hf_experts
from moec.frontend.lower import lower
from moec.frontend.recognize import recognize, user_registration
from moec.frontend.swap import swap_blocks
from moec.ir.program import Program
from moec.ir.types import TensorType
from moec.ir.verifier import verify

if TYPE_CHECKING:  # annotations only: importing moec does not import transformers
    from transformers import PretrainedConfig


def capture(model: nn.Module, args: tuple = (), kwargs: dict | None = None, batch_of_two: bool = True) -> Program:
    """Export ``model(*args, **kwargs)`` and lower it to IR with its recognized blocks as moec ops; an example of
    batch 1 is traced at batch 2 unless ``batch_of_two`` is False (``export_batch_of_two``)."""
    if not isinstance(model, nn.Module):
        raise CaptureError(f"moec compiles torch.nn.Module models, got {type(model).__name__}")
    unloaded = next((name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta),
                    None)
    if unloaded is not None:
        raise CaptureError(f"{type(model).__name__} has weights on the meta device ({unloaded!r} first): they hold no "
                           "values to compile; load the weights first (from_pretrained without a meta device_map, "
                           "or to_empty() then load_state_dict())")
    args, kwargs = distinct_inputs(tuple(args), dict(kwargs or {}))
    specs = recognize(model)
    with inference_setup(model), tensor_state_kept(model):
        try:
            with exportable_experts(model, specs), swap_blocks(model, specs):
                ep = (batch_of_two and export_batch_of_two(model, args, kwargs)) or export(model, args, kwargs)
        except EagerFailure as failure:
            if eager_failure(model, args, kwargs) is None:  # the model itself runs: moec's swap broke it
                registered = sorted({type(model.get_submodule(spec.module)).__qualname__ for spec in specs
                                     if user_registration(model.get_submodule(spec.module)) is not None})
                why = (f"a block registered with moec.register_moe_block ({', '.join(registered)}) is called as its "
                       "kind says once swapped: an 'moe' or 'ffn' block with the hidden states alone, an 'experts' "
                       "block with the hidden states and the router's choice; its forward must take those and "
                       "nothing else" if registered else
                       "this is a moec recognizer error; please report it")
                raise CaptureError(
                    f"{type(model).__name__} runs on the example inputs, but not with moec's ops in place of its "
                    f"recognized blocks ({', '.join(sorted({spec.family for spec in specs}))}): "
                    f"{describe(model, failure.eager_error)}\n{why}"
                ) from failure.eager_error
            raise
    check_serializable_structure(model, ep)
    program = lower(ep)
    program.metadata["input_guards"] = list(getattr(ep, "_guards_code", None) or [])  # checked on every call
    unchecked = program.input_guards.unreadable
    if unchecked:
        warn(f"{type(model).__name__}'s export holds {len(unchecked)} condition(s) on input sizes in a form moec "
             f"does not check on each call ({unchecked[0][:200]}); inputs outside them may compute something else")
    warn_pinned_token_dims(model, program)
    folded = fold_dense_ffns(program)
    verify_registered_blocks(model, program)
    program.metadata["blocks"] = [block_summary(spec) for spec in specs] + [
        {"module": block, "kind": "ffn", "family": "pattern"} for block in folded]
    program.metadata["model_class"] = f"{type(model).__module__}.{type(model).__qualname__}"
    # So that a call may give by position what the example gave by keyword, and the other way round.
    program.metadata["forward_parameters"] = [
        name for name, parameter in inspect.signature(model.forward).parameters.items()
        if parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    # Sizes a backend may fall back on for dims it cannot choose itself (an image's height and width).
    program.metadata["example_shapes"] = [list(x.shape) if isinstance(x, torch.Tensor) else None
                                          for x in program.flatten_inputs(tuple(args), kwargs)]
    return program


def warn_pinned_token_dims(model: nn.Module, program: Program) -> None:
    """One warning naming the sizes of integer inputs (token ids, masks: batch and sequence) that export fixed
    at the example's, because the model's code depends on them (a Python loop over the sequence)."""
    pinned = [f"{name} dim {dim} at {size}" for name, value in zip(program.graph.input_names, program.graph.inputs,
                                                                    strict=False)
              if isinstance(t := value.type, TensorType) and t.dtype in ("i64", "i32", "bool")
              for dim, size in enumerate(t.shape) if isinstance(size, int) and size > 1]
    if pinned:
        warn(f"{type(model).__name__}'s code fixes sizes of its inputs at the example's ({', '.join(pinned)}): the "
             "compiled model takes only those there; compile with an example of the size you will run")


def verify_registered_blocks(model: nn.Module, program: Program) -> None:
    """Verify the captured IR; a failure in a block described by a ``register_moe_block`` call names that
    block and the registration, whose spec does not match the module."""
    try:
        verify(program.graph)
    except VerifyError as err:
        registration = registration_of_block(model, err.block)
        if registration is None:
            raise
        module_class, to_spec = registration
        describer = getattr(to_spec, "__qualname__", repr(to_spec))
        raise VerifyError(
            f"block {err.block!r} ({module_class.__qualname__}, described by {describer} through "
            f"moec.register_moe_block) does not match its module: {err}\n"
            f"fix the sizes, weights or settings that {describer} returns", block=err.block) from None


def registration_of_block(model: nn.Module, block: str | None) -> tuple[type[nn.Module], Any] | None:
    """The ``register_moe_block`` call that described the module at path ``block``, if any."""
    if block is None:
        return None
    try:
        return user_registration(model.get_submodule(block))
    except AttributeError:  # a block found by pattern, not a module of the model
        return None


def distinct_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The example with every tensor that shares memory with an earlier one cloned: export would trace two
    arguments given as one tensor as one input, and the model would read one where the caller meant the
    other."""
    seen: set[int] = set()

    def distinct(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return leaf
        storage = leaf.untyped_storage().data_ptr()
        if storage in seen:
            return leaf.clone()
        seen.add(storage)
        return leaf

    return torch.utils._pytree.tree_map(distinct, (args, kwargs))


# Config settings that add outputs an inference graph does not carry, with the value capture uses.
INFERENCE_CONFIG = {"use_cache": False, "output_router_logits": False}


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 for a model without one)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@contextlib.contextmanager
def inference_setup(model: nn.Module) -> Iterator[None]:
    """Eval mode and ``INFERENCE_CONFIG`` for the duration of the capture; restores both after.

    Every config in the model counts: an encoder-decoder's decoder stack keeps its own copy (T5).
    """
    was_training = model.training
    configs = {id(config): config for module in model.modules()
               if (config := getattr(module, "config", None)) is not None}
    changed = [(config, name, getattr(config, name)) for config in configs.values()
               for name, value in INFERENCE_CONFIG.items() if getattr(config, name, value) != value]
    model.eval()
    for config, name, _ in changed:
        setattr(config, name, INFERENCE_CONFIG[name])
    try:
        yield
    finally:
        model.train(was_training)
        for config, name, value in changed:
            setattr(config, name, value)


@contextlib.contextmanager
def tensor_state_kept(model: nn.Module) -> Iterator[None]:
    """The modules' buffers and tensor attributes as they were, after the capture: export runs the model's
    Python on fake tensors, and code that keeps a tensor on its module while it runs (Phi-3's longrope caches
    ``long_inv_freq`` and registers ``inv_freq`` anew) would leave fake tensors in the user's model, which
    then computed other logits. torch's warning about such attributes is left out: moec puts them back."""
    kept = [(module, dict(module._buffers), set(module._non_persistent_buffers_set),
             {name: value for name, value in vars(module).items() if isinstance(value, torch.Tensor)})
            for module in model.modules()]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The tensor attribute .* was assigned during export")
            yield
    finally:
        for module, buffers, non_persistent, tensors in kept:
            module._buffers.clear()
            module._buffers.update(buffers)
            module._non_persistent_buffers_set.clear()
            module._non_persistent_buffers_set.update(non_persistent)
            for name in [name for name, value in vars(module).items()
                         if isinstance(value, torch.Tensor) and name not in tensors]:
                delattr(module, name)
            vars(module).update(tensors)


@contextlib.contextmanager
def exportable_experts(model: nn.Module, specs: list[BlockSpec]) -> Iterator[None]:
    """Hugging Face experts modules that no spec claims run Hugging Face's ``batched_mm`` experts code for the
    capture (its default ``grouped_mm`` calls a custom op, ``eager`` loops over the experts hit), with a
    warning: that code stays generic ops and copies an expert's weights per (token, expert) pair."""
    claimed = [spec.module for spec in specs]
    configs: dict[int, tuple[PretrainedConfig, str | dict | None]] = {}
    generic: list[str] = []
    for path, module in model.named_modules():
        if not is_hf_experts(module) or any(path == c or path.startswith(c + ".") or not c for c in claimed):
            continue
        config = module.config
        generic.append(f"{path!r} ({type(module).__name__})")
        configs.setdefault(id(config), (config, config._experts_implementation))
        config._experts_implementation = "batched_mm"
    if generic:
        warn(
            f"moec does not model the experts of {len(generic)} module(s): {', '.join(generic[:3])}"
            f"{', ...' if len(generic) > 3 else ''}. They are captured as Hugging Face's batched_mm code, which "
            "copies one expert's weights per (token, expert) pair, so memory grows with the number of tokens; "
            "register the block with moec.register_moe_block to run them on moec's expert kernels")
    try:
        yield
    finally:
        for config, implementation in configs.values():
            config._experts_implementation = implementation


class EagerFailure(CaptureError):
    """The model fails when simply run on the example inputs (``eager_error``)."""

    def __init__(self, model: nn.Module, eager_error: Exception) -> None:
        super().__init__(f"{type(model).__name__} fails on the example inputs themselves, without moec: "
                         f"{describe(model, eager_error)}\npass example inputs that the model runs on")
        self.eager_error = eager_error


def export(model: nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    """``model`` exported with every dimension of the example dynamic; if that fails where a size of 1 after
    the batch dimension broadcasts (a mask of shape [batch, seq, 1]), again with those sizes fixed, with a
    warning naming them (the compiled model then takes only 1 there)."""
    try:
        return export_with(model, args, kwargs, dynamic_shapes_for(model, args, kwargs))
    except CaptureError:
        raise
    except Exception as err:  # export raises many types; all mean "cannot capture"
        output, eager_error = eager_run(model, args, kwargs)
        if eager_error is not None:
            raise EagerFailure(model, eager_error) from eager_error
        for what, structure in (("takes", (args, kwargs)), ("returns", output)):
            opaque = opaque_leaf_type(structure)
            if opaque is not None:
                raise CaptureError(f"{type(model).__name__}.forward {what} {opaque.__qualname__}, a class torch.export "
                                   f"cannot look inside; register it as a pytree before compiling: "
                                   f"{pytree_registration(opaque)}") from None
        single = sizes_of_one(args, kwargs)
        if single and not specializes_size_one(err):
            with contextlib.suppress(Exception):  # the first error is the one to report
                ep = export_with(model, args, kwargs, dynamic_shapes_for(model, args, kwargs, fix_ones=True))
                warn(
                    f"{type(model).__name__} could not be exported with every size dynamic ({describe(model, err)}); "
                    f"it was exported with the sizes of 1 after the batch dimension fixed "
                    f"({', '.join(single)}), so the compiled model takes only 1 there. If one of "
                    "them should vary (a sequence), compile with an example of at least 2 there")
                return ep
        if single and specializes_size_one(err):  # the cause first: torch's own message reads like a moec bug
            raise CaptureError(
                f"cannot export {type(model).__name__} on an example with a size of 1 after the batch dimension "
                f"({', '.join(single)}): the model's code branches on that size, so export cannot keep it "
                f"dynamic; use an example with at least 2 tokens there\n(export failed in "
                f"{describe(model, err)})") from err
        raise CaptureError(f"cannot export {type(model).__name__}: {describe(model, err)}\n"
                           f"{export_hint(err)}") from err


def export_batch_of_two(model: nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram | None:
    """For an example whose every tensor has a first (batch) size of 1: ``model`` exported on the example
    repeated to a batch of 2, where the model runs on that and exports; else None. Traced on a batch of 1,
    code that builds a [1, ...] tensor beside the inputs (Hugging Face's position ids) can keep that 1
    where the batch belongs, and the compiled model then fails on any other batch size."""
    tensors = [leaf for _, leaf in named_tensors(args, kwargs)]
    if not tensors or any(t.dim() == 0 or t.shape[0] != 1 for t in tensors):
        return None
    args2, kwargs2 = torch.utils._pytree.tree_map(
        lambda leaf: leaf.expand(2, *leaf.shape[1:]).clone() if isinstance(leaf, torch.Tensor) else leaf, (args, kwargs))
    if eager_failure(model, args2, kwargs2) is not None:
        return None
    try:
        return export_with(model, args2, kwargs2, dynamic_shapes_for(model, args2, kwargs2))
    except Exception:  # export raises many types; the batch-of-1 export then reports its own error
        return None


def export_with(model: nn.Module, args: tuple, kwargs: dict, dynamic: dict[str, Any]) -> torch.export.ExportedProgram:
    # patch() is added to the config module at run time (torch's own calls ignore the same error).
    with (torch.no_grad(), fx_config.patch(backed_size_oblivious=True),  # type: ignore[attr-defined]
          warnings.catch_warnings(), torch_quiet()):
        # torch's own pytree deprecation notices, raised inside export: nothing a user can act on
        warnings.simplefilter("ignore", FutureWarning)
        ep = torch.export.export(model, tuple(args), kwargs, dynamic_shapes=dynamic, strict=False)
        with retrace_without_guard_checks():
            return ep.run_decompositions({})


_QUIET = threading.RLock()  # logger levels and sys.stderr are the process's: one quiet block at a time


@contextlib.contextmanager
def torch_quiet() -> Iterator[None]:
    """Within this block torch's logs and its prints to stderr are dropped: a failing export logs fake-tensor
    tracebacks and prints the partial graph, before moec's one error says what failed and what to do. With
    ``TORCH_LOGS`` set (someone debugging the export) nothing is dropped."""
    if os.environ.get("TORCH_LOGS"):
        yield
        return
    with _QUIET:
        loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
                   if name == "torch" or name.startswith("torch.")]
        levels = [logger.level for logger in loggers]
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


@contextlib.contextmanager
def retrace_without_guard_checks() -> Iterator[None]:
    """``run_decompositions`` re-traces ``ep.module()``, whose guard-checking submodule evaluates the
    export's guards again on symbolic sizes and records stricter ones: BERT's ``seq <= 512`` came back as
    ``seq < 512``, refusing the model's own maximum length. Within this block the re-trace leaves that
    submodule out; the first trace's guards, and any a decomposition adds, are kept."""
    with_guard_checks = torch.export.ExportedProgram.module
    with unittest.mock.patch.object(torch.export.ExportedProgram, "module",
                                    lambda self, check_guards=False: with_guard_checks(self, check_guards=False)):
        yield


def specializes_size_one(err: BaseException) -> bool:
    """Whether export failed on code that branches on a symbolic size (``is_causal = q_len > 1``), which a
    size of 1 in the example cannot trace; fixing that size would hide a sequence length that should vary."""
    return "Sym" in str(err)


def sizes_of_one(args: tuple, kwargs: dict) -> list[str]:
    """The example's tensors with a size of 1 after the batch dimension, as ``name [shape]``."""
    return [f"{name} {list(x.shape)}" for name, x in named_tensors(args, kwargs) if 1 in x.shape[1:]]


def export_hint(err: BaseException) -> str:
    """What a user can do about an export failure ``err``."""
    if "Couldn't swap" in str(err):  # Module._apply under export: a .to()/.float() of a module inside forward
        return ("that module converts its own parameters while it runs (a .to() or .float() of a module inside "
                "forward), which torch.export cannot trace; convert the model before compiling and remove the "
                "conversion from forward")
    return ("moec needs a model that torch.export can trace; rewrite the data-dependent Python control flow "
            "in that module, or register its block with moec.register_moe_block")


def named_tensors(args: tuple, kwargs: dict) -> list[tuple[str, torch.Tensor]]:
    """The example's tensors with the name of the argument each one is in (positional ones by position)."""
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    return [(name, leaf) for name, value in named for leaf in torch.utils._pytree.tree_leaves(value)
            if isinstance(leaf, torch.Tensor)]


def eager_failure(model: nn.Module, args: tuple, kwargs: dict) -> Exception | None:
    """The error ``model(*args, **kwargs)`` raises when run as is, or None when it runs."""
    return eager_run(model, args, kwargs)[1]


def eager_run(model: nn.Module, args: tuple, kwargs: dict) -> tuple[Any, Exception | None]:
    """``model(*args, **kwargs)`` run as is: (its output, None), or (None, the error it raises)."""
    try:
        with torch.no_grad():
            return model(*args, **kwargs), None
    except Exception as err:  # whatever the model raises
        return None, err


# Leaves torch.export carries in a model's inputs and outputs; any other leaf is a class pytree does not know.
PLAIN_LEAVES = (torch.Tensor, int, float, bool, complex, str, type(None))


def opaque_leaf_type(structure: Any) -> type | None:
    """The first class in ``structure`` that pytree does not know how to flatten, or None."""
    for leaf in torch.utils._pytree.tree_leaves(structure):
        if not isinstance(leaf, PLAIN_LEAVES):
            return type(leaf)
    return None


def pytree_registration(cls: type) -> str:
    """The call that registers ``cls`` as a pytree moec can capture and save (its serialized name is its import
    path, which ``moec.load`` imports)."""
    name = f'serialized_type_name="{cls.__module__}.{cls.__qualname__}"'
    if dataclasses.is_dataclass(cls):
        return f"torch.utils._pytree.register_dataclass({cls.__qualname__}, {name})"
    return (f"torch.utils._pytree.register_pytree_node({cls.__qualname__}, flatten_fn, unflatten_fn, {name}) "
            f"(see torch.utils._pytree)")


def check_serializable_structure(model: nn.Module, ep: torch.export.ExportedProgram) -> None:
    """Every class in the structure of the model's inputs and outputs has the serialized name a plan stores."""
    for what, spec in (("takes", ep.call_spec.in_spec), ("returns", ep.call_spec.out_spec)):
        nodes = [spec]
        while nodes:
            node = nodes.pop()
            serialization = torch.utils._pytree.SUPPORTED_SERIALIZED_TYPES.get(node.type)
            if not node.is_leaf() and (serialization is None or serialization.serialized_type_name
                                       == torch.utils._pytree.NO_SERIALIZED_TYPE_NAME_FOUND):
                raise CaptureError(
                    f"{type(model).__name__}.forward {what} {node.type.__qualname__}, a class registered as a pytree "
                    f"without a serialized_type_name, so moec cannot store its structure; register it with one: "
                    f"{pytree_registration(node.type)}")
            nodes.extend(node.child(i) for i in range(node.num_children))
        try:
            torch.utils._pytree.treespec_dumps(spec)
        except Exception as err:  # a NamedTuple class torch knows no serialized name for, among others
            raise CaptureError(
                f"{type(model).__name__}.forward {what} a structure moec cannot store in a plan "
                f"({type(err).__name__}: {str(err).splitlines()[0][:300]}); return a tuple, a dict or a ModelOutput "
                "instead, or register a NamedTuple class with torch.utils._pytree._register_namedtuple(cls, "
                "serialized_type_name='package.Class')") from None


def describe(model: nn.Module, err: BaseException) -> str:
    """Where ``err`` was raised in ``model``, its type and the first line of its message."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{failing_module(model, err)}: {type(err).__name__}: {reason}"


def dynamic_shapes_for(model: nn.Module, args: tuple, kwargs: dict, fix_ones: bool = False) -> dict[str, Any]:
    """Every dimension of every tensor argument dynamic (``Dim.AUTO``), keyed by parameter name; with
    ``fix_ones``, sizes of 1 after the batch dimension are fixed (``Dim.STATIC``)."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as err:
        raise CaptureError(f"the example inputs do not fit {type(model).__name__}.forward: {err}") from None
    specs: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = inspect.signature(model.forward).parameters[name].kind
        # torch's own mapping of inputs to their dynamic shapes: a registered class of the user's (a dataclass
        # of tensors) takes its shapes as its flattened children, not as an instance of the class
        spec = _tree_map_with_path(
            lambda _, leaf: {i: Dim.STATIC if fix_ones and i > 0 and size == 1 else Dim.AUTO
                             for i, size in enumerate(leaf.shape)} if isinstance(leaf, torch.Tensor) else None, value
        )
        if kind is inspect.Parameter.VAR_KEYWORD:
            # torch.export (2.13) fails on every dynamic-shape form of **kwargs entries
            options = [key for key, v in value.items() if not isinstance(v, torch.Tensor)]
            raise CaptureError(
                f"the example gives {sorted(value)} through {type(model).__name__}.forward's **{name}, which moec "
                "cannot capture; give only the arguments forward names"
                + (f" (for {options}: set them on the model's config, e.g. model.config.{options[0]} = "
                   f"{value[options[0]]!r})" if options else ""))
        specs[name] = spec
    return specs


def failing_module(model: nn.Module, err: BaseException) -> str:
    """The innermost module of ``model`` on the failing traceback, with the source line."""
    names = {id(module): name for name, module in model.named_modules()}
    found = "in the model's own forward"
    tb = err.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code  # the method's first parameter, whatever its name (``self`` by convention)
        owner = tb.tb_frame.f_locals.get(code.co_varnames[0]) if code.co_argcount else None
        if id(owner) in names:
            name = names[id(owner)] or "<root>"
            found = f"module {name!r} ({type(owner).__name__}), line {tb.tb_lineno} of {tb.tb_frame.f_code.co_filename}"
        tb = tb.tb_next
    return found


def block_summary(spec: BlockSpec) -> dict[str, Any]:
    return {"module": spec.module, "kind": spec.kind, "family": spec.family}

