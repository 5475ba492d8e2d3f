"""Export a moec program to a checked ``.onnx`` file.

``export_onnx`` builds a ``ProgramModule`` (the IR evaluated with export-friendly rules), traces it
once with ``torch.export`` and translates it with torch.onnx's dynamo exporter: the steps of
``torch.onnx.export(dynamo=True)``, run here so that the translation registry is built once per process,
the decomposition re-trace is skipped when no op needs it (``prepare``), and constant folding leaves
packed weights packed. The result is checked before it lands at the target path:

1. ``onnx.checker`` and ``onnx.shape_inference`` (strict) on the staged file;
2. an onnxruntime parity run against the torch runner on fresh inputs of shapes capture never saw
   (max abs difference of every output <= ``tolerance``).

The file is written in a temporary folder beside the target and moved into place only when every
check passed, so a failed export leaves nothing behind (nor the folders it made for the file); an
inline export removes the ``<file>.data`` an earlier export with external data left there. Inputs and
outputs keep the model's names; symbolic dims are named ``batch`` and ``sequence`` (axis 0 and 1) where
they are dynamic.

The conditions ``torch.export`` put on input sizes (a plan checks them on each call; see ``moec.ir.guards``)
are not in the graph: onnxruntime runs any size the axes allow, and a size outside them fails in some node
(BERT past its position table) or, where the model's code branches on a size, can compute the example's
branch. They travel as the model's metadata ``moec_input_guards`` (a JSON list), which
``moec.ir.guards.InputGuards(conditions).broken(inputs)`` checks a call's inputs against.

Only float32 programs are exported: onnxruntime's CPU kernels lack bfloat16 for most ops (and float16 and
float64 for some: ScatterND's add, Erf), so a plan compiled in bfloat16, float16 or float64 is refused up front.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir
import onnxruntime
import onnxscript.optimizer
import onnxscript.version_converter
import torch
import torch.utils._pytree as pytree
from onnxscript.rewriter.rules.fusion import _gqa, _rms_normalization
from onnxscript.version_converter._version_converter import SUPPORTED_MAX_ONNX_OPSET
from torch.export import Dim
from torch.onnx._internal.exporter import _core as _torch_onnx_core
from torch.onnx._internal.exporter import _decomp, _registration
from torch.onnx._internal.exporter import _fx_passes as _torch_onnx_fx_passes
from torch.onnx._internal.exporter import _ir_passes as _torch_onnx_ir_passes
from torch.onnx._internal.exporter import _onnx_program as _torch_onnx_program
from torch.onnx._internal.exporter._constants import TORCHLIB_OPSET

from moec.backend.onnx import quant
from moec.backend.onnx.complex_pairs import pairs_unsupported, touches_complex
from moec.backend.onnx.module import ProgramModule, ProgramRules
from moec.backend.onnx.moe import LOWERINGS
from moec.backend.onnx.moe import TRANSLATIONS as MOE_TRANSLATIONS
from moec.backend.torch_runner import TorchRunner
from moec.errors import BackendError, warn
from moec.ir.ops import AtenOp
from moec.ir.printer import op_location
from moec.ir.program import Program, load_treespec
from moec.paths import user_path

DEFAULT_OPSET = 20
MIN_OPSET = TORCHLIB_OPSET  # torch.onnx translates at this opset; the version converter only goes up
MAX_OPSET = min(SUPPORTED_MAX_ONNX_OPSET, onnx.defs.onnx_opset_version())
FUSED_MOE_OPS = ("MoE", "QMoE")  # com.microsoft ops of the ort lowering
GUARDS_KEY = "moec_input_guards"  # the model metadata that keeps the plan's conditions on input sizes
LOW_PRECISION = {"bf16": "bfloat16", "f16": "float16"}  # IR dtypes the export refuses
EXTERNAL_DATA_BYTES = 1 << 30  # weights above 1 GiB go to a ``<file>.data`` beside the model
INLINE_BYTES_MAX = _torch_onnx_program._LARGE_MODEL_THRESHOLD  # torch.onnx writes external data above it, asked or not
TRACE_SHAPE = (2, 4)  # (batch, sequence) of the inputs traced
CHECK_SHAPES = ((3, 5), (1, 11))  # (batch, sequence) of the parity inputs: shapes tracing never saw
AXIS_NAMES = ("batch", "sequence")
TRANSLATIONS = {**MOE_TRANSLATIONS, **quant.TRANSLATIONS}


@dataclass
class OnnxExport:
    """What an export wrote and how its checks went (``max_abs_diff`` per (batch, sequence)); ``opset``
    and ``fused_ops`` (com.microsoft.MoE / QMoE nodes by op) are read from the written file."""

    path: Path
    lowering: str
    opset: int
    external_data: bool
    fused_ops: dict[str, int] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    tolerance: float = 1e-4

    def as_report(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "lowering": self.lowering, "opset": self.opset,
            "external_data": self.external_data, "fused_moe_ops": sum(self.fused_ops.values()),
            "fused_moe_ops_by_op": self.fused_ops,
            "portable_fallbacks": self.fallbacks, "parity_max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance, "checks": ["onnx.checker", "shape_inference", "onnxruntime parity"],
        }


def export_onnx(program: Program, path: str | os.PathLike, *, lowering: str = "portable",
                opset: int = DEFAULT_OPSET, external_data: bool | None = None, optimize: bool = True,
                tolerance: float = 1e-4) -> OnnxExport:
    """Export ``program`` to ``path`` and check it (see the module docstring); raise ``BackendError``.

    ``lowering`` is ``portable`` (standard ONNX ops) or ``ort`` (com.microsoft.MoE where it applies);
    ``opset`` from ``MIN_OPSET`` to ``MAX_OPSET``; ``external_data`` None picks external data for weights
    above 1 GiB, False is refused for weights above ``INLINE_BYTES_MAX``.
    """
    if lowering not in LOWERINGS:
        raise BackendError(f"unknown ONNX lowering {lowering!r}; choose one of {', '.join(LOWERINGS)}")
    check_opset(opset)
    if external_data is not None and not isinstance(external_data, bool):
        raise TypeError(f"external_data is a {type(external_data).__name__} ({external_data!r}); give True, False "
                        "or None (external data for weights above 1 GiB)")
    check_float32(program)
    check_lowerable(program)
    target = check_target(path)
    weight_bytes = sum(t.numel() * t.element_size() for t in program.weights.values())
    if external_data is None:
        external_data = weight_bytes > EXTERNAL_DATA_BYTES
    elif not external_data and weight_bytes > INLINE_BYTES_MAX:
        raise BackendError(f"the plan's weights take {weight_bytes / (1 << 30):.2f} GiB, more than torch.onnx writes "
                           f"inside a .onnx file ({INLINE_BYTES_MAX / (1 << 30):.1f} GiB); export them as external "
                           "data (leave out external_data=False / --no-external-data)")
    rules = ProgramRules(program, lowering)
    fallbacks = dict(rules.moe_plan.fallbacks)
    for block, reason in fallbacks.items():
        warn(f"{block} uses the portable MoE lowering: {reason}")
    result = OnnxExport(target, lowering, opset, external_data, fallbacks=fallbacks, tolerance=tolerance)
    made = next((folder for folder in reversed(target.parents) if not folder.exists()), None)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as err:  # a folder that cannot be written to
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise BackendError(f"cannot write {target}: {err.strerror or err}; choose another output path") from None
    try:
        staged = staging / target.name
        onnx_program = trace_to_onnx(rules.module, program, opset, optimize)
        onnx_program.save(str(staged), external_data=external_data)
        result.opset, result.fused_ops = tidy(staged, program.metadata.get("input_guards", []))
        check_model(staged)
        result.max_abs_diff = check_parity(staged, program, tolerance)
        replace_files(sorted(staging.iterdir()), target.parent)
        if not external_data:
            target.with_name(target.name + ".data").unlink(missing_ok=True)  # an earlier export's, now stale
    except BaseException as err:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        if isinstance(err, OSError) and err.errno in WRITE_FAILURES:  # a full disk, a quota, a read-only disk
            raise BackendError(f"cannot write {target}: {err.strerror or err}; nothing was written") from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


# ----------------------------------------------------------------------------------------------
# tracing
# ----------------------------------------------------------------------------------------------


WRITE_FAILURES = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


def replace_files(files: list[Path], folder: Path) -> None:
    """Move ``files`` into ``folder`` as one change: the files they replace (a model and its external data)
    are set aside first and put back if any move fails, so an interrupted export never leaves a new data
    file beside an old model."""
    set_aside = []
    try:
        for file in files:
            destination = folder / file.name
            if destination.exists():
                aside = destination.with_name(f".{destination.name}.old")
                os.replace(destination, aside)
                set_aside.append((aside, destination))
        for file in files:
            os.replace(file, folder / file.name)
    except BaseException:
        for file in files:
            if not file.exists():
                (folder / file.name).unlink(missing_ok=True)
        for aside, destination in set_aside:
            os.replace(aside, destination)
        raise
    for aside, _ in set_aside:
        aside.unlink(missing_ok=True)


def trace_to_onnx(module: ProgramModule, program: Program, opset: int, optimize: bool):
    """One torch.export trace of ``module``, translated by torch.onnx's registry (see ``prepare``)."""
    graph = program.graph
    example = example_inputs(program, *TRACE_SHAPE)
    dynamic = tuple({axis: Dim.DYNAMIC for axis, dim in enumerate(v.tensor_type.shape) if isinstance(dim, str)}
                    for v in graph.inputs)
    registry = onnx_registry(opset)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = torch.export.export(module, tuple(example), dynamic_shapes=(dynamic,), strict=False)
            exported = prepare(exported, registry)
            onnx_program = _torch_onnx_core._exported_program_to_onnx_program(exported, registry=registry)
            onnxscript.version_converter.convert_version(onnx_program.model, opset)
            # An output that is an input, or another output, gets its own value (an Identity) to be named
            onnx_ir.passes.common.OutputFixPass()(onnx_program.model)
            _torch_onnx_ir_passes.rename_inputs(onnx_program.model, list(graph.input_names))
            _torch_onnx_ir_passes.rename_outputs(onnx_program.model, output_names(program))
            if optimize:
                optimize_onnx(onnx_program.model)
            return onnx_program
    except Exception as err:  # torch.onnx raises many types; all mean "cannot export"
        failed = failed_op(program, str(err))
        if failed is not None:
            raise unlowerable(program, failed, "torch.onnx failed to translate it") from err
        summary = next((line for line in str(err).splitlines() if line.startswith("<class")), str(err)[:300])
        summary = summary.replace(" See the stack trace for more information.", "")
        raise BackendError(f"torch.onnx could not export the program: {summary}\n"
                           "Run the model with the torch backend, or report the op named above.") from err


def failed_op(program: Program, message: str) -> AtenOp | None:
    """The program's first op of the ATen target a torch.onnx translation error names, if any."""
    named = re.search(r"target=torch\.ops\.(aten\.[\w.]+)", message)
    if named is None:
        return None
    return next((op for op in program.graph.ops if isinstance(op, AtenOp) and op.target == named.group(1)), None)


# Overloads torch.onnx reaches only through a decomposition, and the implemented overload each one
# decomposes to (same arguments, same result): swapping them spares a whole re-trace.
IMPLEMENTED_TWINS = {
    torch.ops.aten.to.dtype: torch.ops.aten._to_copy.default,
    torch.ops.aten.__and__.Tensor: torch.ops.aten.bitwise_and.Tensor,
    torch.ops.aten.__or__.Tensor: torch.ops.aten.bitwise_or.Tensor,
}


def prepare(exported: torch.export.ExportedProgram,
            registry: _registration.ONNXRegistry) -> torch.export.ExportedProgram:
    """What torch.onnx does to a traced program before translating it, without re-tracing when it can.

    torch.onnx always re-traces the program to apply its decomposition table (as long as the first
    trace). moec's graphs are made of ATen ops the registry mostly translates directly, so: swap
    ``IMPLEMENTED_TWINS``, drop assertion nodes, and when every op left is translated directly and
    none mutates its inputs, only insert explicit type promotions (torch.onnx's pass); otherwise run
    torch.onnx's own preparation (decompositions included).
    """
    graph_module = exported.graph_module
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target in IMPLEMENTED_TWINS:
            if node.target is torch.ops.aten.to.dtype:  # to(x, dtype, non_blocking, copy) -> _to_copy(x, dtype=)
                dtype = node.args[1] if len(node.args) > 1 else node.kwargs["dtype"]
                node.args, node.kwargs = (node.args[0],), {"dtype": dtype}
            node.target = IMPLEMENTED_TWINS[node.target]
    _torch_onnx_fx_passes.remove_assertion_nodes(graph_module)
    implemented = directly_translated(registry)
    if any(node.op == "call_function" and (node.target not in implemented or mutates(node.target))
           for node in graph_module.graph.nodes):
        return _torch_onnx_core._prepare_exported_program_for_export(exported, registry=registry)
    # As torch.onnx prepares. patch() is added to the config module at run time (torch's own calls ignore
    # the same error).
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):  # type: ignore[attr-defined]
        _torch_onnx_fx_passes.insert_type_promotion_nodes(graph_module)
    return exported


def mutates(target) -> bool:
    schema = getattr(target, "_schema", None)  # operator.getitem and symbolic-size functions have none
    return schema is not None and schema.is_mutable


@functools.cache
def directly_translated(registry: _registration.ONNXRegistry) -> set[_registration.TorchOp]:
    return set(_decomp.get_onnx_implemented_overloads(registry))


def optimize_onnx(model: onnx_ir.Model) -> None:
    """torch.onnx's optimization (constant folding, rewrites, fusions) with packed weights left packed.

    Of onnxscript's opset-23 fusions, RotaryEmbedding is left out: it writes cos/sin caches of batch 1,
    which onnxruntime (1.32) rejects for inputs of any other batch.
    """
    onnxscript.optimizer.optimize_ir(model, should_fold=quant.keep_packed)
    if model.opset_imports.get("") == 23:
        _rms_normalization.fuse_rms_normalization(model)
        _gqa.fuse_gqa(model)


def output_names(program: Program) -> list[str]:
    """Output names from the model's output structure: its keys (``logits``, ``last_hidden_state`` ...), or
    ``output`` for a lone tensor and ``output_0``, ``output_1`` ... for the items of a returned tuple."""
    spec = load_treespec(program.out_spec)
    tree = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    names = []
    for path, _ in pytree.tree_flatten_with_path(tree)[0]:
        parts = [str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path]
        if not path or isinstance(path[0], pytree.SequenceKey):  # no key of the model's own to start with
            parts.insert(0, "output")
        names.append("_".join(parts))
    if len(set(names)) != len(names):
        return [f"output_{i}" for i in range(len(names))]
    return names


def tidy(path: Path, input_guards: list[str]) -> tuple[int, dict[str, int]]:
    """Rename the exporter's symbolic dims (``s21``) after their role (``batch``, ``sequence`` ...), in
    the expressions of derived dims too, drop its per-node debugging metadata (stack traces into this
    exporter's module, not into the model), and keep the plan's conditions on input sizes as the model's
    metadata ``moec_input_guards`` (JSON; onnxruntime does not check them).

    Returns the file's ONNX opset and its fused MoE nodes, counted by op (``com.microsoft.QMoE``: 2).
    """
    model = onnx.load(str(path), load_external_data=False)
    opset = next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
    fused: dict[str, int] = {}
    for node in model.graph.node:
        if node.domain == "com.microsoft" and node.op_type in FUSED_MOE_OPS:
            name = f"{node.domain}.{node.op_type}"
            fused[name] = fused.get(name, 0) + 1
    for node in model.graph.node:
        del node.metadata_props[:]
    renames: dict[str, str] = {}
    for value in model.graph.input:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if not dim.dim_param or dim.dim_param in renames:
                continue
            name = AXIS_NAMES[axis] if axis < len(AXIS_NAMES) else f"dim{axis}"
            if name in renames.values():
                name = f"{value.name}_{name}"
            renames[dim.dim_param] = name
    symbol = re.compile(r"\b(" + "|".join(map(re.escape, renames)) + r")\b") if renames else None
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if symbol is not None and dim.dim_param:
                dim.dim_param = symbol.sub(lambda match: renames[match.group(1)], dim.dim_param)
    if input_guards:
        onnx.helper.set_model_props(model, {GUARDS_KEY: json.dumps(input_guards)})
    onnx.save(model, str(path))
    return opset, fused


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------


def check_opset(opset: int) -> None:
    """Refuse an opset the exporter cannot write (torch.onnx translates at 18; onnxscript converts up to 25)."""
    if not isinstance(opset, int) or isinstance(opset, bool):
        raise TypeError(f"opset is a {type(opset).__name__} ({opset!r}); give an int from {MIN_OPSET} to {MAX_OPSET}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise BackendError(f"cannot export at ONNX opset {opset}: choose an opset from {MIN_OPSET} to {MAX_OPSET} "
                           f"(default {DEFAULT_OPSET})")


def check_target(path: str | os.PathLike) -> Path:
    """``path`` resolved, if a .onnx file can be written there: a new or existing file under folders (missing
    ones are created); else one ``BackendError`` saying why."""
    target = user_path(path).resolve()
    if target.is_dir():
        raise BackendError(f"{target} is a folder; give the path of the .onnx file to write")
    data = target.with_name(target.name + ".data")
    if data.is_dir():
        raise BackendError(f"{data} is a folder, where the export keeps the weights of {target.name} (or removes "
                           "a stale file of them); move it away or choose another output path")
    if os.fspath(path).endswith(("/", os.sep)):  # a folder to be, which Path would make the file's name
        raise BackendError(f"{os.fspath(path)} names a folder; give the path of the .onnx file to write "
                           f"(such as {os.path.join(path, 'model.onnx')})")
    blocking = next((folder for folder in target.parents if folder.exists() and not folder.is_dir()), None)
    if blocking is not None:
        raise BackendError(f"cannot write {target}: {blocking} is a file, not a folder; choose another output path")
    return target


def check_float32(program: Program) -> None:
    """Refuse a program with bfloat16 or float16 weights or values, or float64 weights or inputs (see the module
    docstring; a float32 model may compute a value in float64 on the way, which onnxruntime runs)."""
    graph = program.graph
    stored = [*graph.weights.values(), *(v.type for v in graph.inputs)]
    types = [*stored, *(v.type for op in graph.ops for v in op.results)]
    found = {getattr(t, "dtype", "") for t in types} & LOW_PRECISION.keys()
    found |= {getattr(t, "dtype", "") for t in stored} & {"f64"}
    if found:
        names = " and ".join({**LOW_PRECISION, "f64": "float64"}[d] for d in sorted(found))
        raise BackendError(f"the plan computes in {names}; the ONNX export writes float32 models only "
                           "(onnxruntime's CPU kernels lack bfloat16 for most ops, float16 and float64 for some, "
                           "such as GELU's Erf). Compile the model in float32 (moec.compile(model.float(), ...), or "
                           "moec compile --dtype float32) and export that plan")


def check_lowerable(program: Program) -> None:
    """Refuse, before any tracing, a generic op that torch.onnx can neither translate nor decompose."""
    supported = onnx_supported_targets()
    for op in program.graph.ops:
        if not isinstance(op, AtenOp):
            continue
        if touches_complex(op.args, op.results):
            unsupported = pairs_unsupported(op.target, op.args, op.kwargs)
            if not unsupported:
                continue
            reason = f"complex-valued tensors: {unsupported}"
        elif op.target.startswith("aten.") and op.target not in supported:
            reason = f"no ONNX translation or decomposition in torch.onnx {torch.__version__}"
        else:
            continue
        raise unlowerable(program, op, reason)


def unlowerable(program: Program, op: AtenOp, reason: str) -> BackendError:
    """The error for an op the exporter cannot lower: the op, why, its IR line and where it is in the model."""
    return BackendError(f"the ONNX exporter cannot lower {op.target} ({reason}): {op_location(program.graph, op)}. "
                        "Rewrite that part of the model with supported ops, or run it with the torch backend")


@functools.cache
def onnx_registry(opset: int) -> _registration.ONNXRegistry:
    """torch.onnx's translation table with moec's custom translations, built as ``torch.onnx.export``
    builds it (torchlib at ``opset``, at least the opset torchlib is written for), once per process:
    building it takes seconds, as long as tracing a small model."""
    log = logging.getLogger(_registration.__name__)  # it logs a notice per torchvision op it cannot find
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            registry = _registration.ONNXRegistry.from_torchlib(opset_version=max(opset, TORCHLIB_OPSET))
    finally:
        log.setLevel(level)
    for torch_op, onnx_op in TRANSLATIONS.items():
        registry.register_op(torch_op, onnx_op, is_complex=False)
    return registry


@functools.cache
def onnx_supported_targets() -> set[str]:
    """ATen targets torch.onnx translates or decomposes (the registry's translations plus the
    decompositions it applies before translating; torch.onnx exposes no public query)."""
    registry = onnx_registry(DEFAULT_OPSET)
    implemented = directly_translated(registry)
    decomposed = _decomp.create_onnx_friendly_decomposition_table(implemented)
    return {str(overload) for overload in (*implemented, *decomposed) if hasattr(overload, "_schema")}


def check_model(path: Path) -> None:
    """onnx.checker and strict shape inference on the file; a failure is a ``BackendError``."""
    inferred = path.with_name(path.name + ".inferred")  # beside it for external data; never the file itself
    try:
        onnx.checker.check_model(str(path))
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred), strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise BackendError(f"the exported ONNX model is invalid: {err}") from err
    finally:
        inferred.unlink(missing_ok=True)


def example_inputs(program: Program, batch: int, sequence: int) -> list[torch.Tensor]:
    """Fresh inputs for the graph: symbolic dims get ``batch`` (axis 0) and ``sequence`` (axis 1); from axis 2
    on they keep the capture example's size when the program recorded it (an image's height and width must
    fit its patches, windows and strides), else ``sequence``.

    Integer inputs read by an embedding get ids below its row count; other integer or bool inputs
    (masks) are all ones; float inputs are standard normal. Seeded by the shape.
    """
    generator = torch.Generator().manual_seed(batch * 1000 + sequence)
    vocab = program.embedding_rows()
    examples = program.metadata.get("example_shapes") or [None] * len(program.graph.inputs)
    inputs = []
    for index, (value, example) in enumerate(zip(program.graph.inputs, examples, strict=True)):
        t = value.tensor_type
        shape = [dim if isinstance(dim, int) else input_size(axis, batch, sequence, example, t.rank)
                 for axis, dim in enumerate(t.shape)]
        if t.torch_dtype.is_floating_point:
            inputs.append(torch.randn(shape, generator=generator).to(t.torch_dtype))
        elif index in vocab:
            inputs.append(torch.randint(0, vocab[index], shape, generator=generator, dtype=t.torch_dtype))
        else:
            inputs.append(torch.ones(shape, dtype=t.torch_dtype))
    return inputs


def input_size(axis: int, batch: int, sequence: int, example: list[int] | None, rank: int) -> int:
    """The size of a symbolic input dim in ``example_inputs``."""
    if axis == 0:
        return batch
    if axis >= 2 and example is not None and len(example) == rank:
        return example[axis]
    return sequence


def check_parity(path: Path, program: Program, tolerance: float) -> dict[str, float]:
    """onnxruntime (CPU) vs the torch runner on inputs of each ``CHECK_SHAPES`` size; onnxruntime failing to
    load or run the file is a ``BackendError`` too."""
    session = run_onnxruntime(onnxruntime.InferenceSession, str(path), providers=["CPUExecutionProvider"])
    # exact dequantization, as the export computes; torch experts: no second packed copy of them beside the session
    runner = TorchRunner(program, quant_kernel="dequant", expert_kernel="torch")
    names = [i.name for i in session.get_inputs()]
    diffs = {}
    for batch, sequence in CHECK_SHAPES:
        inputs = example_inputs(program, batch, sequence)
        expected = runner.run(inputs)
        got = run_onnxruntime(session.run, None, {name: x.numpy() for name, x in zip(names, inputs, strict=True)})
        diff = max(float(np.abs(e.float().numpy() - g.astype(np.float32)).max()) if e.numel() else 0.0
                   for e, g in zip(expected, got, strict=True))
        diffs[f"{batch}x{sequence}"] = diff
        if not diff <= tolerance:
            raise BackendError(
                f"the exported model differs from the torch runner by {diff:.3g} (> {tolerance:g}) on "
                f"inputs of batch {batch}, sequence {sequence}; nothing was written"
            )
    return diffs


def run_onnxruntime(call, *args, **kwargs):
    """``call(*args, **kwargs)``, an onnxruntime error becoming one ``BackendError`` line."""
    try:
        return call(*args, **kwargs)
    except Exception as err:  # onnxruntime's errors share no base class but Exception
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise BackendError(f"onnxruntime could not run the exported model in the parity check: {first}; nothing "
                           "was written. Export with the other lowering, or run the plan with the torch backend") from err
