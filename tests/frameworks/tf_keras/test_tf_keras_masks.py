"""Exactness of the tf_keras (Keras 2) adapter: the stored masks reproduce what layers computed.

Each RNN path tf_keras can take is covered, because each applies its masks differently: the
cuDNN-eligible path (one mask of shape (batch, time, feature), new at every timestep), the
cell path in a while loop (masks redrawn at every timestep inside the loop body), and the
unrolled or eager cell path (one mask set for all timesteps).
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tf_keras = pytest.importorskip("tf_keras")

from _keras_util import (
    assert_dropout_exact,
    gru_ref,
    lstm_ref,
    multipliers,
    planted,
    shuffled,
    simple_rnn_ref,
)
from _tf_keras_util import gate_multipliers, rnn_weights, run_probe, varies_over_time

# The while-loop path warns (rightly) that it cannot prove zero perturbation; see
# test_tf_keras_training.py for that warning. Here only the masks matter.
pytestmark = pytest.mark.filterwarnings("ignore::dropspy.errors.DropspyWarning")

L = tf_keras.layers
B, T, F, U = 6, 7, 4, 5


@pytest.fixture(autouse=True)
def _seed():
    tf_keras.utils.set_random_seed(1234)


DROPOUT_CASES = [
    # (id, layer factory, input shape, expected axes, expected noise shape of the record)
    ("2d", lambda: L.Dropout(0.4), (16, 24), ("batch", "feature"), (16, 24)),
    ("3d", lambda: L.Dropout(0.3), (4, 6, 5), ("batch", "time", "feature"), (4, 6, 5)),
    ("3d-steps", lambda: L.Dropout(0.5, noise_shape=(1, 6, 1)), (4, 6, 5),
     ("batch", "time", "feature"), (1, 6, 1)),
    ("3d-features", lambda: L.Dropout(0.5, noise_shape=(1, 1, 5)), (4, 6, 5),
     ("batch", "time", "feature"), (1, 1, 5)),
    ("3d-batch", lambda: L.Dropout(0.5, noise_shape=(None, 1, 1)), (4, 6, 5),
     ("batch", "time", "feature"), (4, 1, 1)),
    ("4d", lambda: L.Dropout(0.3), (2, 4, 4, 3), ("batch", "height", "width", "channel"),
     (2, 4, 4, 3)),
    ("spatial1d", lambda: L.SpatialDropout1D(0.5), (4, 6, 5), ("batch", "time", "feature"),
     (4, 1, 5)),
    ("spatial2d-last", lambda: L.SpatialDropout2D(0.5), (4, 3, 3, 4),
     ("batch", "height", "width", "channel"), (4, 1, 1, 4)),
    ("spatial2d-first", lambda: L.SpatialDropout2D(0.5, data_format="channels_first"),
     (4, 4, 3, 3), ("batch", "channel", "height", "width"), (4, 4, 1, 1)),
    ("spatial3d-last", lambda: L.SpatialDropout3D(0.5), (4, 2, 2, 2, 4),
     ("batch", "depth", "height", "width", "channel"), (4, 1, 1, 1, 4)),
]


@pytest.mark.parametrize("case", DROPOUT_CASES, ids=[c[0] for c in DROPOUT_CASES])
def test_dropout_layer_mask_reproduces_output_bit_for_bit(case, tmp_path):
    _, factory, shape, axes, noise_shape = case
    layer = factory()
    x = planted(shape)
    run, logs, _ = run_probe(layer, x, tmp_path / "run.h5")
    site = run[layer.name]
    assert run.framework == "tf_keras"
    assert site.axes == axes
    assert site.role == "output" and site.layer_class == type(layer).__name__
    assert site.rate == pytest.approx(layer.rate)
    assert len(site) == 1 and site.training[0] and site.applied[0]
    assert site.noise(0).shape == noise_shape
    assert tuple(site.shapes[0]) == shape
    # Keras 2 uses TF's own formula: where(keep, x * float32(1 / (1 - rate)), 0).
    assert_dropout_exact(x, logs["y"], site.mask(0), site.scale)


@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_dropout_mask_exact_when_eager_and_under_xla(mode, tmp_path):
    layer = L.Dropout(0.35, noise_shape=(None, 1, 6))
    x = planted((8, 7, 6))
    run, logs, _ = run_probe(layer, x, tmp_path / "run.h5", eager=mode == "eager",
                             jit=mode == "xla")
    site = run[layer.name]
    assert site.noise(0).shape == (8, 1, 6)
    assert_dropout_exact(x, logs["y"], site.mask(0), site.scale)


# (id, layer kwargs, probe mode, expected tf_keras path, per gate, per timestep)
LSTM_CASES = [
    ("cudnn-path", dict(dropout=0.4), "graph", "cuDNN-eligible", False, True),
    ("cudnn-path-eager", dict(dropout=0.4), "eager", "cuDNN-eligible", False, True),
    ("loop-both", dict(dropout=0.3, recurrent_dropout=0.4), "graph", "while-loop", True, True),
    ("loop-recurrent-only", dict(recurrent_dropout=0.5), "graph", "while-loop", True, True),
    ("loop-xla", dict(dropout=0.3, recurrent_dropout=0.4), "xla", "while-loop", True, True),
    ("unroll", dict(dropout=0.3, recurrent_dropout=0.4, unroll=True), "graph", "unrolled",
     True, False),
    ("unroll-impl2", dict(dropout=0.4, unroll=True), "graph", "unrolled", False, False),
    ("eager", dict(dropout=0.3, recurrent_dropout=0.4), "eager", "eager", True, False),
]


@pytest.mark.parametrize("kw,mode,path,per_gate,per_step", [c[1:] for c in LSTM_CASES],
                         ids=[c[0] for c in LSTM_CASES])
def test_lstm_masks_reproduce_output_and_shuffled_masks_do_not(kw, mode, path, per_gate,
                                                               per_step, tmp_path):
    layer = L.LSTM(U, return_sequences=True, **kw)
    x = planted((B, T, F))
    run, logs, _ = run_probe(layer, x, tmp_path / "run.h5", eager=mode == "eager",
                             jit=mode == "xla")
    name = layer.name
    if kw.get("dropout"):
        if per_gate:
            assert {f"{name}/input/{g}" for g in "ifco"} <= set(run)
            assert f"{name}/input" not in run
        else:
            assert f"{name}/input" in run and f"{name}/input/i" not in run
            site = run[f"{name}/input"]
            assert site.extra["gates_share_mask"] is True
            assert site.extra["masks_drawn_per_call"] == 4
            assert site.extra["masks_applied_per_call"] == 1
    for s in run.values():
        assert s.axes == ("batch", "time", "feature")
        assert s.extra["tf_keras_path"] == path
        assert len(s) == 1 and s.shapes[0][1] == T
        if per_step:
            assert s.noise(0).shape[1] == T
            assert varies_over_time(s.mask(0)), s.name
            assert "time_axis_by_construction" not in s.extra
        else:
            assert s.noise(0).shape[1] == 1
            assert s.extra["time_axis_by_construction"] is True
    k, rk, b = rnn_weights(layer)
    in_m = gate_multipliers(run, name, "input", "ifco", (B, T, F))
    rec_m = gate_multipliers(run, name, "recurrent", "ifco", (B, T, U))
    y = logs["y"]
    np.testing.assert_allclose(lstm_ref(x.astype(np.float64), k, rk, b, in_m, rec_m), y,
                               rtol=1e-4, atol=1e-5)
    bad_in = [shuffled(m, 3 + i) for i, m in enumerate(in_m)] if kw.get("dropout") else in_m
    bad_rec = [shuffled(m, 9 + i) for i, m in enumerate(rec_m)] \
        if kw.get("recurrent_dropout") else rec_m
    assert not np.allclose(lstm_ref(x.astype(np.float64), k, rk, b, bad_in, bad_rec), y,
                           rtol=1e-4, atol=1e-5)
    if per_step:
        # The first timestep's masks at every timestep (what a capture outside the loop, or
        # a reading of the docs, would claim) do not reproduce the output either.
        first = [np.repeat(m[:, :1], T, axis=1) for m in in_m]
        first_rec = [np.repeat(m[:, :1], T, axis=1) for m in rec_m]
        assert not np.allclose(lstm_ref(x.astype(np.float64), k, rk, b, first, first_rec), y,
                               rtol=1e-4, atol=1e-5)


def test_lstm_cell_in_generic_rnn_applies_one_input_mask_per_timestep(tmp_path):
    # RNN(LSTMCell) takes the cell path with implementation=2: 4 masks are drawn per timestep,
    # only the first is applied, to every gate.
    layer = L.RNN(L.LSTMCell(U, dropout=0.4), return_sequences=True)
    x = planted((B, T, F))
    run, logs, _ = run_probe(layer, x, tmp_path / "run.h5")
    assert set(run) == {f"{layer.name}/input"}
    site = run[f"{layer.name}/input"]
    assert site.extra["tf_keras_path"] == "while-loop" and site.extra["implementation"] == 2
    assert site.noise(0).shape == (B, T, F) and varies_over_time(site.mask(0))
    k, rk, b = rnn_weights(layer)
    in_m = [multipliers(site)] * 4
    ones = [np.ones((B, T, U))] * 4
    y = logs["y"]
    np.testing.assert_allclose(lstm_ref(x.astype(np.float64), k, rk, b, in_m, ones), y,
                               rtol=1e-4, atol=1e-5)


GRU_CASES = [
    ("cudnn-path", dict(dropout=0.4), "cuDNN-eligible", False),
    ("loop-both", dict(dropout=0.3, recurrent_dropout=0.4), "while-loop", True),
]


@pytest.mark.parametrize("kw,path,per_gate", [c[1:] for c in GRU_CASES],
                         ids=[c[0] for c in GRU_CASES])
def test_gru_masks_reproduce_output_and_shuffled_masks_do_not(kw, path, per_gate, tmp_path):
    layer = L.GRU(U, return_sequences=True, **kw)
    x = planted((B, T, F))
    run, logs, _ = run_probe(layer, x, tmp_path / "run.h5")
    name = layer.name
    assert (f"{name}/input/z" in run) == per_gate
    assert (f"{name}/input" in run) == (not per_gate)
    for s in run.values():
        assert s.extra["tf_keras_path"] == path
        assert s.noise(0).shape[1] == T and varies_over_time(s.mask(0))
    k, rk, b = rnn_weights(layer)
    in_m = gate_multipliers(run, name, "input", "zrh", (B, T, F))
    rec_m = gate_multipliers(run, name, "recurrent", "zrh", (B, T, U))
    y = logs["y"]
    np.testing.assert_allclose(gru_ref(x.astype(np.float64), k, rk, b, in_m, rec_m), y,
                               rtol=1e-4, atol=1e-5)
    bad = [shuffled(m, 5 + i) for i, m in enumerate(in_m)]
    assert not np.allclose(gru_ref(x.astype(np.float64), k, rk, b, bad, rec_m), y,
                           rtol=1e-4, atol=1e-5)


def test_simple_rnn_masks_reproduce_output(tmp_path):
    layer = L.SimpleRNN(U, dropout=0.4, recurrent_dropout=0.3, return_sequences=True)
    x = planted((B, T, F))
    run, logs, _ = run_probe(layer, x, tmp_path / "run.h5")
    name = layer.name
    assert set(run) == {f"{name}/input", f"{name}/recurrent"}
    assert run[f"{name}/input"].gate is None and run[f"{name}/recurrent"].gate is None
    k, rk, b = rnn_weights(layer)
    in_m = [multipliers(run[f"{name}/input"])]
    rec_m = [multipliers(run[f"{name}/recurrent"])]
    y = logs["y"]
    np.testing.assert_allclose(simple_rnn_ref(x.astype(np.float64), k, rk, b, in_m, rec_m), y,
                               rtol=1e-4, atol=1e-5)
    assert not np.allclose(simple_rnn_ref(x.astype(np.float64), k, rk, b,
                                          [shuffled(in_m[0])], rec_m), y, rtol=1e-4, atol=1e-5)


def test_bidirectional_lstm_masks_line_up_with_input_timesteps(tmp_path):
    # The backward layer's loop runs over reversed inputs; its per-timestep masks are stored
    # in input order, so reversing them with the input must reproduce its output.
    layer = L.Bidirectional(L.LSTM(4, dropout=0.4, recurrent_dropout=0.3))
    x = planted((5, 6, 3))
    run, logs, _ = run_probe(layer, x, tmp_path / "run.h5")
    fwd, bwd = layer.forward_layer, layer.backward_layer
    outs = []
    for sub, xs in ((fwd, x), (bwd, x[:, ::-1])):
        prefix = f"{layer.name}/{sub.name}"
        in_m = [multipliers(run[f"{prefix}/input/{g}"]) for g in "ifco"]
        rec_m = [multipliers(run[f"{prefix}/recurrent/{g}"]) for g in "ifco"]
        if sub is bwd:
            in_m = [m[:, ::-1] for m in in_m]
            # Recurrent masks multiply the state of the loop's previous iteration: loop order.
            rec_m = [m[:, ::-1] for m in rec_m]
        k, rk, b = rnn_weights(sub)
        outs.append(lstm_ref(xs.astype(np.float64), k, rk, b, in_m, rec_m)[:, -1])
    np.testing.assert_allclose(np.concatenate(outs, -1), logs["y"], rtol=1e-4, atol=1e-5)


def test_stacked_cells_have_one_site_set_per_cell(tmp_path):
    c1 = L.LSTMCell(4, dropout=0.3, recurrent_dropout=0.2)
    c2 = L.GRUCell(3, dropout=0.4)
    layer = L.RNN(L.StackedRNNCells([c1, c2]), return_sequences=True)
    x = planted((5, 6, 3))
    run, logs, _ = run_probe(layer, x, tmp_path / "run.h5")
    p1, p2 = f"{layer.name}/{c1.name}", f"{layer.name}/{c2.name}"
    in1 = [multipliers(run[f"{p1}/input/{g}"]) for g in "ifco"]
    rec1 = [multipliers(run[f"{p1}/recurrent/{g}"]) for g in "ifco"]
    in2 = [multipliers(run[f"{p2}/input"])] * 3
    assert run[f"{p2}/input"].shapes[0].tolist() == [5, 6, 4]   # the first cell's output
    k1, rk1, b1 = [np.asarray(w.numpy(), np.float64) for w in c1.weights]
    k2, rk2, b2 = [np.asarray(w.numpy(), np.float64) for w in c2.weights]
    h1 = lstm_ref(x.astype(np.float64), k1, rk1, b1, in1, rec1)
    h2 = gru_ref(h1, k2, rk2, b2, in2, [np.ones((5, 6, 3))] * 3)
    np.testing.assert_allclose(h2, logs["y"], rtol=1e-4, atol=1e-5)


def test_gaussian_noise_layers_are_opaque_sites(tmp_path):
    layer = L.GaussianDropout(0.3)
    x = planted((4, 6))
    run, _, _ = run_probe(layer, x, tmp_path / "run.h5")
    site = run[layer.name]
    assert site.opaque and "Gaussian" in site.opaque and len(site) == 0


@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_time_distributed_dropout_records_a_mask_per_timestep(mode, tmp_path):
    inner = L.Dropout(0.5)
    layer = L.TimeDistributed(inner)
    x = planted((6, 5, 8))
    run, logs, _ = run_probe(layer, x, tmp_path / "run.h5", eager=mode == "eager")
    site = run[f"{layer.name}/{inner.name}"]
    assert site.axes == ("batch", "time", "feature")
    assert site.noise(0).shape == (6, 5, 8) and tuple(site.shapes[0]) == (6, 5, 8)
    mask = site.mask(0)
    assert_dropout_exact(x, logs["y"], mask, site.scale)
    assert varies_over_time(mask)


def test_custom_layer_using_its_random_generator_is_a_custom_site(tmp_path):
    class Noisy(tf_keras.layers.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            from tf_keras.src import backend as kbackend

            self._random_generator = kbackend.RandomGenerator(seed=3)

        def call(self, x, training=False):
            return self._random_generator.dropout(x, 0.45, noise_shape=[x.shape[0] or 6, 1, 5])

    layer = Noisy(name="noisy")
    x = planted((6, 4, 5))
    run, logs, _ = run_probe(layer, x, tmp_path / "run.h5")
    site = run["noisy"]
    assert site.role == "custom" and site.layer_class == "Noisy"
    assert site.noise(0).shape == (6, 1, 5)
    assert_dropout_exact(x, logs["y"], site.mask(0), site.scale)


def _gpu_available():
    return bool(tf.config.list_physical_devices("GPU"))


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_available(), reason="needs a CUDA GPU")
def test_gpu_cudnn_lstm_input_masks_reproduce_output(tmp_path):
    # On a GPU the cuDNN-eligible path really runs the cuDNN kernel; its input mask is applied
    # before the kernel (one per timestep), so it stays observable there.
    layer = L.LSTM(U, dropout=0.4, return_sequences=True)
    x = planted((B, T, F))
    with tf.device("/GPU:0"):
        run, logs, _ = run_probe(layer, x, tmp_path / "run.h5")
    site = run[f"{layer.name}/input"]
    assert site.extra["tf_keras_path"] == "cuDNN-eligible"
    assert site.noise(0).shape == (B, T, F) and varies_over_time(site.mask(0))
    assert "GPU" in str(run.attrs["devices"])
    k, rk, b = rnn_weights(layer)
    in_m = [multipliers(site)] * 4
    ones = [np.ones((B, T, U))] * 4
    np.testing.assert_allclose(lstm_ref(x.astype(np.float64), k, rk, b, in_m, ones), logs["y"],
                               rtol=1e-3, atol=1e-4)


def test_time_major_rnn_sites_are_opaque_with_the_reason(tmp_path):
    layer = L.LSTM(3, dropout=0.3, recurrent_dropout=0.2, time_major=True)
    run, _, _ = run_probe(layer, planted((5, 4, 3)), tmp_path / "run.h5")
    assert set(run) == {f"{layer.name}/input", f"{layer.name}/recurrent"}
    for site in run.values():
        assert "time_major=True" in site.opaque and len(site) == 0
    assert not [n for n in run.notes if n.startswith("perturbation")]


def test_mixed_precision_dropout_mask_stays_exact(tmp_path):
    tf_keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = L.Dropout(0.3)
        x = planted((6, 8))
        run, logs, _ = run_probe(layer, x, tmp_path / "run.h5")
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")
    mask = run[layer.name].mask(0)
    y = np.asarray(logs["y"])
    assert y.dtype == np.float16
    # In float16 the kept elements are multiplied by the float16-rounded 1 / (1 - rate).
    expected = np.where(mask, x.astype(np.float16) * np.float16(1 / (1 - 0.3)), np.float16(0))
    np.testing.assert_array_equal(y.view(np.uint16), expected.view(np.uint16))
    assert np.any(mask & (x == 0))
