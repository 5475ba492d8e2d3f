"""``moec.compile``: capture -> lower -> passes -> backend -> ``CompiledModel``; and ``moec.load``."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moec.analysis.allocation_chart import allocation_svg
from moec.analysis.calibration import META_FILE as CALIBRATION_META
from moec.analysis.calibration import TENSORS_FILE as CALIBRATION_TENSORS
from moec.analysis.calibration import Calibration
from moec.analysis.traces import RoutingTrace
from moec.backend.torch_runner import (
    TorchRunner,
    check_kernel_names,
    check_quant_kernel,
    onnxruntime_installed,
)
from moec.backend.triton_codegen import KERNELS_FILE
from moec.errors import BackendError, MoecError, PlanError, warn
from moec.frontend.capture import float_dtype, inference_setup
from moec.frontend.sizes_of_one import capture_for_sizes_of_one
from moec.ir.core import WeightRef
from moec.ir.ops import DenseFFNOp, ExpertsOp, RouteOp, SharedExpertOp
from moec.ir.plan import load_plan, read_consistently, save_plan
from moec.ir.printer import print_graph
from moec.ir.program import Program
from moec.ir.quant import QuantizedType
from moec.passes import PassContext, build_passes, load_recipe, run_passes
from moec.passes.base import missing_calibration, trace_refusal, unused_calibration
from moec.passes.manager import with_cleanup
from moec.paths import user_path
from moec.report import ALLOCATION_CHART, REPORT_FILE, plan_report

BACKENDS = ("torch", "triton")


KERNELS = "kernels"  # program.metadata: the kernels fixed at compile time (none: each timed on the host)


def unknown_backend(backend: object) -> MoecError:
    """The error for a backend name moec does not run, pointing to where ONNX and expert parallelism live."""
    return MoecError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)} (ONNX files come from "
                     "compiled.export_onnx, expert-parallel runs from torchrun -m moec.run on a placed plan)")


class CompiledModel:
    """A compiled model: call it like the original model; inspect ``.ir``; ``.save()`` a plan folder."""

    def __init__(self, program: Program, backend: str = "torch", *, calibration: Calibration | None = None,
                 kernels_file: Path | None = None, expert_kernel: str = "auto", quant_kernel: str = "auto") -> None:
        if backend not in BACKENDS:
            raise unknown_backend(backend)
        check_kernel_names(quant_kernel, expert_kernel)
        if backend != "triton" and "triton" in program.metadata.get("report", {}):
            program = without_triton_record(program)
        self.program = program
        self.kernels = {"expert_kernel": expert_kernel, "quant_kernel": quant_kernel}  # kept by a saved plan
        self.backend = backend
        self.calibration = calibration  # the statistics passes used, saved with the plan for reuse
        if backend == "triton":
            from moec.backend.triton_runner import TritonRunner

            triton_runner = TritonRunner(program, kernels_file, quant_kernel, expert_kernel)
            self.report["triton"] = triton_runner.report()  # its fallbacks to the torch rules, saved with the plan
            self.runner: TorchRunner = triton_runner
        else:
            self.runner = TorchRunner(program, quant_kernel, expert_kernel)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        inputs = self.program.flatten_inputs(args, kwargs)
        try:
            outputs = self.runner.run(inputs)
        except (IndexError, RuntimeError) as err:
            found = self.program.input_problem(inputs)
            if found is not None:
                problem, advice = found
                raise ValueError(f"{problem}, and the compiled model fails on it ({type(err).__name__}: {err}); "
                                 f"call it with {advice}") from err
            raise
        return self.program.unflatten_outputs(outputs)

    @property
    def ir(self) -> str:
        """The program's IR in its canonical text form."""
        return print_graph(self.program.graph)

    @property
    def report(self) -> dict[str, Any]:
        return self.program.metadata.setdefault("report", {})

    def save(self, path: str | os.PathLike) -> Path:
        """Write a plan folder (``plan.json`` + ``weights.safetensors``, the calibration if any, the
        backend's generated kernels, ``triton_kernels.py`` for the triton backend, and the report's plots,
        ``bit_allocation.svg`` after bit allocation) to ``path``, with ``report.md``: what was compiled, how
        it was checked and what each pass changed (``moec.report``). The plan records this model's backend, which
        ``moec.load`` runs it on by default."""
        extra_files = self.calibration.to_files() if self.calibration is not None else {}
        extra_files |= self.runner.plan_files()
        if "bit_allocation" in self.report:
            extra_files[ALLOCATION_CHART] = allocation_svg(self.report["bit_allocation"])
        metadata = {key: value for key, value in self.program.metadata.items() if key != KERNELS}
        if set(self.kernels.values()) != {"auto"}:
            metadata[KERNELS] = self.kernels
        program = dataclasses.replace(self.program, metadata={**metadata, "backend": self.backend})
        report = plan_report(program, self.summary(), list(extra_files),
                             self.calibration.describe() if self.calibration is not None else "")
        return save_plan(program, path, extra_files or None, documents={REPORT_FILE: report})

    def export_onnx(self, path: str | os.PathLike, *, lowering: str = "portable", opset: int | None = None,
                    external_data: bool | None = None) -> Path:
        """Write a checked ``.onnx`` file (``lowering``: ``portable`` or ``ort``); see ``moec.backend.onnx``.

        The checks' results (parity per shape, fused MoE ops, fallbacks) go in ``report["onnx"]``.
        """
        from moec.backend.onnx import export_onnx
        from moec.backend.onnx.export import DEFAULT_OPSET

        result = export_onnx(self.program, path, lowering=lowering, opset=DEFAULT_OPSET if opset is None else opset,
                             external_data=external_data)
        self.report["onnx"] = result.as_report()
        return result.path

    def check(self, model: nn.Module, inputs: tuple | Mapping[str, Any], label: str = "inputs") -> dict[str, Any]:
        """Compare this compiled model with the original ``model`` on ``inputs`` (positional tuple or keyword
        dict), record the result in ``report["checks"]`` (``report.md`` and ``moec inspect`` show it) and
        return it. A plan whose passes keep the outputs gets a parity check: ``max_abs_diff`` against
        ``tolerance`` (by the model's float dtype: 1e-4 for float32, 1e-2 for float16, 5e-2 for bfloat16) and
        ``passed``. One whose passes change the outputs by design (``quantize``, ``dense-to-moe`` ...) gets its
        deviation instead (``cosine``, ``max_abs_diff``, ``scale``; see ``Deviation``): there is no tolerance
        to hold it to."""
        check_inputs_kind(inputs, "inputs")
        parameters = self.program.metadata.get("forward_parameters", [])
        named = inputs.items() if isinstance(inputs, Mapping) else \
            ((parameters[i] if i < len(parameters) else f"argument {i}", value) for i, value in enumerate(inputs))
        shapes = ", ".join(f"{name} {tuple(value.shape)}" for name, value in named if isinstance(value, torch.Tensor))
        record: dict[str, Any] = {"inputs": label, "shapes": shapes}
        if changes_outputs(self.program):
            result = deviation(model, self, inputs)
            record |= {"kind": "deviation", "cosine": result.cosine, "max_abs_diff": result.max_abs_diff,
                       "scale": result.scale,
                       "masked": isinstance(inputs, Mapping) and isinstance(inputs.get("attention_mask"), torch.Tensor)}
        else:
            difference, tolerance = parity(model, self, inputs), PARITY_TOLERANCE.get(float_dtype(model), 1e-4)
            record |= {"kind": "parity", "max_abs_diff": difference, "tolerance": tolerance,
                       "passed": difference <= tolerance}
        self.report.setdefault("checks", []).append(record)
        return record

    def summary(self) -> list[dict[str, Any]]:
        """One row per FFN/MoE layer: kind, experts, top-k, parameters and bytes of its weights."""
        return layer_summary(self.program)


def compile(
    model: nn.Module,
    example_inputs: tuple | Mapping[str, Any] = (),
    *,
    recipe: str | os.PathLike | Mapping[str, Any] | None = None,
    calibration: Any = None,
    backend: str = "torch",
    expert_kernel: str = "auto",
    quant_kernel: str = "auto",
) -> CompiledModel:
    """Compile ``model`` for inference from example inputs.

    ``example_inputs`` is a tuple of positional arguments or a dict of keyword arguments, as you would
    pass them to ``model``; the compiled model accepts other batch and sequence sizes. ``recipe`` lists
    passes to run (a dict, or a YAML/JSON file); ``calibration`` is data for passes that need it: a list
    of sample inputs (each a tuple or kwargs dict like ``example_inputs``, or a tensor for a model with one
    input), one batch (a dict, or a tensor), or a ``Calibration`` (for example
    ``Calibration.load(plan_folder)``, stored with the plan), see ``moec.analysis.calibration``; samples
    that no pass of the recipe needs are left unused, with a warning. ``expert_kernel`` and ``quant_kernel``
    fix the kernels of float routed experts and of quantized weights (``auto``: the fastest, timed on this host
    per size; ``torch`` and ``dequant`` give outputs that do not depend on the process or the batch size), kept
    by a saved plan.
    """
    if backend not in BACKENDS:
        raise unknown_backend(backend)
    check_kernel_names(quant_kernel, expert_kernel)
    if backend == "triton":  # before capture and passes, which can take minutes
        from moec.backend.triton_runner import check_available

        check_available()
    check_compile_arguments(example_inputs, recipe)
    args, kwargs = ((), dict(example_inputs)) if isinstance(example_inputs, Mapping) else (tuple(example_inputs), {})
    recipe_dict = load_recipe(recipe if not isinstance(recipe, Mapping) else dict(recipe))
    passes = build_passes(recipe_dict)
    context = PassContext(calibration=calibration)
    stored = isinstance(context.calibration, Calibration)  # kept with the plan, for reuse, even when unused
    if calibration is not None and not stored and not any(p.uses_calibration() for p in passes):
        warn(f"calibration is not used: {unused_calibration(passes)}; leave it out")
    needing = [p for p in passes if p.needs_calibration()]
    if calibration is None and needing:  # before capture, which can take minutes
        first = needing[0]
        when = f", with these options (it calibrates {first.calibration_when})," if first.calibration_when else ""
        raise missing_calibration(f"pass {first.name!r}{when}")
    if isinstance(context.calibration, RoutingTrace):
        for pass_ in needing:
            if not pass_.takes_a_trace:
                raise trace_refusal(f"pass {pass_.name!r}")
    program = capture_for_sizes_of_one(model, args, kwargs)
    run_passes(program, with_cleanup(passes), context)
    if "placement" in program.metadata.get("expert_parallel", {}):
        from moec.backend.distributed import runtime_refusal

        refusal = runtime_refusal(program.graph)
        if refusal is not None:
            warn(f"the plan is placed for expert parallelism, but it has {refusal}, which the expert-parallel runtime "
                 "does not run: it runs in one process only; leave them out of the recipe to distribute it")
    program.metadata["recipe"] = recipe_dict
    program.metadata["backend"] = backend
    if context.report:
        program.metadata["report"] = context.report
    return CompiledModel(program, backend, calibration=context.plan_calibration(), expert_kernel=expert_kernel,
                         quant_kernel=quant_kernel)


def without_triton_record(program: Program) -> Program:
    """A copy of ``program`` whose report drops the record of a triton run, which does not apply to another
    backend; the copy is shallow, so ``program`` itself, perhaps shared with a triton model, keeps it."""
    report = {key: value for key, value in program.metadata["report"].items() if key != "triton"}
    return dataclasses.replace(program, metadata={**program.metadata, "report": report})


def check_inputs_kind(inputs: Any, name: str) -> None:
    """A ``TypeError`` saying how to pass model inputs when ``inputs`` (the argument ``name``) cannot be them."""
    if isinstance(inputs, torch.Tensor):
        raise TypeError(f"{name} is a single tensor; pass a tuple of the model's positional arguments, "
                        "such as (input_ids,), or a dict of its keyword arguments")
    if not isinstance(inputs, (tuple, list, Mapping)):
        raise TypeError(f"{name} is a {type(inputs).__name__}; pass a tuple of the model's "
                        "positional arguments, such as (input_ids,), or a dict of its keyword arguments")


def check_compile_arguments(example_inputs: Any, recipe: Any) -> None:
    """A ``TypeError`` saying how to pass ``example_inputs`` or ``recipe`` when its kind cannot be one."""
    check_inputs_kind(example_inputs, "example_inputs")
    if recipe is not None and not isinstance(recipe, (str, os.PathLike, Mapping)):
        hint = f" ({{'passes': [...]}} around this {type(recipe).__name__})" if isinstance(recipe, list) else ""
        raise TypeError(f"recipe is a {type(recipe).__name__}; pass a dict with a 'passes' list{hint}, such as "
                        "{'passes': [{'quantize': {'bits': 4}}]}, or the path of a YAML/JSON recipe file")


def load(path: str | os.PathLike, backend: str | None = None, *, expert_kernel: str | None = None,
         quant_kernel: str | None = None) -> CompiledModel:
    """Load a plan folder written by ``CompiledModel.save`` or ``moec compile -o``.

    ``backend``, ``expert_kernel`` and ``quant_kernel`` (see ``compile``) default to those the plan was saved
    with; a triton plan runs the kernels saved in it.
    """
    folder = user_path(path)
    program, listed, calibration = read_consistently(folder, lambda: read_plan_files(folder), lambda read: read[1])
    backend = backend or program.metadata.get("backend", "torch")
    kernels_file = folder / KERNELS_FILE if KERNELS_FILE in listed else None
    fixed = program.metadata.pop(KERNELS, {})  # the CompiledModel's kernels from here on
    kernels = {"expert_kernel": expert_kernel or fixed.get("expert_kernel", "auto"),
               "quant_kernel": quant_kernel or fixed.get("quant_kernel", "auto")}
    if quant_kernel is None and kernels["quant_kernel"] != "auto":  # fixed by the plan, on another host maybe
        try:
            check_quant_kernel(program, kernels["quant_kernel"])
        except BackendError as err:
            warn(f"{folder} fixes quant_kernel={kernels['quant_kernel']!r}, which cannot run here ({err}); it runs "
                 "on the quantized kernels timed on this host instead")
            kernels["quant_kernel"] = "auto"
    if expert_kernel is None and kernels["expert_kernel"] == "onnxruntime" and not onnxruntime_installed():
        warn(f"{folder} fixes expert_kernel='onnxruntime', and onnxruntime is not installed here; it runs on the "
             "expert kernels timed on this host instead")
        kernels["expert_kernel"] = "auto"
    return CompiledModel(program, backend, calibration=calibration, kernels_file=kernels_file, **kernels)


def read_plan_files(folder: Path) -> tuple[Program, set[str], Calibration | None]:
    """The program of the plan at ``folder``, the files its plan.json lists, and its calibration if it has one."""
    program, listed = load_plan(folder)
    if not {CALIBRATION_META, CALIBRATION_TENSORS} <= listed:
        return program, listed, None
    try:
        return program, listed, Calibration.load(folder)
    except Exception as err:  # checksums matched, so the files were written so: from another moec's format
        raise PlanError(f"{folder}: its calibration does not load ({type(err).__name__}: {err}); compile the plan "
                        "again") from None


def layer_summary(program: Program) -> list[dict[str, Any]]:
    rows = []
    for op in program.graph.ops:
        if not isinstance(op, (DenseFFNOp, RouteOp, ExpertsOp, SharedExpertOp)):
            continue
        params, size = program.weight_sizes(ref.name for ref in op.weight_refs)
        spec = op.spec
        row = {
            "op": op.op_name,
            "weights": weights_module(op.weight_refs),
            "experts": getattr(spec, "num_experts", ""),
            "top_k": op.top_k if isinstance(op, ExpertsOp) else getattr(spec, "top_k", ""),
            "detail": describe_spec(op) + describe_quantization(program, op),
            "params": params,
            "bytes": size,
        }
        rows.append(row)
    return rows


def weights_module(refs: list[WeightRef]) -> str:
    """The module that holds all of an op's weights: their longest common dotted prefix (a lone weight's
    module), so an FFN's row names the MLP, not its first projection."""
    return ".".join(os.path.commonprefix([ref.name.split(".")[:-1] for ref in refs])) if refs else ""


def describe_spec(op: Any) -> str:
    spec = op.spec
    if isinstance(op, RouteOp):
        bias = (", logit bias" if spec.has_logit_bias else "") + (", score bias" if spec.has_bias else "")
        by_best = " by best" if spec.group_score == "max" else ""
        groups = f", groups {spec.topk_group}/{spec.n_group}{by_best}" if spec.n_group > 1 else ""
        return f"{spec.scoring} {spec.order}{', renorm' if spec.renormalize else ''}{bias}{groups}"
    gate = " + sigmoid gate" if getattr(spec, "has_output_gate", False) else ""
    if isinstance(op, ExpertsOp) and not isinstance(op.args[1].owner, RouteOp):
        gate = ", routed by the model's own code"
    kind = "gated " if spec.gated else ""
    clamp = ""
    if getattr(spec, "limit", None) is not None:
        offset = f", up + {spec.up_offset:g}" if spec.up_offset else ""
        clamp = f", clamped at {spec.limit:g}{offset}"
    if getattr(spec, "weighted_input", False):
        gate += ", routing weight on the input"
    if isinstance(op, ExpertsOp) and op.expert_map is not None:
        gate += f", merged from {len(op.expert_map)} router experts"
    if isinstance(op, ExpertsOp) and op.skip_threshold:
        gate += f", skips weights < {op.skip_threshold:g} x top"
    return f"{kind}{spec.act}{clamp}, hidden {spec.hidden}, ffn {spec.intermediate}{gate}"


def describe_quantization(program: Program, op: Any) -> str:
    """``", 4-bit, group 32"`` for an op with quantized weights (``", 2-8 bits (mean 3.50), group 32"`` when
    its matrices have several widths: the mean per parameter); ``""`` for a float one."""
    types = [program.graph.weights[ref.name] for ref in op.weight_refs]
    quantized = [t for t in types if isinstance(t, QuantizedType)]
    if not quantized:
        return ""
    bits = [width for t in quantized for width in t.bits]
    # the mean over parameters, as a budget counts them: each matrix's width weighs by its size
    sizes = [math.prod(t.static_shape[-2:]) for t in quantized for _ in t.bits]
    mean = sum(width * size for width, size in zip(bits, sizes, strict=True)) / sum(sizes)
    widths = f"{bits[0]}-bit" if len(set(bits)) == 1 else f"{min(bits)}-{max(bits)} bits (mean {mean:.2f})"
    groups = " or ".join(str(group) for group in sorted({t.group for t in quantized}))
    return f", {widths}, group {groups}"


PARITY_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}  # max abs difference


def changes_outputs(program: Program) -> list[str]:
    """The passes run on ``program`` that change its outputs by design (``quantize``, ``dense-to-moe`` ...), left
    out where they changed nothing."""
    from moec.passes.base import find_pass

    names = dict.fromkeys(record["pass"] for record in program.metadata.get("passes", []) if record.get("modified", True))
    return [name for name in names if (cls := find_pass(name)) is not None and cls.approximate]


def parity(model: nn.Module, compiled: CompiledModel, example_inputs: tuple | Mapping[str, Any]) -> float:
    """Max abs difference between the original model and the compiled one on the same inputs."""
    return max(((a.float() - b.float()).abs().max().item() for a, b in paired_outputs(model, compiled, example_inputs)
                if a.numel()), default=0.0)


@dataclass(frozen=True)
class Deviation:
    """How far a compiled model that changes the model by design (quantized, pruned, converted to experts)
    lies from the original on some inputs, over the rows of every output tensor (its last dimension is a
    row); with an ``attention_mask`` input, padding positions are left out."""

    max_abs_diff: float
    scale: float  # the largest magnitude among the original's output rows
    cosine: float  # mean cosine between the original's and the compiled model's output rows


def deviation(model: nn.Module, compiled: CompiledModel, inputs: tuple | Mapping[str, Any]) -> Deviation:
    """The ``Deviation`` of ``compiled`` from ``model`` on ``inputs``."""
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    rows = []
    for expected, got in paired_outputs(model, compiled, inputs):
        if expected.dim() == 0 or not expected.numel():
            continue
        if isinstance(mask, torch.Tensor) and expected.dim() >= 3 and expected.shape[:2] == mask.shape:
            keep = mask.to(expected.device).bool()
            expected, got = expected[keep], got[keep]
        rows.append((expected.float().reshape(-1, expected.shape[-1]), got.float().reshape(-1, expected.shape[-1])))
    if not rows:
        return Deviation(0.0, 0.0, 1.0)
    cosines = torch.cat([torch.nn.functional.cosine_similarity(a, b, dim=-1) for a, b in rows])
    return Deviation(max((a - b).abs().max().item() for a, b in rows), max(a.abs().max().item() for a, _ in rows),
                     cosines.mean().item())


def paired_outputs(model: nn.Module, compiled: CompiledModel,
                   inputs: tuple | Mapping[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(original, compiled) pairs of every output tensor on the same inputs, on the original's device."""
    args, kwargs = ((), dict(inputs)) if isinstance(inputs, Mapping) else (tuple(inputs), {})
    with inference_setup(model), torch.inference_mode():  # as it was captured: eval, no cache or router logits
        expected = model(*args, **kwargs)
    got = compiled(*args, **kwargs)
    leaves_expected = [t for t in torch.utils._pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
    leaves_got = [t for t in torch.utils._pytree.tree_leaves(got) if isinstance(t, torch.Tensor)]
    if len(leaves_expected) != len(leaves_got):
        raise MoecError(f"compiled model returned {len(leaves_got)} tensors, the model {len(leaves_expected)}")
    # The triton backend answers on its GPU.
    return [(a, b.to(a.device)) for a, b in zip(leaves_expected, leaves_got, strict=True)]
