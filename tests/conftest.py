"""Shared fixtures: zoo models are built once per test session (they are seeded, so this is safe)."""

from __future__ import annotations

import functools

import pytest
import torch

from moec.frontend.zoo import build_preset


@functools.cache
def _cached_preset(name: str, dtype: torch.dtype):
    return build_preset(name, dtype)


@pytest.fixture
def preset():
    """``preset(name, dtype=torch.float32) -> (model, example_kwargs)``, shared across tests; do not mutate."""

    def get(name: str, dtype: torch.dtype = torch.float32):
        return _cached_preset(name, dtype)

    return get
