"""The Keras adapter's lifecycle: restore on exit (errors too), refusals, opaque sites."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":  # pragma: no cover
    pytest.skip("the Keras adapter tests need the TensorFlow backend", allow_module_level=True)

from _keras_util import assert_dropout_exact, planted

import dropspy
from dropspy.errors import RecordingError, UnsupportedModelError
from dropspy.frameworks.keras import capture_tf as keras_capture

L = keras.layers


def _model(**compile_kw):
    keras.utils.set_random_seed(0)
    inp = keras.Input((5, 3))
    x = L.SpatialDropout1D(0.3)(inp)
    x = L.LSTM(4, dropout=0.3, recurrent_dropout=0.2)(x)
    model = keras.Model(inp, L.Dense(1)(L.Dropout(0.5)(x)))
    model.compile(optimizer="sgd", loss="mse", **compile_kw)
    return model


def _data(n=8):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 5, 3)).astype(np.float32), np.zeros((n, 1), np.float32)


def _patched_state(model):
    """Every trace of dropspy on the model and on Keras; empty when fully restored."""
    left = []
    for name in ("train_step", "make_train_function", "test_step", "make_test_function",
                 "predict_step", "make_predict_function", "call"):
        if name in model.__dict__:
            left.append(f"model.{name}")
    for layer in model._flatten_layers(include_self=False, recursive=True):
        for name in ("call", "get_dropout_mask", "get_recurrent_dropout_mask"):
            if name in layer.__dict__:
                left.append(f"{layer.name}.{name}")
    if keras_capture.installed():
        left.append("keras backend random.dropout")
    return left


def test_record_restores_everything_and_the_previous_train_function(tmp_path):
    model = _model()
    x, y = _data()
    model.fit(x, y, verbose=0)
    model.evaluate(x, y, verbose=0)
    model.predict(x, verbose=0)
    before = (model.train_function, model.test_function, model.predict_function)
    with dropspy.record(model, tmp_path / "run.h5"):
        assert keras_capture.installed()
        model.fit(x, y, verbose=0)
        model.evaluate(x, y, verbose=0)
        assert model.predict(x, verbose=0).shape == (8, 1)
        assert model.train_function is not before[0]
    assert _patched_state(model) == []
    assert (model.train_function, model.test_function, model.predict_function) == before
    model.fit(x, y, verbose=0)   # still trains, with its own function


def test_record_restores_everything_when_training_raises(tmp_path):
    class Boom(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                raise RuntimeError("boom")

    model = _model()
    x, y = _data()
    with pytest.raises(RuntimeError, match="boom"):
        with dropspy.record(model, tmp_path / "run.h5"):
            model.fit(x, y, batch_size=2, verbose=0, callbacks=[Boom()])
    assert _patched_state(model) == []
    run = dropspy.load(tmp_path / "run.h5")
    assert run.complete
    assert all(s.steps.tolist() == [0, 1] for s in run.values())


def test_recording_twice_in_a_row_gives_two_complete_runs(tmp_path):
    model = _model()
    x, y = _data()
    for name in ("a.h5", "b.h5"):
        with dropspy.record(model, tmp_path / name):
            model.fit(x, y, batch_size=4, verbose=0)
    a, b = dropspy.load(tmp_path / "a.h5"), dropspy.load(tmp_path / "b.h5")
    assert set(a) == set(b)
    for name in a:
        assert len(a[name]) == len(b[name]) == 2
        assert not np.array_equal(a[name].mask(0), b[name].mask(0))   # training went on
    assert _patched_state(model) == []


def test_nested_record_of_one_model_fails_clearly_and_leaves_the_outer_one_working(tmp_path):
    model = _model()
    x, y = _data()
    with dropspy.record(model, tmp_path / "outer.h5"):
        with pytest.raises(RecordingError, match="already being recorded"):
            with dropspy.record(model, tmp_path / "inner.h5"):
                pass
        model.fit(x, y, batch_size=4, verbose=0)
    assert all(len(s) == 2 for s in dropspy.load(tmp_path / "outer.h5").values())
    assert _patched_state(model) == []


def test_two_models_recorded_at_once_keep_their_own_masks(tmp_path):
    m1, m2 = _model(), _model()
    x, y = _data()
    with dropspy.record(m1, tmp_path / "1.h5"), dropspy.record(m2, tmp_path / "2.h5"):
        m1.fit(x, y, batch_size=4, verbose=0)
        m2.fit(x, y, batch_size=8, verbose=0)
    assert all(len(s) == 2 for s in dropspy.load(tmp_path / "1.h5").values())
    assert all(len(s) == 1 for s in dropspy.load(tmp_path / "2.h5").values())
    assert not keras_capture.installed()


def test_steps_per_execution_above_one_under_xla_is_refused_with_the_reason(tmp_path):
    model = _model(steps_per_execution=2, jit_compile=True)
    with pytest.raises(UnsupportedModelError, match="steps_per_execution=2") as info:
        with dropspy.record(model, tmp_path / "run.h5"):
            pass
    assert "jit_compile=True" in str(info.value)
    assert _patched_state(model) == []


def test_steps_per_execution_above_one_records_every_inner_step(tmp_path):
    # Exactness and zero perturbation at spe=4: test_keras_backends (all backends' driver).
    model = _model(steps_per_execution=3)
    x, y = _data(10)
    with dropspy.record(model, tmp_path / "run.h5"):
        model.fit(x, y, batch_size=2, verbose=0)       # executions of 3, 2 steps
        model.evaluate(x, y, batch_size=5, verbose=0)  # one execution of 2 steps
    run = dropspy.load(tmp_path / "run.h5")
    for name, site in run.items():
        train = site.training
        assert site.steps[train].tolist() == list(range(5)), name
    lstm = run[next(n for n in run if n.endswith("/input/i"))]
    assert (lstm.steps[~lstm.training] == 5).all() and (~lstm.training).sum() == 2
    assert lstm.calls[~lstm.training].tolist() == [0, 1]


def test_a_layer_that_is_not_a_model_is_refused(tmp_path):
    with pytest.raises(UnsupportedModelError, match="not a model"):
        dropspy.record(L.Dropout(0.5), tmp_path / "run.h5").__enter__()


def test_keras3_adapter_refuses_a_tf_keras_model_naming_tf_keras():
    # dropspy.record routes tf_keras models to their own adapter (issue 8); the Keras 3
    # adapter, given one directly, must refuse it clearly rather than half-record it.
    tf_keras = pytest.importorskip("tf_keras")
    from dropspy.frameworks.keras import KerasAdapter

    model = tf_keras.Sequential([tf_keras.layers.Dropout(0.5, input_shape=(3,))])
    with pytest.raises(UnsupportedModelError, match="tf_keras"):
        KerasAdapter(model)


@pytest.mark.slow
def test_a_backend_without_capture_is_refused_naming_it(tmp_path):
    code = textwrap.dedent(f"""
        import keras, dropspy
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dropout(0.5)])
        try:
            with dropspy.record(model, {str(tmp_path / 'run.h5')!r}):
                pass
        except dropspy.UnsupportedModelError as exc:
            print("REFUSED", exc)
    """)
    env = dict(os.environ, KERAS_BACKEND="numpy")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert "REFUSED" in out.stdout, out.stderr[-2000:]
    assert "backend='numpy'" in out.stdout and "jax or torch" in out.stdout


def test_noise_layers_and_unknown_random_layers_are_opaque_sites_with_a_reason(tmp_path):
    class Jitter(L.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.gen = keras.random.SeedGenerator(3)

        def call(self, x, training=False):
            if training:
                return x + keras.random.normal(keras.ops.shape(x), seed=self.gen)
            return x

    keras.utils.set_random_seed(0)
    inp = keras.Input((4,))
    x = L.GaussianDropout(0.3, name="gd")(inp)
    x = Jitter(name="jitter")(x)
    x = L.Dropout(0.5, name="plain")(x)
    model = keras.Model(inp, L.Dense(1)(x))
    model.compile(optimizer="sgd", loss="mse")
    with dropspy.record(model, tmp_path / "run.h5"):
        model.fit(np.ones((4, 4), np.float32), np.zeros((4, 1), np.float32), verbose=0)
    run = dropspy.load(tmp_path / "run.h5")
    assert "Gaussian" in run["gd"].opaque and len(run["gd"]) == 0
    assert "jitter/normal" in run
    assert "Jitter" in run["jitter/normal"].opaque and "keras.random.normal" in \
        run["jitter/normal"].opaque
    assert not run["plain"].opaque and len(run["plain"]) == 1
    assert any("jitter" in n and "opaque" in n for n in run.notes)


def _custom_loop(model, x, y, steps, compiled):
    opt = keras.optimizers.SGD(0.1)
    opt.build(model.trainable_variables)

    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = keras.ops.mean((model(xb, training=True) - yb) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply(grads, model.trainable_variables)
        return loss

    if compiled:
        step = tf.function(step)
    for i in range(steps):
        step(x[i * 4:(i + 1) * 4], y[i * 4:(i + 1) * 4])


def test_eager_custom_gradient_tape_loop_is_recorded_one_step_per_training_call(tmp_path):
    x, y = _data(12)
    plain = _model()
    _custom_loop(plain, x, y, 3, compiled=False)
    recorded = _model()
    with dropspy.record(recorded, tmp_path / "run.h5"):
        _custom_loop(recorded, x, y, 3, compiled=False)
        recorded(x, training=False)           # inference: no step, nothing recorded
    for a, b in zip(plain.weights, recorded.weights):
        np.testing.assert_array_equal(a.numpy().view(np.uint32), b.numpy().view(np.uint32))
    run = dropspy.load(tmp_path / "run.h5")
    assert len(run) == 10
    for site in run.values():
        assert site.steps.tolist() == [0, 1, 2] and site.applied.all()
    assert _patched_state(recorded) == []


def test_eager_model_call_masks_are_exact(tmp_path):
    layer = L.Dropout(0.4, name="d")
    model = keras.Sequential([keras.Input((6, 5)), layer])
    x = planted((4, 6, 5))
    with dropspy.record(model, tmp_path / "run.h5"):
        y = model(x, training=True).numpy()
    site = dropspy.load(tmp_path / "run.h5")["d"]
    assert_dropout_exact(x, y, site.mask(0), site.scale)


def test_compiled_custom_loop_is_not_recorded_and_the_run_says_so(tmp_path):
    model = _model()
    x, y = _data(8)
    with dropspy.record(model, tmp_path / "run.h5"):
        _custom_loop(model, x, y, 2, compiled=True)
    run = dropspy.load(tmp_path / "run.h5")
    assert all(len(s) == 0 for s in run.values())
    assert any("tf.function" in n and "not recorded" in n for n in run.notes)


def test_dropout_drawn_inside_the_time_loop_is_opaque_and_counted_as_dropped(tmp_path):
    class NoisyCell(L.Layer):
        def __init__(self, units, **kw):
            super().__init__(**kw)
            self.state_size = units
            self.gen = keras.random.SeedGenerator(1)
            self.proj = L.Dense(units)

        def build(self, input_shape):
            self.proj.build(input_shape)

        def call(self, x, states, training=False):
            if training:
                x = keras.random.dropout(x, 0.3, seed=self.gen)
            h = self.proj(x) + states[0]
            return h, [h]

    keras.utils.set_random_seed(0)
    inp = keras.Input((5, 3))
    model = keras.Model(inp, L.Dense(1)(L.RNN(NoisyCell(4, name="noisy"), name="rnn")(inp)))
    model.compile(optimizer="sgd", loss="mse")
    x, y = _data()
    with dropspy.record(model, tmp_path / "run.h5"):
        model.fit(x, y, batch_size=4, verbose=0)
    run = dropspy.load(tmp_path / "run.h5")
    site = run["rnn/noisy"]
    assert "loop" in site.opaque and len(site) == 0
    assert run.records_dropped.get("unobservable") == 2 * 5   # 2 steps x 5 timesteps
    assert any("rnn/noisy" in n and "not recorded" in n for n in run.notes)


@pytest.mark.parametrize("kind", ["MultiWorkerMirroredStrategy", "TPUStrategy"])
def test_strategies_other_than_mirrored_with_several_replicas_are_refused_naming_them(
        kind, tmp_path):
    # Mirrored replicas are recorded (test_keras_backends, in a subprocess with 2 logical
    # CPUs); a strategy whose outputs are reduced another way is refused before training.
    fake = type(kind, (), {"num_replicas_in_sync": 4})()
    model = _model()
    model._distribute_strategy = fake
    with pytest.raises(UnsupportedModelError, match=kind) as info:
        dropspy.record(model, tmp_path / "run.h5").__enter__()
    assert "4 replicas" in str(info.value)
    if kind.startswith("MultiWorker"):
        assert "own run file" in str(info.value)


def test_custom_cell_dropout_in_an_unrolled_rnn_is_recorded_per_timestep(tmp_path):
    class NoisyCell(L.Layer):
        def __init__(self, units, **kw):
            super().__init__(**kw)
            self.state_size = units
            self.gen = keras.random.SeedGenerator(1)

        def call(self, x, states, training=False):
            if training:
                x = keras.random.dropout(x, 0.5, seed=self.gen)
            return x + states[0], [x + states[0]]

    keras.utils.set_random_seed(0)
    inp = keras.Input((4, 3))
    rnn = L.RNN(NoisyCell(3, name="noisy"), unroll=True, return_sequences=True, name="rnn")
    model = keras.Model(inp, L.Dense(1)(rnn(inp)))
    model.compile(optimizer="sgd", loss="mse")
    x, y = _data()
    with dropspy.record(model, tmp_path / "run.h5"):
        model.fit(x[:, :4], y, batch_size=8, verbose=0)
    site = dropspy.load(tmp_path / "run.h5")["rnn/noisy"]
    assert site.role == "custom" and not site.opaque
    assert site.calls.tolist() == [0, 1, 2, 3]     # one fresh mask per timestep
    assert site.axes == ("batch", "feature")


def test_a_single_replica_strategy_is_recorded(tmp_path):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = _model()
    x, y = _data()
    with dropspy.record(model, tmp_path / "run.h5"):
        model.fit(x, y, batch_size=4, verbose=0)
    run = dropspy.load(tmp_path / "run.h5")
    assert len(run) == 10 and all(len(s) == 2 for s in run.values())


def test_record_entered_in_on_train_begin_records_every_step_of_that_fit(tmp_path):
    # fit has built its train function before on_train_begin: attach must build the
    # recording one at once (fit looks model.train_function up at every step).
    class Record(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.rec = dropspy.record(self.model, tmp_path / "run.h5")
            self.rec.__enter__()

        def on_train_end(self, logs=None):
            self.rec.__exit__(None, None, None)

    model = _model()
    x, y = _data(8)
    model.fit(x, y, batch_size=4, verbose=0)          # the train function exists
    model.fit(x, y, batch_size=4, verbose=0, callbacks=[Record()])
    run = dropspy.load(tmp_path / "run.h5")
    assert run.complete and len(run) >= 3
    assert all(site.steps.tolist() == [0, 1] for site in run.values())
    assert _patched_state(model) == []
