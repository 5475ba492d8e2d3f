"""The pass manager: recipe names resolve to passes (built-ins imported on first use), bad recipes are one
clear error."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from moec.errors import PassError
from moec.passes import BUILTIN_PASSES, PassContext, build_passes, find_pass, load_recipe, run_passes


@pytest.mark.parametrize("name", sorted(BUILTIN_PASSES))
def test_every_builtin_name_resolves_to_its_pass(name):
    assert find_pass(name).name == name


def test_recipe_names_may_use_underscores():
    assert [p.name for p in build_passes({"passes": ["dead_code", {"dynamic_skip": {"threshold": 0.5}}]})] == [
        "dead-code", "dynamic-skip"]


def test_unknown_pass_names_the_known_ones():
    with pytest.raises(PassError, match=r"unknown pass 'dense-to-mo' in recipe; known passes: bit-allocation, "):
        build_passes({"passes": ["dense-to-mo"]})


ALWAYS_RUN = ("simplify", "dead_code")  # moec.compile runs these first, on every model


def test_importing_moec_imports_no_pass_module_nor_model_family():
    """The solvers, scipy and Hugging Face's model families load when used, not on ``import moec``."""
    heavy = tuple(f"moec.passes.{module}" for module in BUILTIN_PASSES.values() if module not in ALWAYS_RUN)
    code = (f"import sys, moec; print(sorted(m for m in sys.modules if m.startswith({heavy!r} + "
            "('transformers.models.', 'ortools', 'scipy.optimize'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


@pytest.mark.parametrize(("text", "message"), [
    ("pases: [{quantize: {bits: 4}}]", r"has an unknown key 'pases'; valid keys: passes$"),
    ("quantize: {bits: 4}", r"has an unknown key 'quantize'; valid keys: passes \(a pass goes in the 'passes' list"),
    ("passes: []\ndense_to_moe: {}", r"has an unknown key 'dense_to_moe'; valid keys: passes \(a pass goes in"),
    ("passes: []\nbackend: triton", r"has an unknown key 'backend'; valid keys: passes \(the backend is chosen by "
                                    r"moec.compile's backend= or the CLI's --backend\)$"),
    ("passes:", r"needs a 'passes' list"),
    ("passes: {quantize: {}}", r"needs a 'passes' list"),
    ("- quantize: {}", r"must be a mapping with a 'passes' list"),
])
def test_recipe_mistakes_are_named_not_ignored(tmp_path, text, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(text + "\n")
    with pytest.raises(PassError, match=rf"recipe file {path} {message}"):
        load_recipe(path)


@pytest.mark.parametrize(("recipe", "message"), [
    ([{"quantize": {}}], r"^the recipe must be a mapping with a 'passes' list"),
    ({"quantize": {}}, r"^the recipe has an unknown key 'quantize'; valid keys: passes \(a pass goes in"),
])
def test_build_passes_checks_the_recipe_as_load_recipe_does(recipe, message):
    with pytest.raises(PassError, match=message):
        build_passes(recipe)


def test_a_recipe_path_that_is_a_folder_is_named_as_one(tmp_path):
    with pytest.raises(PassError, match=rf"recipe file {tmp_path} is a folder; give the path of a YAML/JSON"):
        load_recipe(tmp_path)


@pytest.mark.parametrize(("name", "hint"), [("recipe.toml", True), ("recipe.yaml", False)])
def test_a_recipe_that_does_not_parse_names_the_formats_read(tmp_path, name, hint):
    path = tmp_path / name
    path.write_text('[[passes]]\nquantize = { bits = 4 }\nx: [1\n')
    with pytest.raises(PassError, match=rf"recipe file {path} is not valid YAML/JSON") as caught:
        load_recipe(path)
    assert ("(a .toml file is not read: write the recipe as YAML or JSON)" in str(caught.value)) == hint
    assert f'in "{path}", line 2' in str(caught.value)  # where in the file, not in "<unicode string>"


@pytest.mark.parametrize(("name", "content", "message"), [
    ("recipe.yaml", "passes:\n  - quantize: {bits: 4, group: 32, bits: 8}\n",
     r"is not valid YAML/JSON: 'bits' is given twice\n"),
    ("recipe.json", '{"passes": [{"quantize": {"bits": 4, "bits": 8}}]}',
     r"is not valid JSON: 'bits' is given twice in one object$"),
    ("recipe.json", '{"passes": [],}', r"is not valid JSON: Expecting property name"),
    ("recipe.yaml", b"\xff\xfe\x00bin", r"cannot be read as UTF-8 text \('utf-8' codec can't decode byte 0xff"),
])
def test_a_recipe_file_with_a_key_twice_or_unreadable_text_is_refused(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    with pytest.raises(PassError, match=rf"^recipe file {re.escape(str(path))} {message}"):
        load_recipe(path)


def test_yaml_merge_keys_are_not_keys_given_twice(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("defaults: &q {bits: 4}\npasses:\n  - quantize: {<<: *q, group: 32}\n")
    with pytest.raises(PassError, match="unknown key 'defaults'"):  # read, then refused for its extra key
        load_recipe(path)
    path.write_text("passes:\n  - quantize: {<<: {bits: 4}, group: 32}\n")
    assert load_recipe(path) == {"passes": [{"quantize": {"bits": 4, "group": 32}}]}


def test_a_json_recipe_is_read_as_json(tmp_path):
    """Tab indentation is JSON, but no YAML: a .json recipe is read by a JSON parser."""
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"passes": [{"quantize": {"bits": 4}}]}, indent="\t"))
    assert load_recipe(path) == {"passes": [{"quantize": {"bits": 4}}]}


@pytest.mark.parametrize(("entry", "message"), [
    (5, r"recipe entry 5 must be a pass name or \{name: \{options\}\}"),
    (None, r"recipe entry None must be a pass name"),
    ({"quantize": 4}, r"pass 'quantize': its options must be a mapping \{option: value\}, got 4"),
    ({"quantize": {"bits": 4.0}}, r"pass 'quantize': option bits=4.0 must be an integer$"),
    ({"quantize": {"group": 32.0}}, r"pass 'quantize': option group=32.0 must be an integer$"),
    ({"quantize": {"bits": True}}, r"pass 'quantize': option bits=True must be an integer$"),
    ({"quantize": {"dense": "no"}}, r"pass 'quantize': option dense='no' must be true or false$"),
    ({"quantize": {"method": 1}}, r"pass 'quantize': option method=1 must be a string$"),
    ({"quantize": {"bits": 5}}, r"pass 'quantize': bits=5 is not supported"),
    ({"bit-allocation": {"budget": "3"}}, r"pass 'bit-allocation': option budget='3' must be a number$"),
    ({"bit-allocation": {"budget": 0}}, r"pass 'bit-allocation': budget=0 must be a positive, finite average number of bits"),
    ({"bit-allocation": {"budget": float("inf")}}, r"pass 'bit-allocation': budget=inf must be a positive, finite"),
    ({"bit-allocation": {"budget": float("nan")}}, r"pass 'bit-allocation': budget=nan must be a positive, finite"),
    ({"bit-allocation": {"widths": []}}, r"pass 'bit-allocation': widths=\[\] must list one or more distinct widths"),
    ({"bit-allocation": {"widths": [2, 2, 4]}}, r"widths=\[2, 2, 4\] must list one or more distinct widths"),
    ({"bit-allocation": {"widths": [5, 4]}}, r"pass 'bit-allocation': widths=\[4, 5\]: 5 is not a supported width; "
                                             r"choose widths from \[2, 3, 4, 8\]$"),
    ({"bit-allocation": {"widths": 4}}, r"option widths=4 must be a list of integers$"),
    ({"bit-allocation": {"floors": {"expert": 16}}}, r"pass 'bit-allocation': floors\['expert'\]=16 is above every "
                                                     r"width in \[2, 3, 4, 8\]"),
    ({"bit-allocation": {"floors": {"expert": "8"}}}, r"option floors=\{'expert': '8'\} must be a mapping of "
                                                      r"strings to integers$"),
    ({"dense-to-moe": {"layers": [0, 1.5]}}, r"option layers=\[0, 1.5\] must be a list of strings or integers, or null$"),
    ({"expert-prune": {"keep": 2.5}}, r"pass 'expert-prune': option keep=2.5 must be an integer or null$"),
    ({"expert-prune": {"keep": 0}}, r"^expert-prune: keep=0 must be a positive number"),
    ({"overlap-schedule": {"chunks": 0}}, r"pass 'overlap-schedule': chunks=0 must be at least 1"),
    ({"expert-placement": {"world_size": 0}}, r"pass 'expert-placement': world_size=0 must be at least 1"),
])
def test_bad_options_are_one_error_naming_the_pass_and_option(entry, message):
    with pytest.raises(PassError, match=message):
        build_passes({"passes": [entry]})


def test_options_of_the_declared_types_are_taken():
    quantize, allocate, convert = build_passes({"passes": [
        {"quantize": None}, {"bit-allocation": {"budget": 3, "widths": [4, 2], "floors": {"expert": 4}}},
        {"dense-to-moe": {"layers": [0, "model.layers.1.mlp"]}}]})
    assert quantize.bits == 4 and allocate.budget == 3 and allocate.widths == (2, 4)
    assert convert.layers == (0, "model.layers.1.mlp")


@pytest.mark.parametrize(("preset", "name", "options", "note"), [
    ("tiny-llama", "expert-prune", {"keep": 2}, "the program has no routed MoE layers to prune"),
    ("tiny-llama", "expert-merge", {"keep": 2}, "the program has no routed MoE layers to merge"),
    ("tiny-llama", "dynamic-skip", {}, "the program has no moe.experts ops whose experts could be skipped"),
    ("tiny-llama", "quantize", {"dense": False}, "the program has no moe.experts ops to quantize (dense=False "),
    ("tiny-mixtral", "dense-to-moe", {}, "the program has no ffn.dense ops to split into experts"),
])
def test_a_pass_that_finds_nothing_to_work_on_notes_it_and_warns(compiled_program, preset, name, options, note):
    _, _, program = compiled_program(preset)
    with pytest.warns(UserWarning, match=rf"pass '{name}' changed nothing: {re.escape(note)}"):
        (record,) = run_passes(program, build_passes({"passes": [{name: options}]}), PassContext())
    assert record["summary"]["note"].startswith(note) and not record["modified"]


@pytest.mark.parametrize("terminal", [True, False])
def test_a_spinner_names_each_running_pass_on_a_terminal_only(compiled_program, monkeypatch, terminal):
    """On a terminal, a transient spinner says which pass of how many runs (a long pass is not a silent wait);
    in a log or a pipe nothing is drawn."""
    import io

    import rich
    from rich.console import Console

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=terminal, width=80)
    monkeypatch.setattr(rich, "get_console", lambda: console)
    _, _, program = compiled_program("tiny-mixtral")
    run_passes(program, build_passes({"passes": ["dead-code", {"dynamic-skip": {"threshold": 0.5}}]}), PassContext())
    drawn = screen.getvalue()
    if terminal:
        assert "pass dead-code (1 of 2)..." in drawn and "pass dynamic-skip (2 of 2)..." in drawn
    else:
        assert drawn == ""


@pytest.mark.parametrize("terminal", [True, False])
def test_calibration_and_gptq_draw_a_named_bar_on_a_terminal_only(compiled_program, monkeypatch, terminal):
    """The calibration run says which pass it calibrates for, and GPTQ's rounding has its own bar."""
    import io

    import rich
    from rich.console import Console

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=terminal, width=120)
    monkeypatch.setattr(rich, "get_console", lambda: console)
    _, example, program = compiled_program("tiny-mixtral")
    recipe = {"passes": [{"expert-prune": {"keep": 3}}, {"quantize": {"bits": 4, "group": 32, "method": "gptq"}}]}
    run_passes(program, build_passes(recipe), PassContext(calibration=[example]))
    drawn = screen.getvalue()
    if terminal:
        assert "calibrating for pass 'expert-prune'" in drawn and "GPTQ: rounding the weights" in drawn
    else:
        assert drawn == ""


def test_a_failing_pass_is_named_once_with_the_recipe_passes_before_it(compiled_program):
    """The passes every recipe starts with (simplify, dead-code) go unnamed; a message the pass begins with
    its own name does not name it twice."""
    _, example, program = compiled_program("tiny-mixtral")
    passes = [*build_passes({"passes": [{"expert-prune": {"keep": 3}}, {"expert-prune": {"keep": 1}}]})]
    from moec.passes.dead_code import DeadCode
    from moec.passes.simplify import Simplify

    with pytest.raises(PassError, match=r"^pass 'expert-prune' \(after 'expert-prune'\) failed: keep=1 is fewer "):
        run_passes(program, [Simplify(), DeadCode(), *passes], PassContext(calibration=[example], progress=False))
