"""Triton kernel tests run in Triton's interpreter on the CPU (tests/conftest.py switches it on before
anything imports triton); every test here skips when triton is not installed."""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[triton]')")
