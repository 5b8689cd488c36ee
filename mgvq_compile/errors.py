"""Errors that name the problem and the fix.

Every error the compiler raises on bad input is a :class:`MgvqError`: its message says what is wrong
and its ``hint`` says what to do about it. The CLI prints both and exits non-zero.
"""

from __future__ import annotations

__all__ = [
    "MgvqError",
    "InputError",
    "UnsupportedOpError",
    "CalibrationError",
    "RecipeError",
    "PassError",
    "CaptureError",
]


class MgvqError(Exception):
    """Base class of the compiler's user-facing errors."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class InputError(MgvqError):
    """A model file, option or output directory that cannot be used as given."""


class UnsupportedOpError(MgvqError):
    """The calibration executor has no converter for an op of the graph."""

    def __init__(self, op_type: str, domain: str, opset: int, node_name: str):
        dom = domain or "ai.onnx"
        super().__init__(
            f"the calibration executor has no converter for op {dom}::{op_type} "
            f"(opset {opset}) used by node {node_name!r}",
            "use a method that needs no calibration (--method rtn or kmeans-vq), or add a converter "
            "with mgvq_compile.calibration.ops.register_op",
        )
        self.op_type = op_type
        self.domain = domain
        self.opset = opset
        self.node_name = node_name


class CalibrationError(MgvqError):
    """Calibration data that is missing, empty or does not fit the graph."""


class RecipeError(MgvqError):
    """A recipe or pass configuration that cannot be used."""


class CaptureError(MgvqError):
    """A torch / transformers model that could not be captured as a graph."""


class PassError(MgvqError):
    """A pass failed; the message names the pass and the passes that ran before it."""
