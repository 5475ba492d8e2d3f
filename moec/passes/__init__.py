"""Passes over moec programs, and the manager that runs a recipe of them.

The built-in passes (``BUILTIN_PASSES``) are imported when a recipe first names them; ``register_pass``
adds users' own.
"""

from moec.passes.base import BUILTIN_PASSES, PASSES, Pass, PassContext, PassResult, find_pass, register_pass
from moec.passes.manager import build_passes, load_recipe, run_passes

__all__ = ["BUILTIN_PASSES", "PASSES", "Pass", "PassContext", "PassResult", "build_passes", "find_pass",
           "load_recipe", "register_pass", "run_passes"]
