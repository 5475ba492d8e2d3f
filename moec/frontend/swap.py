"""Swap recognized blocks for thin wrappers around the ``moec`` custom ops, for the length of a ``with``.

Inside :func:`swap_blocks` each block's module runs one ``moec.moe_block`` / ``moec.ffn`` /
``moec.experts`` call on the
model's own parameters and buffers (fetched by name at call time, so torch.export lifts them as
placeholders), and returns what the original forward returned. The swap is inference semantics:
dropout and router jitter, active only in training, are not reproduced.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from moec.errors import CaptureError
from moec.frontend import custom_ops  # noqa: F401  (registers torch.ops.moec.*)
from moec.frontend.blocks import BlockSpec, required_part
from moec.frontend.hf_blocks import (
    BERT_STYLE_FAMILIES,
    FLAT_OUTPUT_FAMILIES,
    OUTPUT_NORMS,
    ROUTER_SCORES_FAMILIES,
)


def block_op(spec: BlockSpec) -> Callable[..., torch.Tensor]:
    """The custom op that runs a block of this kind."""
    return {"moe": torch.ops.moec.moe_block, "experts": torch.ops.moec.experts}.get(spec.kind, torch.ops.moec.ffn)


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return model.get_buffer(name)


def _block_fn(model: nn.Module, spec: BlockSpec) -> Callable[..., torch.Tensor]:
    """``(x, *routing) -> op(x, *routing, weights, config)`` for one block, with the weights looked up on
    every call (``routing``: the router's indices and weights, for an experts module)."""
    op = block_op(spec)
    config = spec.to_json()
    names = list(spec.weights.values())

    def run(x: torch.Tensor, *routing: torch.Tensor) -> torch.Tensor:
        return op(x, *routing, [_tensor(model, name) for name in names], config)

    return run


def _bert_feed_forward(layer: nn.Module, run: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """BertLayer.feed_forward_chunk with the FFN (intermediate.dense -> act -> output.dense) as one op.

    BERT's FFN output is consumed inside BertOutput together with the residual, so no module's forward
    is exactly the FFN. The layer's ``feed_forward_chunk`` sees both the FFN input and the residual, so
    it is the one patch point that keeps BertOutput's dropout + residual + LayerNorm as ordinary code.
    """

    def feed_forward_chunk(attention_output: torch.Tensor) -> torch.Tensor:
        dropout, layer_norm = layer.get_submodule("output.dropout"), layer.get_submodule("output.LayerNorm")
        return layer_norm(dropout(run(attention_output)) + attention_output)

    return feed_forward_chunk


def _patch(
    module: nn.Module, spec: BlockSpec, run: Callable[..., torch.Tensor]
) -> tuple[str, Callable]:
    """(attribute to override on the instance, replacement)."""
    if spec.family in BERT_STYLE_FAMILIES:
        return "feed_forward_chunk", _bert_feed_forward(module, run)
    if spec.kind == "experts":
        def experts_forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
            if hidden_states.dim() == 2:
                return run(hidden_states, top_k_index, top_k_weights)
            # The choice is per token, [T, k]; DBRX's experts get the tokens unflattened, [B, S, H].
            rows = hidden_states.reshape(-1, hidden_states.shape[-1])
            return run(rows, top_k_index, top_k_weights).reshape(hidden_states.shape)

        return "forward", experts_forward
    if spec.family in ROUTER_SCORES_FAMILIES:
        def forward_with_router_scores(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # The block also returns its router's scores (GPT-OSS) or logits (Llama 4), its router's second
            # output: the model's router computes them (callers that drop them, as the decoder layers do,
            # leave its ops dead, and capture removes them).
            router = module.get_submodule("router")
            return run(hidden_states), router(hidden_states.reshape(-1, hidden_states.shape[-1]))[1]

        return "forward", forward_with_router_scores

    if spec.family in FLAT_OUTPUT_FAMILIES:
        def flat_forward(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            rows = hidden_states.reshape(-1, required_part(spec.experts, "experts", spec).hidden)
            router_logits = module.get_submodule("gate")(rows)[0]  # the model's router, as its block returns them
            return run(rows).flatten(), router_logits.flatten()

        return "forward", flat_forward
    if spec.family in OUTPUT_NORMS:
        norm = module.get_submodule(OUTPUT_NORMS[spec.family])

        def forward_with_output_norm(hidden_states: torch.Tensor) -> torch.Tensor:
            return norm(run(hidden_states))

        return "forward", forward_with_output_norm

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return run(hidden_states)

    return "forward", forward


@contextlib.contextmanager
def swap_blocks(model: nn.Module, specs: list[BlockSpec]) -> Iterator[nn.Module]:
    """Within the block, each spec's module calls its custom op; the original methods come back on exit.

    The overrides are instance attributes, so other instances of the same class are untouched and
    exiting (normally or on error) restores the model exactly. Yields ``model``.
    """
    restore: list[tuple[nn.Module, str, Callable | None]] = []
    try:
        for spec in specs:
            try:
                module = model.get_submodule(spec.module)
            except AttributeError as err:
                raise CaptureError(f"block {spec.module!r} is not a submodule of the model: {err}") from err
            attribute, replacement = _patch(module, spec, _block_fn(model, spec))
            restore.append((module, attribute, module.__dict__.get(attribute)))
            setattr(module, attribute, replacement)
        yield model
    finally:
        for module, attribute, previous in reversed(restore):
            if previous is None:
                delattr(module, attribute)
            else:
                setattr(module, attribute, previous)
