"""``bit-allocation``: mixed-precision quantization, one width per expert (or per linear) chosen by an LP.

Requires: a verified graph with float expert (and, with ``dense=True``, dense FFN / shared expert) weights;
calibration samples in ``context`` (any form ``moec.compile`` takes; see ``PassContext.flat_samples``).
Ensures: like ``quantize``, every targeted weight is packed (``moec.ir.quant``), but each unit (an expert's
``w_in``+``w_out``, a dense FFN's linears; with ``per_linear`` each linear alone) has the width from
``widths`` that ``moec.analysis.bit_allocation.solve`` chose: minimal sum of importance x measured error,
with the parameter-weighted average width <= ``budget`` and each unit at or above its floor. That sum
assumes the units' errors add up; the pass measures the solved allocation and the widest uniform width
within the budget together at the model output (all their units rounded at once, on the calibration
samples) and applies the uniform one if it measures lower (``kept`` and ``measured`` in the report).
``context.report["bit_allocation"]`` holds the table (unit, params, importance, error per width, chosen
width), the objective, the LP relaxation's bound below it, and the objective and average width of every
uniform alternative; a saved plan
draws it as ``bit_allocation.svg`` (``moec.analysis.allocation_chart``). In place.

Analysis and application: the error table and importance are measured here (``unit_errors``), the
allocation is solved as a plain table problem, and ``moec.passes.quantize.quantize_units`` applies it.
Two ways to measure (``importance=``): ``"output"`` (default) measures each unit's error where it matters,
at the model's output: one calibration run per unit and width with only that unit rounded (RTN), error =
mean cosine distance of the output rows to the float model's, padding positions left out (``OutputError``;
this includes how often and how strongly the unit is routed to, so importance is 1). ``"routing"`` needs
no run per unit (for many experts): error = the unit's own FFN output error (mean squared) on its
calibration rows, importance = the expert's routing mass (mean routing weight per token; 1 for dense FFNs
and shared experts).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moec.analysis import bit_allocation
from moec.analysis.ffn_activations import FFNActivations
from moec.backend.torch_runner import TorchRunner
from moec.errors import PassError
from moec.ir.ops import ExpertsOp
from moec.ir.program import Program
from moec.ir.quant import SUPPORTED_BITS
from moec.kernels.quant import quantize_matrix
from moec.kernels.reference import activation, gated_activation
from moec.passes.base import Pass, PassContext, PassResult, register_pass
from moec.passes.quantize import (
    UNIT_KINDS,
    Unit,
    activations_for,
    calibration_rows,
    check_options,
    check_quantizable,
    nothing_to_quantize,
    op_of_unit,
    quantizable_units,
    quantize_units,
)
from moec.progress import progress_bar

IMPORTANCES = ("output", "routing")
REFERENCE_BYTES = 256 * 2**20  # the most memory the output error's reference rows (float64) may take


def unit_output(program: Program, unit: Unit, rows: torch.Tensor, replaced: dict[str, torch.Tensor]) -> torch.Tensor:
    """The unit's FFN (one expert, or a dense FFN without its output gate) on ``rows``, with some roles replaced."""
    op = op_of_unit(program, unit)
    spec = op.spec
    act = activation(spec.act)

    def weight(role):
        if role in replaced:
            return replaced[role]
        ref = op.kwargs.get(role)
        if ref is None:
            return None
        tensor = program.weights[ref.name].float()
        return tensor if unit.expert is None else tensor[unit.expert]

    if isinstance(op, ExpertsOp):
        hidden = F.linear(rows, weight("w_in"), weight("b_in"))
        if spec.gated:
            gate, up = hidden.chunk(2, dim=-1)
            hidden = gated_activation(gate, up, spec)
        else:
            hidden = act(hidden)
        return F.linear(hidden, weight("w_out"), weight("b_out"))
    up = F.linear(rows, weight("w_up"), weight("b_up"))
    hidden = gated_activation(F.linear(rows, weight("w_gate"), weight("b_gate")), up, spec) if spec.gated else act(up)
    return F.linear(hidden, weight("w_down"), weight("b_down"))


def unit_errors(program: Program, unit: Unit, widths: tuple[int, ...], group: int,
                activations: FFNActivations) -> list[float]:
    """Mean squared output error of ``unit`` rounded (RTN) to each width, on its calibration rows."""
    rows = calibration_rows(program, activations, unit.op_index, unit.expert)
    op = program.graph.ops[unit.op_index]
    reference = unit_output(program, unit, rows, {})
    errors = []
    for width in widths:
        replaced = {}
        for role in unit.roles:
            tensor = program.weights[op.kwargs[role].name].float()
            matrix = tensor if unit.expert is None else tensor[unit.expert]
            replaced[role] = quantize_matrix(matrix, width, group).dequantize()
        errors.append(float((unit_output(program, unit, rows, replaced) - reference).pow(2).sum(-1).mean()))
    return errors


def routing_importance(unit: Unit, activations: FFNActivations) -> float:
    """An expert's routing mass (mean routing weight per token); 1 for dense FFNs and shared experts."""
    if unit.expert is None:
        return 1.0
    mass = activations.ops[unit.op_index].mass
    assert mass is not None, "collect records the routing of every moe.experts op"
    return float(mass[unit.expert])


class OutputError:
    """The model-level error of rounding units (RTN) to some widths: the mean cosine distance between the
    rows (last-dim vectors) of the program's first output with those units rounded and without, on the
    calibration ``batches``. With an ``attention_mask`` input, padding positions are left out, as in
    calibration. Rows wide enough to exceed ``REFERENCE_BYTES`` (a causal LM's logits over a large
    vocabulary) are compared on an equal seeded subset of each batch's rows that fits it. ``program.weights``
    is left as it was."""

    def __init__(self, program: Program, batches: list[list[torch.Tensor]], group: int) -> None:
        self.program, self.batches, self.group = program, batches, group
        self.runner = TorchRunner(program)
        names = program.graph.input_names
        self.masks = [batch[names.index("attention_mask")].bool() if "attention_mask" in names else None
                      for batch in batches]
        self.picks: list[torch.Tensor | None] = [None] * len(batches)
        self.reference = []
        generator = torch.Generator().manual_seed(0)
        for index, (batch, mask) in enumerate(zip(batches, self.masks, strict=True)):
            rows = self.rows(index, batch, mask)
            per_batch = max(1, REFERENCE_BYTES // (rows.element_size() * rows.shape[-1] * len(batches)))
            if rows.shape[0] > per_batch:
                self.picks[index] = torch.randperm(rows.shape[0], generator=generator)[:per_batch].sort().values
                rows = rows[self.picks[index]]
            self.reference.append(rows)

    def rows(self, index: int, batch: list[torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
        """The first output's rows on ``batch`` (the ``index``-th), real tokens only (those picked, if any), in
        float64 (one unit's rounding moves the cosine by less than float32 resolves near 1)."""
        output = self.runner.run(batch)[0]
        if mask is not None and output.dim() >= 3 and output.shape[:2] == mask.shape:
            output = output[mask]
        output = output.reshape(-1, output.shape[-1])
        pick = self.picks[index]
        return (output if pick is None else output[pick]).double()

    def __call__(self, units: list[Unit], bits: list[int]) -> float:
        originals: dict[str, torch.Tensor] = {}
        try:
            for unit, width in zip(units, bits, strict=True):
                op = self.program.graph.ops[unit.op_index]
                for role in unit.roles:
                    name = op.kwargs[role].name
                    if name not in originals:  # one copy per tensor: a layer's experts share theirs
                        originals[name] = self.program.weights[name]
                        self.program.weights[name] = originals[name].clone()
                    weight = self.program.weights[name]
                    matrix = weight if unit.expert is None else weight[unit.expert]
                    matrix.copy_(quantize_matrix(matrix, width, self.group).dequantize())
            distance = [1 - F.cosine_similarity(self.rows(index, batch, mask), reference, dim=-1).mean()
                        for index, (batch, mask, reference)
                        in enumerate(zip(self.batches, self.masks, self.reference, strict=True))]
            return float(sum(distance)) / len(self.batches)
        finally:
            self.program.weights.update(originals)


def unit_label(unit: Unit) -> str:
    where = unit.block or f"op{unit.op_index}"
    expert = f"[{unit.expert}]" if unit.expert is not None else ""
    return f"{where}{expert}:{'+'.join(unit.roles)}"


@register_pass
@dataclass(frozen=True)
class BitAllocation(Pass):
    name = "bit-allocation"
    approximate = True

    budget: float = 3.0  # average bits over all quantized parameters
    widths: tuple[int, ...] = (2, 3, 4, 8)
    group: int = 64
    method: str = "rtn"
    dense: bool = True
    per_linear: bool = False
    floors: dict[str, int] = field(default_factory=dict)  # by unit kind (UNIT_KINDS) or block
    importance: str = "output"  # or "routing"

    def __post_init__(self) -> None:
        if self.importance not in IMPORTANCES:
            raise PassError(f"importance={self.importance!r} is not one of {', '.join(IMPORTANCES)}")
        if not self.widths or len(set(self.widths)) != len(self.widths):
            raise PassError(f"widths={list(self.widths)} must list one or more distinct widths")
        object.__setattr__(self, "widths", tuple(sorted(self.widths)))
        object.__setattr__(self, "floors", dict(self.floors))
        unsupported = [width for width in self.widths if width not in SUPPORTED_BITS]
        if unsupported:
            raise PassError(f"widths={list(self.widths)}: {', '.join(map(str, unsupported))} "
                            f"{'is not a supported width' if len(unsupported) == 1 else 'are not supported widths'}; "
                            f"choose widths from {list(SUPPORTED_BITS)}")
        for width in self.widths:
            check_options(width, self.group, self.method)
        if not (self.budget > 0 and math.isfinite(self.budget)):
            raise PassError(f"budget={self.budget} must be a positive, finite average number of bits (such as 3.0)")
        for key, floor in self.floors.items():
            if floor > self.widths[-1]:
                raise PassError(f"floors[{key!r}]={floor} is above every width in {list(self.widths)}; lower the "
                                "floor or add a wider width")

    def check_floor_keys(self, units: list[Unit]) -> None:
        """One ``PassError`` naming a ``floors`` key that is neither a unit kind nor the block of a unit."""
        blocks = list(dict.fromkeys(unit.block for unit in units))
        for key in self.floors:
            if key not in UNIT_KINDS and key not in blocks:
                raise PassError(f"floors key {key!r} is neither a unit kind ({', '.join(UNIT_KINDS)}) nor the block "
                                f"of a quantized FFN (such as {blocks[0]!r})")

    def needs_calibration(self) -> bool:
        return True  # both importances measure errors on calibration samples

    def check_finite(self, units: list[Unit], errors: list[list[float]]) -> None:
        """One ``PassError`` naming the first unit and width whose rounding made the measured error non-finite
        (a half-precision model that overflows at a narrow width): no allocation can weigh it."""
        for unit, row in zip(units, errors, strict=True):
            for width, error in zip(self.widths, row, strict=True):
                if not math.isfinite(error):
                    wider = [w for w in self.widths if w > width]
                    floor = (f"hold it wider with a floor (floors: {{{unit.block!r}: {wider[0]}}}) or " if wider and
                             unit.block else "")
                    raise PassError(f"rounding {unit_label(unit)} to {width} bits makes the measured error {error} "
                                    f"(the output overflows or is undefined on the calibration samples); {floor}leave "
                                    f"{width} out of widths")

    def floor_of(self, unit: Unit) -> int | None:
        return self.floors.get(unit.block, self.floors.get(unit.kind))

    def run(self, program: Program, context: PassContext) -> PassResult:
        units = quantizable_units(program, self.dense, self.per_linear)
        if not units:
            return PassResult(False, {"units": 0}, note=nothing_to_quantize(self.dense))
        check_quantizable(program, units, self.group)
        self.check_floor_keys(units)
        params = [u.params for u in units]
        floors = [self.floor_of(u) for u in units]
        # Check feasibility before the (slower) measurements, so a bad budget fails at once.
        bit_allocation.check_budget(self.budget, params, self.widths, floors, f"floors {self.floors or 'none'}")
        needed_by = f"pass {self.name!r}"
        activations = activations_for(program, context, needed_by)
        output_error = OutputError(program, context.flat_samples(program, needed_by), self.group)
        if self.importance == "output":
            errors = [[output_error([u], [width]) for width in self.widths]
                      for u in progress_bar(units, "bit allocation: measuring each unit's output error")]
            importance = [1.0] * len(units)
        else:
            errors = [unit_errors(program, u, self.widths, self.group, activations) for u in units]
            importance = [routing_importance(u, activations) for u in units]
        self.check_finite(units, errors)
        allocation = bit_allocation.solve(params, importance, errors, self.widths, self.budget, floors)
        # every unit at one width, or at the smallest width its floor allows where that is wider
        uniform_bits = {width: [min(w for w in self.widths if w >= max(width, f or width)) for f in floors]
                        for width in self.widths}
        uniform = {str(width): {"average_bits": bit_allocation.average_bits(bits, params),
                                "objective": bit_allocation.objective_of(bits, self.widths, importance, errors)}
                   for width, bits in uniform_bits.items()}
        chosen, check = self.checked_against_uniform(allocation.bits, uniform_bits, params,
                                                     lambda bits: output_error(units, bits))
        table = [
            {"unit": unit_label(u), "kind": u.kind, "params": u.params, "importance": imp,
             "error": dict(zip(map(str, self.widths), err, strict=True)), "bits": bits}
            for u, imp, err, bits in zip(units, importance, errors, chosen, strict=True)
        ]
        quantize_units(program, units, chosen, self.group, self.method, activations)
        summary = {"budget": self.budget, "average_bits": bit_allocation.average_bits(chosen, params),
                   "objective": bit_allocation.objective_of(chosen, self.widths, importance, errors),
                   "lower_bound": allocation.lower_bound, "solve_seconds": allocation.solve_seconds, "units": len(units),
                   "units_by_bits": {str(w): chosen.count(w) for w in sorted(set(chosen))}, **check}
        context.report["bit_allocation"] = {**summary, "uniform": uniform, "table": table}
        return PassResult(True, summary)

    def checked_against_uniform(self, bits: list[int], uniform_bits: dict[int, list[int]], params: list[int],
                                measured: Callable[[list[int]], float]) -> tuple[list[int], dict]:
        """The solved ``bits``, or the widest uniform width within the budget if that measures a smaller error
        at the model output (``measured``): the objective adds up the units' errors measured one at a time,
        and rounding many units at once need not add up the same way. Returns the widths to apply and a
        report entry: which was kept, and the two measured errors when they were compared (or ``same_as``:
        the uniform width the allocation equals)."""
        fitting = [w for w, b in uniform_bits.items() if bit_allocation.average_bits(b, params) <= self.budget + 1e-9]
        if not fitting:
            return bits, {"kept": "allocation"}
        width = max(fitting)
        label = f"uniform {width}-bit" + (" (floors applied)" if set(uniform_bits[width]) != {width} else "")
        if uniform_bits[width] == bits:
            return bits, {"kept": "allocation", "same_as": label}
        errors = {"allocation": measured(bits), label: measured(uniform_bits[width])}
        if errors[label] < errors["allocation"]:
            return uniform_bits[width], {"kept": label, "measured": errors}
        return bits, {"kept": "allocation", "measured": errors}
