"""``DropspyCallback`` for a Lightning ``Trainer`` (``lightning.pytorch``, or the standalone
``pytorch_lightning`` package when only that one is installed).

The callback enters :func:`dropspy.record` on the ``LightningModule`` at ``on_train_start``
and leaves it at ``on_train_end`` or ``on_exception``. Steps are ``trainer.global_step``: the
callback marks a new step whenever the Trainer's counter moved (after a batch), so gradient
accumulation, several optimizers and a resumed run are counted as Lightning counts them. Under
a DDP strategy the module given to the hooks is the unwrapped one and each process records its
own file, by :func:`dropspy.record`'s per-rank rule. Lightning's sanity-check validation runs
before ``on_train_start`` and is never recorded.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any

from dropspy.integrations._base import (
    DriverFacade,
    RecordingDriver,
    check_options,
    missing_framework,
)

# Only a missing package gets the install line; an error inside an installed one surfaces as is.
if importlib.util.find_spec("lightning") is not None:
    _Callback: Any = importlib.import_module("lightning.pytorch").Callback
elif importlib.util.find_spec("pytorch_lightning") is not None:
    _Callback = importlib.import_module("pytorch_lightning").Callback
else:
    raise missing_framework("lightning", "Lightning (lightning or pytorch_lightning)",
                            "lightning")

__all__ = ["DropspyCallback"]


class DropspyCallback(DriverFacade, _Callback):  # type: ignore[misc]
    """Record the dropout masks a ``LightningModule`` applies while ``trainer.fit`` trains it.

    One callback records one run: a second ``fit`` with it fails at its start with
    :func:`dropspy.record`'s message. Validation, test and predict loops run the module in eval
    mode; they are recorded only with ``evaluate=True`` (as records with ``training=False``):
    inside ``fit`` as part of the step after the last optimizer step, and in a
    ``trainer.validate/test/predict`` call given this callback as a recording of its own.

    Args:
        path: The run file to create (HDF5); under DDP, one per rank.
        evaluate: Also record validation, test and predict loops.
        **options: :func:`dropspy.record`'s options (``every``, ``steps``, ``sites``,
            ``max_bytes``, ``on_full``), checked here.

    Raises:
        OptionError: An unknown option or a value ``record()`` would refuse (at construction).
        UnsupportedModelError: At train start, for a module dropspy cannot record.
        RecordingError: At train start, when the callback already recorded or the module is
            already being recorded.

    Example:
        >>> from dropspy.integrations.lightning import DropspyCallback   # doctest: +SKIP
        >>> trainer = L.Trainer(max_epochs=2, callbacks=[DropspyCallback("run.h5", every=10)])
        >>> trainer.fit(module, train_loader)
    """

    def __init__(self, path: str | os.PathLike[str], *, evaluate: bool = False,
                 **options: Any) -> None:
        super().__init__()
        self._driver = RecordingDriver(
            "lightning", path, check_options(options), evaluate,
            step_clock="steps are Lightning's trainer.global_step, marked by the Lightning "
                       "DropspyCallback")
        self._step = 0
        self._region = False   # a forward region is open around the running batch

    def close(self) -> None:
        """End the recording now (idempotent): the module is restored and the file closed."""
        self._driver.stop()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Enter :func:`dropspy.record` on the module; the first step is ``global_step``."""
        self._driver.start(pl_module)
        self._step = int(trainer.global_step)
        self._driver.mark_step(self._step)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                             batch_idx: int) -> None:
        """The batch is one forward of the module, also where ``training_step`` calls its
        submodules without calling the module itself."""
        self._region = self._driver.enter_forward()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """A batch ended; once the optimizer stepped, the next forwards are a new step."""
        if self._region:
            self._region = False
            self._driver.exit_forward()
        step = int(trainer.global_step)
        if step != self._step and self._driver.kind == "train":
            self._step = step
            self._driver.mark_step(step)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Leave the recording: the module is restored and the file closed."""
        if self._driver.kind == "train":
            self._driver.stop()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Training raised: leave the recording before the exception leaves ``fit``."""
        self._driver.stop()

    def _begin(self, trainer: Any, pl_module: Any, kind: str) -> None:
        """A validate/test/predict call of its own (not fit's validation), if asked."""
        fn = str(getattr(getattr(trainer.state, "fn", None), "value", ""))
        if self._driver.evaluate and fn != "fit" and not self._driver.started:
            self._driver.start(pl_module, kind)

    def _end(self, kind: str) -> None:
        if self._driver.kind == kind:
            self._driver.stop()

    def _enter_eval_batch(self) -> None:
        if self._driver.evaluate and not self._region:
            self._region = self._driver.enter_forward()

    def _exit_eval_batch(self) -> None:
        if self._region:
            self._region = False
            self._driver.exit_forward()

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        """With ``evaluate=True`` the batch is one forward of the module (see train batches)."""
        self._enter_eval_batch()

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        """Close the batch's forward region."""
        self._exit_eval_batch()

    def on_test_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        """With ``evaluate=True`` the batch is one forward of the module (see train batches)."""
        self._enter_eval_batch()

    def on_test_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        """Close the batch's forward region."""
        self._exit_eval_batch()

    def on_predict_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        """With ``evaluate=True`` the batch is one forward of the module (see train batches)."""
        self._enter_eval_batch()

    def on_predict_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        """Close the batch's forward region."""
        self._exit_eval_batch()

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        """``trainer.validate`` with ``evaluate=True``: start recording."""
        self._begin(trainer, pl_module, "validate")

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        """End a recording that ``trainer.validate`` started."""
        self._end("validate")

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        """``trainer.test`` with ``evaluate=True``: start recording."""
        self._begin(trainer, pl_module, "test")

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        """End a recording that ``trainer.test`` started."""
        self._end("test")

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        """``trainer.predict`` with ``evaluate=True``: start recording."""
        self._begin(trainer, pl_module, "predict")

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        """End a recording that ``trainer.predict`` started."""
        self._end("predict")
