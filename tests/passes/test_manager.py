"""The pass manager: recipe names resolve to passes (built-ins imported on first use), bad recipes are one
clear error."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moec.errors import PassError
from moec.passes import BUILTIN_PASSES, build_passes, find_pass


@pytest.mark.parametrize("name", sorted(BUILTIN_PASSES))
def test_every_builtin_name_resolves_to_its_pass(name):
    assert find_pass(name).name == name


def test_recipe_names_may_use_underscores():
    assert [p.name for p in build_passes({"passes": ["dead_code", {"dynamic_skip": {"threshold": 0.5}}]})] == [
        "dead-code", "dynamic-skip"]


def test_unknown_pass_names_the_known_ones():
    with pytest.raises(PassError, match=r"unknown pass 'dense-to-mo' in recipe; known passes: bit-allocation, "):
        build_passes({"passes": ["dense-to-mo"]})


def test_importing_moec_imports_no_pass_module_nor_model_family():
    """The solvers, scipy and Hugging Face's model families load when used, not on ``import moec``."""
    heavy = tuple(f"moec.passes.{module}" for module in BUILTIN_PASSES.values() if module != "dead_code")
    code = (f"import sys, moec; print(sorted(m for m in sys.modules if m.startswith({heavy!r} + "
            "('transformers.models.', 'ortools', 'scipy.optimize'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
