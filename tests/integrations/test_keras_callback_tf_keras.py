"""The same DropspyCallback in a Keras 2 (tf_keras) fit: no perturbation (the train function is
built once, by the recording, before its first step), the masks of record() around fit."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tf_keras = pytest.importorskip("tf_keras")
pytest.importorskip("keras")

import dropspy
from dropspy.errors import DropspyWarning
from dropspy.integrations.keras import DropspyCallback

L = tf_keras.layers


def _model():
    """SpatialDropout1D -> LSTM(dropout) -> Dense: a path where tf_keras is reproducible."""
    tf_keras.backend.clear_session()
    tf_keras.utils.set_random_seed(0)
    inp = tf_keras.Input((5, 3))
    x = L.SpatialDropout1D(0.3)(inp)
    x = L.LSTM(4, dropout=0.3)(x)
    model = tf_keras.Model(inp, L.Dense(1)(L.Dropout(0.5)(x)))
    model.compile(optimizer="sgd", loss="mse")
    return model


def _fit(model, callbacks=()):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 5, 3)).astype(np.float32)
    y = rng.normal(size=(12, 1)).astype(np.float32)
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0, callbacks=list(callbacks))
    return [w.copy() for w in model.get_weights()]


def test_tf_keras_fit_with_the_callback_is_unperturbed_and_matches_record(tmp_path):
    plain = _fit(_model())
    cb_model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DropspyWarning)   # no "built before recording" warning
        with_cb = _fit(cb_model, [DropspyCallback(tmp_path / "cb.h5")])
    for a, b in zip(plain, with_cb):
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))
    model = _model()
    with dropspy.record(model, tmp_path / "rec.h5"):
        _fit(model)
    cb, ref = dropspy.load(tmp_path / "cb.h5"), dropspy.load(tmp_path / "rec.h5")
    assert cb.framework == "tf_keras" and cb.attrs["integration"] == "keras"
    assert sorted(cb) == sorted(ref) and len(cb) >= 3
    for name in cb:
        a, b = cb[name], ref[name]
        assert a.steps.tolist() == b.steps.tolist() == list(range(6)), name
        for i in range(len(a)):
            np.testing.assert_array_equal(a.mask(i), b.mask(i), err_msg=name)
    # The callback's model is handed back as it was: no hook, no recording train function.
    assert "make_train_function" not in cb_model.__dict__
    assert cb_model.__dict__.get("train_function") is None
