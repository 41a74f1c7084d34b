"""Runs the Keras callback under the backend named by KERAS_BACKEND; prints one JSON line.

KERAS_BACKEND is fixed per process when keras is first imported (the test session imports it
with TensorFlow), so ``test_keras_callback_backends.py`` runs this script in a subprocess:
``python keras_backend_driver.py <workdir>``. It fits the seed model three times from one seed:
without dropspy, with ``DropspyCallback`` and inside ``with dropspy.record()``, and reports
whether the weights and seed-generator states are bit-identical and the masks the same.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

if os.environ.get("KERAS_BACKEND") == "torch":
    import torch  # noqa: F401  (torch before tensorflow in one process)

import keras

import dropspy
from dropspy.integrations.keras import DropspyCallback

L = keras.layers


def _np(v):
    return np.asarray(keras.ops.convert_to_numpy(v))


def _model():
    keras.backend.clear_session()
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((5, 3)),
        L.SpatialDropout1D(0.3),
        L.LSTM(4, dropout=0.2, recurrent_dropout=0.3),
        L.Dense(1),
    ])
    model.compile(optimizer="adam", loss="mse")
    return model


def _fit(model, callbacks=()):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 5, 3)).astype(np.float32)
    y = rng.normal(size=(12, 1)).astype(np.float32)
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0, callbacks=list(callbacks))
    states = [_np(g.state.value) for layer in model._flatten_layers(include_self=True)
              for g in getattr(layer, "_seed_generators", []) or []]
    return [_np(w) for w in model.weights], states


def main(workdir: str) -> None:
    plain = _fit(_model())
    with_cb = _fit(_model(), [DropspyCallback(os.path.join(workdir, "cb.h5"))])
    model = _model()
    with dropspy.record(model, os.path.join(workdir, "rec.h5")):
        _fit(model)
    cb = dropspy.load(os.path.join(workdir, "cb.h5"))
    ref = dropspy.load(os.path.join(workdir, "rec.h5"))
    same_masks = sorted(cb) == sorted(ref) and all(
        len(cb[n]) == len(ref[n]) and all(np.array_equal(cb[n].mask(i), ref[n].mask(i))
                                          for i in range(len(cb[n]))) for n in cb)
    print(json.dumps({
        "backend": keras.backend.backend(),
        "weights_identical": all(a.tobytes() == b.tobytes() for a, b in zip(plain[0], with_cb[0])),
        "seed_states_identical": len(plain[1]) > 0 and all(
            np.array_equal(a, b) for a, b in zip(plain[1], with_cb[1])),
        "same_masks_as_record": same_masks,
        "sites": sorted(cb),
        "steps": {n: cb[n].steps.tolist() for n in cb},
        "integration": cb.attrs.get("integration"),
    }))


if __name__ == "__main__":
    main(sys.argv[1])
