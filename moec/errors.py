"""The moec exception family: every error a user can meet says what is wrong and what to do next."""

from __future__ import annotations


class MoecError(Exception):
    """Base class of every error moec raises on purpose."""


class CaptureError(MoecError):
    """A model could not be captured (exported) into moec's IR."""


class VerifyError(MoecError):
    """The IR breaks one of the verifier's invariants."""


class ParseError(MoecError):
    """IR text could not be parsed."""


class PassError(MoecError):
    """A pass failed or was given options it cannot honour."""


class PlanError(MoecError):
    """A plan folder is missing, corrupt, or from an incompatible version."""


class BackendError(MoecError):
    """A backend cannot run the given IR."""
