"""The pass contract: every pass is a frozen dataclass with a kebab-case name and typed options.

A pass transforms a ``Program`` in place and returns a ``PassResult`` saying whether it changed
anything and what (counts a report can show). Passes that need data call
``context.statistics`` or ``context.flat_samples`` (see ``moec.analysis.calibration``) and say so in
``needs_calibration``, which the CLI reads to decide whether to load calibration data; a pass that only
uses calibration when given (an optional measurement) says so in ``uses_calibration``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

from moec.errors import MoecError, PassError
from moec.ir.program import Program
from moec.ir.quant import QuantizedType


@dataclass
class PassContext:
    """What passes may read besides the program: calibration data and the running report.

    ``calibration`` is what the user gave: sample inputs (a list of kwargs dicts or args tuples; a dict or
    a tensor is one batch), a ``Calibration`` (for example one loaded from a plan folder), or None; any other
    form is refused here (``given_calibration``). ``calibrations`` holds every calibration known so far,
    oldest first; ``described`` those that were the statistics of the program at some point of this run
    (see ``plan_calibration``).
    """

    calibration: Any = None
    report: dict[str, Any] = field(default_factory=dict)
    max_rows: int | None = None
    progress: bool = True
    calibrations: list[Any] = field(default_factory=list)
    described: list[Any] = field(default_factory=list)
    given_is_foreign: bool = False

    def __post_init__(self) -> None:
        from moec.analysis.calibration import Calibration, given_calibration

        self.calibration = given_calibration(self.calibration)
        if isinstance(self.calibration, Calibration):
            self.calibrations.append(self.calibration)

    def flat_samples(self, program: Program, needed_by: str) -> list[list[Any]]:
        """The calibration samples as lists of the program's flat input tensors, for passes that run the
        program themselves (e.g. to measure output error under each candidate rewrite). ``needed_by``
        names the asking pass in errors (``"pass 'quantize'"``)."""
        from moec.analysis.calibration import Calibration, fingerprint, flatten_samples

        if self.calibration is None:
            raise missing_calibration(needed_by)
        self.refuse_a_trace(needed_by)
        if isinstance(self.calibration, Calibration):
            if not self.calibration.flat_samples:
                raise PassError(f"{needed_by}: the given calibration stores no samples; pass the sample inputs")
            if not self.described:  # which calibration the plan keeps is still open: is the given one this program's?
                if self.calibration.fingerprint == fingerprint(program):
                    self.describes(self.calibration)
                else:
                    self.given_is_foreign = True  # of another program: its statistics are not this plan's
            return self.stored_samples(self.calibration, program, needed_by)
        return flatten_samples(program, self.calibration)

    def statistics(self, program: Program, needed_by: str) -> Any:
        """The ``Calibration`` of ``program`` as it is now: a known one whose fingerprint matches, else
        computed by running the samples (the user's, or those a known calibration stored) through it.
        ``needed_by`` names the asking pass in errors."""
        from moec.analysis.calibration import DEFAULT_MAX_ROWS, calibrate, calibrate_flat, fingerprint

        if self.calibration is None:
            raise missing_calibration(needed_by)
        self.refuse_a_trace(needed_by)
        current = fingerprint(program)
        for known in self.calibrations:
            if known.fingerprint == current:
                self.describes(known)
                return known
        max_rows = self.max_rows or (self.calibrations[0].max_rows if self.calibrations else DEFAULT_MAX_ROWS)
        stored = next((c for c in self.calibrations if c.flat_samples), None)
        if stored is not None:
            result = calibrate_flat(program, self.stored_samples(stored, program, needed_by), max_rows=max_rows,
                                    progress=self.progress, label=f"calibrating for {needed_by}")
        elif self.calibrations:
            raise PassError(f"{needed_by}: the given calibration was computed on another program and stores "
                            "no samples to rerun; pass the sample inputs instead")
        else:
            result = calibrate(program, self.calibration, max_rows=max_rows, progress=self.progress,
                               label=f"calibrating for {needed_by}")
        self.calibrations.append(result)
        self.describes(result)
        return result

    @staticmethod
    def stored_samples(calibration: Any, program: Program, needed_by: str) -> list[list[Any]]:
        """A known calibration's samples as ``program``'s flat inputs (``Calibration.samples_for``)."""
        try:
            return calibration.samples_for(program)
        except MoecError as err:
            raise PassError(f"{needed_by}: {err}") from None

    def refuse_a_trace(self, needed_by: str) -> None:
        """A ``PassError`` when the calibration given is a routing trace, which only expert placement reads."""
        from moec.analysis.traces import RoutingTrace

        if isinstance(self.calibration, RoutingTrace):
            raise trace_refusal(needed_by)

    def plan_calibration(self) -> Any:
        """The calibration a plan stores: the first that held the statistics of the program as a pass read them;
        without one, a given ``Calibration`` that no pass found to be of another program; else None."""
        from moec.analysis.calibration import Calibration

        if self.described:
            return self.described[0]
        if isinstance(self.calibration, Calibration) and not self.given_is_foreign:
            return self.calibration
        return None

    def describes(self, calibration: Any) -> None:
        """Note that ``calibration`` holds the statistics of the program at this point of the run."""
        if not any(known is calibration for known in self.described):
            self.described.append(calibration)


def trace_refusal(needed_by: str) -> PassError:
    """The error of a pass that runs sample inputs and was given a routing trace as calibration."""
    return PassError(f"{needed_by} runs sample inputs through the model, and calibration= is a RoutingTrace (only "
                     "expert-placement reads one); pass a list of sample inputs or a Calibration")


def missing_calibration(needed_by: str) -> PassError:
    """The error of a pass that needs calibration data and was given none: both ways to give it."""
    return PassError(f"{needed_by} needs calibration data: pass calibration=<list of sample inputs> to "
                     "moec.compile, or --calibration FILE to the moec CLI")


def unused_calibration(passes: list[Pass]) -> str:
    """Why calibration data given for ``passes`` goes unused, when none of them needs it with its options
    (``needs_calibration``): names the recipe's passes, the options under which those would use it
    (``calibration_when``), else the passes that can use it."""
    recipe = f"its passes: {', '.join(p.name for p in passes)}" if passes else "it has no passes"
    conditional = list(dict.fromkeys(f"{p.name} uses it only {p.calibration_when}" for p in passes
                                     if p.calibration_when))  # a pass given twice is named once
    if conditional:
        return f"no pass of the recipe needs calibration data with its options ({recipe}); {'; '.join(conditional)}"
    users = []
    for name in pass_names():
        cls = find_pass(name)
        if cls is not None and (cls.needs_calibration is not Pass.needs_calibration
                                or cls.uses_calibration is not Pass.uses_calibration):
            users.append(f"{name} ({cls.calibration_when})" if cls.calibration_when else name)
    return f"no pass of the recipe needs calibration data ({recipe}); only {', '.join(users)} use it"


def check_float_weights(program: Program, pass_name: str, layer: str, weight_names: list[str]) -> None:
    """One ``PassError`` naming ``layer`` when one of its weights is already quantized: passes that rewrite
    weights (pruning, merging, splitting FFNs) work on float weights and run before quantization."""
    quantized = [name for name in weight_names if isinstance(program.graph.weights.get(name), QuantizedType)]
    if quantized:
        raise PassError(f"{pass_name}: layer {layer} is already quantized (@{quantized[0]}); run {pass_name} "
                        "before quantize or bit-allocation in the recipe")


@dataclass
class PassResult:
    """What a pass did: whether it changed the program, and counts a report can show. A pass that found
    nothing to work on says why in ``note``; the manager adds it to the summary and warns."""

    modified: bool
    summary: dict[str, Any] = field(default_factory=dict)
    note: str | None = None


PASSES: dict[str, type[Pass]] = {}  # the passes imported so far, by recipe name (built-ins and users' own)

# The built-in passes by recipe name -> module of moec.passes, imported when a recipe first names them:
# some pull in a solver or scipy, which ``import moec`` should not pay for.
BUILTIN_PASSES = {
    "bit-allocation": "bit_allocation",
    "dead-code": "dead_code",
    "dense-to-moe": "dense_to_moe",
    "dynamic-skip": "dynamic_skip",
    "expert-merge": "expert_merge",
    "expert-placement": "expert_placement",
    "expert-prune": "expert_prune",
    "overlap-schedule": "overlap_schedule",
    "quantize": "quantize",
    "simplify": "simplify",
}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available to recipes under its ``name``."""
    PASSES[cls.name] = cls
    return cls


def find_pass(name: str) -> type[Pass] | None:
    """The pass registered under ``name`` (importing a built-in one on first use), or None."""
    if name not in PASSES and name in BUILTIN_PASSES:
        importlib.import_module(f"moec.passes.{BUILTIN_PASSES[name]}")
    return PASSES.get(name)


def pass_names() -> list[str]:
    return sorted(set(PASSES) | set(BUILTIN_PASSES))


@dataclass(frozen=True)
class Pass:
    name: ClassVar[str] = ""
    # True for passes that change the model's outputs by design (quantization, pruning, conversion to
    # experts): the CLI then reports how far the outputs moved instead of failing its parity check.
    approximate: ClassVar[bool] = False
    # For a pass whose use of calibration data depends on its options: when it uses it ("with method gptq"),
    # for the message that says why given calibration goes unused.
    calibration_when: ClassVar[str] = ""
    # True for a pass that can take a RoutingTrace as its calibration (expert placement) instead of samples.
    takes_a_trace: ClassVar[bool] = False

    def needs_calibration(self) -> bool:
        """Whether ``run`` (with these options) calls ``context.statistics``."""
        return False

    def uses_calibration(self) -> bool:
        """Whether ``run`` (with these options) reads calibration data when it is given: when it needs it, or
        for an optional measurement (``dynamic-skip`` measures its skip rate on the samples)."""
        return self.needs_calibration()

    def run(self, program: Program, context: PassContext) -> PassResult:
        raise NotImplementedError

    def refresh(self, program: Program, context: PassContext, summary: dict[str, Any], changed_by: list[str]) -> None:
        """Bring this pass's ``summary`` up to date with the final ``program`` after the later passes
        ``changed_by`` changed it. Most summaries say what the pass did and stay; one that measured the program
        (``dynamic-skip``'s skip rate) measures again."""
