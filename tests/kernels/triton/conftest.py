"""Triton kernel tests run on the GPU when there is one, else in Triton's interpreter on the CPU
(``import moec``, which the top conftest does first, switches it on where there is no GPU); every test here
skips when triton is not installed. Inputs are made on the CPU (seeded) and moved to ``device``; references
run on the CPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[triton]')")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
