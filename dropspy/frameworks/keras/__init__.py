"""Keras 3 (TensorFlow backend): the masks leave the traced train step as extra outputs.

Modules by role (the same names in every framework package):

- ``adapter``: :class:`KerasAdapter`, the lifecycle (claims a model, attaches, steps, detaches).
- ``sites``: which layers and cells are sites, their names, axes and facts.
- ``capture``: the patched backend dropout that keeps the mask it draws.
- ``draws``: routes each draw to its site (layer call stack, RNN cell masks).

The parts Keras 3 shares with Keras 2 live in :mod:`dropspy.frameworks.keras_base`, outside
this package, so that the Keras 2 adapter never imports Keras 3.
"""

from __future__ import annotations

from dropspy.frameworks.keras.adapter import KerasAdapter

__all__ = ["KerasAdapter"]
