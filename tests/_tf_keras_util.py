"""Helpers for the tf_keras (Keras 2) adapter tests: probe models, numpy references.

Imported only by ``tests/frameworks/tf_keras/test_tf_keras*.py`` after
``pytest.importorskip("tf_keras")``. The numpy reference forwards and exactness checks are the
Keras 3 tests' (``_keras_util``).
"""

from __future__ import annotations

import numpy as np
from _keras_util import multipliers

import dropspy


def make_probe(layer, *, jit: bool = False, eager: bool = False):
    """A tf_keras model whose train step returns the layer's input and output in the logs."""
    import tf_keras as k

    class Probe(k.Model):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def call(self, x, training=False):
            return self.inner(x, training=training)

        def train_step(self, data):
            x, _, _ = k.utils.unpack_x_y_sample_weight(data)
            return {"x": x, "y": self(x, training=True)}

    model = Probe(layer)
    model.compile(optimizer="sgd", loss="mse", jit_compile=jit, run_eagerly=eager)
    return model


def run_probe(layer, x, path, *, jit: bool = False, eager: bool = False, **kw):
    """Record one train_on_batch of a probe model; return (run, logs, model)."""
    model = make_probe(layer, jit=jit, eager=eager)
    with dropspy.record(model, path, **kw):
        logs = model.train_on_batch(x, np.zeros((x.shape[0], 1), np.float32), return_dict=True)
    return dropspy.load(path), logs, model


def rnn_weights(layer):
    """The layer's weights as float64 arrays (kernel, recurrent kernel, bias)."""
    return [np.asarray(w.numpy(), np.float64) for w in layer.weights]


def gate_multipliers(run, prefix, role, gates, shape_time):
    """Multipliers per gate; one shared site serves every gate; ones where nothing drops."""
    names = [f"{prefix}/{role}/{g}" for g in gates]
    if all(n in run for n in names):
        return [multipliers(run[n]) for n in names]
    if f"{prefix}/{role}" in run:
        return [multipliers(run[f"{prefix}/{role}"])] * len(gates)
    return [np.ones(shape_time)] * len(gates)


def varies_over_time(mask):
    """Whether some timestep's mask differs from the first timestep's."""
    return any(not np.array_equal(mask[:, 0], mask[:, t]) for t in range(1, mask.shape[1]))
