"""CUDA graphs of a kernel call, one per input shape, so that a repeated call is one replay.

Why: at decode sizes a MoE layer's GPU work takes 30-250 us, while issuing its launches from Python (binding
the arguments of the Triton kernels, the allocations around them) took the host 270-390 us per call on an H100
machine (docs/BENCHMARKS.md): the GPU waited for the host. A captured graph issues all of a call's launches at
once, and the host's part shrinks to copying the inputs in and the outputs out.

Contract of the wrapped ``fn``: it takes tensors only and returns a tensor or a tuple of tensors; it never
waits for the host (no ``.item()``, no copy of host data to the GPU); besides its arguments it reads only
tensors that outlive the wrapper (the weights), whose memory a replay reads again.

Policy: a CUDA call with at most ``max_rows`` rows (the first dimension of its first input) is captured the
second time its shapes are seen, so a one-off shape (a prompt's length) runs directly; at most ``max_graphs``
shapes are captured, and later new shapes run directly. A call that cannot be captured (it broke the
contract) warns once and runs directly from then on. Outputs are copies, so callers may keep them. The graphs
of one wrapper share one memory pool (pass ``pool`` to share it wider): their scratch memory overlaps, which
is safe because replays run one after another on one stream and each output is copied out at once. Threads
share a wrapper: one at a time copies its inputs in, replays and copies the outputs out.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from moec.errors import warn

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

__all__ = ["GraphedCall"]

Outputs = torch.Tensor | tuple[torch.Tensor, ...]
ShapeKey = tuple[tuple[tuple[int, ...], tuple[int, ...], torch.dtype, torch.device], ...]


@dataclass
class CapturedCall:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # the graph reads these: each call copies its inputs into them
    outputs: Outputs  # the graph writes these: each call returns copies


class GraphedCall:
    """``fn(*inputs)``, replayed from a CUDA graph per input shape once that shape repeats (see the module)."""

    def __init__(self, fn: Callable[..., Outputs], max_graphs: int = 32, max_rows: int = 512,
                 pool: _POOL_HANDLE | None = None) -> None:
        self.fn = fn
        self.max_graphs = max_graphs
        self.max_rows = max_rows
        self.pool = pool
        self.seen: Counter[ShapeKey] = Counter()
        self.graphs: dict[ShapeKey, CapturedCall] = {}
        self.lock = threading.Lock()

    def __call__(self, *inputs: torch.Tensor) -> Outputs:
        if not inputs[0].is_cuda or inputs[0].shape[0] > self.max_rows:
            return self.fn(*inputs)
        key = tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in inputs)
        with self.lock:  # a graph has one set of input and output buffers: one thread at a time copies, replays
            captured = self.graphs.get(key)
            if captured is None:
                self.seen[key] += 1
                if self.seen[key] >= 2 and len(self.graphs) < self.max_graphs:
                    captured = self.capture_or_give_up(key, inputs)
            if captured is not None:
                for static, given in zip(captured.inputs, inputs, strict=True):
                    static.copy_(given)
                captured.graph.replay()
                outputs = captured.outputs
                return outputs.clone() if isinstance(outputs, torch.Tensor) else tuple(t.clone() for t in outputs)
        return self.fn(*inputs)

    def capture_or_give_up(self, key: ShapeKey, inputs: tuple[torch.Tensor, ...]) -> CapturedCall | None:
        """The call on ``inputs`` captured and kept for ``key``; None, with a warning and no more captures, if
        ``fn`` broke the contract (it waited for the host)."""
        try:
            self.graphs[key] = self.capture(inputs)
        except RuntimeError as error:
            self.max_graphs = 0
            warn(f"moec: a kernel call could not be captured in a CUDA graph, so it runs directly "
                 f"from now on ({str(error).splitlines()[0]})")
            return None
        return self.graphs[key]

    def capture(self, inputs: tuple[torch.Tensor, ...]) -> CapturedCall:
        """Capture ``fn`` on copies of ``inputs``, after one warm-up call on a side stream (the recipe of
        torch.cuda.graphs: lazy initialization must not happen inside the capture)."""
        with torch.cuda.device(inputs[0].device):
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            static = tuple(t.clone() for t in inputs)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.fn(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                outputs = self.fn(*static)
        return CapturedCall(graph, static, outputs)
