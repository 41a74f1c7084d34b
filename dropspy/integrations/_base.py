"""What every integration shares: options checked at construction, one recording per
callback, entered at train start and left at train end, on an exception, or at exit.

Framework-free: the callbacks hand the model in; :func:`dropspy.record` finds the adapter.
"""

from __future__ import annotations

import atexit
import os
import warnings
import weakref
from typing import Any

from dropspy.errors import DropspyWarning, OptionError, RecordingError
from dropspy.options import RecordOptions
from dropspy.recorder import Recording

__all__ = ["DriverFacade", "RecordingDriver", "check_options", "missing_framework", "warn_once"]

OPTION_NAMES = ("every", "steps", "sites", "max_bytes", "on_full")

# Drivers whose recording is still open: closed at interpreter exit (a training loop that
# raised where no callback hook sees it), so the run file is left closed and readable.
_OPEN: weakref.WeakSet[RecordingDriver] = weakref.WeakSet()


def missing_framework(module: str, what: str, extra: str) -> ImportError:
    """The one-line error for an integration imported without its framework."""
    return ImportError(
        f"dropspy.integrations.{module} needs {what}, which is not installed. Install it with: "
        f"pip install 'dropspy[{extra}]'"
    )


def check_options(options: dict[str, Any]) -> RecordOptions:
    """Check :func:`dropspy.record`'s options now, so a bad one fails where the callback is
    made, not when training starts.

    Raises:
        OptionError: An unknown option, or a value :func:`dropspy.record` would refuse.
    """
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise OptionError(
            f"Unknown option(s) {', '.join(map(repr, unknown))}. Expected the options of "
            f"dropspy.record(): {', '.join(OPTION_NAMES)}."
        )
    return RecordOptions.of(**options)


def warn_once(owner: Any, message: str) -> None:
    """Warn ``message`` (a :class:`DropspyWarning`) once per ``owner`` and message."""
    seen = owner.__dict__.setdefault("_dropspy_warned", set())
    if message not in seen:
        seen.add(message)
        warnings.warn(f"dropspy: {message}", DropspyWarning, stacklevel=3)


class RecordingDriver:
    """One callback's recording.

    Args:
        integration: The callback's name, stored in the run file (``integration``).
        path: The run file (per-rank files follow :func:`dropspy.record`'s rule).
        options: :func:`dropspy.record`'s options, already checked (:func:`check_options`).
        evaluate: Record evaluation and prediction batches too.
        step_clock: What the steps are, when this callback marks them (torch integrations):
            the note the run prints and stores instead of "marked explicitly with mark_step()".
    """

    def __init__(self, integration: str, path: str | os.PathLike[str], options: RecordOptions,
                 evaluate: bool, step_clock: str | None = None) -> None:
        if not isinstance(evaluate, bool):
            raise OptionError(f"Invalid value received for argument `evaluate`. Expected a "
                              f"bool. Received: evaluate={evaluate!r}")
        self.integration = integration
        self.path = os.fspath(path)
        self.options = options
        self.evaluate = evaluate
        self.step_clock = step_clock
        self.recording: Recording | None = None
        self.kind: str | None = None   # what started the recording: train, eval, predict

    @property
    def active(self) -> bool:
        """Whether the recording is open."""
        return self in _OPEN

    @property
    def started(self) -> bool:
        """Whether this callback's one recording has started (it may have ended since)."""
        return self.recording is not None

    def start(self, model: Any, kind: str = "train") -> Recording:
        """Enter :func:`dropspy.record` for ``model``.

        Raises:
            RecordingError: This callback already recorded (a callback records one run), or
                the model is already being recorded.
            UnsupportedModelError: dropspy cannot record this model.
        """
        if self.recording is not None:
            self.stop()   # still open if the last run raised where no hook saw it
            try:
                self.recording.__enter__()   # raises record()'s "already used" error
            except RecordingError as exc:
                raise RecordingError(
                    f"{exc} A DropspyCallback records one training run into {self.path}: "
                    f"make a new one for each run."
                ) from None
        recording = Recording(model, self.path, self.options, integration=self.integration)
        try:
            recording.__enter__()
        except RecordingError:
            # Another callback of this training run started recording this model: the run
            # stops here, at its start, so that recording must end too, not stay attached.
            for other in list(_OPEN):
                rec = other.recording
                if rec is not None and rec.model is model:
                    other.stop()
            raise
        self.recording, self.kind = recording, kind
        _OPEN.add(self)
        if recording.session is not None:
            recording.session.record_eval = self.evaluate or kind != "train"
            recording.session.step_clock = self.step_clock
        return recording

    def stop(self) -> None:
        """Leave the recording (idempotent): the model is restored and the file closed."""
        if self not in _OPEN:
            return
        _OPEN.discard(self)
        if self.recording is not None:
            self.recording.__exit__(None, None, None)

    def enter_forward(self) -> bool:
        """Open a forward region on the adapter (torch), if recording; whether one opened."""
        fn = getattr(getattr(self.recording, "adapter", None), "enter_forward", None)
        if fn is None or self not in _OPEN:
            return False
        fn()
        return True

    def exit_forward(self) -> None:
        """Close the region :meth:`enter_forward` opened."""
        fn = getattr(getattr(self.recording, "adapter", None), "exit_forward", None)
        if fn is not None and self in _OPEN:
            fn()

    def mark_step(self, step: int) -> None:
        """Start step ``step`` (torch): the framework's own step counter drives the file's."""
        if self.recording is not None and self in _OPEN:
            self.recording.mark_step(step)


class DriverFacade:
    """What every integration callback shows of its :class:`RecordingDriver`."""

    _driver: RecordingDriver

    @property
    def path(self) -> str:
        """The run file (before the per-rank suffix, under a multi-process launch)."""
        return self._driver.path

    @property
    def recording(self) -> Any:
        """The :class:`dropspy.recorder.Recording` once training started, else None."""
        return self._driver.recording


@atexit.register
def _close_open_recordings() -> None:
    for driver in list(_OPEN):
        try:
            driver.stop()
        except Exception:  # pragma: no cover - exit path: close the others
            pass
