"""Helpers for the Keras adapter tests: probe models and numpy reference forwards.

Imported by the Keras 3 tests (``tests/frameworks/keras/``, ``tests/integrations/``) after
``pytest.importorskip("tensorflow")``.
"""

from __future__ import annotations

import numpy as np

import dropspy


def keras():
    import keras as _keras

    return _keras


def seed_states(model):
    """Every SeedGenerator state of ``model`` (TF backend), in layer order."""
    out = []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        for gen in getattr(layer, "_seed_generators", []) or []:
            out.append(gen.state.numpy())
        gen = getattr(layer, "seed_generator", None)
        if gen is not None:
            out.append(gen.state.numpy())
    return out


def make_probe(layer, *, jit: bool = False, training: bool = True, extra=None):
    """A model whose train step returns the layer's input and output in the logs.

    ``train_on_batch(..., return_dict=True)`` then hands back ``x`` and ``y`` as arrays, taken
    from the same compiled step whose masks dropspy records.
    """
    k = keras()

    class Probe(k.Model):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def call(self, x, training=False):
            return self.inner(x, training=training)

        def train_step(self, data):
            x, _, _ = k.utils.unpack_x_y_sample_weight(data)
            y = self(x, training=training)
            logs = {"x": x}
            if isinstance(y, (tuple, list)):
                for i, t in enumerate(y):
                    logs[f"y{i}"] = t
            else:
                logs["y"] = y
            if extra is not None:
                logs.update(extra(self, x))
            return logs

    model = Probe(layer)
    model.compile(optimizer="sgd", loss="mse", jit_compile=jit)
    return model


def run_probe(layer, x, path, *, jit: bool = False, training: bool = True, extra=None, **kw):
    """Record one train_on_batch of a probe model; return (run, logs)."""
    model = make_probe(layer, jit=jit, training=training, extra=extra)
    with dropspy.record(model, path, **kw):
        logs = model.train_on_batch(x, np.zeros((x.shape[0], 1), np.float32), return_dict=True)
    return dropspy.load(path), logs, model


def planted(shape, seed=0, zero_fraction=0.3):
    """Random float32 inputs with exact +0.0 and -0.0 planted in them."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32)
    x[rng.random(shape) < zero_fraction / 2] = 0.0
    x[rng.random(shape) < zero_fraction / 2] = -0.0
    return x


def assert_dropout_exact(x, y, mask, scale):
    """``y == where(mask, x * float32(scale), 0)`` bit for bit, and the mask is not ``y != 0``."""
    expected = np.where(mask, x * np.float32(scale), np.float32(0.0)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(y, np.float32).view(np.uint32),
                                  expected.view(np.uint32))
    # Planted zeros that were kept: a mask guessed from the output would call them dropped.
    assert np.any(mask & (x == 0)), "test needs kept zeros to tell a recorded mask from a guess"


def multipliers(site, i=0):
    """The float multipliers a cell applies: applied keep-mask * scale, as float64."""
    return site.mask(i).astype(np.float64) * np.float32(site.scale)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def lstm_ref(x, kernel, rkernel, bias, in_m, rec_m, h=None, c=None):
    """LSTM forward in numpy; ``in_m``/``rec_m``: 4 multiplier arrays (B, T, .) per gate."""
    b, t_len, _ = x.shape
    units = rkernel.shape[0]
    h = np.zeros((b, units)) if h is None else h
    c = np.zeros((b, units)) if c is None else c
    ks, us, bs = np.split(kernel, 4, 1), np.split(rkernel, 4, 1), np.split(bias, 4)
    outs = []
    for t in range(t_len):
        z = [(x[:, t] * in_m[g][:, t]) @ ks[g] + bs[g] + (h * rec_m[g][:, t]) @ us[g]
             for g in range(4)]
        i, f, o = sigmoid(z[0]), sigmoid(z[1]), sigmoid(z[3])
        c = f * c + i * np.tanh(z[2])
        h = o * np.tanh(c)
        outs.append(h)
    return np.stack(outs, 1)


def gru_ref(x, kernel, rkernel, bias, in_m, rec_m):
    """GRU (reset_after=True) forward in numpy; gates z, r, h."""
    b, t_len, _ = x.shape
    u = rkernel.shape[0]
    h = np.zeros((b, u))
    ks, us = np.split(kernel, 3, 1), np.split(rkernel, 3, 1)
    bi, br = np.split(bias[0], 3), np.split(bias[1], 3)
    outs = []
    for t in range(t_len):
        xz, xr, xh = [(x[:, t] * in_m[g][:, t]) @ ks[g] + bi[g] for g in range(3)]
        rz, rr, rh = [(h * rec_m[g][:, t]) @ us[g] + br[g] for g in range(3)]
        z, r = sigmoid(xz + rz), sigmoid(xr + rr)
        hh = np.tanh(xh + r * rh)
        h = z * h + (1 - z) * hh
        outs.append(h)
    return np.stack(outs, 1)


def simple_rnn_ref(x, kernel, rkernel, bias, in_m, rec_m):
    """SimpleRNN (tanh) forward in numpy."""
    b, t_len, _ = x.shape
    h = np.zeros((b, rkernel.shape[0]))
    outs = []
    for t in range(t_len):
        h = np.tanh((x[:, t] * in_m[0][:, t]) @ kernel + bias + (h * rec_m[0][:, t]) @ rkernel)
        outs.append(h)
    return np.stack(outs, 1)


def shuffled(m, seed=1):
    """The same multipliers in another order (same rate, wrong elements)."""
    rng = np.random.default_rng(seed)
    flat = m.ravel().copy()
    rng.shuffle(flat)
    return flat.reshape(m.shape)
