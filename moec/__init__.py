"""moec: an MoE-aware model compiler.

    import moec
    compiled = moec.compile(model, (input_ids,))
    out = compiled(other_input_ids)
    print(compiled.ir)
    compiled.save("plan/"); again = moec.load("plan/")
"""

__version__ = "0.1.0"

import os as _os  # noqa: E402

import torch as _torch  # noqa: E402

# Without a CUDA GPU, Triton runs kernels only in its interpreter, a switch it reads when first imported;
# the imports below (transformers models) import it, so the Triton backend's switch is set here, first.
if not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")

from moec.api import CompiledModel, compile, load  # noqa: E402
from moec.errors import (  # noqa: E402
    BackendError,
    CaptureError,
    MoecError,
    ParseError,
    PassError,
    PlanError,
    VerifyError,
)
from moec.frontend.blocks import BlockSpec, ExpertsSpec, FFNSpec, RouteSpec  # noqa: E402
from moec.frontend.recognize import register_moe_block  # noqa: E402

__all__ = [
    "BackendError", "BlockSpec", "CaptureError", "CompiledModel", "ExpertsSpec", "FFNSpec", "MoecError", "ParseError",
    "PassError", "PlanError", "RouteSpec", "VerifyError", "compile", "load", "register_moe_block",
]
