"""``DropspyCallback`` for the transformers ``Trainer``.

The callback enters :func:`dropspy.record` on the Trainer's model at ``on_train_begin`` and
leaves it at ``on_train_end``. Steps are the Trainer's own optimizer steps
(``state.global_step``): the callback marks each step at ``on_step_end``, so gradient
accumulation (several forwards per step), a step the gradient scaler skipped and a run resumed
from a checkpoint are all counted as the Trainer counts them. Under a multi-process launch
(``torchrun``, ``accelerate launch``) each process records its own file, by
:func:`dropspy.record`'s per-rank rule.
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
# The Trainer needs accelerate, so its absence is a missing framework too.
if any(importlib.util.find_spec(name) is None for name in ("transformers", "accelerate")):
    raise missing_framework("transformers", "transformers and accelerate", "transformers")
_TrainerCallback: Any = importlib.import_module("transformers").TrainerCallback

__all__ = ["DropspyCallback"]


class DropspyCallback(DriverFacade, _TrainerCallback):  # type: ignore[misc]
    """Record the dropout masks the ``Trainer``'s model applies while it trains.

    Works with ``report_to="none"`` and next to any other callback. One callback records one
    training run: a second ``train()`` with it fails at its start with
    :func:`dropspy.record`'s message. Evaluation during training (``eval_strategy``) runs the
    model in eval mode; its forwards are recorded only with ``evaluate=True``, as records of
    the step after the last optimizer step.

    Args:
        path: The run file to create (HDF5); under a multi-process launch, one per rank.
        evaluate: Also record the evaluation forwards made during training.
        **options: :func:`dropspy.record`'s options (``every``, ``steps``, ``sites``,
            ``max_bytes``, ``on_full``), checked here.

    Raises:
        OptionError: An unknown option or a value ``record()`` would refuse (at construction).
        UnsupportedModelError: At train start, for a model dropspy cannot record.
        RecordingError: At train start, when the callback already recorded or the model is
            already being recorded.

    Example:
        >>> from dropspy.integrations.transformers import DropspyCallback   # doctest: +SKIP
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds,
        ...                   callbacks=[DropspyCallback("run.h5", every=10)])
        >>> trainer.train()
    """

    def __init__(self, path: str | os.PathLike[str], *, evaluate: bool = False,
                 **options: Any) -> None:
        self._driver = RecordingDriver(
            "transformers", path, check_options(options), evaluate,
            step_clock="steps are the Trainer's optimizer steps (state.global_step), marked by "
                       "the transformers DropspyCallback")

    def close(self) -> None:
        """End the recording now (idempotent): the model is restored and the file closed.

        The Trainer calls no callback when training raises; call this in a ``finally`` to
        close the file at once (else it is closed at interpreter exit).
        """
        self._driver.stop()

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       **kwargs: Any) -> None:
        """Enter :func:`dropspy.record` on the Trainer's (unwrapped) model."""
        self._driver.start(model)
        self._driver.mark_step(int(state.global_step))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """One optimizer step ended: the next forwards belong to ``state.global_step``."""
        self._driver.mark_step(int(state.global_step))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Leave the recording: the model is restored and the file closed."""
        self._driver.stop()
