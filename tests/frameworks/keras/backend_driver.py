"""Runs one Keras 3 scenario under the backend named by KERAS_BACKEND; prints one JSON line.

KERAS_BACKEND is fixed per process when keras is first imported, and the test session imports
keras with TensorFlow: the JAX and torch tests run this script in a subprocess
(``python backend_driver.py <scenario>[,<scenario>...] <workdir>``) and assert on what it prints.

Scenarios:
    fit:   the reference model (SpatialDropout1D, LSTM(dropout, recurrent_dropout), Dropout,
           Dense) trained by fit + train_on_batch with and without dropspy; every variable,
           every seed-generator state (and torch's global RNG) compared bit for bit.
    exact: a probe whose train step returns each dropout's input and output; each recorded
           mask is checked against the backend's own dropout arithmetic, with exact zeros
           planted in the input.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

if os.environ.get("KERAS_BACKEND") == "torch":
    import torch  # noqa: F401  (torch before tensorflow in one process)

import keras

import dropspy

L = keras.layers
BACKEND = keras.backend.backend()
N, T, F = 14, 6, 4


def _np(v):
    return np.asarray(keras.ops.convert_to_numpy(v))


def _model(seed=3):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((T, F)),
        L.SpatialDropout1D(0.3, name="sd"),
        L.LSTM(5, dropout=0.3, recurrent_dropout=0.2, name="lstm"),
        L.Dropout(0.4, name="out"),
        L.Dense(1),
    ])
    model.compile(optimizer="adam", loss="mse", jit_compile=BACKEND == "jax")
    return model


def _seed_states(model):
    out = []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        for gen in getattr(layer, "_seed_generators", []) or []:
            out.append(_np(gen.state.value))
    return out


def _train(model, x, y):
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    model.train_on_batch(x[:4], y[:4])
    model.train_on_batch(x[4:8], y[4:8])


def _rng_state():
    if BACKEND == "torch":
        import torch

        return torch.get_rng_state().numpy()
    return np.zeros(0)


def fit(workdir):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, T, F)).astype(np.float32)
    y = rng.normal(size=(N, 1)).astype(np.float32)
    plain = _model()
    _train(plain, x, y)
    rng_plain = _rng_state()
    recorded = _model()
    path = os.path.join(workdir, f"fit_{BACKEND}.h5")
    with dropspy.record(recorded, path) as rec:
        _train(recorded, x, y)
        # Compiled traces kept on the host (JAX: one per batch shape; torch: eager, none).
        traces = len(rec.adapter._traces)
    rng_recorded = _rng_state()
    weights = [bool(np.array_equal(_np(a.value).view(np.uint8), _np(b.value).view(np.uint8)))
               for a, b in zip(plain.weights, recorded.weights)]
    sa, sb = _seed_states(plain), _seed_states(recorded)
    run = dropspy.load(path)
    return {
        "backend": run.attrs["backend"],
        "n_weights": len(weights),
        "weights_equal": all(weights),
        "n_seed_states": len(sa),
        "seed_states_equal": len(sa) == len(sb) and all(
            np.array_equal(a, b) for a, b in zip(sa, sb)),
        "global_rng_equal": bool(np.array_equal(rng_plain, rng_recorded)),
        "records": {name: len(site) for name, site in run.items()},
        "steps": {name: site.steps.tolist() for name, site in run.items()},
        "opaque": [name for name, site in run.items() if site.opaque],
        "dropped": {k: v for k, v in run.records_dropped.items() if v},
        "complete": bool(run.complete),
        "traces": traces,
    }


def _probe():
    keras.utils.set_random_seed(1)
    inp = keras.Input((T, F))
    outs = [L.Dropout(0.5, name="plain")(inp), L.SpatialDropout1D(0.3, name="spatial")(inp),
            L.Dropout(0.25, seed=7, name="seeded")(inp)]

    class Probe(keras.Model):
        if BACKEND == "jax":
            def train_step(self, state, data):
                tv, ntv, ov, mv = state
                x = data[0]
                ys, ntv = self.stateless_call(tv, ntv, x, training=True)
                return {"x": x, **{f"y{i}": t for i, t in enumerate(ys)}}, (tv, ntv, ov, mv)
        else:
            def train_step(self, data):
                x = data[0]
                ys = self(x, training=True)
                return {"x": x, **{f"y{i}": t for i, t in enumerate(ys)}}

    model = Probe(inp, outs)
    model.compile(optimizer="sgd", jit_compile=BACKEND == "jax")
    return model


def _planted(shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32)
    x[rng.random(shape) < 0.15] = 0.0
    x[rng.random(shape) < 0.15] = -0.0
    return x


def _expected(x, noise, rate, formula):
    """The backend's own dropout arithmetic on ``x`` and the recorded keep-noise."""
    keep_prob = 1.0 - rate
    mask = np.broadcast_to(noise, x.shape)
    if BACKEND == "jax":
        import jax

        fn = jax.jit(lambda a, m: jax.lax.select(m, a / keep_prob, jax.numpy.zeros_like(a)))
        return np.asarray(fn(x, mask))
    import torch

    t = torch.from_numpy(x.copy())
    m = torch.from_numpy(np.array(mask))
    if formula == "F.dropout":   # ATen's _dropout: noise.bernoulli_(1-p).div_(1-p); x * noise
        return (t * m.to(t.dtype).div_(1.0 - rate)).numpy()
    return torch.where(m, t / keep_prob, torch.zeros_like(t)).numpy()


def exact(workdir):
    model = _probe()
    path = os.path.join(workdir, f"exact_{BACKEND}.h5")
    xs = [_planted((8, T, F), s) for s in range(3)]
    logs = []
    with dropspy.record(model, path):
        for x in xs:
            out = model.train_on_batch(x, np.zeros((8, 1), np.float32), return_dict=True)
            logs.append({k: np.asarray(v) for k, v in out.items()})
    run = dropspy.load(path)
    # Which formula each layer's draw follows on torch (see capture_torch's module doc).
    formulas = {"plain": "F.dropout", "spatial": "bernoulli", "seeded": "bernoulli"}
    result = {"sites": sorted(run), "checks": {}}
    for i, name in enumerate(("plain", "spatial", "seeded")):
        site = run[name]
        ok = []
        kept_zero = False
        for step, (x, lg) in enumerate(zip(xs, logs)):
            np.testing.assert_array_equal(lg["x"], x)
            noise = site.noise(step)
            mask = site.mask(step)
            want = _expected(x, noise, site.rate, formulas[name])
            got = lg[f"y{i}"].astype(np.float32)
            ok.append(bool(np.array_equal(got.view(np.uint32), want.view(np.uint32))))
            kept_zero |= bool(np.any(mask & (x == 0)))
        result["checks"][name] = {"exact": ok, "kept_zeros": kept_zero,
                                  "noise_shape": list(site.noise(0).shape),
                                  "keep_fraction": float(np.mean(site.mask(0)))}
    return result


if __name__ == "__main__":
    scenarios, workdir = sys.argv[1].split(","), sys.argv[2]
    table = {"fit": fit, "exact": exact}
    print("DRIVER-RESULT " + json.dumps({name: table[name](workdir) for name in scenarios}))
