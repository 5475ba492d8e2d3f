"""Triton kernel tests run in Triton's interpreter on the CPU (``import moec``, which the top conftest does
first, switches it on where there is no GPU); every test here skips when triton is not installed."""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[triton]')")
