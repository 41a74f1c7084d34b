"""Keras 3 (TensorFlow, JAX, torch backends): the masks leave the step as extra outputs.

Modules by role (the same names in every framework package):

- ``adapter``: :class:`KerasAdapter`, the lifecycle (claims a model, attaches, steps, detaches).
- ``sites``: which layers and cells are sites, their names, axes and facts.
- ``capture_tf``, ``capture_jax``, ``capture_torch``: the patched backend dropout that keeps
  the mask it draws, one per backend, behind ``tracing`` (the trace and the shared patch).
- ``draws``: routes each draw to its site (layer call stack, RNN cell masks).

The parts Keras 3 shares with Keras 2 live in :mod:`dropspy.frameworks.keras_base`, outside
this package, so that the Keras 2 adapter never imports Keras 3.
"""

from __future__ import annotations

from dropspy.frameworks.keras.adapter import KerasAdapter

__all__ = ["KerasAdapter"]
