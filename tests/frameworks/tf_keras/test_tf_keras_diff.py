"""Keras 2 and Keras 3 recordings of the same model line up site by site in ``dropspy diff``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tf_keras = pytest.importorskip("tf_keras")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":  # pragma: no cover
    pytest.skip("needs Keras 3 on the TensorFlow backend", allow_module_level=True)

import dropspy
from dropspy.analysis import analyze_run, diff
from dropspy.errors import DropspyWarning


def _record(k, path, lstm_kw):
    k.utils.set_random_seed(0)
    L = k.layers
    inp = k.Input((8, 6))
    x = L.SpatialDropout1D(0.3, name="spatial_dropout1d")(inp)
    x = L.LSTM(10, name="lstm", **lstm_kw)(x)
    model = k.Model(inp, L.Dense(1)(L.Dropout(0.5, name="dropout")(x)))
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 8, 6)).astype(np.float32)
    y = rng.normal(size=(48, 1)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DropspyWarning)   # Keras 2's while-loop path warns
        with dropspy.record(model, path):
            model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    return dropspy.load(path)


@pytest.mark.parametrize("lstm_kw,lstm_sites", [
    (dict(dropout=0.3), ["lstm/input"]),
    (dict(dropout=0.3, recurrent_dropout=0.3),
     [f"lstm/{r}/{g}" for r in ("input", "recurrent") for g in "ifco"]),
], ids=["dropout", "dropout+recurrent"])
def test_keras2_and_keras3_differ_only_in_lstm_masks_over_time(lstm_kw, lstm_sites, tmp_path):
    k2 = _record(tf_keras, tmp_path / "keras2.h5", lstm_kw)
    k3 = _record(keras, tmp_path / "keras3.h5", lstm_kw)
    assert (k2.framework, k3.framework) == ("tf_keras", "keras")
    assert set(k2) == set(k3) == {"spatial_dropout1d", "dropout", *lstm_sites}
    for name in k2:
        assert k2[name].axes == k3[name].axes and k2[name].gate == k3[name].gate
    found = {(d.site, d.aspect): (d.a, d.b) for d in diff(analyze_run(k2), analyze_run(k3))}
    expected = {}
    for name in lstm_sites:
        expected[(name, "axis:time")] = ("independent", "shared")
        expected[(name, "pattern")] = ("elementwise", "time-shared")
        expected[(name, "over_time")] = ("resampled", "constant")
    assert found == expected
