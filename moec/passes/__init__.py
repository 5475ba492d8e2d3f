"""Passes over moec programs, and the manager that runs a recipe of them."""

from moec.passes import (  # noqa: F401  (registers the passes)
    bit_allocation,
    dead_code,
    dense_to_moe,
    dynamic_skip,
    expert_merge,
    expert_placement,
    expert_prune,
    overlap_schedule,
    quantize,
)
from moec.passes.base import PASSES, Pass, PassContext, PassResult, register_pass
from moec.passes.manager import build_passes, load_recipe, run_passes

__all__ = ["PASSES", "Pass", "PassContext", "PassResult", "build_passes", "load_recipe", "register_pass", "run_passes"]
