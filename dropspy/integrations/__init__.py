"""Callbacks that drive :func:`dropspy.record` from inside a training framework's own loop.

- :mod:`dropspy.integrations.keras`: ``DropspyCallback`` for ``model.fit`` (Keras 3 and
  Keras 2 / tf_keras).
- :mod:`dropspy.integrations.transformers`: ``DropspyCallback`` for the transformers
  ``Trainer``.
- :mod:`dropspy.integrations.lightning`: ``DropspyCallback`` for a Lightning ``Trainer``.

Each takes :func:`dropspy.record`'s options (``every``, ``steps``, ``sites``, ``max_bytes``,
``on_full``), checked when the callback is made, and ``evaluate`` (record evaluation and
prediction batches too). This package imports no framework; each module imports only its own.
"""

__all__: list[str] = []
