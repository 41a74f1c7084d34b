"""The Keras callback inside model.fit: zero perturbation, the same masks as record(), the
lifecycle (train start to end, exceptions, reuse), evaluate only if asked, Keras 2 too."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":  # pragma: no cover
    pytest.skip("the Keras adapter records the TensorFlow backend", allow_module_level=True)

from _keras_util import seed_states

import dropspy
from dropspy.errors import DropspyWarning, OptionError, RecordingError, UnsupportedModelError
from dropspy.integrations.keras import DropspyCallback

L = keras.layers
N, T, F = 12, 5, 3   # three batches of 4


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, T, F)).astype(np.float32), rng.normal(size=(N, 1)).astype(
        np.float32)


def _seed_model(seed=1):
    """The seed example's model: SpatialDropout1D -> LSTM(dropout, recurrent_dropout) -> Dense."""
    keras.backend.clear_session()   # the same layer names in every run
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((T, F)),
        L.SpatialDropout1D(0.3),
        L.LSTM(4, dropout=0.2, recurrent_dropout=0.3),
        L.Dense(1),
    ])
    model.compile(optimizer="adam", loss="mse")
    return model


def _fit(model, callbacks=(), **kw):
    x, y = _data()
    kw = {"batch_size": 4, "epochs": 2, "shuffle": False, "verbose": 0, **kw}
    return model.fit(x, y, callbacks=list(callbacks), **kw)


def _masks(run):
    return {name: [site.mask(i) for i in range(len(site))] for name, site in run.items()}


def _assert_same_masks(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        assert len(a[name]) == len(b[name]), name
        for ma, mb in zip(a[name], b[name]):
            np.testing.assert_array_equal(ma, mb, err_msg=name)


def test_fit_with_the_callback_is_bit_identical_to_fit_without(tmp_path):
    plain = _seed_model()
    _fit(plain)
    host = (random.getstate(), np.random.get_state()[1].copy())
    recorded = _seed_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DropspyWarning)
        _fit(recorded, [DropspyCallback(tmp_path / "run.h5")])
    assert random.getstate() == host[0]
    np.testing.assert_array_equal(np.random.get_state()[1], host[1])
    for a, b in zip(plain.weights, recorded.weights):
        np.testing.assert_array_equal(a.numpy().view(np.uint32), b.numpy().view(np.uint32),
                                      err_msg=a.path)
    sa, sb = seed_states(plain), seed_states(recorded)
    assert len(sa) >= 2
    for a, b in zip(sa, sb):
        np.testing.assert_array_equal(a, b)
    run = dropspy.load(tmp_path / "run.h5")
    assert run.complete
    assert len(run) >= 3
    for site in run.values():   # 2 epochs of 3 batches: steps as Keras counts them
        assert site.steps.tolist() == list(range(6)), site.name


def test_callback_records_the_same_masks_as_record_around_fit(tmp_path):
    a = _seed_model()
    _fit(a, [DropspyCallback(tmp_path / "cb.h5", every=2)])
    b = _seed_model()
    with dropspy.record(b, tmp_path / "rec.h5", every=2):
        _fit(b)
    ra, rb = dropspy.load(tmp_path / "cb.h5"), dropspy.load(tmp_path / "rec.h5")
    _assert_same_masks(_masks(ra), _masks(rb))
    assert ra["spatial_dropout1d"].steps.tolist() == [0, 2, 4]
    assert ra.attrs["integration"] == "keras"
    assert "integration" not in rb.attrs


@pytest.mark.slow
def test_validation_is_recorded_only_if_asked(tmp_path):
    x, y = _data()
    for evaluate in (False, True):
        model = _seed_model()
        path = tmp_path / f"run{evaluate}.h5"
        _fit(model, [DropspyCallback(path, evaluate=evaluate)], epochs=1,
             validation_data=(x[:4], y[:4]))
        run = dropspy.load(path)
        lstm = run["lstm/input/i"]
        training = lstm.training.tolist()
        assert training.count(True) == 3
        # The LSTM draws its masks in the validation step too (not applied): recorded only
        # when asked, else counted as left out by the sampling policy.
        assert training.count(False) == (1 if evaluate else 0)
        assert (run.records_dropped.get("sampling", 0) > 0) is not evaluate


def test_evaluate_alone_is_recorded_when_asked_and_left_alone_otherwise(tmp_path):
    x, y = _data()
    model = _seed_model()
    model.evaluate(x, y, batch_size=4, verbose=0, callbacks=[DropspyCallback(tmp_path / "no.h5")])
    assert not (tmp_path / "no.h5").exists()
    assert "make_train_function" not in model.__dict__   # the build hook is taken off again
    model.evaluate(x, y, batch_size=4, verbose=0,
                   callbacks=[DropspyCallback(tmp_path / "ev.h5", evaluate=True)])
    run = dropspy.load(tmp_path / "ev.h5")
    site = run["lstm/input/i"]
    assert site.training.tolist() == [False] * 3   # three batches, drawn but not applied
    assert "make_test_function" not in model.__dict__


@pytest.mark.slow
def test_model_is_restored_and_file_closed_after_fit(tmp_path):
    model = _seed_model()
    cb = DropspyCallback(tmp_path / "run.h5")
    _fit(model, [cb], epochs=1)
    for name in ("make_train_function", "train_step", "train_function", "call"):
        assert name not in model.__dict__ or model.__dict__[name] is None, name
    assert dropspy.load(tmp_path / "run.h5").complete
    # The model trains on without dropspy after the recording.
    _fit(model, epochs=1)


def test_a_dataset_of_unknown_length_ending_an_epoch_does_not_end_the_recording(tmp_path):
    x, y = _data()
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(4).filter(lambda a, b: True)
    assert data.cardinality() == tf.data.UNKNOWN_CARDINALITY   # the epoch ends by exception
    model = _seed_model()
    model.fit(data, epochs=2, verbose=0, callbacks=[DropspyCallback(tmp_path / "run.h5")])
    run = dropspy.load(tmp_path / "run.h5")
    assert run["spatial_dropout1d"].steps.tolist() == list(range(6))


def test_an_exception_in_a_step_ends_the_recording_before_it_leaves_fit(tmp_path):
    class Boom(L.Layer):   # raises in the third training step
        calls = 0

        def call(self, x, training=None):
            if training:
                Boom.calls += 1
                if Boom.calls == 3:
                    raise KeyboardInterrupt
            return x

    keras.backend.clear_session()
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((T, F)), L.SpatialDropout1D(0.3), Boom(), L.Flatten(),
                              L.Dense(1)])
    model.compile(optimizer="adam", loss="mse", run_eagerly=True)
    with pytest.raises(KeyboardInterrupt):
        _fit(model, [DropspyCallback(tmp_path / "run.h5")])
    run = dropspy.load(tmp_path / "run.h5")   # closed without close(): complete
    assert run.complete
    assert run["spatial_dropout1d"].steps.tolist() == [0, 1]
    assert "make_train_function" not in model.__dict__ and "train_step" not in model.__dict__


@pytest.mark.slow
def test_close_ends_a_recording_that_another_callback_broke_off(tmp_path):
    class Stop(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                raise RuntimeError("stop")

    model = _seed_model()
    cb = DropspyCallback(tmp_path / "run.h5")
    with pytest.raises(RuntimeError, match="stop"):
        _fit(model, [cb, Stop()])
    cb.close()
    run = dropspy.load(tmp_path / "run.h5")
    assert run.complete
    assert run["spatial_dropout1d"].steps.tolist() == [0, 1]
    assert "train_step" not in model.__dict__


def test_a_callback_used_twice_fails_at_train_start_with_records_message(tmp_path):
    model = _seed_model()
    cb = DropspyCallback(tmp_path / "run.h5")
    _fit(model, [cb], epochs=1)
    weights = [w.numpy().copy() for w in model.weights]
    with pytest.raises(RecordingError, match="already used"):
        _fit(model, [cb], epochs=1)
    for w, before in zip(model.weights, weights):   # failed before the first step
        np.testing.assert_array_equal(w.numpy(), before)


def test_two_callbacks_on_one_model_fail_at_train_start_and_leave_the_model_as_it_was(tmp_path):
    model = _seed_model()
    with pytest.raises(RecordingError, match="already being recorded"):
        _fit(model, [DropspyCallback(tmp_path / "a.h5"), DropspyCallback(tmp_path / "b.h5")])
    assert not any(name in model.__dict__ for name in ("make_train_function", "train_step"))
    assert dropspy.load(tmp_path / "b.h5").records_written == 0


def test_a_model_dropspy_cannot_record_fails_at_train_start(tmp_path):
    model = _seed_model()
    # steps_per_execution > 1 is recorded, but not together with XLA on the TF backend.
    model.compile(optimizer="adam", loss="mse", steps_per_execution=2, jit_compile=True)
    with pytest.raises(UnsupportedModelError, match="steps_per_execution"):
        _fit(model, [DropspyCallback(tmp_path / "run.h5")])


@pytest.mark.parametrize("options, name", [
    ({"every": 0}, "every"), ({"steps": 3}, "steps"), ({"on_full": "wait"}, "on_full"),
    ({"max_bytes": -1}, "max_bytes"), ({"sites": 3}, "sites"), ({"evry": 2}, "evry"),
])
def test_bad_options_fail_when_the_callback_is_made(options, name, tmp_path):
    with pytest.raises(OptionError, match=name):
        DropspyCallback(tmp_path / "run.h5", **options)
    assert not (tmp_path / "run.h5").exists()
