"""The moec exception family: every error a user can meet says what is wrong and what to do next."""

from __future__ import annotations

import os
import sys
import warnings

PACKAGE_DIR = os.path.dirname(__file__) + os.sep  # frames in files under it are moec's own

class MoecError(Exception):
    """Base class of every error moec raises on purpose."""


class CaptureError(MoecError):
    """A model could not be captured (exported) into moec's IR."""


class VerifyError(MoecError):
    """The IR breaks one of the verifier's invariants; ``block`` is the model block (module path) of the
    op at fault, when that op came from one."""

    def __init__(self, message: str, block: str | None = None) -> None:
        super().__init__(message)
        self.block = block


class ParseError(MoecError):
    """IR text could not be parsed."""


class PassError(MoecError):
    """A pass failed or was given options it cannot honour."""


class PlanError(MoecError):
    """A plan folder is missing, corrupt, or from an incompatible version."""


class BackendError(MoecError):
    """A backend cannot run the given IR, or an ONNX export cannot be written or fails its checks."""


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside the moec package: the user's line that
    called into moec, wherever inside moec the warning arises."""
    if sys.version_info >= (3, 12):
        warnings.warn(message, category, skip_file_prefixes=(PACKAGE_DIR,))
        return
    frame, level = sys._getframe(1), 2  # level 2: warn's caller
    while frame.f_back is not None and frame.f_code.co_filename.startswith(PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
