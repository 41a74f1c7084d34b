"""Pin the mask structure of your own model in its unit tests, with dropspy.testing.

The ``dropspy_record`` fixture (from dropspy's pytest plugin) records a model inside a test
into the test's ``tmp_path``; the ``assert_*`` helpers of :mod:`dropspy.testing` then check
the recorded masks and fail with expected vs observed for each property that does not hold.
Such a test catches a refactor or a framework upgrade that silently changes what your dropout
drops (a layer swapped for another, a ``noise_shape`` lost, dropout left on at inference).

Run: ``python -m pytest examples/test_mask_structure.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from dropspy.testing import (
    assert_fresh,
    assert_mask_structure,
    assert_no_findings,
    assert_no_inference_dropout,
)

RATE = 0.3


def _keras():
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "tensorflow":  # pragma: no cover
        pytest.skip("dropspy records Keras 3 on the TensorFlow backend")
    keras.utils.set_random_seed(0)
    return keras


def _fit(keras, model, steps=4, batch=16):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps * batch, 12, 6)).astype("float32")
    y = rng.normal(size=(steps * batch, 1)).astype("float32")
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0)


def test_spatial_dropout_drops_features_for_all_timesteps(dropspy_record):
    keras = _keras()
    model = keras.Sequential([keras.Input((12, 6)),
                              keras.layers.SpatialDropout1D(RATE, name="spatial_dropout1d"),
                              keras.layers.LSTM(8), keras.layers.Dense(1)])
    with dropspy_record(model) as rec:
        _fit(keras, model)
    # Shared along time only (so batch and feature vary), at the configured rate, new each step.
    assert_mask_structure(rec.path, "spatial_dropout1d", shared=["time"], rate=RATE, fresh=True)


def test_a_wrong_expectation_says_expected_and_observed(dropspy_record):
    keras = _keras()
    model = keras.Sequential([keras.Input((12, 6)),
                              keras.layers.SpatialDropout1D(RATE, name="spatial_dropout1d"),
                              keras.layers.LSTM(8), keras.layers.Dense(1)])
    with dropspy_record(model) as rec:
        _fit(keras, model)
    # "SpatialDropout1D drops entire time steps" is a claim the masks refute:
    refuted = r"shared axes: expected \{feature\}, observed \{time\}"
    with pytest.raises(AssertionError, match=refuted):
        assert_mask_structure(rec.path, "spatial_dropout1d", shared=["feature"])


def test_lstm_recurrent_masks_one_per_gate_same_at_every_timestep(dropspy_record):
    keras = _keras()
    model = keras.Sequential([keras.Input((12, 6)),
                              keras.layers.LSTM(8, recurrent_dropout=RATE, name="lstm"),
                              keras.layers.Dense(1)])
    with dropspy_record(model) as rec:
        _fit(keras, model)
    # A glob checks every gate's site: lstm/recurrent/i, /f, /c, /o.
    assert_mask_structure(rec.path, "lstm/recurrent/*", gates="distinct", over_time="constant",
                          rate=RATE)
    assert_no_findings(rec.path, "warning")


def test_torch_locked_dropout_one_mask_per_sequence(dropspy_record):
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Locked(nn.Module):
        def forward(self, x):
            if not self.training:
                return x
            return x * x.new_empty(x.size(0), 1, x.size(2)).bernoulli_(1 - RATE) / (1 - RATE)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.locked = Locked()
            self.lstm = nn.LSTM(6, 8, batch_first=True)

        def forward(self, x):
            return self.lstm(self.locked(x))[0][:, -1].sum(-1)

    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with dropspy_record(model) as rec:
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(16, 12, 6)).pow(2).mean().backward()
            opt.step()
    # A hand-made mask is a site too, named after its module and how it was drawn.
    assert_mask_structure(rec.path, "locked*", shared=["time"], rate=RATE)
    assert_fresh(rec.path)


def test_torch_dropout_is_off_in_eval_mode(dropspy_record):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(RATE), nn.Linear(32, 1))
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with dropspy_record(model) as rec:
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(16, 6)).pow(2).mean().backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            model(torch.randn(16, 6))
    assert_mask_structure(rec.path, "2", shared=[], rate=RATE)  # nn.Sequential names it "2"
    # Fails if anything was dropped during a call made in eval mode (e.g. a functional
    # F.dropout(x, p, training=True) that ignores self.training).
    assert_no_inference_dropout(rec.path)
