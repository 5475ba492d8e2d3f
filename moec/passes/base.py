"""The pass contract: every pass is a frozen dataclass with a kebab-case name and typed options.

A pass transforms a ``Program`` in place and returns a ``PassResult`` saying whether it changed
anything and what (counts a report can show). Passes that need data read ``context.calibration``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from moec.ir.program import Program


@dataclass
class PassContext:
    """What passes may read besides the program: calibration data and the running report."""

    calibration: Any = None
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassResult:
    modified: bool
    summary: dict[str, Any] = field(default_factory=dict)


PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available to recipes under its ``name``."""
    PASSES[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Pass:
    name: ClassVar[str] = ""

    def run(self, program: Program, context: PassContext) -> PassResult:
        raise NotImplementedError
