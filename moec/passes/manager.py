"""Run a recipe: an explicit list of passes, each verified after it runs and recorded for the report.

A recipe is a dict (or YAML/JSON file) ``{"passes": [entry, ...]}``; an entry is a pass name or
``{name: {option: value}}``. Names are kebab-case (``dense-to-moe``); snake_case is accepted too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import time
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from moec.errors import MoecError, PassError, warn
from moec.ir.ops import DenseFFNOp, ExpertsOp, SharedExpertOp
from moec.ir.program import Program
from moec.ir.verifier import verify
from moec.passes.base import Pass, PassContext, find_pass, pass_names
from moec.passes.dead_code import DeadCode
from moec.passes.simplify import Simplify
from moec.paths import user_path

Hook = Callable[[Pass, Program, dict[str, Any]], None]


RECIPE_KEYS = ("passes",)


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently: a recipe
    with ``bits: 4`` and later ``bits: 8`` would quantize to 8 bits without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = []
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *defaults": merged by the base loader
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice", key_node.start_mark)
            seen.append(key)
        return super().construct_mapping(node, deep)


def read_recipe_file(path: Path) -> Any:
    """The contents of a recipe file: JSON for a ``.json`` file, else YAML (of which JSON is nearly a subset);
    a key given twice in one mapping is an error, as are unreadable text and syntax errors."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PassError(f"recipe file {path} cannot be read as UTF-8 text ({err}); write the recipe as YAML or "
                        "JSON") from None
    if path.suffix.lower() == ".json":
        def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            keys = [key for key, _ in pairs]
            twice = next((key for key in keys if keys.count(key) > 1), None)
            if twice is not None:
                raise ValueError(f"{twice!r} is given twice in one object")
            return dict(pairs)

        try:
            return json.loads(text, object_pairs_hook=unique)
        except ValueError as err:
            raise PassError(f"recipe file {path} is not valid JSON: {err}") from None
    stream = io.StringIO(text)
    stream.name = str(path)  # YAML's error marks name the file, not "<unicode string>"
    try:
        return yaml.load(stream, Loader=UniqueKeyLoader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as err:
        other = f" (a {path.suffix} file is not read: write the recipe as YAML or JSON)" \
            if path.suffix.lower() not in (".yaml", ".yml") else ""
        raise PassError(f"recipe file {path} is not valid YAML/JSON{other}: {err}") from None


def load_recipe(source: str | os.PathLike | dict | None) -> dict[str, Any]:
    """A recipe dict from a dict, a YAML/JSON file path, or None (no passes).

    A recipe is a mapping with a ``passes`` list and nothing else: a misspelled key or a pass written at
    the top level is an error, not a recipe that runs nothing."""
    if source is None:
        return {"passes": []}
    where = "the recipe"
    if isinstance(source, (str, os.PathLike)):
        path = user_path(source)
        where = f"recipe file {path}"
        if path.is_dir():
            raise PassError(f"recipe file {path} is a folder; give the path of a YAML/JSON recipe file")
        if not path.is_file():
            raise PassError(f"recipe file {path} does not exist")
        recipe = read_recipe_file(path)
    else:
        recipe = source
    example = "e.g. {'passes': [{'quantize': {'bits': 4}}]}"
    if not isinstance(recipe, dict):
        raise PassError(f"{where} must be a mapping with a 'passes' list, {example}")
    unknown = [key for key in recipe if key not in RECIPE_KEYS]
    if unknown:
        if find_pass(str(unknown[0]).replace("_", "-")) is not None:
            advice = f" (a pass goes in the 'passes' list, {example})"
        elif unknown[0] == "backend":
            advice = " (the backend is chosen by moec.compile's backend= or the CLI's --backend)"
        else:
            advice = ""
        raise PassError(f"{where} has an unknown key {unknown[0]!r}; valid keys: {', '.join(RECIPE_KEYS)}{advice}")
    if not isinstance(recipe.get("passes"), list):
        raise PassError(f"{where} needs a 'passes' list, {example}")
    return {"passes": list(recipe["passes"])}


def build_passes(recipe: str | os.PathLike | dict | None) -> list[Pass]:
    """The passes of ``recipe`` (anything ``load_recipe`` reads), each built from its entry with every option
    checked against the type the pass declares for it (``check_option``)."""
    passes = []
    for entry in load_recipe(recipe)["passes"]:
        if not (isinstance(entry, str) or (isinstance(entry, dict) and len(entry) == 1)):
            raise PassError(f"recipe entry {entry!r} must be a pass name or {{name: {{options}}}}")
        name, options = (entry, None) if isinstance(entry, str) else next(iter(entry.items()))
        key = str(name).replace("_", "-")
        cls = find_pass(key)
        if cls is None:
            raise PassError(f"unknown pass {name!r} in recipe; known passes: {', '.join(pass_names())}")
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise PassError(f"pass {key!r}: its options must be a mapping {{option: value}}, got {options!r}")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = set(options) - set(fields)
        if unknown:
            raise PassError(f"pass {key!r} has no option(s) {sorted(unknown)}; its options: {sorted(fields)}")
        hints = typing.get_type_hints(cls)
        for option, value in options.items():
            check_option(key, option, value, hints[option])
        try:
            passes.append(cls(**options))
        except (TypeError, ValueError, PassError) as err:
            message = str(err)  # some passes name themselves already ("expert-prune: keep=...")
            raise PassError(message if message.startswith(f"{key}: ") else f"pass {key!r}: {message}") from None
    return passes


def check_option(pass_name: str, option: str, value: Any, annotation: Any) -> None:
    """One ``PassError`` naming the pass and the option when ``value`` is not of the option's declared type.

    A float option takes an int, an int option takes no float or bool, a bool option only true/false, a
    tuple or list option a list of its items, a dict option a mapping; other annotations are not checked."""
    if not matches(value, annotation):
        raise PassError(f"pass {pass_name!r}: option {option}={value!r} must be {describe(annotation)}")


def matches(value: Any, annotation: Any) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arg) for arg in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation in (tuple, list) or origin in (tuple, list):
        item = sequence_item(annotation)
        return isinstance(value, (list, tuple)) and all(matches(v, item) for v in value)
    if annotation is dict or origin is dict:
        key, item = args or (Any, Any)
        return isinstance(value, dict) and all(matches(k, key) and matches(v, item) for k, v in value.items())
    return True  # Any, or a type of a user's pass that recipes cannot spell


def sequence_item(annotation: Any) -> Any:
    """The item type of a list or homogeneous tuple annotation (``list[int]``, ``tuple[int, ...]``), else Any."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    return args[0] if args and (origin is list or args[-1] is Ellipsis) else Any


def describe(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        parts = [describe(arg) for arg in args]
        return (", or " if any(" or " in part for part in parts) else " or ").join(parts)
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if annotation in names:
        return names[annotation]
    if annotation in (tuple, list) or origin in (tuple, list):
        item = sequence_item(annotation)
        return "a list" if item is Any else f"a list of {plural(describe(item))}"
    if annotation is dict or origin is dict:
        return "a mapping" if not args else f"a mapping of {plural(describe(args[0]))} to {plural(describe(args[1]))}"
    return str(annotation)


def plural(description: str) -> str:
    """``"an integer"`` -> ``"integers"``, ``"a string or an integer"`` -> ``"strings or integers"``."""
    words = [part.removeprefix("an ").removeprefix("a ") for part in description.split(" or ")]
    return " or ".join(word if word in ("null", "true", "false", "list") else f"{word}s" for word in words)


def program_stats(program: Program) -> dict[str, int]:
    from moec.ir.ops import ExpertsOp

    experts = sum(op.spec.num_experts for op in program.graph.ops_of(ExpertsOp))
    params, size = program.weight_sizes()
    return {"experts": experts, "params": params, "bytes": size}


ALWAYS_RUN = (Simplify.name, DeadCode.name)  # before every recipe (moec.api.compile): not named in its errors
QUANTIZING_PASSES = ("quantize", "bit-allocation")
EXPERT_REWRITING_PASSES = ("expert-prune", "expert-merge")  # they rewrite float expert weights


def with_cleanup(passes: Sequence[Pass]) -> list[Pass]:
    """``passes`` after the two every recipe starts with (``ALWAYS_RUN``): generic no-ops, then dead code."""
    return [Simplify(), DeadCode(), *passes]


def refused_order(program: Program, passes: Sequence[Pass]) -> str | None:
    """Why a pass of ``passes`` will refuse the weights an earlier one quantized (expert-prune or expert-merge
    after the experts were quantized, dense-to-moe after the dense FFNs were, a weight quantized twice), or
    None: found from the recipe before any pass runs, where the refusal would come after the earlier passes
    ran (a GPTQ quantization takes minutes on a large model)."""
    present = {"experts": any(program.graph.ops_of(ExpertsOp)), "dense FFNs": any(program.graph.ops_of(DenseFFNOp)),
               "shared experts": any(program.graph.ops_of(SharedExpertOp))}
    quantized_by: dict[str, str] = {}  # kind of weight -> the pass that quantized it
    for pass_ in passes:
        name = pass_.name
        reads = {"experts"} if name in EXPERT_REWRITING_PASSES else {"dense FFNs"} if name == "dense-to-moe" else set()
        if name in QUANTIZING_PASSES:  # routed experts always; dense FFNs and shared experts with dense=true
            kinds = ("experts", "dense FFNs", "shared experts") if getattr(pass_, "dense", False) else ("experts",)
            reads = {kind for kind in kinds if present[kind]}
        for kind in sorted(reads & set(quantized_by)):
            where = f"{name!r} comes after {quantized_by[kind]!r}"
            if name in QUANTIZING_PASSES:
                return (f"{where}, which already quantized the {kind}: quantize each weight once (bit-allocation "
                        "quantizes the weights it chooses widths for)")
            return (f"{where}, which quantized the {kind} it rewrites: {name} works on float weights; put it "
                    "before quantize and bit-allocation in the recipe")
        if name in QUANTIZING_PASSES:
            quantized_by |= dict.fromkeys(reads, name)
        if name == "dense-to-moe":
            present["experts"] = True
            present["shared experts"] = present["shared experts"] or getattr(pass_, "shared", 0) > 0
    return None


def run_passes(program: Program, passes: list[Pass], context: PassContext,
               hooks: Sequence[Hook] = ()) -> list[dict[str, Any]]:
    """Run ``passes`` in order; verify after each; return one record per pass (time, changes), which is also
    appended to ``program.metadata["passes"]``, the program's history that reports read. A recipe whose
    order a pass would refuse after earlier ones ran (``refused_order``) is a ``PassError`` before any runs. A recipe
    that leaves an expert placement out of date (a pass after expert-placement pruned, merged or converted
    experts, and no later expert-placement placed them again) is a ``PassError`` naming that pass: the plan
    could not run expert-parallel."""
    refused = refused_order(program, passes)
    if refused is not None:
        raise PassError(f"the recipe's order will not run: {refused}")
    records: list[dict[str, Any]] = []
    # The pass after which the program's expert placement no longer fits its experts (None: before any).
    mismatch = placement_mismatch(program)
    outdated_by: tuple[str | None, str] | None = None if mismatch is None else (None, mismatch)
    for index, pass_ in enumerate(passes, 1):
        before = program_stats(program)
        start = time.perf_counter()
        try:
            with pass_status(f"pass {pass_.name} ({index} of {len(passes)})"):
                result = pass_.run(program, context)
            verify(program.graph)
        except MoecError as err:
            ran = [record["pass"] for record in records if record["pass"] not in ALWAYS_RUN]
            after = f" (after {', '.join(map(repr, ran))})" if ran else ""
            message = str(err).removeprefix(f"{pass_.name}: ")  # the pass named itself: once is enough
            raise PassError(f"pass {pass_.name!r}{after} failed: {message}") from err
        summary = {**result.summary, "note": result.note} if result.note else result.summary
        if result.note:
            warn(f"pass {pass_.name!r} changed nothing: {result.note}")
        record = {
            "pass": pass_.name,
            "options": dataclasses.asdict(pass_),
            "seconds": round(time.perf_counter() - start, 4),
            "modified": result.modified,
            "before": before,
            "after": program_stats(program),
            **({"summary": summary} if summary else {}),
        }
        records.append(record)
        for hook in hooks:
            hook(pass_, program, record)
        mismatch = placement_mismatch(program)
        outdated_by = None if mismatch is None else (outdated_by or (pass_.name, mismatch))
    for index, (pass_, record) in enumerate(zip(passes, records, strict=True)):
        changed_by = [later["pass"] for later in records[index + 1:] if later["modified"]]
        own = record.get("summary")
        if changed_by and isinstance(own, dict):
            pass_.refresh(program, context, own, changed_by)
    if outdated_by is not None:
        name, mismatch = outdated_by
        changed = "the experts were changed" if name is None else f"pass {name!r} changed the experts"
        raise PassError(f"{changed} after expert-placement placed them ({mismatch}), so the plan could not run "
                        "expert-parallel; put expert-placement after the passes that prune, merge or convert experts")
    program.metadata.setdefault("passes", []).extend(records)
    return records


@contextlib.contextmanager
def pass_status(title: str) -> Iterator[None]:
    """A transient spinner saying which pass runs, on a terminal only (in a log it is noise), drawn on rich's
    global console so that it shows below the ``moec`` CLI's own spinner."""
    import rich

    console = rich.get_console()
    if not console.is_terminal:
        yield
        return
    with console.status(f"{title}..."):
        yield


def placement_mismatch(program: Program) -> str | None:
    """Why the program's expert placement no longer fits its experts; None when it fits or there is none."""
    settings = program.metadata.get("expert_parallel", {})
    if "placement" not in settings:
        return None
    from moec.analysis import placement as placing  # OR-Tools loads only for placed programs

    return placing.placement_mismatch(placing.Placement.from_json(settings["placement"]), program.graph)
