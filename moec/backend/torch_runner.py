"""The torch runner: moec's reference interpreter, a table from op to rule.

Every other backend is tested against this one. Generic ops call the ATen op (or Python operator)
they name; MoE and FFN ops call ``moec.kernels``. The graph runs as one generated Python function
(``moec.backend.graph_function``), which frees each value right after its last use.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from collections.abc import Callable
from typing import Any

import torch

from moec.backend.causal_mask import mask_skips
from moec.backend.graph_function import Callee, GraphFunction, Observer
from moec.errors import BackendError, warn
from moec.frontend.blocks import ExpertsSpec
from moec.ir.core import Operation, OpT
from moec.ir.ops import AtenOp, DenseFFNOp, ExpertsOp, RouteOp, SharedExpertOp
from moec.ir.printer import op_location
from moec.ir.program import Program
from moec.ir.quant import QuantizedType, storage_names
from moec.ir.targets import resolve_target
from moec.kernels import reference
from moec.kernels.attention import read_mask_sdpa
from moec.kernels.kernel_choice import KernelChoice
from moec.kernels.moe_cpu import experts_forward, experts_grouped_mm, grouped_mm_fits, onednn_available
from moec.kernels.quant import QuantizedWeight
from moec.kernels.quant_matmul import (
    INT4_MAX_BITS,
    INT4_ROW_MULTIPLE,
    QuantizedExperts,
    auto_kernel,
    onnxruntime_linear,
    prepare_linear,
)
from moec.kernels.quant_matmul import KERNELS as QUANT_KERNELS
from moec.kernels.skip import skipped_pairs


def run_route(op: RouteOp, weight, args):
    return reference.route(args[0], weight("router"), weight("router_bias"), op.spec, weight("router_logit_bias"))


def run_experts(op: ExpertsOp, weight, args):
    x, indices, routing = args
    if torch.is_autocast_enabled(x.device.type):
        # The experts compute in the plan's dtype whichever kernel runs (onnxruntime's does not autocast), and
        # return the op's type: a float32 plan called under autocast mixed bf16 rows into its float32 sum.
        with torch.autocast(x.device.type, enabled=False):
            return run_experts(op, weight, args)
    indices = reference.remap_experts(indices, op.expert_map)
    k, hidden = indices.shape[-1], x.shape[-1]
    # float32 routing weights: a model's own router code may hand over bf16 ones
    tokens, indices, routing = x.reshape(-1, hidden), indices.reshape(-1, k), routing.reshape(-1, k).float()
    if indices.device.type == "cpu" and indices.numel() and \
            not 0 <= int(indices.min()) <= int(indices.max()) < op.spec.num_experts:
        # a model's own router (an 'experts' block) chose them: the kernels would read another expert, or fail
        # (checked on the CPU only, where reading the ids back costs no device sync)
        raise BackendError(f"MoE block {op.block!r} was handed expert ids {int(indices.min())}..{int(indices.max())}, "
                           f"outside 0..{op.spec.num_experts - 1} (its {op.spec.num_experts} experts)")
    threshold = op.skip_threshold
    if threshold:  # per chosen router expert, as every backend does
        routing = routing.masked_fill(skipped_pairs(routing, threshold), 0.0)
    # a token's members of one merged expert run it once, on their summed weight (where the weight scales the
    # expert's output: one that weighs its input computes something else for each weight)
    merged = op.expert_map is not None and not op.spec.weighted_input
    if merged:
        routing, _ = reference.merge_repeated_experts(indices, routing)
    w_in, w_out, b_in, b_out = weight("w_in"), weight("w_out"), weight("b_in"), weight("b_out")
    sources = (w_in, w_out, b_in, b_out)
    if threshold or isinstance(w_in, QuantizedWeight) or isinstance(w_out, QuantizedWeight):
        y = quantized_experts(weight, tokens, indices, routing, sources, op.spec)
    else:
        def onnxruntime_kernel():
            return weight.cached("onnxruntime_experts", lambda: onnxruntime_experts(*sources, op.spec, merged), sources)

        y = float_experts(weight.expert_kernel, tokens, indices, routing, *sources, op.spec, onnxruntime_kernel,
                          drop_zero_weight=merged)
    return y.reshape(x.shape)


EXPERT_KERNELS = ("auto", "onnxruntime", "torch", "torch-blas", "torch-grouped")


def check_kernel_names(quant_kernel: object, expert_kernel: object) -> None:
    """One ``BackendError`` naming a ``quant_kernel`` or ``expert_kernel`` the runner does not have."""
    if quant_kernel not in QUANT_KERNELS:
        raise BackendError(f"quant_kernel={quant_kernel!r} is not one of {', '.join(QUANT_KERNELS)}")
    if expert_kernel not in EXPERT_KERNELS:
        raise BackendError(f"expert_kernel={expert_kernel!r} is not one of {', '.join(EXPERT_KERNELS)}")


# The float32 CPU experts kernel that ``expert_kernel="auto"`` measured fastest, per layer shape and size.
ExpertKernelKey = tuple[ExpertsSpec, int, int, int, str]  # see expert_kernel_key
EXPERT_KERNEL_CHOICE: KernelChoice[ExpertKernelKey] = KernelChoice()


@functools.cache
def onnxruntime_installed() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def onnxruntime_experts(w_in, w_out, b_in, b_out, spec, drop_zero_weight: bool = False,
                        int8_activations: bool = True):
    # Imported on first use: onnx and onnxruntime take about a second to import.
    from moec.kernels.moe_onnxruntime import OnnxruntimeExperts

    return OnnxruntimeExperts(w_in, w_out, b_in, b_out, spec, drop_zero_weight, int8_activations)


@functools.cache
def onnxruntime_int8_available() -> bool:
    """Whether onnxruntime is installed and its MatMulNBits runs on int8 activations here
    (``moec.kernels.matmul_nbits``)."""
    if not onnxruntime_installed():
        return False
    from moec.kernels.matmul_nbits import int8_activations_available

    return int8_activations_available()


def onnxruntime_takes(weights: tuple[torch.Tensor | QuantizedWeight | None, ...]) -> bool:
    """Whether ``OnnxruntimeExperts`` runs quantized experts of these weights: every quantized one of at most
    ``INT4_MAX_BITS`` bits on the CPU, the others float32 on the CPU."""
    def takes(w) -> bool:
        if isinstance(w, QuantizedWeight):
            return max(w.type.bits) <= INT4_MAX_BITS and w.qweight.device.type == "cpu"
        return w is None or (w.dtype == torch.float32 and w.device.type == "cpu")

    return all(takes(w) for w in weights) and onnxruntime_int8_available()


# Below 16 tokens ``OnnxruntimeExperts`` on MatMulNBits can win a race run with the experts in cache and lose
# inside a model, where each call streams them from memory (with caches evicted, int4pack was faster at 1-8
# tokens in 58 of 62 timings, by up to 1.9x; docs/BENCHMARKS.md), so ``auto`` leaves it out there.
QUANTIZED_ONNXRUNTIME_MIN_TOKENS = 16
# From 512 tokens on MatMulNBits keeps the activations float32: rounding them to int8 no longer saved time
# there (timed interleaved on an MoE block), and float32 activations are exact to the dequantized weights
# (docs/BENCHMARKS.md).
QUANTIZED_FLOAT_ACTIVATIONS_MIN_TOKENS = 512


def int8_activations(rows: int) -> bool:
    """Whether MatMulNBits runs a call of ``rows`` rows on int8 activations (``onnxruntime`` and ``auto``)."""
    return rows < QUANTIZED_FLOAT_ACTIVATIONS_MIN_TOKENS


def activations_name(int8: bool) -> str:
    """The part of a cached MatMulNBits kernel's name that tells its activations apart."""
    return "int8" if int8 else "float32"


def quantized_experts(weight: WeightReader, tokens: torch.Tensor, indices: torch.Tensor, routing: torch.Tensor,
                      sources: tuple[Any, Any, Any, Any], spec: ExpertsSpec) -> torch.Tensor:
    """Routed experts with quantized weights (or with dynamic skipping) on ``weight.quant_kernel``.

    ``dequant``/``int4pack``: ``QuantizedExperts``. ``onnxruntime``: ``OnnxruntimeExperts`` (MatMulNBits on
    int8 activations, on float32 ones from ``QUANTIZED_FLOAT_ACTIVATIONS_MIN_TOKENS`` tokens on). ``auto``: for
    float32 activations on the CPU, weights ``onnxruntime_takes`` and at least
    ``QUANTIZED_ONNXRUNTIME_MIN_TOKENS`` tokens, the faster of ``onnxruntime`` and ``QuantizedExperts``' own
    choice (``int4pack``) for this layer shape and size, timed on the first such call
    (``EXPERT_KERNEL_CHOICE``, keyed ``quantized``); else ``QuantizedExperts``.
    """
    kernel = weight.quant_kernel
    torch_kernel = "auto" if kernel == "onnxruntime" else kernel  # onnxruntime takes quantized experts only
    candidates = {
        "torch": lambda: weight.cached("experts", lambda: QuantizedExperts(*sources, spec, torch_kernel), sources)(
            tokens, indices, routing),
    }
    quantized = any(isinstance(w, QuantizedWeight) for w in sources)
    wanted = kernel == "onnxruntime" or (kernel == "auto" and tokens.shape[0] >= QUANTIZED_ONNXRUNTIME_MIN_TOKENS)
    if quantized and wanted and tokens.dtype == torch.float32 and tokens.device.type == "cpu" \
            and onnxruntime_takes(sources):
        int8 = int8_activations(tokens.shape[0])
        candidates["onnxruntime"] = lambda: weight.cached(
            f"onnxruntime_experts:{activations_name(int8)}",
            lambda: onnxruntime_experts(*sources, spec, drop_zero_weight=True, int8_activations=int8), sources)(
            tokens, indices, routing)
    if kernel == "onnxruntime" and quantized:
        if "onnxruntime" not in candidates:
            raise BackendError("quant_kernel='onnxruntime' runs float32 activations on the CPU only; use "
                               "quant_kernel='auto'")
        return candidates["onnxruntime"]()
    if len(candidates) == 1:
        return candidates["torch"]()
    key = expert_kernel_key(spec, indices.shape[1], tokens.shape[0], weights="quantized")
    return EXPERT_KERNEL_CHOICE.run(key, {auto_kernel(INT4_MAX_BITS, tokens.device): candidates["torch"],
                                          "onnxruntime": candidates["onnxruntime"]})


def float_experts(kernel: str, tokens: torch.Tensor, indices: torch.Tensor, routing: torch.Tensor,
                  w_in: torch.Tensor, w_out: torch.Tensor, b_in: torch.Tensor | None, b_out: torch.Tensor | None,
                  spec: ExpertsSpec, onnxruntime_kernel: Callable[[], Any], drop_zero_weight: bool = False
                  ) -> torch.Tensor:
    """Float routed experts on ``kernel`` (``EXPERT_KERNELS``); ``onnxruntime_kernel()`` gives the op's
    ``OnnxruntimeExperts``, built once (dropping pairs of weight 0 as ``drop_zero_weight`` asks of the others).

    ``auto``, for float32 and bfloat16 experts on the CPU: the fastest of ``torch`` (oneDNN's matmuls),
    ``torch-blas`` (``F.linear``), ``torch-grouped`` (``F.grouped_mm``, where its layout rules allow) and, for
    float32 from two tokens on, ``onnxruntime``, for this layer shape, dtype, thread count and token count (to
    the next power of two), timed on the first such call and remembered for the process
    (``EXPERT_KERNEL_CHOICE``); which one wins depends on the host (``moec.kernels.kernel_choice``). Other
    dtypes and devices: ``torch``.
    """
    on_cpu = all(t.device.type == "cpu" for t in (tokens, w_in, w_out))
    float32_cpu = on_cpu and all(t.dtype == torch.float32 for t in (tokens, w_in, w_out))
    candidates = {
        "torch": lambda: experts_forward(tokens, indices, routing, w_in, w_out, b_in, b_out, spec,
                                         drop_zero_weight=drop_zero_weight),
        "torch-blas": lambda: experts_forward(tokens, indices, routing, w_in, w_out, b_in, b_out, spec, onednn=False,
                                              drop_zero_weight=drop_zero_weight),
    }
    if on_cpu and grouped_mm_fits(tokens.dtype, tokens.device, spec):
        candidates["torch-grouped"] = lambda: experts_grouped_mm(tokens, indices, routing, w_in, w_out, b_in, b_out,
                                                                 spec, drop_zero_weight=drop_zero_weight)
    elif kernel == "torch-grouped":
        raise BackendError(f"expert_kernel='torch-grouped' cannot run this plan: F.grouped_mm takes float32 and "
                           f"bfloat16 experts on the CPU with rows of a multiple of 16 bytes, and these are "
                           f"{str(tokens.dtype).removeprefix('torch.')} on {tokens.device.type} (hidden "
                           f"{spec.hidden}, intermediate {spec.intermediate}); use expert_kernel='torch'")
    if kernel == "onnxruntime" and not (float32_cpu and onnxruntime_installed()):
        why = "it runs float32 experts on the CPU only" if onnxruntime_installed() else \
            "onnxruntime is not installed (pip install onnxruntime)"
        raise BackendError(f"expert_kernel='onnxruntime' cannot run this plan: {why}; use expert_kernel='torch'")
    if kernel == "onnxruntime":
        return onnxruntime_kernel()(tokens, indices, routing)
    if kernel != "auto":
        return candidates[kernel]()
    raced_dtype = tokens.dtype in (torch.float32, torch.bfloat16) and w_in.dtype == w_out.dtype == tokens.dtype
    if not (on_cpu and raced_dtype) or tokens.shape[0] == 0:
        return candidates["torch"]()
    if not onednn_available(tokens.dtype):  # then "torch" runs F.linear too
        del candidates["torch-blas"]
    key = expert_kernel_key(spec, indices.shape[1], tokens.shape[0], str(tokens.dtype).removeprefix("torch."))
    # At one token onnxruntime lost the race on every host measured, and building its session costs a packed
    # copy of the experts, so ``auto`` leaves it out there: decoding alone never builds it.
    if float32_cpu and onnxruntime_installed() and tokens.shape[0] > 1 and onnxruntime_may_race(key, spec, w_in, w_out):
        candidates["onnxruntime"] = lambda: onnxruntime_kernel()(tokens, indices, routing)
    return EXPERT_KERNEL_CHOICE.run(key, candidates)


PACKED_COPY_HEADROOM = 0.2  # of the machine's memory, left available after building a packed copy of experts
_warned_low_memory = False


def onnxruntime_may_race(key: ExpertKernelKey, spec: ExpertsSpec, w_in: torch.Tensor, w_out: torch.Tensor) -> bool:
    """Whether ``auto`` runs onnxruntime for ``key``: it won the key's race, or the key is new and the packed
    copy of the experts its session keeps (about their size again) leaves a fifth of the machine's memory
    available (Linux's MemAvailable); else the torch kernels run, with one warning: a model that fits in
    memory is not pushed out of it by its first prompt."""
    global _warned_low_memory
    chosen = EXPERT_KERNEL_CHOICE.chosen.get(key)
    if chosen is not None:
        return chosen == "onnxruntime"
    packed = w_in.numel() * w_in.element_size() + w_out.numel() * w_out.element_size()
    memory = available_memory()
    if memory is None or memory[0] - packed >= PACKED_COPY_HEADROOM * memory[1]:
        return True
    if not _warned_low_memory:
        _warned_low_memory = True
        warn(f"moec: onnxruntime's experts kernel would keep a packed copy of each MoE layer's experts "
             f"({packed / 2**20:,.0f} MiB for a layer of {spec.num_experts} experts), leaving less than "
             f"{PACKED_COPY_HEADROOM:.0%} of this machine's memory available, so the torch kernels run the experts "
             "instead where it was not built already")
    return False


def available_memory() -> tuple[int, int] | None:
    """(bytes available, bytes in all) of this machine's memory, from /proc/meminfo; None where it cannot
    be read (not Linux)."""
    try:
        with open("/proc/meminfo") as meminfo:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in meminfo}
        return fields["MemAvailable"], fields["MemTotal"]
    except (OSError, ValueError, IndexError, KeyError):
        return None


def kernel_choice_lines() -> list[str]:
    """One line per choice ``auto`` made in this process for routed experts or a quantized linear: the layer
    and size, the winner, every time raced."""
    lines = []
    for (spec, top_k, size_bits, threads, weights), winner in EXPERT_KERNEL_CHOICE.chosen.items():
        layer = (f"{spec.num_experts} {'quantized ' if weights == 'quantized' else ''}experts "
                 f"{spec.hidden} -> {spec.intermediate}, top-{top_k}")
        lines.append(_choice_line(layer, size_bits, "token", threads, winner,
                                  EXPERT_KERNEL_CHOICE.timings[spec, top_k, size_bits, threads, weights]))
    for (rows, columns, bits, size_bits, threads), winner in LINEAR_KERNEL_CHOICE.chosen.items():
        lines.append(_choice_line(f"quantized linear {columns} -> {rows}, {bits} bits", size_bits, "row", threads,
                                  winner, LINEAR_KERNEL_CHOICE.timings[rows, columns, bits, size_bits, threads]))
    return lines


def _choice_line(what: str, size_bits: int, unit: str, threads: int, winner: str, timings: dict[str, float]) -> str:
    low, high = 1 << (size_bits - 1), (1 << size_bits) - 1  # size_bits >= 1: empty calls are not raced
    size = f"1 {unit}" if high == 1 else f"{low}-{high} {unit}s"
    times = ", ".join(f"{name} {seconds * 1e3:.2f} ms" for name, seconds in timings.items())
    return f"{what}, {size}, {threads} thread{'s' if threads > 1 else ''}: {winner} ({times})"


def expert_kernel_key(spec: ExpertsSpec, top_k: int, num_tokens: int, weights: str = "float32") -> ExpertKernelKey:
    """What ``auto``'s choice of kernel is remembered by: the layer's shape, its top-k, the token count to
    the next power of two, torch's intra-op thread count (onnxruntime's sessions take the same), and the
    experts' ``weights``: their dtype (``float32``, ``bfloat16``) or ``quantized``."""
    return spec, top_k, num_tokens.bit_length(), torch.get_num_threads(), weights


def run_ffn(op: DenseFFNOp | SharedExpertOp, weight, args):
    roles = ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down", "gate")
    tensors = {role: weight(role) for role in roles}  # by role, which names the parameters of both ffns
    if not any(isinstance(t, QuantizedWeight) for t in tensors.values()):
        return reference.ffn(args[0], **tensors, spec=op.spec)
    return quantized_ffn(args[0], **tensors, spec=op.spec, weight=weight)


def quantized_ffn(x, w_gate, w_up, w_down, b_gate, b_up, b_down, gate, spec, weight):
    """The dense FFN of ``reference.ffn`` with quantized linears, prepared once per op."""

    def linear(role: str, w, b):
        if not isinstance(w, QuantizedWeight):
            return lambda v: torch.nn.functional.linear(v, w, b)
        return lambda v: quantized_linear(weight, role, w, b, v)

    rows = x.reshape(-1, x.shape[-1])
    up = linear("w_up", w_up, b_up)(rows)
    if spec.gated:
        hidden = reference.gated_activation(linear("w_gate", w_gate, b_gate)(rows), up, spec)
    else:
        hidden = reference.activation(spec.act)(up)
    y = linear("w_down", w_down, b_down)(hidden)
    if gate is not None:
        y = torch.sigmoid(torch.nn.functional.linear(rows, gate)) * y
    return y.reshape(x.shape)


# The kernel ``quant_kernel="auto"`` measured fastest for a quantized dense linear, per matrix and size.
LinearKernelKey = tuple[int, int, int, int, int]  # see linear_kernel_key
LINEAR_KERNEL_CHOICE: KernelChoice[LinearKernelKey] = KernelChoice()


def linear_kernel_key(weight_type: QuantizedType, rows: int) -> LinearKernelKey:
    """What ``auto``'s choice for a quantized linear is remembered by: the matrix's [N, K] and width, the row
    count to the next power of two, and torch's intra-op thread count."""
    out_features, in_features = weight_type.static_shape[-2:]
    return out_features, in_features, max(weight_type.bits), rows.bit_length(), torch.get_num_threads()


def quantized_linear(weight: WeightReader, role: str, w: QuantizedWeight, b: torch.Tensor | None,
                     rows: torch.Tensor) -> torch.Tensor:
    """``rows @ dequantize(w).T (+ b)`` for the dense linear ``role`` on ``weight.quant_kernel``, each kernel
    prepared once.

    ``onnxruntime`` rounds the activations to int8 below ``QUANTIZED_FLOAT_ACTIVATIONS_MIN_TOKENS`` rows and
    keeps them float32 from there, as for routed experts. ``auto``: for float32 rows on the CPU, a matrix of at
    most ``INT4_MAX_BITS`` bits and at least ``QUANTIZED_ONNXRUNTIME_MIN_TOKENS`` rows, the fastest of
    ``int4pack``, ``dequant`` and MatMulNBits on float32 activations (``onnxruntime-float32``) or, below
    ``QUANTIZED_FLOAT_ACTIVATIONS_MIN_TOKENS`` rows, on int8 ones (``onnxruntime-int8``) for this matrix and
    size, timed on the first such call (``LINEAR_KERNEL_CHOICE``); else ``prepare_linear``'s own choice
    (``int4pack`` where it runs). On small matrices float32 activations can beat int8 ones at any size.
    """
    def prepared(kernel: str, int8: bool = False) -> Callable[[], torch.Tensor]:
        def build() -> Callable[[torch.Tensor], torch.Tensor]:
            if kernel == "onnxruntime":
                return onnxruntime_linear(w.matrix(0), b, int8_activations=int8)
            return prepare_linear(w.matrix(0), b, kernel)

        name = f"{role}:{kernel}:{activations_name(int8)}" if kernel == "onnxruntime" else f"{role}:{kernel}"
        return lambda: weight.cached(name, build, (w, b))(rows)

    int8 = int8_activations(rows.shape[0])
    kernel = weight.quant_kernel
    if kernel != "auto":
        return prepared(kernel, int8)()
    bits = max(w.type.bits)
    racing = (rows.dtype == torch.float32 and rows.device.type == "cpu" and bits <= INT4_MAX_BITS
              and rows.shape[0] >= QUANTIZED_ONNXRUNTIME_MIN_TOKENS)
    single = auto_kernel(bits, w.qweight.device, w.type.static_shape[-2])  # what ``prepare_linear`` runs for ``auto``
    if not racing:
        return prepared(single)()  # cached under its own name: one prepared copy, raced or not
    candidates = {"dequant": prepared("dequant")}
    if single == "int4pack":
        candidates["int4pack"] = prepared("int4pack")
    if onnxruntime_int8_available():
        candidates["onnxruntime-float32"] = prepared("onnxruntime", int8=False)
        if int8:
            candidates["onnxruntime-int8"] = prepared("onnxruntime", int8=True)
    return LINEAR_KERNEL_CHOICE.run(linear_kernel_key(w.type, rows.shape[0]), candidates)


class WeightReader:
    """An op's weights by role: tensors, or ``QuantizedWeight`` views of packed storage; plus a per-op cache
    for kernels prepared once (repacked quantized matrices, onnxruntime sessions holding packed experts).

    A cached kernel is rebuilt when a weight it was built from has been replaced in ``program.weights``
    since (passes and analyses that try weights out on one runner do that) or changed in place (a compiled
    model's weights are the model's own tensors, so ``model.load_state_dict`` reaches them): every kernel then
    computes with the same weights, whichever a call's size picks.
    """

    def __init__(self, op: Operation, program: Program, quant_kernel: str, expert_kernel: str) -> None:
        self.op, self.program = op, program
        self.quant_kernel, self.expert_kernel = quant_kernel, expert_kernel
        self.prepared: dict[tuple[str, int], Any] = {}  # (key, torch thread count) -> (sources, versions, kernel)
        self.building = threading.RLock()  # re-entrant: a build may prepare another kernel of the op

    def __call__(self, role: str) -> torch.Tensor | QuantizedWeight | None:
        ref = self.op.kwargs.get(role)
        if ref is None:
            return None
        weight_type = self.program.graph.weights.get(ref.name)
        if isinstance(weight_type, QuantizedType):
            return QuantizedWeight.from_storage(ref.name, weight_type, self.program.weights)
        return self.program.weights[ref.name]

    def cached(self, key: str, build: Callable[[], Any], sources: tuple[torch.Tensor | QuantizedWeight | None, ...]) -> Any:
        """``build()``, kept while the weights in ``sources`` are the ones it was built from, unchanged; one per
        torch thread count (an onnxruntime session keeps the count it was built with, and server threads may run
        with different counts). Threads asking together for a kernel not yet built wait for one build."""
        tensors = [t for source in sources for t in _storage_tensors(source)]
        versions = [inplace_version(t) for t in tensors]
        slot = (key, torch.get_num_threads())
        entry = self.prepared.get(slot)
        if entry is not None and _same_objects(entry[0], tensors) and entry[1] == versions:
            return entry[2]
        with self.building:
            entry = self.prepared.get(slot)
            if entry is None or not _same_objects(entry[0], tensors) or entry[1] != versions:
                entry = self.prepared[slot] = (tensors, versions, build())
            return entry[2]


def _same_objects(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def inplace_version(tensor: torch.Tensor) -> int | None:
    """The count of in-place changes torch keeps for ``tensor`` (None for an inference tensor, which keeps none
    and cannot be changed outside inference mode)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def _storage_tensors(weight: torch.Tensor | QuantizedWeight | None) -> tuple[torch.Tensor, ...]:
    """The tensors of ``program.weights`` that ``weight`` reads."""
    if weight is None:
        return ()
    if isinstance(weight, QuantizedWeight):
        return weight.qweight, weight.scales, weight.zeros
    return (weight,)


Rule = Callable[[Operation, WeightReader, list[Any]], Any]  # (op, its weights, its argument values) -> results


def rule_for(op_class: type[OpT], run: Callable[[OpT, WeightReader, list[Any]], Any]) -> Rule:
    """``run`` as a rule of the table, which looks it up by ``op_class`` (so it gets ops of that class)."""

    def rule(op: Operation, weight: WeightReader, args: list[Any]) -> Any:
        if not isinstance(op, op_class):
            raise BackendError(f"the torch rule for {op_class.name} cannot run {op.op_name}")
        return run(op, weight, args)

    return rule


RULES: dict[type[Operation], Rule] = {
    RouteOp: rule_for(RouteOp, run_route),
    ExpertsOp: rule_for(ExpertsOp, run_experts),
    DenseFFNOp: rule_for(DenseFFNOp, run_ffn),
    SharedExpertOp: rule_for(SharedExpertOp, run_ffn),
}


def check_quant_kernel(program: Program, kernel: str) -> None:
    """A ``BackendError`` naming the first quantized weight ``quant_kernel=kernel`` cannot run: ``int4pack``
    and ``onnxruntime`` take matrices of at most ``INT4_MAX_BITS`` bits stored on the CPU (``int4pack`` with rows
    in whole tiles of ``INT4_ROW_MULTIPLE``), and
    ``onnxruntime`` needs onnxruntime's int8 MatMulNBits kernel here."""
    if kernel not in ("int4pack", "onnxruntime"):
        return
    if kernel == "onnxruntime" and not onnxruntime_int8_available():
        why = "onnxruntime is not installed (pip install onnxruntime)" if not onnxruntime_installed() else \
            "onnxruntime's MatMulNBits does not compute on int8 activations on this CPU"
        raise BackendError(f"quant_kernel='onnxruntime' cannot run here: {why}; use quant_kernel='auto'")
    for name, weight_type in program.graph.weights.items():
        if not isinstance(weight_type, QuantizedType):
            continue
        device = program.weights[storage_names(name)["qweight"]].device
        widest = max(weight_type.bits)
        rows = weight_type.static_shape[-2]
        if widest > INT4_MAX_BITS or device.type != "cpu" or (kernel == "int4pack" and rows % INT4_ROW_MULTIPLE):
            found = (f"{widest}-bit matrices" if widest > INT4_MAX_BITS else f"its storage on {device}"
                     if device.type != "cpu" else f"{rows} rows, not a multiple of {INT4_ROW_MULTIPLE}")
            whole_tiles = f" with rows in multiples of {INT4_ROW_MULTIPLE}" if kernel == "int4pack" else ""
            raise BackendError(f"quant_kernel={kernel!r} runs CPU matrices of at most {INT4_MAX_BITS} bits{whole_tiles}, and "
                               f"weight @{name} has {found}; use quant_kernel='auto' (a kernel that runs each "
                               "matrix) or 'dequant'")


class TorchRunner:
    """Runs a program's graph on torch tensors (any device the weights are on).

    ``rules`` is the op -> rule table; another backend can run through this interpreter with some rules
    replaced (the Triton backend substitutes its kernels for ``moe.route``/``moe.experts``).
    """

    rules: dict[type[Operation], Rule] = RULES

    def __init__(self, program: Program, quant_kernel: str = "auto", expert_kernel: str = "auto") -> None:
        """``quant_kernel`` picks the kernel for quantized linears (``moec.kernels.quant_matmul.KERNELS``);
        ``expert_kernel`` the one for float routed experts (``EXPERT_KERNELS``: ``onnxruntime`` is
        ``moec.kernels.moe_onnxruntime``, ``torch`` is ``moec.kernels.moe_cpu`` on oneDNN's matmuls,
        ``torch-blas`` the same on ``F.linear``, ``torch-grouped`` on ``F.grouped_mm``, ``auto`` the fastest of
        them measured on this host for float32 and bfloat16 experts on the CPU, else ``torch``; see
        ``float_experts``)."""
        check_kernel_names(quant_kernel, expert_kernel)
        check_quant_kernel(program, quant_kernel)
        self.program = program
        self.quant_kernel = quant_kernel
        self.expert_kernel = expert_kernel
        self.callees = [self.callee(op) for op in program.graph.ops]
        self.skips = mask_skips(program.graph, self.callees)  # and the callees of their SDPA ops
        self.function = GraphFunction(program.graph, self.callees, skips=self.skips)
        self._observing_function: GraphFunction | None = None

    def callee(self, op: Operation) -> Callee:
        """What runs ``op``: the ATen op (or Python operator) a generic op names, called with its arguments
        spread; any other op's rule, through ``prepare``."""
        if not isinstance(op, AtenOp):
            return Callee(self.prepare(op), spread=False)
        if op.target == "aten.scaled_dot_product_attention.default":  # a mask that needs none runs without
            return Callee(read_mask_sdpa, spread=True)
        fn = resolve_target(op.target)
        schema = getattr(fn, "_schema", None)
        returns_list = schema is not None and len(op.results) == 1 and len(schema.returns) == 1 \
            and isinstance(schema.returns[0].type, torch.ListType)
        # An OpOverload's own __call__ only forwards to ``_op``, the dispatcher entry: skip that Python frame.
        return Callee(getattr(fn, "_op", fn), spread=True, returns_list=returns_list)

    def prepare(self, op: Operation) -> Callable[[list[Any]], Any]:
        """``step(args)`` running ``op`` (not a generic op) by its rule in ``rules``; subclasses
        replace it for the ops they run otherwise."""
        rule = self.rules.get(type(op))
        if rule is None:
            raise BackendError(f"the torch runner has no rule for {op.op_name}")
        weight = WeightReader(op, self.program, self.quant_kernel, self.expert_kernel)
        return lambda args: rule(op, weight, args)

    @property
    def python_source(self) -> str:
        """The Python source the graph runs as (``moec.backend.graph_function``)."""
        return self.function.source

    def plan_files(self) -> dict[str, str]:
        """Files this backend adds to a saved plan folder (none: the IR and weights say everything)."""
        return {}

    def run(self, inputs: list[torch.Tensor], observe: Observer | None = None) -> list[torch.Tensor]:
        """Run the graph on flat inputs; ``observe(op, args, result)`` sees every op as it runs
        (calibration and tracing use it to record activations and routing decisions). An error an op raises
        gets a note naming that op: its IR line and where it is in the model."""
        graph = self.program.graph
        if len(inputs) != len(graph.inputs):
            raise BackendError(f"the graph takes {len(graph.inputs)} inputs, got {len(inputs)}")
        function = self.function
        if observe is not None:
            if self._observing_function is None:  # written on first use: only calibration and tracing observe
                self._observing_function = GraphFunction(graph, self.callees, observing=True, skips=self.skips)
            function = self._observing_function
        with torch.inference_mode():
            try:
                return function(self.program.weights, observe, inputs)
            except Exception as error:
                step = function.failed_step(error)
                if step is not None and hasattr(error, "add_note"):  # notes: Python 3.11 on
                    error.add_note(f"moec: raised by the op at {op_location(graph, graph.ops[step])}")
                raise
