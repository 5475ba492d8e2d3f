"""The ``moec`` custom ops that stand in for recognized blocks during capture.

``moec::moe_block(Tensor x, Tensor[] weights, str config) -> Tensor``,
``moec::ffn(Tensor x, Tensor[] weights, str config) -> Tensor`` and
``moec::experts(Tensor x, Tensor indices, Tensor routing, Tensor[] weights, str config) -> Tensor`` (routed
experts given the router's choice): ``config`` is ``BlockSpec.to_json()``, ``weights`` are the block's
tensors in ``spec.roles`` order, and the result has ``x``'s shape and dtype.
To torch.export they are opaque ops with a static output shape (the fake implementations), so a
data-dependent loop over experts never reaches the exported graph. Eagerly they run
:mod:`moec.kernels.reference`.
"""

from __future__ import annotations

import functools

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


@moe_block.register_fake
def _moe_block_fake(x: torch.Tensor, weights: list[torch.Tensor], config: str) -> torch.Tensor:
    return torch.empty_like(x)


@experts.register_fake
def _experts_fake(x: torch.Tensor, indices: torch.Tensor, routing: torch.Tensor, weights: list[torch.Tensor],
                  config: str) -> torch.Tensor:
    return torch.empty_like(x)


@ffn.register_fake
def _ffn_fake(x: torch.Tensor, weights: list[torch.Tensor], config: str) -> torch.Tensor:
    return torch.empty_like(x)
