"""Passes over moec programs, and the manager that runs a recipe of them."""

from moec.passes import dead_code, dense_to_moe, expert_merge, expert_prune  # noqa: F401  (register the passes)
from moec.passes.base import PASSES, Pass, PassContext, PassResult, register_pass
from moec.passes.manager import build_passes, load_recipe, run_passes

__all__ = ["PASSES", "Pass", "PassContext", "PassResult", "build_passes", "load_recipe", "register_pass", "run_passes"]
