"""The Keras adapter inside model.fit: zero perturbation, sampling, steps, eval masks."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":  # pragma: no cover
    pytest.skip("the Keras adapter tests need the TensorFlow backend", allow_module_level=True)

from _keras_util import assert_dropout_exact, make_probe, planted, seed_states

import dropspy

L = keras.layers
N, T, F = 14, 6, 4   # 14 samples, batch 4: three full batches and a partial one


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, T, F)).astype(np.float32), rng.normal(size=(N, 1)).astype(np.float32)


def _model(jit, seed=3, rnn=True):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((T, F))
    x = L.Dropout(0.3, noise_shape=(None, 1, F))(inp)
    x = L.SpatialDropout1D(0.2)(x)
    x = L.Dense(8)(x)
    if rnn != "simple":
        x = L.MultiHeadAttention(num_heads=2, key_dim=4, dropout=0.3)(x, x)
    x = L.TimeDistributed(L.Dropout(0.25))(x)
    if rnn == "simple":   # XLA compiles of LSTM/GRU loops take ~15 s on 2 cores
        x = L.SimpleRNN(5, dropout=0.3, recurrent_dropout=0.2)(x)
    elif rnn:
        x = L.LSTM(6, dropout=0.2, recurrent_dropout=0.3, return_sequences=True)(x)
        x = L.GRU(5, dropout=0.3)(x)
    else:
        x = L.Flatten()(x)
    x = L.Dropout(0.4)(x)
    model = keras.Model(inp, L.Dense(1)(x))
    model.compile(optimizer="adam", loss="mse", jit_compile=jit)
    return model


def _bits(a):
    return np.asarray(a).view(np.uint32)


@pytest.mark.parametrize("jit", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["graph", "xla"])
def test_fit_weights_and_seed_states_bit_identical_with_and_without_record(jit, tmp_path):
    x, y = _data()
    rnn = "simple" if jit else True
    plain = _model(jit, rnn=rnn)
    plain.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    recorded = _model(jit, rnn=rnn)
    with dropspy.record(recorded, tmp_path / "run.h5"):
        recorded.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(plain.weights, recorded.weights):
        np.testing.assert_array_equal(_bits(a.numpy()), _bits(b.numpy()), err_msg=a.path)
    sa, sb = seed_states(plain), seed_states(recorded)
    assert len(sa) == len(sb) and len(sa) >= 5
    for a, b in zip(sa, sb):
        np.testing.assert_array_equal(a, b)
    run = dropspy.load(tmp_path / "run.h5")
    assert run.complete
    steps = 4   # 4 batches, the last one partial
    for site in run.values():
        assert not site.opaque
        assert len(site) == steps, site.name
        assert site.steps.tolist() == list(range(steps))
        assert site.shapes[3][0] == 2   # the partial batch
    if not jit:
        assert {run[n].gate for n in run if "/input/" in n and run[n].layer_class == "LSTM"} \
            == set("ifco")


def test_run_eagerly_matches_graph_weights_and_records(tmp_path):
    x, y = _data()
    plain = _model(False, rnn=False)
    plain.run_eagerly = True
    plain.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    recorded = _model(False, rnn=False)
    recorded.run_eagerly = True
    with dropspy.record(recorded, tmp_path / "run.h5"):
        recorded.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(plain.weights, recorded.weights):
        np.testing.assert_array_equal(_bits(a.numpy()), _bits(b.numpy()))
    run = dropspy.load(tmp_path / "run.h5")
    assert all(len(s) == 4 for s in run.values())


def test_masks_drawn_in_evaluate_and_predict_are_recorded_as_not_applied(tmp_path):
    x, y = _data()
    keras.utils.set_random_seed(0)
    inp = keras.Input((T, F))
    hidden = L.LSTM(3, dropout=0.3, recurrent_dropout=0.3)(L.Dropout(0.2, name="d")(inp))
    model = keras.Model(inp, L.Dense(1)(hidden))
    model.compile(optimizer="sgd", loss="mse")
    with dropspy.record(model, tmp_path / "run.h5"):
        model.fit(x, y, batch_size=4, epochs=1, validation_data=(x, y), verbose=0)
        model.evaluate(x, y, batch_size=7, verbose=0)
        model.predict(x, batch_size=7, verbose=0)
    run = dropspy.load(tmp_path / "run.h5")
    assert len(run["d"]) == 4 and run["d"].training.all()   # Dropout draws only in training
    for name, site in run.items():
        train = site.training
        assert train.sum() == 4 and site.applied[train].all(), name
        assert not site.applied[~train].any(), name
        if name != "d":   # RNN masks are drawn in every mode: 4 + 2 + 2 eval batches
            assert (~train).sum() == 8, name
            assert (site.steps[~train] == 4).all()   # they join the step after training
        pairs = list(zip(site.steps.tolist(), site.calls.tolist()))
        assert len(pairs) == len(set(pairs)), name


def test_monte_carlo_dropout_in_predict_is_recorded_as_dropout_at_inference(tmp_path):
    class MCDropout(L.Dropout):
        def call(self, inputs, training=None):
            return super().call(inputs, training=True)

    def build():
        keras.utils.set_random_seed(0)
        inp = keras.Input((16,))
        model = keras.Model(inp, MCDropout(0.5, name="mc")(inp))
        model.compile(optimizer="sgd", loss="mse")
        return model

    x = planted((6, 16))
    plain = build().predict(x, batch_size=3, verbose=0)
    model = build()
    with dropspy.record(model, tmp_path / "run.h5"):
        y = model.predict(x, batch_size=3, verbose=0)
    np.testing.assert_array_equal(plain.view(np.uint32), y.view(np.uint32))
    site = dropspy.load(tmp_path / "run.h5")["mc"]
    for i in range(2):
        assert_dropout_exact(x[3 * i:3 * i + 3], y[3 * i:3 * i + 3], site.mask(i), site.scale)
    assert len(site) == 2 and site.applied.all() and not site.training.any()
    from dropspy.analysis import analyze_run

    findings = [f for s in analyze_run(dropspy.load(tmp_path / "run.h5")).sites
                for f in s.findings]
    assert any(f.code == "inference-dropout" for f in findings)


def test_rnn_masks_drawn_while_not_training_are_recorded_as_not_applied(tmp_path):
    layer = L.LSTM(3, dropout=0.5, recurrent_dropout=0.5)
    model = make_probe(layer, training=False)
    x = planted((4, 5, 2))
    with dropspy.record(model, tmp_path / "run.h5"):
        model.train_on_batch(x, np.zeros((4, 1), np.float32))
    run = dropspy.load(tmp_path / "run.h5")
    assert len(run) == 8
    for site in run.values():
        assert len(site) == 1
        assert not site.training[0] and not site.applied[0]
        assert site.mask(0) is None
        assert site.shapes[0].tolist()[:2] == [4, 5]


def test_every_records_only_sampled_steps_and_counts_the_rest(tmp_path):
    x, y = _data()
    model = _model(False, rnn=False)
    with dropspy.record(model, tmp_path / "run.h5", every=2):
        model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    run = dropspy.load(tmp_path / "run.h5")
    n_sites = len(run)
    for site in run.values():
        assert site.steps.tolist() == [0, 2]
    assert run.records_dropped.get("sampling") == 2 * n_sites


def test_train_on_batch_counts_steps_across_calls_and_shared_layer_calls(tmp_path):
    shared = L.Dropout(0.5, name="shared")
    inp = keras.Input((8,))
    out = L.Dense(1)(L.Add()([shared(inp), shared(inp)]))
    model = keras.Model(inp, out)
    model.compile(optimizer="sgd", loss="mse")
    x = planted((4, 8))
    with dropspy.record(model, tmp_path / "run.h5"):
        for _ in range(3):
            model.train_on_batch(x, np.zeros((4, 1), np.float32))
    site = dropspy.load(tmp_path / "run.h5")["shared"]
    assert site.steps.tolist() == [0, 0, 1, 1, 2, 2]
    assert site.calls.tolist() == [0, 1, 0, 1, 0, 1]
    assert not np.array_equal(site.mask(0), site.mask(1))


def test_callbacks_never_see_the_mask_outputs(tmp_path):
    seen = []

    class Spy(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(set(logs))

    x, y = _data()
    model = _model(False, rnn=False)
    with dropspy.record(model, tmp_path / "run.h5"):
        hist = model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[Spy()])
    assert seen and all(keys == {"loss"} for keys in seen)
    assert set(hist.history) == {"loss"}


def test_meta_names_framework_backend_and_devices(tmp_path):
    model = _model(False, rnn=False)
    with dropspy.record(model, tmp_path / "run.h5"):
        pass
    run = dropspy.load(tmp_path / "run.h5")
    assert run.framework == "keras"
    assert run.attrs["framework_version"] == keras.__version__
    assert run.attrs["backend"] == "tensorflow"
    assert "CPU" in str(run.attrs["devices"])


def test_mixed_precision_masks_stay_exact(tmp_path):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = L.Dropout(0.5)
        model = make_probe(layer)
        x = planted((8, 16)).astype(np.float16)
        with dropspy.record(model, tmp_path / "run.h5"):
            logs = model.train_on_batch(x, np.zeros((8, 1), np.float32), return_dict=True)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    site = dropspy.load(tmp_path / "run.h5")[layer.name]
    y = np.asarray(logs["y"], np.float16)
    expected = np.where(site.mask(0), x * np.float16(1 / (1 - 0.5)), np.float16(0))
    np.testing.assert_array_equal(y.view(np.uint16), expected.view(np.uint16))


def _gpu_available():
    return bool(tf.config.list_physical_devices("GPU"))


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_gpu_fit_is_unperturbed_and_masks_exact(jit, tmp_path):
    x, y = _data()
    with tf.device("/GPU:0"):
        plain = _model(jit)
        plain.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
        recorded = _model(jit)
        with dropspy.record(recorded, tmp_path / "run.h5"):
            recorded.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(plain.weights, recorded.weights):
        np.testing.assert_array_equal(_bits(a.numpy()), _bits(b.numpy()))
    run = dropspy.load(tmp_path / "run.h5")
    assert "GPU" in str(run.attrs["devices"])
    assert all(len(s) == 4 for s in run.values())
    # cuDNN LSTM path (dropout only): the input mask is applied before the kernel, so it is
    # observable; check it against the output bit for bit on the GPU.
    layer = L.Dropout(0.3)
    with tf.device("/GPU:0"):
        model = make_probe(layer, jit=jit)
        xp = planted((8, 6, 5))
        with dropspy.record(model, tmp_path / "probe.h5"):
            logs = model.train_on_batch(xp, np.zeros((8, 1), np.float32), return_dict=True)
    site = dropspy.load(tmp_path / "probe.h5")[layer.name]
    assert_dropout_exact(xp, logs["y"], site.mask(0), site.scale)


def test_unbuilt_sequential_declares_its_sites_at_the_first_step(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        L.SpatialDropout1D(0.3, name="sd"),
        L.TimeDistributed(L.Dropout(np.float32(0.5), name="inner"), name="td"),
        L.LSTM(4, dropout=0.3, name="lstm"),
        L.Dropout(0.5, name="out"),
        L.Dense(1),
    ])
    model.compile(optimizer="sgd", loss="mse")
    x, y = _data()
    with dropspy.record(model, tmp_path / "run.h5"):
        model.fit(x, y, batch_size=7, verbose=0)
    run = dropspy.load(tmp_path / "run.h5")
    assert sorted(run) == ["lstm/input", "out", "sd", "td/inner"]
    assert run["td/inner"].axes == ("batch", "time", "feature")
    assert run["lstm/input"].axes == ("batch", "time", "feature")
    assert run["out"].axes == ("batch", "feature")
    assert all(len(s) == 2 for s in run.values())


def test_sites_filter_keeps_selected_sites_and_counts_the_rest(tmp_path):
    keras.utils.set_random_seed(0)
    inp = keras.Input((T, F))
    x = L.Dropout(0.3, name="d")(inp)
    x = L.LSTM(3, dropout=0.3, recurrent_dropout=0.3, name="lstm")(x)
    model = keras.Model(inp, L.Dense(1)(x))
    model.compile(optimizer="sgd", loss="mse")
    x, y = _data()
    with dropspy.record(model, tmp_path / "run.h5", sites="lstm/input/*"):
        model.fit(x, y, batch_size=7, verbose=0)
    run = dropspy.load(tmp_path / "run.h5")
    assert sorted(run) == [f"lstm/input/{g}" for g in "cfio"]
    assert all(len(s) == 2 for s in run.values())
    assert run.records_dropped.get("site_filter") == 2 * 5   # d + 4 recurrent, 2 steps
