"""Fixtures of the frontend tests."""

from __future__ import annotations

import pytest

from moec.frontend import recognize as recognize_module


@pytest.fixture
def isolated_registry(monkeypatch):
    """Registrations made by a test vanish after it; gives the registry as it was before the test."""
    registry = list(recognize_module._REGISTRY)
    monkeypatch.setattr(recognize_module, "_REGISTRY", list(registry))
    return registry
