"""Block recognition: find the FFN and MoE blocks of a model by module class and describe them as specs.

Built in (by class, ``hf_blocks.BUILTIN_BLOCKS``): the sparse MoE blocks of sixty-one Hugging Face families
(Mixtral, Qwen2/3-MoE, Qwen3-Next, OLMoE, DeepSeek-V2/V3, GLM-4-MoE, GPT-OSS, Mistral 4, Llama 4, DBRX ...:
the router as a ``RouteSpec``, the experts by their standard layout or by the experts probe); the gated
MLPs of Llama-style models and of those MoE families' dense layers and shared experts; GPT-2, GPT-J,
GPT-NeoX, Falcon, CLIP and T5 MLPs; BERT-style feed-forward sublayers. Users add their own classes with
:func:`register_moe_block`, and capture checks each spec they return (``spec_checks``). A module of any
other class with the Llama-style gated MLP's parts (``gate_proj``, ``up_proj``, ``down_proj`` Linears and
``act_fn``) is recognized too when a probe shows that it computes exactly that
(``hf_blocks.probed_gated_mlp``). So is a Hugging Face experts module (stacked expert weights,
``forward(hidden_states, top_k_index, top_k_weights)``) in a block no recognizer claims, when a probe shows
it computes moec's experts op (``hf_blocks.probed_hf_experts``): its router stays the model's code.

A recognizer may decline a module (for example one with an activation moec does not model) by
returning None; the module then stays ordinary torch code in the captured graph.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from moec.errors import CaptureError
from moec.frontend.blocks import BlockSpec
from moec.frontend.hf_blocks import BUILTIN_BLOCKS, ToSpec, probed_gated_mlp, probed_hf_experts
from moec.frontend.spec_checks import registered_probe_problem, spec_problem

# (class, to_spec) pairs, the built-ins first; searched from the end, so later registrations win. The
# built-ins name their Hugging Face classes by import path, so that importing moec does not import every
# model family.
_REGISTRY: list[tuple[type[nn.Module] | str, ToSpec]] = list(BUILTIN_BLOCKS)


def register_moe_block(module_class: type[nn.Module], to_spec: ToSpec) -> None:
    """Teach moec a block class: ``to_spec(module)`` describes one instance as a :class:`BlockSpec`.

    Weight names in the returned spec are relative to the module (``"router.weight"``); moec prefixes
    the module's path in the model, and fills ``module``. Return None to leave an instance unrecognized.
    Registrations made later win over earlier ones and over the built-ins; subclasses match too.
    The module's ``forward(hidden_states)`` (for ``kind='experts'``, routed experts given the router's choice:
    ``forward(hidden_states, top_k_index, top_k_weights)``) must return one tensor of the input's shape.
    Capture checks each spec against its module, and names the block and ``to_spec`` when they disagree: its
    form (``spec_checks.spec_problem``), its weight names, what it computes
    (``spec_checks.registered_probe_problem``: the module's forward on a few random rows against moec's
    reference kernels), then the IR's sizes.

    Example, for a module with a router ``nn.Linear(H, E)`` and stacked expert weights
    ``w1`` (E, 2F, H) (gate rows first) and ``w2`` (E, H, F)::

        def my_moe_spec(m):
            E, H, F = m.w2.shape
            return BlockSpec(
                kind="moe", family="my-moe", module="",
                weights={"router": "router.weight", "w_in": "w1", "w_out": "w2"},
                route=RouteSpec(num_experts=E, top_k=m.top_k),
                experts=ExpertsSpec(num_experts=E, hidden=H, intermediate=F, act="silu", gated=True),
            )

        moec.register_moe_block(MyMoE, my_moe_spec)
    """
    if not (isinstance(module_class, type) and issubclass(module_class, nn.Module)):
        given = (f"an instance of {type(module_class).__name__}; pass the class itself"
                 if isinstance(module_class, nn.Module) else repr(module_class))
        raise TypeError(f"register_moe_block: module_class must be a torch.nn.Module subclass, got {given}")
    if not callable(to_spec):
        raise TypeError(f"register_moe_block: to_spec must be a function taking a {module_class.__name__} and "
                        f"returning a moec.BlockSpec or None, got {to_spec!r}")
    _REGISTRY.append((module_class, to_spec))


def user_registration(module: nn.Module) -> tuple[type[nn.Module], ToSpec] | None:
    """The ``register_moe_block`` call that describes ``module``, or None when a built-in or a probe does."""
    found = _registration_for(module)
    if found is None or isinstance(found[0], str):
        return None
    return found[0], found[1]


def recognize(model: nn.Module) -> list[BlockSpec]:
    """Specs of the recognized blocks of ``model``, in module order, with model-relative weight names.

    A recognized module's descendants are not searched (a shared expert belongs to its MoE block).
    """
    specs: list[BlockSpec] = []
    claimed: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(prefix + ".") for prefix in claimed):
            continue
        spec = _spec_for(module, path)
        if spec is None:
            continue
        specs.append(_anchored(spec, path))
        claimed.append(path)
    return specs


def _registration_for(module: nn.Module) -> tuple[type[nn.Module] | str, ToSpec] | None:
    """The latest registry entry whose class ``module`` is an instance of."""
    lineage = type(module).__mro__
    paths = {f"{cls.__module__}.{cls.__qualname__}" for cls in lineage}
    for module_class, to_spec in reversed(_REGISTRY):
        if module_class in paths if isinstance(module_class, str) else module_class in lineage:
            return module_class, to_spec
    return None


def _spec_for(module: nn.Module, path: str) -> BlockSpec | None:
    found = _registration_for(module)
    if found is None:
        return probed_gated_mlp(module) or probed_hf_experts(module)
    if isinstance(found[0], str):  # a built-in recognizer
        return found[1](module)
    try:
        spec = found[1](module)
    except Exception as err:  # the user's own to_spec failed: name it, with the block it was given
        name = getattr(found[1], "__qualname__", repr(found[1]))
        raise CaptureError(f"block {path!r}: {name}, registered for {type(module).__name__} with "
                           f"moec.register_moe_block, raised {type(err).__name__}: {err}") from err
    _check_registered_spec(module, path, found[1], spec)
    return spec


def _check_registered_spec(module: nn.Module, path: str, to_spec: ToSpec, spec: object) -> None:
    """A user's ``to_spec`` returned None, or a BlockSpec for ``module`` (the block at ``path``) that is well
    formed (``spec_checks.spec_problem``), names tensors of the module, and computes what the module's forward
    computes (``spec_checks.registered_probe_problem``). Otherwise raises a CaptureError naming the block, its
    class and ``to_spec``."""
    if spec is None:
        return
    name = getattr(to_spec, "__qualname__", repr(to_spec))
    registered = f"block {path!r}: {name}, registered for {type(module).__name__} with moec.register_moe_block,"
    if not isinstance(spec, BlockSpec):
        raise CaptureError(f"{registered} returned a {type(spec).__name__}; it must return a moec.BlockSpec, or None "
                           "to leave the module alone")
    problem = spec_problem(spec)
    if problem is not None:
        raise CaptureError(f"{registered} {problem}")
    tensors = dict([*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)])
    for role, weight in spec.weights.items():
        if weight not in tensors:
            raise CaptureError(f"{registered} gives weight {role!r} as {weight!r}, which is not a parameter or buffer "
                               f"of that module (names are relative to the module, such as 'router.weight')")
    problem = registered_probe_problem(module, spec, {role: tensors[weight] for role, weight in spec.weights.items()})
    if problem is not None:
        raise CaptureError(f"{registered} {problem}")


def _anchored(spec: BlockSpec, path: str) -> BlockSpec:
    """The spec with its module path set and its weight names made model-relative."""
    prefix = f"{path}." if path else ""
    weights = {role: prefix + name for role, name in spec.weights.items()}
    return dataclasses.replace(spec, module=path, weights=weights)
