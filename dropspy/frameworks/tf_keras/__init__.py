"""Keras 2 (``tf_keras``, or ``tf.keras`` under ``TF_USE_LEGACY_KERAS=1``).

Modules by role (the same names in every framework package):

- ``adapter``: :class:`TfKerasAdapter`, the lifecycle.
- ``sites``: which layers and cells are sites, their names, axes and facts.
- ``capture``: the patched backend dropout that keeps the mask it draws, and the routing of
  each draw to its site.

Shared with Keras 3: :mod:`dropspy.frameworks.keras_base`. This package never imports Keras 3.
"""

from __future__ import annotations

from dropspy.frameworks.tf_keras.adapter import TfKerasAdapter

__all__ = ["TfKerasAdapter"]
