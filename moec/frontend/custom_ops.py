"""The ``moec`` custom ops that stand in for recognized blocks during capture.

``moec::moe_block(Tensor x, Tensor[] weights, str config) -> Tensor``,
``moec::ffn(Tensor x, Tensor[] weights, str config) -> Tensor`` and
``moec::experts(Tensor x, Tensor indices, Tensor routing, Tensor[] weights, str config) -> Tensor`` (routed
experts given the router's choice): ``config`` is ``BlockSpec.to_json()``, ``weights`` are the block's
tensors in ``spec.roles`` order, and the result has ``x``'s shape and dtype; ``x``'s last dimension is
the block's hidden size (``block_hidden``).
To torch.export they are opaque ops with a static output shape (the fake implementations), so a
data-dependent loop over experts never reaches the exported graph. Eagerly they run
:mod:`moec.kernels.reference`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch

from moec.frontend.blocks import BlockSpec
from moec.kernels import reference


@functools.lru_cache(maxsize=256)
def parse_config(config: str) -> BlockSpec:
    """The spec behind a custom op's ``config`` string (parsed once per distinct string)."""
    return BlockSpec.from_json(config)


def _by_role(weights: list[torch.Tensor], spec: BlockSpec) -> dict[str, torch.Tensor]:
    if len(weights) != len(spec.roles):
        raise ValueError(
            f"block {spec.module!r} takes {len(spec.roles)} weights {spec.roles}, got {len(weights)}"
        )
    return dict(zip(spec.roles, weights, strict=True))


@torch.library.custom_op("moec::moe_block", mutates_args=())
def moe_block(x: torch.Tensor, weights: list[torch.Tensor], config: str) -> torch.Tensor:
    """A whole MoE block (route, experts, shared expert) on ``x`` [..., H]."""
    spec = parse_config(config)
    return reference.moe_block(x, _by_role(weights, spec), spec)


@torch.library.custom_op("moec::ffn", mutates_args=())
def ffn(x: torch.Tensor, weights: list[torch.Tensor], config: str) -> torch.Tensor:
    """A whole dense FFN block on ``x`` [..., H]."""
    spec = parse_config(config)
    return reference.ffn_block(x, _by_role(weights, spec), spec)


@torch.library.custom_op("moec::experts", mutates_args=())
def experts(x: torch.Tensor, indices: torch.Tensor, routing: torch.Tensor, weights: list[torch.Tensor],
            config: str) -> torch.Tensor:
    """Routed experts on ``x`` [T, H] for the router's choice: ``indices`` and ``routing`` weights [T, k]."""
    spec = parse_config(config)
    return reference.experts_block(x, indices, routing, _by_role(weights, spec), spec)


# The role whose rows are the block's hidden size H in moec's layout: w_out (E, H, F), w_down (H, F).
OUTPUT_PROJECTION = {"moe": "w_out", "experts": "w_out", "ffn": "w_down"}


def block_hidden(weights: Mapping[str, torch.Tensor], spec: BlockSpec) -> int:
    """The hidden size H of a block's rows, read from its output projection (``weights`` by role, as the
    framework stores them)."""
    role = OUTPUT_PROJECTION[spec.kind]
    return reference.oriented_weight(weights[role], role, spec).shape[-2]


def _block_output(x: torch.Tensor, weights: list[torch.Tensor], config: str) -> torch.Tensor:
    """The fake result of a block op: like ``x`` [..., H], with H pinned to ``block_hidden``.

    Capture makes every dimension of a model input dynamic; a block fed such an input directly would leave
    its H symbolic, and the IR could not check H against the block's weights. The pin makes it static.
    """
    spec = parse_config(config)
    hidden = block_hidden(_by_role(weights, spec), spec)
    torch._check(x.shape[-1] == hidden, lambda: (
        f"block {spec.module!r} takes rows of {hidden} (the size of its weights), got an input of shape "
        f"{list(x.shape)}"))
    return torch.empty_like(x)


@moe_block.register_fake
def _moe_block_fake(x: torch.Tensor, weights: list[torch.Tensor], config: str) -> torch.Tensor:
    return _block_output(x, weights, config)


@experts.register_fake
def _experts_fake(x: torch.Tensor, indices: torch.Tensor, routing: torch.Tensor, weights: list[torch.Tensor],
                  config: str) -> torch.Tensor:
    return _block_output(x, weights, config)


@ffn.register_fake
def _ffn_fake(x: torch.Tensor, weights: list[torch.Tensor], config: str) -> torch.Tensor:
    return _block_output(x, weights, config)
