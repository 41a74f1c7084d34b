"""Capture of the keep-masks Keras 3 draws on the torch backend (eager torch).

Keras' torch ``random.dropout`` has two draw paths, and each is recorded by its own formula:

- with a noise shape or a seeded ``SeedGenerator``: ``torch.bernoulli`` of a ``keep_prob``
  matrix at the noise shape, on a ``torch.Generator`` seeded from the layer's
  ``SeedGenerator``, then ``where(mask, inputs / keep_prob, 0)``;
- otherwise (unseeded layers, RNN cell masks): ``F.dropout`` on torch's global RNG, which on
  CPU draws ``noise.bernoulli_(1 - p)`` at the input's shape, scales it in place and multiplies
  (``native_dropout`` on CUDA, which returns its mask).

Keras' own function runs unchanged; the short-lived dispatch mode of the torch adapter
(:class:`~dropspy.frameworks.torch.grab.Grabber`) copies the mask ATen draws the moment it is
drawn. Nothing is recomputed and nothing random is drawn by dropspy.

``jit_compile=True`` makes the torch backend wrap the step in ``torch.compile``: refused by name
(see the adapter), since the dispatch mode would change what dynamo traces.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from keras.src.backend.torch import random as _torch_random

from dropspy.frameworks.keras.tracing import BackendCapture, Draw, Frame, Trace
from dropspy.frameworks.torch.grab import Grabber

__all__ = ["Frame", "Draw", "Trace", "TorchCapture", "CAPTURE"]


class TorchCapture(BackendCapture):
    """The torch backend's capture (every step eager)."""

    name = "torch"

    def exact_dropout(self, inputs: Any, rate: Any, noise_shape: Any = None,
                      seed: Any = None) -> tuple[Any, Any, Any]:
        original = self.original_dropout
        if rate == 1.0 or rate == 0.0:   # no draw: everything dropped / kept
            out = original(inputs, rate, noise_shape=noise_shape, seed=seed)
            shape = _torch_random._get_concrete_noise_shape(inputs, noise_shape)
            keep = torch.full(tuple(shape), rate == 0.0, dtype=torch.bool, device=inputs.device)
            return out, keep, self.shape_vector(keep)
        with Grabber() as grab:
            out = original(inputs, rate, noise_shape=noise_shape, seed=seed)
        if len(grab.draws) != 1:   # the router counts it (capture_error) and says so
            self.miss = (f"{len(grab.draws)} masks drawn by one dropout, expected 1"
                         + (f" ({grab.error})" if grab.error else ""))
            return out, None, None
        keep = grab.draws[0].mask
        if keep.dim() < inputs.dim():
            keep = keep.reshape((1,) * (inputs.dim() - keep.dim()) + tuple(keep.shape))
        return out, keep, self.shape_vector(keep)

    def eager(self) -> bool:
        return True

    def shape_vector(self, x: Any) -> Any:
        return torch.tensor(list(x.shape), dtype=torch.int32)

    def int_vector(self, values: Any) -> Any:
        return torch.tensor(list(values), dtype=torch.int32)

    def concat(self, parts: list[Any]) -> Any:
        return torch.cat([p.cpu() for p in parts], 0)

    def stack(self, parts: list[Any], axis: int) -> Any:
        return torch.stack(parts, dim=axis)

    def flatten(self, x: Any) -> Any:
        return x.reshape(-1)

    def empty_bits(self) -> Any:
        return torch.zeros(0, dtype=torch.bool)

    def to_numpy(self, x: Any) -> Any:
        return np.asarray(x.detach().cpu())


CAPTURE = TorchCapture(_torch_random)
