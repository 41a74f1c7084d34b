"""Exactness of the Keras 3 adapter: the stored masks reproduce what the layers computed."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":  # pragma: no cover
    pytest.skip("the Keras adapter tests need the TensorFlow backend", allow_module_level=True)

from _keras_util import (
    assert_dropout_exact,
    gru_ref,
    lstm_ref,
    multipliers,
    planted,
    run_probe,
    shuffled,
    simple_rnn_ref,
)

L = keras.layers


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)


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
    ("4d-channels", lambda: L.Dropout(0.5, noise_shape=(None, 1, 1, 3)), (4, 4, 4, 3),
     ("batch", "height", "width", "channel"), (4, 1, 1, 3)),
    ("spatial1d", lambda: L.SpatialDropout1D(0.5), (4, 6, 5), ("batch", "time", "feature"),
     (4, 1, 5)),
    ("spatial2d-last", lambda: L.SpatialDropout2D(0.5), (4, 3, 3, 4),
     ("batch", "height", "width", "channel"), (4, 1, 1, 4)),
    ("spatial2d-first", lambda: L.SpatialDropout2D(0.5, data_format="channels_first"),
     (4, 4, 3, 3), ("batch", "channel", "height", "width"), (4, 4, 1, 1)),
    ("spatial3d-last", lambda: L.SpatialDropout3D(0.5), (4, 2, 2, 2, 4),
     ("batch", "depth", "height", "width", "channel"), (4, 1, 1, 1, 4)),
    ("spatial3d-first", lambda: L.SpatialDropout3D(0.5, data_format="channels_first"),
     (4, 4, 2, 2, 2), ("batch", "channel", "depth", "height", "width"), (4, 4, 1, 1, 1)),
]


@pytest.mark.parametrize("case", DROPOUT_CASES, ids=[c[0] for c in DROPOUT_CASES])
def test_dropout_layer_mask_reproduces_output_bit_for_bit(case, tmp_path):
    _, factory, shape, axes, noise_shape = case
    layer = factory()
    x = planted(shape)
    run, logs, _ = run_probe(layer, x, tmp_path / "run.h5")
    site = run[layer.name]
    assert site.axes == axes
    assert site.role == "output" and site.layer_class == type(layer).__name__
    assert site.rate == pytest.approx(layer.rate)
    assert len(site) == 1 and site.training[0] and site.applied[0]
    assert site.noise(0).shape == noise_shape
    assert tuple(site.shapes[0]) == shape
    assert_dropout_exact(x, logs["y"], site.mask(0), site.scale)


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_dropout_mask_exact_under_xla_and_graph(jit, tmp_path):
    layer = L.Dropout(0.35)
    x = planted((8, 7, 6))
    run, logs, _ = run_probe(layer, x, tmp_path / "run.h5", jit=jit)
    site = run[layer.name]
    assert_dropout_exact(x, logs["y"], site.mask(0), site.scale)


def test_custom_layer_calling_keras_random_dropout_is_attributed_to_it(tmp_path):
    class Noisy(L.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.gen = keras.random.SeedGenerator(7)

        def call(self, x, training=False):
            if training:
                return keras.random.dropout(x, 0.45, noise_shape=(None, 1, 5), seed=self.gen)
            return x

    layer = Noisy(name="noisy")
    x = planted((6, 4, 5))
    run, logs, _ = run_probe(layer, x, tmp_path / "run.h5")
    site = run["noisy"]
    assert site.role == "custom" and site.layer_class == "Noisy"
    assert site.noise(0).shape == (6, 1, 5)
    assert site.rate == pytest.approx(0.45)
    assert_dropout_exact(x, logs["y"], site.mask(0), site.scale)


def test_time_distributed_dropout_records_one_draw_per_timestep(tmp_path):
    inner = L.Dropout(0.5)
    layer = L.TimeDistributed(inner)
    x = planted((6, 5, 8))
    run, logs, _ = run_probe(layer, x, tmp_path / "run.h5")
    site = run[f"{layer.name}/{inner.name}"]
    assert site.axes == ("batch", "time", "feature")
    assert site.noise(0).shape == (6, 5, 8)
    mask = site.mask(0)
    assert_dropout_exact(x, logs["y"], mask, site.scale)
    # TimeDistributed draws a fresh mask for every time slice.
    assert not all(np.array_equal(mask[:, 0], mask[:, t]) for t in range(1, 5))


def _rnn_weights(layer):
    return [w.numpy().astype(np.float64) for w in layer.weights]


def _gate_multipliers(run, prefix, role, gates, shape_time):
    """Multipliers per gate; one shared site serves every gate."""
    names = [f"{prefix}/{role}/{g}" for g in gates]
    if all(n in run for n in names):
        return [multipliers(run[n]) for n in names]
    if f"{prefix}/{role}" in run:
        return [multipliers(run[f"{prefix}/{role}"])] * len(gates)
    return [np.ones(shape_time)] * len(gates)


LSTM_CASES = [
    ("dropout-only", dict(dropout=0.4), False),
    ("both", dict(dropout=0.3, recurrent_dropout=0.4), True),
    ("recurrent-only", dict(recurrent_dropout=0.5), True),
]


@pytest.mark.parametrize("kw,per_gate", [c[1:] for c in LSTM_CASES], ids=[c[0] for c in LSTM_CASES])
def test_lstm_masks_reproduce_output_and_shuffled_masks_do_not(kw, per_gate, tmp_path):
    layer = L.LSTM(5, return_sequences=True, **kw)
    x = planted((6, 7, 4)).astype(np.float32)
    run, logs, _ = run_probe(layer, x, tmp_path / "run.h5")
    name = layer.name
    gates = "ifco"
    if kw.get("dropout"):
        if per_gate:
            assert {f"{name}/input/{g}" for g in gates} <= set(run)
            assert f"{name}/input" not in run
        else:
            assert f"{name}/input" in run and f"{name}/input/i" not in run
            assert run[f"{name}/input"].extra["gates_share_mask"] is True
    for s in run.values():
        assert s.axes == ("batch", "time", "feature")
        assert s.extra["time_axis_by_construction"] is True
        assert s.noise(0).shape[1] == 1 and s.shapes[0][1] == 7
    k, rk, b = _rnn_weights(layer)
    in_m = _gate_multipliers(run, name, "input", gates, (6, 7, 4))
    rec_m = _gate_multipliers(run, name, "recurrent", gates, (6, 7, 5))
    y = logs["y"]
    np.testing.assert_allclose(lstm_ref(x.astype(np.float64), k, rk, b, in_m, rec_m), y,
                               rtol=1e-4, atol=1e-5)
    bad_in = [shuffled(m, 3 + i) for i, m in enumerate(in_m)] if kw.get("dropout") else in_m
    bad_rec = [shuffled(m, 9 + i) for i, m in enumerate(rec_m)] \
        if kw.get("recurrent_dropout") else rec_m
    assert not np.allclose(lstm_ref(x.astype(np.float64), k, rk, b, bad_in, bad_rec), y,
                           rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kw,per_gate", [(dict(dropout=0.4), False),
                                         (dict(dropout=0.3, recurrent_dropout=0.4), True)],
                         ids=["dropout-only", "both"])
def test_gru_masks_reproduce_output_and_shuffled_masks_do_not(kw, per_gate, tmp_path):
    layer = L.GRU(5, return_sequences=True, **kw)
    x = planted((6, 7, 4))
    run, logs, _ = run_probe(layer, x, tmp_path / "run.h5")
    name = layer.name
    assert (f"{name}/input/z" in run) == per_gate
    assert (f"{name}/input" in run) == (not per_gate)
    k, rk, b = _rnn_weights(layer)
    in_m = _gate_multipliers(run, name, "input", "zrh", (6, 7, 4))
    rec_m = _gate_multipliers(run, name, "recurrent", "zrh", (6, 7, 5))
    y = logs["y"]
    np.testing.assert_allclose(gru_ref(x.astype(np.float64), k, rk, b, in_m, rec_m), y,
                               rtol=1e-4, atol=1e-5)
    bad = [shuffled(m, 5 + i) for i, m in enumerate(in_m)]
    assert not np.allclose(gru_ref(x.astype(np.float64), k, rk, b, bad, rec_m), y,
                           rtol=1e-4, atol=1e-5)


def test_simple_rnn_masks_reproduce_output(tmp_path):
    layer = L.SimpleRNN(5, dropout=0.4, recurrent_dropout=0.3, return_sequences=True)
    x = planted((6, 7, 4))
    run, logs, _ = run_probe(layer, x, tmp_path / "run.h5")
    name = layer.name
    assert run[f"{name}/input"].gate is None and run[f"{name}/recurrent"].gate is None
    k, rk, b = _rnn_weights(layer)
    in_m = [multipliers(run[f"{name}/input"])]
    rec_m = [multipliers(run[f"{name}/recurrent"])]
    y = logs["y"]
    np.testing.assert_allclose(simple_rnn_ref(x.astype(np.float64), k, rk, b, in_m, rec_m), y,
                               rtol=1e-4, atol=1e-5)
    assert not np.allclose(simple_rnn_ref(x.astype(np.float64), k, rk, b,
                                          [shuffled(in_m[0])], rec_m), y, rtol=1e-4, atol=1e-5)


def test_bidirectional_lstm_records_both_directions(tmp_path):
    layer = L.Bidirectional(L.LSTM(4, dropout=0.4, recurrent_dropout=0.3))
    x = planted((5, 6, 3))
    run, logs, _ = run_probe(layer, x, tmp_path / "run.h5")
    fwd, bwd = layer.forward_layer, layer.backward_layer
    outs = []
    for sub, xs in ((fwd, x), (bwd, x[:, ::-1])):
        prefix = f"{layer.name}/{sub.name}"
        in_m = [multipliers(run[f"{prefix}/input/{g}"]) for g in "ifco"]
        rec_m = [multipliers(run[f"{prefix}/recurrent/{g}"]) for g in "ifco"]
        if sub is bwd:  # the masks are constant over time; reverse anyway to stay honest
            in_m, rec_m = [m[:, ::-1] for m in in_m], [m[:, ::-1] for m in rec_m]
        k, rk, b = _rnn_weights(sub)
        outs.append(lstm_ref(xs.astype(np.float64), k, rk, b, in_m, rec_m)[:, -1])
    np.testing.assert_allclose(np.concatenate(outs, -1), logs["y"], rtol=1e-4, atol=1e-5)


def test_stacked_rnn_cells_have_one_site_set_per_cell(tmp_path):
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
    k1, rk1, b1 = [w.numpy().astype(np.float64) for w in c1.weights]
    k2, rk2, b2 = [w.numpy().astype(np.float64) for w in c2.weights]
    h1 = lstm_ref(x.astype(np.float64), k1, rk1, b1, in1, rec1)
    h2 = gru_ref(h1, k2, rk2, b2, in2, [np.ones((5, 6, 3))] * 3)
    np.testing.assert_allclose(h2, logs["y"], rtol=1e-4, atol=1e-5)


def test_conv_lstm2d_masks_reproduce_output(tmp_path):
    layer = L.ConvLSTM2D(2, 3, padding="same", dropout=0.4, recurrent_dropout=0.3,
                         return_sequences=True)
    x = planted((2, 3, 4, 4, 2))
    run, logs, _ = run_probe(layer, x, tmp_path / "run.h5")
    name = layer.name
    site = run[f"{name}/input/i"]
    assert site.axes == ("batch", "time", "height", "width", "channel")
    assert site.noise(0).shape == (2, 1, 4, 4, 2)
    in_m = [multipliers(run[f"{name}/input/{g}"]).astype(np.float32) for g in "ifco"]
    rec_m = [multipliers(run[f"{name}/recurrent/{g}"]).astype(np.float32) for g in "ifco"]
    k, rk, b = [w.numpy() for w in layer.weights]
    ks, rks, bs = np.split(k, 4, -1), np.split(rk, 4, -1), np.split(b, 4)
    h = np.zeros((2, 4, 4, 2), np.float32)
    c = np.zeros_like(h)
    conv = lambda a, w: tf.nn.conv2d(a, w, 1, "SAME").numpy()
    sig = lambda z: 1 / (1 + np.exp(-z))
    outs = []
    for t in range(3):
        z = [conv(x[:, t] * in_m[g][:, t], ks[g]) + bs[g] + conv(h * rec_m[g][:, t], rks[g])
             for g in range(4)]
        c = sig(z[1]) * c + sig(z[0]) * np.tanh(z[2])
        h = sig(z[3]) * np.tanh(c)
        outs.append(h)
    np.testing.assert_allclose(np.stack(outs, 1), logs["y"], rtol=1e-4, atol=1e-5)


def test_multi_head_attention_dropout_is_an_attention_site(tmp_path):
    layer = L.MultiHeadAttention(num_heads=2, key_dim=3, dropout=0.4)

    class SelfAttention(L.Layer):
        def __init__(self, mha, **kw):
            super().__init__(**kw)
            self.mha = mha

        def call(self, x, training=False):
            return self.mha(x, x, return_attention_scores=True, training=training)

    wrapper = SelfAttention(layer, name="self_attention")
    x = planted((3, 5, 4))
    run, logs, _ = run_probe(wrapper, x, tmp_path / "run.h5")
    site = run[f"self_attention/{layer.name}/attention"]
    assert site.role == "attention" and site.layer_class == "MultiHeadAttention"
    assert site.axes == ("batch", "head", "query", "key")
    mask = site.mask(0)
    assert mask.shape == (3, 2, 5, 5)
    probs = logs["y1"]                                 # softmax output, before dropout
    dropped = np.where(mask, probs * np.float32(site.scale), np.float32(0))
    value = layer._value_dense(tf.constant(x)).numpy()
    out = layer._output_dense(tf.constant(np.einsum("acbe,aecd->abcd", dropped, value))).numpy()
    np.testing.assert_allclose(out, logs["y0"], rtol=1e-4, atol=1e-5)
    wrong = np.where(shuffled(mask), probs * np.float32(site.scale), np.float32(0))
    out_wrong = layer._output_dense(
        tf.constant(np.einsum("acbe,aecd->abcd", wrong, value))).numpy()
    assert not np.allclose(out_wrong, logs["y0"], rtol=1e-4, atol=1e-5)


def test_keras_attention_layer_dropout_is_a_query_key_attention_site(tmp_path):
    layer = L.Attention(dropout=0.5, name="att")

    class Self(L.Layer):
        def __init__(self, att, **kw):
            super().__init__(**kw)
            self.att = att

        def call(self, x, training=False):
            return self.att([x, x], return_attention_scores=True, training=training)

    x = planted((3, 5, 4))
    run, logs, _ = run_probe(Self(layer, name="self"), x, tmp_path / "run.h5")
    site = run["self/att"]
    assert site.role == "attention" and site.axes == ("batch", "query", "key")
    # Keras' Attention returns the weights after dropout: compare with softmax(x x^T).
    scores = np.einsum("bqd,bkd->bqk", x.astype(np.float64), x.astype(np.float64))
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    mask = site.mask(0)
    np.testing.assert_allclose(logs["y1"], np.where(mask, probs * site.scale, 0),
                               rtol=1e-4, atol=1e-6)
    assert not np.allclose(logs["y1"], np.where(shuffled(mask), probs * site.scale, 0),
                           rtol=1e-4, atol=1e-6)


def test_group_query_attention_dropout_is_an_attention_site(tmp_path):
    layer = L.GroupQueryAttention(head_dim=2, num_query_heads=4, num_key_value_heads=2,
                                  dropout=0.5, name="gqa")

    class Self(L.Layer):
        def __init__(self, att, **kw):
            super().__init__(**kw)
            self.att = att

        def call(self, x, training=False):
            return self.att(x, x, training=training)

    x = planted((2, 5, 4))
    run, _, _ = run_probe(Self(layer, name="self"), x, tmp_path / "run.h5")
    site = run["self/gqa/attention"]
    assert site.role == "attention" and site.layer_class == "GroupedQueryAttention"
    assert site.axes == ("batch", "head", "query", "key")
    assert site.noise(0).shape == (2, 4, 5, 5)
