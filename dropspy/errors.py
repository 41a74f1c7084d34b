"""The dropspy error hierarchy: one root, each subclass also a matching builtin."""

from __future__ import annotations

__all__ = [
    "DropspyError",
    "RunFileError",
    "UnsupportedModelError",
    "RecordingError",
    "ExpectationError",
    "SiteNotFoundError",
    "ReportError",
    "RecordNotFoundError",
    "OptionError",
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


class SiteNotFoundError(DropspyError, KeyError):
    """A site name or pattern matches no site; the message lists the sites that exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class RecordNotFoundError(DropspyError, ValueError):
    """No record matches the step / call asked for; the message says which exist."""


class ReportError(DropspyError, ValueError):
    """A report (JSON or mapping) does not have the shape of a dropspy report."""


class OptionError(DropspyError, ValueError):
    """A recording option is invalid: the message names it, what was received and expected."""


class DropspyWarning(UserWarning):
    """Something the user must know about a recording (perturbation, write failure)."""


class RunSetError(RunFileError):
    """Files given as one run set cannot be analysed as one (different runs, nothing readable,
    a glob that matches nothing)."""
