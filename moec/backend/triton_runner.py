"""The Triton backend: the torch runner with ``moe.route``/``moe.experts`` replaced by generated kernels.

Generic ATen ops, dense FFNs and shared experts keep the torch runner's rules. The kernels come from a
plan's ``triton_kernels.py`` (see :mod:`moec.backend.triton_codegen`): the one in the plan folder when the
plan was compiled for this backend, else one generated now into moec's cache. Ops the kernels cannot run
keep their torch rule (float64 ones included: the kernels compute in float32, the torch rules in float64), and
one warning line says which and why (or, for a plan without MoE ops, that it all runs on the torch runner);
``CompiledModel.report["triton"]`` records them, and a saved plan keeps that record. On a GPU, each kernel call whose shapes repeat is replayed from a CUDA graph
(:mod:`moec.backend.cuda_graphs`), so decode steps do not wait on the host.

On a machine without a CUDA GPU, Triton runs its kernels in its interpreter (``TRITON_INTERPRET=1``, read
when triton is first imported); ``import moec`` switches it on there, so import moec before anything that
imports triton (transformers models do), or set the variable yourself.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from moec.backend import triton_codegen
from moec.backend.cuda_graphs import GraphedCall
from moec.backend.torch_runner import RULES, Observer, TorchRunner
from moec.errors import BackendError, warn
from moec.ir.ops import ExpertsOp, RouteOp
from moec.ir.program import Program
from moec.kernels import reference
from moec.kernels.quant import QuantizedWeight
from moec.kernels.skip import skipped_pairs


def import_triton() -> ModuleType:
    """triton, or a BackendError saying how to install it."""
    try:
        import triton
    except ImportError:
        raise BackendError(
            "backend 'triton' needs Triton, which is not installed: pip install 'moec[triton]' "
            "(or pip install triton), or use backend 'torch'"
        ) from None
    return triton


def kernel_device(triton: ModuleType) -> torch.device:
    """Where the kernels run: the GPU, or the CPU in the interpreter (only if triton was imported in it)."""
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(triton.language.standard.sum, InterpretedFunction):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        setting = os.environ.get("TRITON_INTERPRET")
        if setting is not None and setting.lower() not in ("1", "true", "on", "yes"):
            cause = f"TRITON_INTERPRET is {setting!r}: leave it unset or set it to 1"
        else:
            cause = "import moec before transformers/triton, or set TRITON_INTERPRET=1"
        raise BackendError(f"backend 'triton' needs a CUDA GPU, or Triton's interpreter on the CPU, which must be on "
                           f"when triton is first imported: {cause}")
    return torch.device("cuda")


def check_available() -> torch.device:
    """Where the kernels will run (see ``kernel_device``), or the BackendError saying what is missing."""
    return kernel_device(import_triton())


def graphable(weights: tuple) -> bool:
    """Whether a launch on these weights can be captured in a CUDA graph: not with mixed-width quantized
    experts, whose per-expert widths are copied to the GPU on every call."""
    from moec.kernels.triton_ops import weight_format  # imports triton: only once the backend runs

    return not any(isinstance(w, QuantizedWeight) and weight_format(w) == "mixed" for w in weights)


def bound_launch(launcher, weights: tuple, graph_pool) -> Callable:
    """``launcher`` with its weights bound: ``call(*activations)``, through CUDA graphs when ``graph_pool`` is
    given (on a GPU) and the weights allow it. Made once per op and set of weights (``WeightReader.cached``):
    a graph reads the memory of the weights it was captured with."""
    def call(*activations):
        return launcher(*activations, *weights)

    return GraphedCall(call, pool=graph_pool) if graph_pool is not None and graphable(weights) else call


def run_route(launcher, graph_pool):
    def rule(op, weight, args):
        weights = (weight("router"), weight("router_bias"), weight("router_logit_bias"))
        launch = weight.cached("triton_launch", lambda: bound_launch(launcher, weights, graph_pool), weights)
        x = args[0]
        flat_indices, flat_weights = launch(x.reshape(-1, x.shape[-1]))
        lead = x.shape[:-1]
        return flat_indices.reshape(*lead, -1), flat_weights.reshape(*lead, -1)

    return rule


def run_experts(launcher, graph_pool):
    def rule(op, weight, args):
        weights = (weight("w_in"), weight("w_out"), weight("b_in"), weight("b_out"))
        launch = weight.cached("triton_launch", lambda: bound_launch(launcher, weights, graph_pool), weights)
        x, indices, routing = args
        k, hidden = indices.shape[-1], x.shape[-1]
        indices = reference.remap_experts(indices, op.expert_map).reshape(-1, k)
        routing = routing.reshape(-1, k)
        if op.skip_threshold:  # the kernels never run a pair whose expert index is negative
            indices = indices.masked_fill(skipped_pairs(routing, op.skip_threshold), -1)
        y = launch(x.reshape(-1, hidden), indices, routing)
        return y.reshape(x.shape)

    return rule


class TritonRunner(TorchRunner):
    """Runs a program with the Triton kernels of ``kernels_file`` (None: generate them into the cache).

    On a GPU the weights are copied to it once, inputs are moved to it (a no-op for CUDA tensors) and
    outputs stay there; in the interpreter everything stays on the CPU.
    """

    def __init__(self, program: Program, kernels_file: Path | None = None, quant_kernel: str = "auto",
                 expert_kernel: str = "auto") -> None:
        device = check_available()
        self.source = triton_codegen.generate(program) if kernels_file is None else kernels_file.read_text()
        self.kernels_file = kernels_file or triton_codegen.write_cached(self.source)
        self.kernels = triton_codegen.load_kernels(self.kernels_file, program)
        graph_pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        self.kernel_rules = {}  # id(op) -> rule running its launcher
        self.fallback_ops: list[dict[str, object]] = []  # the MoE ops that keep their torch rule, and why
        for index, op in triton_codegen.kernel_ops(program):
            launcher = self.kernels.LAUNCHERS.get(index)
            reason = triton_codegen.unsupported_reason(op)
            if reason is None and launcher is None:  # a kernel file written by another moec version
                reason = f"the plan's {triton_codegen.KERNELS_FILE} has no launcher for it"
            if reason is not None:
                self.fallback_ops.append({"op": index, "op_name": op.op_name, "block": op.block, "reason": reason})
                continue
            run = run_route if isinstance(op, RouteOp) else run_experts
            self.kernel_rules[id(op)] = run(launcher, graph_pool)
        self.fallbacks = self.warn_fallbacks(program, self.fallback_ops)
        self.rules = RULES | {RouteOp: self.run_moe_op, ExpertsOp: self.run_moe_op}
        self.device = device
        if device.type != "cpu":
            program = dataclasses.replace(program, weights={k: v.to(device) for k, v in program.weights.items()})
        super().__init__(program, quant_kernel, expert_kernel)  # for the ops the Triton kernels leave to it

    def run(self, inputs: list[torch.Tensor], observe: Observer | None = None) -> list[torch.Tensor]:
        return super().run([x.to(self.device) if isinstance(x, torch.Tensor) else x for x in inputs], observe)

    def run_moe_op(self, op, weight, args):
        """The op's kernel launcher, or its torch rule where the kernels cannot run it."""
        rule = self.kernel_rules.get(id(op), RULES[type(op)])
        return rule(op, weight, args)

    @staticmethod
    def warn_fallbacks(program: Program, fallback_ops: list[dict[str, object]]) -> list[str]:
        """Warn once (one line) about the MoE ops that keep their torch rule, naming each op and why, and return
        those reasons; a plan without MoE ops gets one line saying that it runs on the torch runner."""
        candidates = triton_codegen.kernel_ops(program)
        if not candidates:
            warn("moec triton backend: the plan has no moe.route or moe.experts op for the Triton kernels, so it "
                 "runs on the torch runner (use backend 'torch')")
        reasons = [f"op {row['op']} {row['op_name']}{f' of {block}' if (block := row['block']) else ''} "
                   f"({row['reason']})" for row in fallback_ops]
        if reasons:
            scope = "the whole plan runs" if len(reasons) == len(candidates) else f"{len(reasons)} of {len(candidates)} MoE ops run"
            warn(f"moec triton backend: {scope} on the torch runner: {'; '.join(reasons)}")
        return reasons

    def report(self) -> dict[str, object]:
        """What ``CompiledModel.report["triton"]`` records: how many MoE ops run a Triton kernel, and each op that
        keeps its torch rule (``op`` index in the graph, ``op_name``, ``block``, ``reason``)."""
        return {"kernel_ops": len(self.kernel_rules), "fallbacks": list(self.fallback_ops)}

    def plan_files(self) -> dict[str, str]:
        """The files this backend adds to a saved plan folder."""
        return {triton_codegen.KERNELS_FILE: self.source}
