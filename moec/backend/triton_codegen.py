"""Code generation for the Triton backend: one Python source file of kernels and launchers per plan.

The file is the kernel library (:mod:`moec.kernels.triton_moe`, copied verbatim so a plan folder holds the
exact kernels it was compiled with) followed by one launcher per ``moe.route``/``moe.experts`` op, each
with its op's shapes, routing and activation as literals and its tile table (:mod:`triton_tiles`) inlined.
A header says what it was generated for. ``load_kernels`` imports such a file and checks that it belongs
to the program about to run it.

Ops the kernels cannot run (see ``unsupported_reason``) get no launcher; the backend runs them with the
torch runner's rule.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import re
import sys
from pathlib import Path
from types import ModuleType

from moec.errors import PlanError
from moec.ir.ops import ExpertsOp, RouteOp
from moec.ir.printer import print_graph
from moec.ir.program import Program
from moec.ir.quant import QuantizedType

KERNELS_FILE = "triton_kernels.py"
EXPERT_DTYPES = ("f32", "bf16", "f16")


def ir_digest(program: Program) -> str:
    return hashlib.sha256(print_graph(program.graph).encode()).hexdigest()


def unsupported_reason(op: RouteOp | ExpertsOp) -> str | None:
    """Why the Triton kernels cannot run ``op`` (a route or experts op), or None if they can."""
    x_dtype = op.args[0].tensor_type.dtype
    if isinstance(op, RouteOp):
        if op.spec.n_group > 1:
            return "group-limited routing (n_group > 1) is not implemented by the Triton router"
        if x_dtype not in EXPERT_DTYPES:  # f64: the torch rule routes in float64, the kernel would round to float32
            return (f"activations of dtype {x_dtype} (the Triton router computes in float32 and takes "
                    f"{', '.join(EXPERT_DTYPES)}; the torch rule keeps {x_dtype})")
        return None
    if x_dtype not in EXPERT_DTYPES:
        return f"activations of dtype {x_dtype} (the kernels take {', '.join(EXPERT_DTYPES)})"
    for role in ("w_in", "w_out", "b_in", "b_out"):
        weight_type = op.weight_type(role)
        if weight_type is None or isinstance(weight_type, QuantizedType):
            continue  # quantized matrices are read packed and dequantized tile by tile, whatever their dtype
        if weight_type.dtype != x_dtype:
            return f"{role} is {weight_type.dtype} but the activations are {x_dtype}"
    return None


def kernel_ops(program: Program) -> list[tuple[int, RouteOp | ExpertsOp]]:
    """(index in the graph, op) of every op the Triton backend could substitute."""
    return [(i, op) for i, op in enumerate(program.graph.ops) if isinstance(op, (RouteOp, ExpertsOp))]


def describe(op: RouteOp | ExpertsOp) -> str:
    spec = op.spec
    where = op.block or "?"
    if isinstance(op, RouteOp):
        renorm = ", renormalized" if spec.renormalize else ""
        return f"{where}: {spec.num_experts} experts, top-{spec.top_k}, {spec.scoring} {spec.order}{renorm}"
    gated = "gated " if spec.gated else ""
    gated += "input-weighted " if spec.weighted_input else ""
    dtype = op.args[0].tensor_type.dtype
    return (f"{where}: {spec.num_experts} experts, hidden {spec.hidden}, FFN {spec.intermediate}, "
            f"{gated}{spec.act}, {dtype} activations, {weight_description(op)}")


def weight_description(op: ExpertsOp) -> str:
    """``f32 weights``, or the packed widths of quantized ones (``w_in int4, w_out 3-8 bit, group 32``)."""
    parts = []
    for role in ("w_in", "w_out"):
        weight_type = op.weight_type(role)
        assert weight_type is not None, "an experts op in a graph has its required w_in and w_out"
        if not isinstance(weight_type, QuantizedType):
            parts.append(f"{role} {weight_type.dtype}")
            continue
        low, high = min(weight_type.bits), max(weight_type.bits)
        width = f"int{low}" if low == high else f"{low}-{high} bit"
        parts.append(f"{role} {width} (group {weight_type.group})")
    return ", ".join(parts)


def library_source() -> str:
    """The kernel library's source without its module docstring (the header replaces it)."""
    from moec.kernels import triton_moe

    source = inspect.getsource(triton_moe)
    docstring_end = source.index('"""', source.index('"""') + 3) + 3
    return source[docstring_end:].lstrip("\n")


def route_launcher(index: int, op: RouteOp) -> str:
    return f'''
ROUTE_SPEC_{index} = {op.spec!r}


def route_{index}(x, router, router_bias, router_logit_bias):
    """IR op {index}, {describe(op)}."""
    return triton_ops.route(x, router, router_bias, ROUTE_SPEC_{index}, kernels=KERNELS,
                            logit_bias=router_logit_bias)
'''


def experts_launcher(index: int, op: ExpertsOp, top_k: int) -> str:
    from moec.backend.triton_tiles import shape_key, tiles_for_shape

    spec = op.spec
    key = shape_key(spec.num_experts, spec.hidden, spec.intermediate, top_k, op.args[0].tensor_type.dtype)
    rows = "".join(f"\n    ({limit}, {tiles!r})," for limit, tiles in tiles_for_shape(key))
    return f'''
EXPERTS_SPEC_{index} = {spec!r}
TILES_{index} = [  # (up to this many tokens, tiles); table key {key}{rows}
]


def experts_{index}(x, indices, routing, w_in, w_out, b_in, b_out):
    """IR op {index}, {describe(op)}."""
    tiles = pick(TILES_{index}, x.shape[0])
    return triton_ops.experts(x, indices, routing, w_in, w_out, b_in, b_out, EXPERTS_SPEC_{index}, tiles,
                              kernels=KERNELS)
'''


def generate(program: Program) -> str:
    """The kernel source for ``program``: library kernels + one launcher per op the kernels can run."""
    import triton

    from moec import __version__

    supported = [(i, op) for i, op in kernel_ops(program) if unsupported_reason(op) is None]
    listing = "\n".join(f"    op {i:<4} {op.op_name:<12} {describe(op)}" for i, op in supported) or "    (none)"
    header = f'''"""moec Triton kernels for one plan: generated, do not edit (`moec compile --backend triton` writes it).

Generated by moec {__version__} with triton {triton.__version__} for:
  model:  {program.metadata.get("model_class", "?")}
  IR:     sha256 {ir_digest(program)}
  ops (index in the IR: what its launcher runs):
{listing}

The kernels are moec.kernels.triton_moe, copied verbatim; the launchers at the end specialize them to
each op's shapes, routing and activation, with tile sizes per token count from moec's tile table.
"""

'''
    launchers = []
    for index, op in supported:
        if isinstance(op, RouteOp):
            launchers.append(route_launcher(index, op))
        else:
            launchers.append(experts_launcher(index, op, op.top_k))
    table = ", ".join(f"{i}: {'route' if isinstance(op, RouteOp) else 'experts'}_{i}" for i, op in supported)
    footer = f'''

# ----------------------------------------------------------------------------------------------
# This plan's launchers
# ----------------------------------------------------------------------------------------------

import sys  # noqa: E402

from moec.backend.triton_tiles import pick  # noqa: E402
from moec.frontend.blocks import ExpertsSpec, RouteSpec  # noqa: E402, F401  (the specs' reprs name them)
from moec.kernels import triton_ops  # noqa: E402
from moec.kernels.triton_ops import TileConfig  # noqa: E402, F401

IR_SHA256 = "{ir_digest(program)}"
KERNELS = sys.modules[__name__]  # the launchers run this file's kernels, not the installed library's
{"".join(launchers)}

LAUNCHERS = {{{table}}}
'''
    return header + library_source() + footer


def load_kernels(path: Path, program: Program) -> ModuleType:
    """Import a generated kernel file after checking that its header names ``program``'s IR (a file for
    another IR is refused unrun). Importing runs the file: a triton plan runs the kernels it carries."""
    header = re.search(r'^IR_SHA256 = "([0-9a-f]{64})"$', path.read_text(), flags=re.MULTILINE)
    if header is None or header.group(1) != ir_digest(program):
        raise PlanError(f"{path} was generated for another IR than the plan's; compile the plan again")
    name = f"moec_triton_kernels_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PlanError(f"{path} cannot be imported as a Python module; compile the plan again")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise PlanError(f"{path} does not load ({type(err).__name__}: {err}); compile the plan again") from None
    return module


def write_cached(source: str) -> Path:
    """Write ``source`` to moec's cache (content-addressed, so it is written once) and return the path."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moec" / "triton"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"kernels_{hashlib.sha256(source.encode()).hexdigest()[:16]}.py"
    if not path.exists():
        staging = path.with_suffix(f".{os.getpid()}.tmp")
        staging.write_text(source)
        staging.replace(path)
    return path
