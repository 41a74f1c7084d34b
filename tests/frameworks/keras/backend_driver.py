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
    dataparallel: (JAX, 2 host devices via XLA_FLAGS) keras.distribution.DataParallel: fit
           bit-identical with and without dropspy and no collective added to the compiled
           step; masks equal to a single-device run's, batch-sharded as the root attribute
           says, exact against the outputs with planted zeros; ModelParallel refused.
    mirrored: (TensorFlow) MirroredStrategy over 2 logical CPUs: fit bit-identical with and
           without dropspy, masks per replica, and Monte Carlo dropout in predict checked
           per replica against each replica's half of the batch.
    reattach: three record() contexts on one model with un-recorded fits between: train
           step traces per context (the kept recording functions), bit-identical training,
           masks equal to those of a model traced afresh in every context.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

if os.environ.get("KERAS_BACKEND") == "torch":
    import torch  # noqa: F401  (torch before tensorflow in one process)
if "mirrored" in sys.argv[1]:
    # Two logical CPUs, configured before TensorFlow initialises its devices.
    import tensorflow as tf

    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        _cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras

import dropspy

L = keras.layers
BACKEND = keras.backend.backend()
N, T, F = 14, 6, 4


def _np(v):
    return np.asarray(keras.ops.convert_to_numpy(v))


def _model(seed=3, spe=1):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((T, F)),
        L.SpatialDropout1D(0.3, name="sd"),
        L.LSTM(5, dropout=0.3, recurrent_dropout=0.2, name="lstm"),
        L.Dropout(0.4, name="out"),
        L.Dense(1),
    ])
    model.compile(optimizer="adam", loss="mse", jit_compile=BACKEND == "jax",
                  steps_per_execution=spe)
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
    from dropspy.frameworks import find_adapter

    torch_claims = None
    if BACKEND == "torch":   # every Keras layer is a torch.nn.Module here
        from dropspy.frameworks.torch import TorchAdapter

        torch_claims = TorchAdapter.claims(recorded)
    return {
        "claimed_by": find_adapter(recorded).__name__,
        "torch_adapter_claims": torch_claims,
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


def _probe_steps(model, path):
    """Three recorded train steps of the probe on planted inputs: (inputs, step logs)."""
    xs = [_planted((8, T, F), s) for s in range(3)]
    logs = []
    with dropspy.record(model, path):
        for x in xs:
            out = model.train_on_batch(x, np.zeros((8, 1), np.float32), return_dict=True)
            logs.append({k: np.asarray(v) for k, v in out.items()})
    return xs, logs


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
    xs, logs = _probe_steps(model, path)
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


def spe(workdir):
    """steps_per_execution=4: every inner step's masks equal the spe=1 run's, bit-identical."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, T, F)).astype(np.float32)
    y = rng.normal(size=(20, 1)).astype(np.float32)

    def train(model):   # 10 steps of 2: executions of 4, 4 and 2 steps
        model.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0)

    runs, models = {}, {}
    for k in (1, 4):
        models[k] = _model(spe=k)
        path = os.path.join(workdir, f"spe{k}_{BACKEND}.h5")
        with dropspy.record(models[k], path):
            train(models[k])
        runs[k] = dropspy.load(path)
    plain = _model(spe=4)
    train(plain)
    same, total = 0, 0
    for name in runs[1]:
        a, b = runs[1][name], runs[4][name]
        for i in range(min(len(a), len(b))):
            total += 1
            same += bool(a.steps[i] == b.steps[i] and np.array_equal(a.mask(i), b.mask(i)))
    weights = [bool(np.array_equal(_np(p.value).view(np.uint8), _np(q.value).view(np.uint8)))
               for p, q in zip(plain.weights, models[4].weights)]
    sa, sb = _seed_states(plain), _seed_states(models[4])
    return {
        "records": {k: {n: len(s) for n, s in r.items()} for k, r in runs.items()},
        "steps4": sorted(set(runs[4]["sd"].steps.tolist())),
        "same_masks": [same, total],
        "weights_equal": all(weights), "n_weights": len(weights),
        "seed_states_equal": len(sa) == len(sb) and all(
            np.array_equal(p, q) for p, q in zip(sa, sb)),
        "dropped": {k: v for k, v in runs[4].records_dropped.items() if v},
    }


_COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all",
                "reduce-scatter")


def _collectives(dump, name):
    """Collective ops in each optimized step module named ``jit_<name>`` of the XLA dump."""
    import glob
    import re

    out = []
    for f in sorted(glob.glob(os.path.join(dump, f"*.jit_{name}.cpu_after_optimizations.txt"))):
        text = open(f).read()
        out.append({c: len(re.findall(rf"(?<![\w-]){c}(?:-start)?\(", text))
                    for c in _COLLECTIVES})
    return out


def _row_blocks(arrays, n):
    """Per batch-sharded payload array: whether device k of the mesh holds rows block k."""
    import jax

    devices = list(jax.devices())[:n]
    ok = []
    for a in arrays:
        if a.shape[0] < n:
            continue   # a batch axis of 1 (a noise shape without the batch): on every device
        rows = a.shape[0] // n
        idx = a.sharding.devices_indices_map(a.shape)
        ok.append(all(idx[d][0] == slice(k * rows, (k + 1) * rows) or
                      (k * rows, (k + 1) * rows) == idx[d][0].indices(a.shape[0])[:2]
                      for k, d in enumerate(devices)))
    return ok


def dataparallel(workdir):
    """keras.distribution.DataParallel over 2 host devices (XLA_FLAGS set by the test)."""
    import jax

    from dropspy.store import validate_file

    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, T, F)).astype(np.float32)
    y = rng.normal(size=(N, 1)).astype(np.float32)
    dump = os.path.join(workdir, "hlo")
    dist = keras.distribution.DataParallel()
    keras.distribution.set_distribution(dist)
    plain = _model()
    _train(plain, x, y)
    recorded = _model()
    path = os.path.join(workdir, "dp.h5")
    blocks = []
    with dropspy.record(recorded, path) as rec:
        on_step = rec.adapter._on_step

        def spy(step, payload, *args, **kwargs):
            blocks.extend(_row_blocks(payload["bits"], 2))
            return on_step(step, payload, *args, **kwargs)

        rec.adapter._on_step = spy
        _train(recorded, x, y)
    weights = [bool(np.array_equal(_np(a.value).view(np.uint8), _np(b.value).view(np.uint8)))
               for a, b in zip(plain.weights, recorded.weights)]
    sa, sb = _seed_states(plain), _seed_states(recorded)
    collectives = {"plain": _collectives(dump, "train_step"),
                   "recorded": _collectives(dump, "step_fn")}
    run = dropspy.load(path)

    # The same model, seed and data on one device: the masks a single device draws.
    keras.distribution.set_distribution(None)
    single = _model()
    single_path = os.path.join(workdir, "single.h5")
    with dropspy.record(single, single_path):
        _train(single, x, y)
    one = dropspy.load(single_path)
    same, total, halves, pairs = 0, 0, 0, 0
    for name, site in run.items():
        for i in range(len(site)):
            total += 1
            same += bool(one[name].steps[i] == site.steps[i]
                         and np.array_equal(one[name].mask(i), site.mask(i)))
            m = site.mask(i)
            if m.shape[0] >= 2:
                pairs += 1
                half = m.shape[0] // 2
                halves += bool(np.array_equal(m[:half], m[half:2 * half]))
    single_weights_equal = all(
        np.array_equal(_np(a.value), _np(b.value)) for a, b in zip(plain.weights, single.weights))

    # Exactness: a probe returns each dropout's input and output from the sharded step.
    keras.distribution.set_distribution(dist)
    model = _probe()
    probe_path = os.path.join(workdir, "dp_exact.h5")
    xs, logs = _probe_steps(model, probe_path)
    prun = dropspy.load(probe_path)
    exact = {}
    for i, name in enumerate(("plain", "spatial", "seeded")):
        site = prun[name]
        ok, kept_zero = [], False
        for step, (xb, lg) in enumerate(zip(xs, logs)):
            mask = site.mask(step)
            want = _expected(xb, site.noise(step), site.rate, "")
            got = lg[f"y{i}"].astype(np.float32)
            ok.append(bool(np.array_equal(lg["x"], xb)
                           and np.array_equal(got.view(np.uint32), want.view(np.uint32))))
            kept_zero |= bool(np.any(mask & (xb == 0)))
        exact[name] = {"exact": ok, "kept_zeros": kept_zero}

    # A layout that may shard other axes than the batch: refused by name before recording.
    mesh = keras.distribution.DeviceMesh((1, 2), ["batch", "model"],
                                         keras.distribution.list_devices())
    keras.distribution.set_distribution(keras.distribution.ModelParallel(
        layout_map=keras.distribution.LayoutMap(mesh), batch_dim_name="batch"))
    refused = None
    try:
        with dropspy.record(_model(), os.path.join(workdir, "mp.h5")):
            pass
    except dropspy.UnsupportedModelError as exc:
        refused = str(exc)
    finally:
        keras.distribution.set_distribution(None)
    return {
        "devices": len(jax.devices()),
        "distribution": json.loads(run.attrs["distribution"]),
        "problems": validate_file(path),
        "n_weights": len(weights), "weights_equal": all(weights),
        "n_seed_states": len(sa),
        "seed_states_equal": len(sa) == len(sb) and all(
            np.array_equal(a, b) for a, b in zip(sa, sb)),
        "collectives": collectives,
        "row_blocks": [sum(blocks), len(blocks)],
        "records": {name: len(site) for name, site in run.items()},
        "replicas": sorted({int(r) for site in run.values() for r in site.replicas}),
        "same_as_single_device": [same, total],
        "single_device_weights_equal": single_weights_equal,
        "halves_identical": [halves, pairs],
        "exact": exact,
        "dropped": {k: v for k, v in run.records_dropped.items() if v},
        "model_parallel_refused": refused,
    }


def _counting_model(seed=5):
    """A small model whose ``traces()`` counts train_step bodies run (once per jit trace)."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((T, F))
    x = L.Dense(4)(L.SpatialDropout1D(0.3, name="sd")(inp))
    out = L.Dense(1)(L.Dropout(0.4, name="out")(L.Flatten()(x)))
    counter = [0]

    class Counting(keras.Model):
        def train_step(self, *args):
            counter[0] += 1
            return super().train_step(*args)

    model = Counting(inp, out)
    model.compile(optimizer="adam", loss="mse", jit_compile=BACKEND == "jax")
    return model, lambda: counter[0]


def reattach(workdir):
    """Three record() contexts on one model, un-recorded fits between: traces per context,
    bit-identical training, and masks equal to a model traced afresh in every context."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, T, F)).astype(np.float32)
    y = rng.normal(size=(8, 1)).astype(np.float32)
    models, inside, runs = {}, {}, {}
    for mode in ("plain", "kept", "fresh"):
        model, traces = models[mode] = _counting_model()
        model.fit(x, y, batch_size=4, shuffle=False, verbose=0)
        inside[mode], runs[mode] = [], []
        for i in range(3):
            before = traces()
            if mode == "plain":
                model.fit(x, y, batch_size=4, shuffle=False, verbose=0)
            else:
                if mode == "fresh":   # as every context was before the functions were kept
                    model.__dict__.pop("_dropspy_kept", None)
                path = os.path.join(workdir, f"reattach_{mode}{i}.h5")
                with dropspy.record(model, path):
                    model.fit(x, y, batch_size=4, shuffle=False, verbose=0)
                runs[mode].append(dropspy.load(path))
            inside[mode].append(traces() - before)
            model.fit(x, y, batch_size=4, shuffle=False, verbose=0)
            model.train_on_batch(x[:4], y[:4])
    plain, kept = models["plain"][0], models["kept"][0]
    weights = [_np(a.value).tobytes() == _np(b.value).tobytes()
               for a, b in zip(plain.weights + plain.optimizer.variables,
                               kept.weights + kept.optimizer.variables)]
    sa, sb = _seed_states(plain), _seed_states(kept)
    same = [all(len(a[n]) == len(b[n]) and all(np.array_equal(a[n].noise(k), b[n].noise(k))
                                                 for k in range(len(a[n]))) for n in a)
            and set(a) == set(b) for a, b in zip(runs["kept"], runs["fresh"])]
    return {
        "traces": {"kept": inside["kept"], "fresh": inside["fresh"]},
        "weights_equal": all(weights), "n_weights": len(weights),
        "seed_states_equal": len(sa) == len(sb) > 0 and all(
            np.array_equal(a, b) for a, b in zip(sa, sb)),
        "masks_equal_fresh": same,
        "steps": [{n: r[n].steps.tolist() for n in r} for r in runs["kept"]],
        "differ_between_contexts": not np.array_equal(runs["kept"][0]["out"].mask(0),
                                                      runs["kept"][1]["out"].mask(0)),
    }


def _mirrored_model(strategy, seed=3):
    with strategy.scope():
        return _model(seed)


def mirrored(workdir):
    """2 replicas (2 logical CPUs): fit, bit-identical; masks per replica; MC predict exact."""
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, T, F)).astype(np.float32)
    y = rng.normal(size=(16, 1)).astype(np.float32)

    def train(model):
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)

    plain = _mirrored_model(strategy)
    train(plain)
    recorded = _mirrored_model(strategy)
    path = os.path.join(workdir, "mirrored.h5")
    with dropspy.record(recorded, path):
        train(recorded)
    weights = [bool(np.array_equal(_np(a.value).view(np.uint8), _np(b.value).view(np.uint8)))
               for a, b in zip(plain.weights, recorded.weights)]
    sa, sb = _seed_states(plain), _seed_states(recorded)
    run = dropspy.load(path)
    per_replica, identical, total = {}, 0, 0
    for name, site in run.items():
        reps = site.replicas.tolist()
        per_replica[name] = {str(r): reps.count(r) for r in sorted(set(reps))}
        for step in sorted(set(site.steps.tolist())):
            idx = [i for i in range(len(site)) if site.steps[i] == step]
            by_rep = {int(site.replicas[i]): site.mask(i) for i in idx}
            if len(by_rep) == 2:
                total += 1
                identical += bool(np.array_equal(by_rep[0], by_rep[1]))

    # Monte Carlo dropout in predict: outputs are concatenated in replica order, so each
    # replica's half of the batch is checked against that replica's recorded mask.
    class MCDropout(L.Dropout):
        def call(self, inputs, training=None):
            return super().call(inputs, training=True)

    with strategy.scope():
        inp = keras.Input((T, F))
        mc = keras.Model(inp, MCDropout(0.5, name="mc")(inp))
        mc.compile(optimizer="sgd", loss="mse")
    xp = _planted((8, T, F), 5)
    mc_path = os.path.join(workdir, "mirrored_mc.h5")
    with dropspy.record(mc, mc_path):
        yp = mc.predict(xp, batch_size=8, verbose=0)
    mc_run = dropspy.load(mc_path)
    site = mc_run["mc"]
    exact, kept_zero = [], False
    for i in range(len(site)):
        r = int(site.replicas[i])
        xs, ys = xp[4 * r:4 * r + 4], yp[4 * r:4 * r + 4]
        m = site.mask(i)
        want = np.where(m, xs * np.float32(site.scale), np.float32(0)).astype(np.float32)
        exact.append(bool(np.array_equal(ys.view(np.uint32), want.view(np.uint32))))
        kept_zero |= bool(np.any(m & (xs == 0)))
    return {
        "weights_equal": all(weights), "n_weights": len(weights),
        "seed_states_equal": len(sa) == len(sb) and all(
            np.array_equal(a, b) for a, b in zip(sa, sb)),
        "n_seed_states": len(sa),
        "per_replica": per_replica,
        "identical_across_replicas": [identical, total],
        "mc_replicas": sorted(site.replicas.tolist()),
        "mc_exact": exact, "mc_kept_zeros": kept_zero,
        "dropped": {k: v for k, v in run.records_dropped.items() if v},
    }


if __name__ == "__main__":
    scenarios, workdir = sys.argv[1].split(","), sys.argv[2]
    table = {"fit": fit, "exact": exact, "mirrored": mirrored, "spe": spe,
             "dataparallel": dataparallel, "reattach": reattach}
    print("DRIVER-RESULT " + json.dumps({name: table[name](workdir) for name in scenarios}))
