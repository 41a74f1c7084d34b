"""The tf_keras adapter inside fit: zero perturbation where tf_keras is reproducible, a warning
where it is not, restoring everything on exit, refusals, and the masks never reaching callbacks.
"""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tf_keras = pytest.importorskip("tf_keras")

import dropspy
from dropspy.errors import DropspyWarning, UnsupportedModelError
from dropspy.frameworks import find_adapter
from dropspy.frameworks.tf_keras import TfKerasAdapter
from dropspy.frameworks.tf_keras import capture as cap

L = tf_keras.layers


def _model(rnn=None, *, eager=False, jit=False, seed=0):
    """SpatialDropout1D -> RNN -> Dropout -> Dense, built and compiled from a fixed seed."""
    tf_keras.backend.clear_session()   # layer names without numeric suffixes
    tf_keras.utils.set_random_seed(seed)
    inp = tf_keras.Input((5, 3))
    x = L.SpatialDropout1D(0.3)(inp)
    x = (rnn or (lambda: L.LSTM(4, dropout=0.3)))()(x)
    model = tf_keras.Model(inp, L.Dense(1)(L.Dropout(0.5)(x)))
    model.compile(optimizer="sgd", loss="mse", run_eagerly=eager, jit_compile=jit)
    return model


def _light():
    """A cheap RNN to trace (no cuDNN-eligible variants): for tests of the lifecycle."""
    return L.SimpleRNN(4, dropout=0.3, unroll=True)


def _data(n=12):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 5, 3)).astype(np.float32), rng.normal(size=(n, 1)).astype(
        np.float32)


def _fit(model, x, y, path=None, **fit_kw):
    fit_kw = {"batch_size": 4, "epochs": 2, "verbose": 0, "shuffle": False, **fit_kw}
    if path is None:
        model.fit(x, y, **fit_kw)
    else:
        with dropspy.record(model, path):
            model.fit(x, y, **fit_kw)
    return [w.copy() for w in model.get_weights()]


def _bits(weights):
    return [w.view(np.uint32) for w in weights]


# Paths where tf_keras itself is reproducible run to run (measured): zero perturbation holds.
DETERMINISTIC = {
    "cudnn-lstm": dict(rnn=lambda: L.LSTM(4, dropout=0.3)),
    "cudnn-gru": dict(rnn=lambda: L.GRU(4, dropout=0.3)),
    "unroll-both": dict(rnn=lambda: L.LSTM(4, dropout=0.3, recurrent_dropout=0.2, unroll=True)),
    "eager-both": dict(rnn=lambda: L.LSTM(4, dropout=0.3, recurrent_dropout=0.2), eager=True),
}


@pytest.mark.parametrize("kind", list(DETERMINISTIC))
def test_fit_weights_and_host_rng_bit_identical_with_and_without_record(kind, tmp_path):
    x, y = _data()
    base = _fit(_model(**DETERMINISTIC[kind]), x, y)
    base_rng = (random.getstate(), np.random.get_state()[1].copy())
    with warnings.catch_warnings():
        warnings.simplefilter("error", DropspyWarning)   # no perturbation warning here
        recorded = _fit(_model(**DETERMINISTIC[kind]), x, y, tmp_path / "run.h5")
    assert random.getstate() == base_rng[0]
    np.testing.assert_array_equal(np.random.get_state()[1], base_rng[1])
    for a, b in zip(_bits(base), _bits(recorded)):
        np.testing.assert_array_equal(a, b)
    run = dropspy.load(tmp_path / "run.h5")
    assert run.complete and run.framework == "tf_keras"
    assert all(len(run[n]) == 6 for n in run)   # 3 batches x 2 epochs, every site
    assert not [n for n in run.notes if n.startswith("perturbation")]


@pytest.mark.parametrize("kind", ["lstm-loop", "gru-loop"])
def test_while_loop_path_warns_before_recording_and_notes_it_in_the_file(kind, tmp_path):
    rnn = {"lstm-loop": lambda: L.LSTM(4, dropout=0.3, recurrent_dropout=0.2),
           "gru-loop": lambda: L.GRU(4, recurrent_dropout=0.2)}[kind]
    model = _model(rnn)
    x, y = _data()
    rec = dropspy.record(model, tmp_path / "run.h5")
    with pytest.warns(DropspyWarning, match="not reproducible run to run even without dropspy"):
        rec.__enter__()   # the warning comes when recording starts, before any step runs
    try:
        assert model.__dict__.get("train_function") is None
        model.fit(x, y, batch_size=4, verbose=0)
    finally:
        rec.__exit__(None, None, None)
    run = dropspy.load(tmp_path / "run.h5")
    notes = [n for n in run.notes if n.startswith("perturbation")]
    assert len(notes) == 1 and run.sites[0] == "spatial_dropout1d"
    rnn_name = [n for n in run if "/recurrent" in n][0].split("/")[0]
    assert rnn_name in notes[0]
    # The masks are still recorded, one per timestep.
    site = run[[n for n in run if "/recurrent" in n][0]]
    assert site.noise(0).shape == (4, 5, 4) and len(site) == 3


def test_xla_warns_that_keras2_dropout_is_not_reproducible_there(tmp_path):
    model = _model(_light, jit=True)
    x, y = _data()
    with pytest.warns(DropspyWarning, match="jit_compile=True"):
        with dropspy.record(model, tmp_path / "run.h5"):
            model.fit(x, y, batch_size=4, verbose=0)
    assert len(dropspy.load(tmp_path / "run.h5")["simple_rnn/input"]) == 3


def _patched_state(model):
    """Every trace of dropspy on the model and on tf_keras; empty when fully restored."""
    left = []
    for name in ("train_step", "make_train_function", "train_tf_function"):
        if name in model.__dict__ and name != "train_tf_function":
            left.append(f"model.{name}")
    for layer in model._flatten_layers(include_self=False, recursive=True):
        for name in ("get_dropout_mask_for_cell", "get_recurrent_dropout_mask_for_cell"):
            if name in layer.__dict__:
                left.append(f"{layer.name}.{name}")
    if cap.installed():
        left.append("tf_keras backend patches")
    return left


def test_record_restores_everything_and_the_previous_train_function(tmp_path):
    model = _model(_light)
    x, y = _data()
    model.fit(x, y, verbose=0)
    before = model.train_function
    with pytest.warns(DropspyWarning, match="built before recording started"), \
            dropspy.record(model, tmp_path / "run.h5"):
        assert cap.installed()
        model.fit(x, y, verbose=0)
        assert model.train_function is not before
    assert _patched_state(model) == []
    assert model.train_function is before
    model.fit(x, y, verbose=0)   # still trains, with its own function


def test_record_restores_everything_when_training_raises(tmp_path):
    class Boom(tf_keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                raise RuntimeError("boom")

    model = _model(lambda: L.LSTM(4, dropout=0.3, recurrent_dropout=0.2))
    x, y = _data()
    with pytest.raises(RuntimeError, match="boom"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DropspyWarning)
        with dropspy.record(model, tmp_path / "run.h5"):
            model.fit(x, y, batch_size=4, verbose=0, callbacks=[Boom()])
    assert _patched_state(model) == []
    run = dropspy.load(tmp_path / "run.h5")
    assert run.complete
    assert all(s.steps.tolist() == [0, 1] for s in run.values())


def test_recording_twice_in_a_row_gives_two_complete_runs(tmp_path):
    model = _model(_light)
    x, y = _data(8)
    for name in ("a.h5", "b.h5"):
        with dropspy.record(model, tmp_path / name):
            model.fit(x, y, batch_size=4, verbose=0)
    a, b = dropspy.load(tmp_path / "a.h5"), dropspy.load(tmp_path / "b.h5")
    assert set(a) == set(b) == {"spatial_dropout1d", "simple_rnn/input", "dropout"}
    for name in a:
        assert len(a[name]) == len(b[name]) == 2


def test_callbacks_never_see_the_mask_outputs(tmp_path):
    seen = []

    class Spy(tf_keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(sorted(logs))

    model = _model(_light)
    x, y = _data(8)
    with dropspy.record(model, tmp_path / "run.h5"):
        hist = model.fit(x, y, batch_size=4, verbose=0, callbacks=[Spy()],
                         validation_data=(x, y))
    assert seen == [["loss"], ["loss"]]
    assert set(hist.history) == {"loss", "val_loss"}
    # Validation draws no mask (tf_keras applies none outside training): train steps only.
    assert all(len(s) == 2 for s in dropspy.load(tmp_path / "run.h5").values())


def test_train_on_batch_counts_steps_across_calls(tmp_path):
    model = _model(_light)
    x, y = _data(8)
    with dropspy.record(model, tmp_path / "run.h5"):
        for _ in range(3):
            model.train_on_batch(x, y)
    site = dropspy.load(tmp_path / "run.h5")["simple_rnn/input"]
    assert site.steps.tolist() == [0, 1, 2] and site.calls.tolist() == [0, 0, 0]
    # A fresh mask every step.
    assert not np.array_equal(site.noise(0), site.noise(1))


def test_adapter_claims_only_tf_keras_models():
    keras = pytest.importorskip("keras")
    model = _model(_light)
    assert TfKerasAdapter.claims(model)
    assert find_adapter(model) is TfKerasAdapter
    k3 = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    assert not TfKerasAdapter.claims(k3)
    assert find_adapter(k3) is not TfKerasAdapter
    assert not TfKerasAdapter.claims(object())


def test_layer_that_is_not_a_model_is_refused_with_what_to_do(tmp_path):
    with pytest.raises(UnsupportedModelError, match="wrap it in a tf_keras.Model"):
        with dropspy.record(L.Dropout(0.5), tmp_path / "run.h5"):
            pass


def test_steps_per_execution_above_one_is_refused(tmp_path):
    model = _model(_light)
    model.compile(optimizer="sgd", loss="mse", steps_per_execution=2)
    with pytest.raises(UnsupportedModelError, match="steps_per_execution=2"):
        with dropspy.record(model, tmp_path / "run.h5"):
            pass
    assert _patched_state(model) == []


def test_masks_drawn_outside_fit_are_noted_not_recorded(tmp_path):
    model = _model(_light)
    x, _ = _data(4)
    with dropspy.record(model, tmp_path / "run.h5"):
        model(x, training=True)
    run = dropspy.load(tmp_path / "run.h5")
    assert all(len(s) == 0 for s in run.values())
    assert any("outside model.fit/evaluate/predict" in n for n in run.notes)


def test_meta_names_framework_and_versions(tmp_path):
    model = _model(_light)
    x, y = _data(4)
    with dropspy.record(model, tmp_path / "run.h5"):
        model.fit(x, y, verbose=0)
    run = dropspy.load(tmp_path / "run.h5")
    assert run.attrs["framework"] == "tf_keras"
    assert run.attrs["framework_version"] == tf_keras.__version__
    assert run.attrs["tensorflow_version"] == tf.__version__


def test_monte_carlo_dropout_in_predict_is_recorded_as_dropout_at_inference(tmp_path):
    from _keras_util import assert_dropout_exact, planted

    from dropspy.analysis import analyze_run

    def build():
        tf_keras.backend.clear_session()
        tf_keras.utils.set_random_seed(0)
        inp = tf_keras.Input((16,))
        model = tf_keras.Model(inp, L.Dropout(0.5, name="mc")(inp, training=True))
        model.compile(optimizer="sgd", loss="mse")
        return model

    x = planted((6, 16))
    plain = build().predict(x, batch_size=3, verbose=0)
    model = build()
    with dropspy.record(model, tmp_path / "run.h5"):
        y = model.predict(x, batch_size=3, verbose=0)
        model.evaluate(x, np.zeros((6, 16), np.float32), batch_size=3, verbose=0)
    np.testing.assert_array_equal(plain.view(np.uint32), y.view(np.uint32))
    site = dropspy.load(tmp_path / "run.h5")["mc"]
    for i in range(2):
        assert_dropout_exact(x[3 * i:3 * i + 3], y[3 * i:3 * i + 3], site.mask(i), site.scale)
    assert len(site) == 4 and site.applied.all() and not site.training.any()
    assert site.steps.tolist() == [0] * 4 and site.calls.tolist() == [0, 1, 2, 3]
    codes = {f.code for s in analyze_run(dropspy.load(tmp_path / "run.h5")).sites
             for f in s.findings}
    assert "inference-dropout" in codes


def test_recording_after_the_train_function_was_built_warns_and_recompiling_avoids_it(tmp_path):
    # Stateful dropout ops keep their random state inside the compiled train function; the new
    # function dropspy builds restarts those streams (measured: different weights), so say so.
    x, y = _data()
    model = _model()
    model.fit(x, y, batch_size=4, verbose=0)
    with pytest.warns(DropspyWarning, match="built before recording started"):
        with dropspy.record(model, tmp_path / "late.h5"):
            model.fit(x, y, batch_size=4, verbose=0)

    def fit_twice(path):
        m = _model()
        m.fit(x, y, batch_size=4, verbose=0, shuffle=False)
        m.compile(optimizer="sgd", loss="mse")   # a fresh train function in both runs
        return _fit(m, x, y, path)

    base = fit_twice(None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DropspyWarning)
        recorded = fit_twice(tmp_path / "run.h5")
    for a, b in zip(_bits(base), _bits(recorded)):
        np.testing.assert_array_equal(a, b)
