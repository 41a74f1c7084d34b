"""``DropspyCallback`` for Keras' ``model.fit``: Keras 3 and Keras 2 (tf_keras), one name.

Where it hooks in, and why: ``fit`` builds its train function *before* it calls
``on_train_begin`` (Keras 3 on every backend and tf_keras alike), and :func:`dropspy.record`
must build that function itself (the masks are extra outputs of the train step). Entering
``record()`` in ``on_train_begin`` would leave ``fit`` holding no train function (measured:
``TypeError: 'NoneType' object is not callable``) or, in tf_keras, replace a function whose
stateful dropout ops then start their random streams again. So the callback enters
``record()`` one call earlier: ``fit`` hands the callback its model (``set_model``) before it
builds the train function, and the callback puts a one-shot hook on the model's
``make_train_function``; the first call from ``fit`` enters ``record()`` and then builds the
recording train function, exactly as ``fit`` inside ``with dropspy.record(...)`` would.
Training is bit-identical with and without the callback (tested, weights and seed states).

The class derives from Keras 3's ``Callback`` and carries what tf_keras' ``CallbackList``
asks of its callbacks, so the same object works in both (``keras`` 3 is installed with
TensorFlow >= 2.16; without it the class derives from tf_keras' ``Callback``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import FrameType
from typing import Any

from dropspy.integrations._base import (
    DriverFacade,
    RecordingDriver,
    check_options,
    missing_framework,
    warn_once,
)


def _keras_callback_base() -> Any:
    """Keras 3's ``Callback``; tf_keras' when only tf_keras is installed. Only a missing
    package gets the install line; an error inside an installed one surfaces as is."""
    if importlib.util.find_spec("keras") is not None:
        keras = importlib.import_module("keras")
        if int(keras.__version__.split(".")[0]) >= 3:
            return keras.callbacks.Callback
    if importlib.util.find_spec("tf_keras") is not None:
        return importlib.import_module("tf_keras").callbacks.Callback
    raise missing_framework("keras", "Keras (keras>=3 with TensorFlow, or tf_keras)",
                            "tensorflow")


_Callback: Any = _keras_callback_base()

__all__ = ["DropspyCallback"]

# The functions that call make_<kind>_function when a fit / evaluate / predict starts.
_CALLERS = {
    "train": ("fit",),
    "test": ("evaluate", "_get_test_function_runner"),   # tf_keras builds it in a helper
    "predict": ("predict",),
}


class DropspyCallback(DriverFacade, _Callback):  # type: ignore[misc]
    """Record the dropout masks ``model.fit`` applies, from the start of training to its end.

    One callback records one run into one file: reuse in a second ``fit`` fails at its start
    with :func:`dropspy.record`'s message. Evaluation and prediction batches (validation in
    ``fit``, ``evaluate``, ``predict`` given this callback) are recorded only with
    ``evaluate=True``; they belong to the step after the last train step, as with ``record()``.
    An exception raised inside a training step ends the recording before it propagates (the
    file is closed, the model restored); :meth:`close` does the same from user code.

    Args:
        path: The run file to create (HDF5).
        evaluate: Also record evaluation and prediction batches.
        **options: :func:`dropspy.record`'s options (``every``, ``steps``, ``sites``,
            ``max_bytes``, ``on_full``), checked here.

    Raises:
        OptionError: An unknown option or a value ``record()`` would refuse (at construction).
        UnsupportedModelError: At train start, for a model dropspy cannot record.
        RecordingError: At train start, when the callback already recorded or the model is
            already being recorded.

    Example:
        >>> from dropspy.integrations.keras import DropspyCallback   # doctest: +SKIP
        >>> model.fit(x, y, epochs=2, callbacks=[DropspyCallback("run.h5", every=10)])
    """

    # What tf_keras' CallbackList reads from every callback (Keras 3's Callback lacks them).
    _supports_tf_logs = False
    _chief_worker_only = None
    validation_data = None

    def __init__(self, path: str | os.PathLike[str], *, evaluate: bool = False,
                 **options: Any) -> None:
        super().__init__()
        self._driver = RecordingDriver("keras", path, check_options(options), evaluate)
        self._target: Any = None   # the model, held apart from Keras' `model` property
        self._armed: dict[str, tuple[bool, Any]] = {}

    def close(self) -> None:
        """End the recording now (idempotent): the model is restored and the file closed."""
        self._disarm()
        self._driver.stop()

    # tf_keras asks which batch hooks a callback implements; this one needs none.
    def _implements_train_batch_hooks(self) -> bool:
        return False

    def _implements_test_batch_hooks(self) -> bool:
        return False

    def _implements_predict_batch_hooks(self) -> bool:
        return False

    def set_model(self, model: Any) -> None:
        """Keep the model and, before ``fit`` builds its train function, hook that build."""
        super().set_model(model)
        if self._driver.started:
            return
        self._disarm()
        self._target = model
        kinds = ["train"] + (["test", "predict"] if self._driver.evaluate else [])
        for kind in kinds:
            self._arm(model, kind)

    def _arm(self, model: Any, kind: str) -> None:
        name = f"make_{kind}_function"
        if not callable(getattr(model, name, None)):
            return
        had = name in model.__dict__
        self._armed[kind] = (had, model.__dict__.get(name))
        previous = getattr(model, name)

        def hook(*args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1)
            self._disarm()
            if not self._driver.started and _called_by(caller, _CALLERS[kind], self):
                return self._start(model, kind, *args, **kwargs)
            return previous(*args, **kwargs)

        hook._dropspy_callback = self  # type: ignore[attr-defined]
        object.__setattr__(model, name, hook)

    def _disarm(self) -> None:
        """Take the build hooks off the model, putting back what was there before."""
        model, armed, self._armed = self._target, self._armed, {}
        for kind, (had, old) in armed.items():
            name = f"make_{kind}_function"
            current = model.__dict__.get(name)
            if getattr(current, "_dropspy_callback", None) is not self:
                # Wrapped since (another callback's recording): ours comes back when that
                # one is undone; take it off then.
                self._armed[kind] = (had, old)
                continue
            if had:
                object.__setattr__(model, name, old)
            else:
                object.__delattr__(model, name)

    def _start(self, model: Any, kind: str, *args: Any, **kwargs: Any) -> Any:
        """Enter record(), then build the recording ``kind`` function (as fit would have)."""
        try:
            self._driver.start(model, kind)
        except BaseException:
            self._disarm()
            raise
        built = getattr(model, f"make_{kind}_function")(*args, **kwargs)
        attr = f"{kind}_function"
        fn = model.__dict__.get(attr)
        if fn is None:
            return built
        guarded = self._guard(fn)
        object.__setattr__(model, attr, guarded)
        return guarded if built is fn else built

    def _guard(self, fn: Any) -> Any:
        """``fn``, ending the recording before an exception from a step leaves ``fit``."""
        def function(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except BaseException as exc:
                if not _ends_epoch(exc):
                    self._driver.stop()
                raise

        # The adapters recognise their own functions by these (tf_keras rebuilds otherwise).
        for attr in ("_dropspy_owner", "__wrapped__"):
            if hasattr(fn, attr):
                setattr(function, attr, getattr(fn, attr))
        return function

    def _fallback_start(self, kind: str) -> None:
        """Start at ``on_<kind>_begin`` when the build hook did not run (``fit`` was given a
        model other than the one ``set_model`` saw, or built its function elsewhere): enter
        record() and rebuild the function, as record() would have it built."""
        model = self._target if self._target is not None else self.model
        self._disarm()
        self._start(model, kind, force=True)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        """Start recording if the build hook did not already."""
        if not self._driver.started:
            self._fallback_start("train")
        elif not self._driver.active:
            self._driver.start(self._target)   # a second fit: record()'s "already used"

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        """Stop recording: the model is restored and the run file closed."""
        if self._driver.kind == "train":
            self._driver.stop()

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        """``evaluate=True`` outside ``fit``: start recording here if not started yet."""
        self._begin("test")

    def on_test_end(self, logs: dict[str, Any] | None = None) -> None:
        """End a recording that ``evaluate`` started."""
        self._end("test")

    def on_predict_begin(self, logs: dict[str, Any] | None = None) -> None:
        """``evaluate=True`` outside ``fit``: start recording here if not started yet."""
        self._begin("predict")

    def on_predict_end(self, logs: dict[str, Any] | None = None) -> None:
        """End a recording that ``predict`` started."""
        self._end("predict")

    def _begin(self, kind: str) -> None:
        driver = self._driver
        if not driver.evaluate or driver.active:
            return
        if not driver.started:
            self._fallback_start(kind)
        else:
            warn_once(self, f"this DropspyCallback already recorded a run into {driver.path}; "
                            f"this {'evaluate' if kind == 'test' else kind} is not recorded. "
                            f"Give it a new DropspyCallback to record it.")

    def _end(self, kind: str) -> None:
        if self._driver.kind == kind:
            self._driver.stop()
        elif not self._driver.started:
            self._disarm()   # evaluate/predict without recording: leave the model as it was


def _called_by(frame: FrameType | None, names: tuple[str, ...], callback: Any) -> bool:
    """Whether ``frame`` is the Keras loop (``fit``...) that was handed ``callback``."""
    if frame is None or frame.f_code.co_name not in names:
        return False
    callbacks = getattr(frame.f_locals.get("callbacks"), "callbacks", None)
    return callbacks is None or any(c is callback for c in callbacks)


def _ends_epoch(exc: BaseException) -> bool:
    """Whether ``exc`` is how a dataset of unknown length ends an epoch: ``fit`` catches it
    (``catch_stop_iteration``) and goes on training, so the recording goes on too."""
    return isinstance(exc, StopIteration) or type(exc).__name__ == "OutOfRangeError"
