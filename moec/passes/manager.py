"""Run a recipe: an explicit list of passes, each verified after it runs and recorded for the report.

A recipe is a dict (or YAML/JSON file) ``{"passes": [entry, ...]}``; an entry is a pass name or
``{name: {option: value}}``. Names are kebab-case (``dense-to-moe``); snake_case is accepted too.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from moec.errors import MoecError, PassError
from moec.ir.program import Program
from moec.ir.verifier import verify
from moec.passes.base import Pass, PassContext, find_pass, pass_names

Hook = Callable[[Pass, Program, dict[str, Any]], None]


def load_recipe(source: str | os.PathLike | dict | None) -> dict[str, Any]:
    """A recipe dict from a dict, a YAML/JSON file path, or None (no passes)."""
    if source is None:
        return {"passes": []}
    if isinstance(source, dict):
        recipe = source
    else:
        path = Path(source)
        if not path.is_file():
            raise PassError(f"recipe file {path} does not exist")
        try:
            recipe = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise PassError(f"recipe file {path} is not valid YAML/JSON: {err}") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("passes", []), list):
        raise PassError("a recipe must be a mapping with a 'passes' list, e.g. {'passes': [{'dead-code': {}}]}")
    return {"passes": list(recipe.get("passes", [])), **{k: v for k, v in recipe.items() if k != "passes"}}


def build_passes(recipe: dict[str, Any]) -> list[Pass]:
    passes = []
    for entry in recipe["passes"]:
        name, options = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()), (None, None))
        if not isinstance(entry, (str, dict)) or (isinstance(entry, dict) and len(entry) != 1):
            raise PassError(f"recipe entry {entry!r} must be a pass name or {{name: {{options}}}}")
        key = str(name).replace("_", "-")
        cls = find_pass(key)
        if cls is None:
            raise PassError(f"unknown pass {name!r} in recipe; known passes: {', '.join(pass_names())}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(options or {}) - known
        if unknown:
            raise PassError(f"pass {key!r} has no option(s) {sorted(unknown)}; its options: {sorted(known)}")
        try:
            passes.append(cls(**(options or {})))
        except (TypeError, ValueError) as err:
            raise PassError(f"pass {key!r}: bad options: {err}") from None
    return passes


def program_stats(program: Program) -> dict[str, int]:
    from moec.ir.ops import ExpertsOp

    experts = sum(op.spec.num_experts for op in program.graph.ops_of(ExpertsOp))
    params, size = program.weight_sizes()
    return {"experts": experts, "params": params, "bytes": size}


def run_passes(program: Program, passes: list[Pass], context: PassContext,
               hooks: Sequence[Hook] = ()) -> list[dict[str, Any]]:
    """Run ``passes`` in order; verify after each; return one record per pass (time, changes)."""
    records: list[dict[str, Any]] = []
    for pass_ in passes:
        before = program_stats(program)
        start = time.perf_counter()
        try:
            result = pass_.run(program, context)
            verify(program.graph)
        except MoecError as err:
            ran = ", ".join(r["pass"] for r in records) or "none"
            raise PassError(f"pass {pass_.name!r} failed (passes run before it: {ran}): {err}") from err
        record = {
            "pass": pass_.name,
            "options": dataclasses.asdict(pass_),
            "seconds": round(time.perf_counter() - start, 4),
            "modified": result.modified,
            "before": before,
            "after": program_stats(program),
            **({"summary": result.summary} if result.summary else {}),
        }
        records.append(record)
        for hook in hooks:
            hook(pass_, program, record)
    return records
