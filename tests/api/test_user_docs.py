"""The README and the user guide name only things that exist: their Python examples parse, the ``moec.*``
names and repository paths they quote resolve, and every recipe they show (in code, in prose and in
``examples/``) builds, so a renamed option or module cannot leave the pages behind. (docs/IR.md has its own
test, tests/ir/test_ir_doc.py.)"""

from __future__ import annotations

import ast
import importlib
import json
import re
from pathlib import Path

import pytest

from moec.passes import build_passes, find_pass, load_recipe

ROOT = Path(__file__).resolve().parents[2]
PAGES = {name: (ROOT / name).read_text() for name in ("README.md", "docs/guide.md")}
FENCED = re.compile(r"^```([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"`([^`]+)`")
DOTTED = re.compile(r"(?<![\w.])moec(?:\.\w+)+")
REPO_PATH = re.compile(r"(?<![\w./])(?:moec|tools|docs|examples|tests)/[\w./-]*\w")


def python_blocks() -> list[tuple[str, str]]:
    return [(f"{page}:{i}", body) for page, text in PAGES.items()
            for i, (lang, body) in enumerate(FENCED.findall(text)) if lang.strip() == "python"]


def prose(text: str) -> str:
    """The page without its fenced blocks, so that inline code spans pair up."""
    return FENCED.sub("", text)


def inline_code() -> list[tuple[str, str]]:
    return [(page, span) for page, text in PAGES.items() for span in INLINE.findall(prose(text))]


def resolve(dotted: str) -> object:
    """The module attribute ``dotted`` names (``moec.kernels.workspace.release``), importing the longest
    module prefix; AttributeError or ImportError when it does not exist."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for part in parts[split:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(dotted)


def recipes_in_code() -> list[tuple[str, dict]]:
    """Every ``{"passes": [...]}`` literal in the pages' Python examples."""
    found = []
    for where, body in python_blocks():
        for node in ast.walk(ast.parse(body)):
            if isinstance(node, ast.Dict) and any(isinstance(k, ast.Constant) and k.value == "passes"
                                                  for k in node.keys):
                found.append((where, ast.literal_eval(node)))
    return found


def entries_in_prose() -> list[tuple[str, dict]]:
    """Every inline ``{"pass-name": {options}}`` of the prose, with ``"a" | "b"`` alternatives each tried."""
    found = []
    for page, span in inline_code():
        text = " ".join(span.split())
        if not text.startswith("{"):
            continue
        alternatives = re.findall(r'"[^"]*"(?:\s*\|\s*"[^"]*")+', text)
        variants = [text]
        for group in alternatives:
            variants = [v.replace(group, choice.strip(), 1) for v in variants for choice in group.split("|")]
        for variant in variants:
            try:
                entry = json.loads(variant)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and len(entry) == 1 and find_pass(next(iter(entry)).replace("_", "-")):
                found.append((page, entry))
    return found


@pytest.mark.parametrize("where,body", python_blocks(), ids=[w for w, _ in python_blocks()])
def test_python_examples_parse(where, body):
    ast.parse(body)


def test_quoted_moec_names_exist():
    names = {(page, name) for page, span in inline_code() for name in DOTTED.findall(span)}
    names |= {(where, name) for where, body in python_blocks() for name in DOTTED.findall(body)}
    assert names
    missing = []
    for page, name in sorted(names):
        try:
            resolve(name)
        except (AttributeError, ImportError):
            missing.append(f"{page}: {name}")
    assert not missing, missing


def test_quoted_repository_paths_exist():
    paths = {(page, path) for page, span in inline_code() for path in REPO_PATH.findall(span)}
    missing = [f"{page}: {path}" for page, path in sorted(paths) if not (ROOT / path).exists()]
    assert paths and not missing, missing


def test_recipes_shown_build():
    recipes = recipes_in_code() + [(page, {"passes": [entry]}) for page, entry in entries_in_prose()]
    recipes += [(str(path), load_recipe(path)) for path in sorted((ROOT / "examples").glob("*.yaml"))]
    shown = {json.dumps(recipe["passes"][0], sort_keys=True) for _, recipe in recipes}
    assert len(shown) >= 5, recipes  # the pages' merge, prune, dense-to-moe, quantize ... examples were found
    for where, recipe in recipes:
        assert build_passes(recipe), where
