"""The dropspy error hierarchy: one root, each subclass also a matching builtin."""

from __future__ import annotations

__all__ = [
    "DropspyError",
    "RunFileError",
    "UnsupportedModelError",
    "RecordingError",
    "ExpectationError",
    "DropspyWarning",
]


class DropspyError(Exception):
    """Root of every error dropspy raises on purpose."""


class RunFileError(DropspyError, ValueError):
    """A run file is missing, unreadable, not a run, or of an unknown format version."""


class UnsupportedModelError(DropspyError, TypeError):
    """No adapter can record this model, or it uses something the adapter refuses."""


class RecordingError(DropspyError, RuntimeError):
    """Recording cannot start or continue (nesting, a model already being recorded...)."""


class ExpectationError(DropspyError, ValueError):
    """An expectation string or spec file is malformed."""


class DropspyWarning(UserWarning):
    """Something the user must know about a recording (perturbation, write failure)."""
