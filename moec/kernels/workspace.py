"""Scratch buffers that the CPU experts kernels keep between calls.

Why: a kernel gathers the rows of every (token, slot) pair into one [T*k, H] buffer (and the onnxruntime
kernel collects the experts' output rows into another). Past 32 MB, glibc's malloc hands out fresh
pages for every allocation and returns them on free, so a new buffer costs its page faults on every call:
on a 2-core AMD EPYC, allocating and filling 50 MB took 26 ms against 3 ms to refill a kept buffer, and
gathering 32,768 rows of 384 floats took 31 ms into a new tensor against 5 ms into a kept one.

Buffers are kept per thread (calls from different threads never share one), per name and dtype, and
grow to the largest size asked for. A caller must not keep a view past its call: the next call reuses
the memory; and it writes into them with ``out=``, which autograd refuses, so only for inputs that do not
require grad. ``release()`` frees this thread's buffers.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["gathered_rows", "release", "scratch"]

_local = threading.local()


def scratch(name: str, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous CPU tensor [rows, cols] of ``dtype`` whose memory this thread reuses under ``name``;
    its contents are undefined."""
    buffers: dict[tuple[str, torch.dtype], torch.Tensor] = _local.__dict__.setdefault("buffers", {})
    size = rows * cols
    buffer = buffers.get((name, dtype))
    if buffer is None or buffer.numel() < size:
        with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
            buffer = buffers[(name, dtype)] = torch.empty(size, dtype=dtype)
    return buffer[:size].view(rows, cols)


def release() -> None:
    """Free the calling thread's scratch buffers."""
    _local.__dict__.pop("buffers", None)


def gathered_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(0, index)`` for x [T, H]: into this thread's kept ``"moe_rows"`` buffer when x is on the
    CPU and does not require grad, else a new tensor."""
    if x.device.type != "cpu" or x.requires_grad:
        return x.index_select(0, index)
    return torch.index_select(x, 0, index, out=scratch("moe_rows", len(index), x.shape[1], x.dtype))
