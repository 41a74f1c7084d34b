"""Re-entering record() on a Keras 3 model reuses its recording step functions (TF backend).

Traces are counted by a real observable: the Python body of the model's ``train_step`` runs
once per trace of a compiled train function (and never when a traced function runs). The JAX
and torch backends: ``test_keras_backends.py`` (scenario ``reattach``).
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":  # pragma: no cover
    pytest.skip("the Keras adapter tests need the TensorFlow backend", allow_module_level=True)

from _keras_util import assert_dropout_exact, make_probe, planted, seed_states

import dropspy

L = keras.layers
N, T, F = 8, 5, 3


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(N, T, F)).astype(np.float32), rng.normal(size=(N, 1)).astype(np.float32)


def _model(jit=False, seed=0, spe=1, rnn=None):
    """SpatialDropout1D, LSTM(dropout, recurrent_dropout) (``rnn``, by default in graph mode
    only: XLA compiles of LSTM loops take ~15 s here), Dropout, Dense; ``model.traces()``
    counts train_step bodies run."""
    rnn = not jit if rnn is None else rnn
    keras.utils.set_random_seed(seed)
    inp = keras.Input((T, F))
    x = L.SpatialDropout1D(0.3, name="sd")(inp)
    x = L.Dense(4, name="proj")(x)
    x = L.Flatten()(x) if not rnn else L.LSTM(4, dropout=0.3, recurrent_dropout=0.2, name="lstm")(x)
    out = L.Dense(1, name="head")(L.Dropout(0.5, name="out")(x))
    counter = [0]

    class Counting(keras.Model):
        def train_step(self, data):
            counter[0] += 1   # Python runs here once per trace (never per compiled step)
            return super().train_step(data)

    model = Counting(inp, out)
    model.compile(optimizer="adam", loss="mse", jit_compile=jit, steps_per_execution=spe)
    object.__setattr__(model, "traces", lambda: counter[0])
    return model


def _bits(v):
    return np.asarray(v).view(np.uint32)


def _same_training_state(a, b):
    for va, vb in zip(a.weights, b.weights):
        np.testing.assert_array_equal(_bits(va.numpy()), _bits(vb.numpy()), err_msg=va.path)
    for va, vb in zip(a.optimizer.variables, b.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(va.numpy()), np.asarray(vb.numpy()))
    sa, sb = seed_states(a), seed_states(b)
    assert len(sa) == len(sb) >= 2
    for va, vb in zip(sa, sb):
        np.testing.assert_array_equal(va, vb)


def _session(model, tmp_path, mode):
    """Three short record() contexts with un-recorded fit/train_on_batch/evaluate between
    (``mode=None``: the same calls, never recorded).

    Returns the train_step traces per context and outside the contexts.
    """
    x, y = _data()
    model.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    inside, outside = [], 0
    for i in range(3):
        before = model.traces()
        if mode is None:
            model.fit(x, y, batch_size=4, shuffle=False, verbose=0)
            model.evaluate(x, y, batch_size=4, verbose=0)
        else:
            with dropspy.record(model, tmp_path / f"{mode}{i}.h5"):
                model.fit(x, y, batch_size=4, shuffle=False, verbose=0)
                model.evaluate(x, y, batch_size=4, verbose=0)
        inside.append(model.traces() - before)
        before = model.traces()
        model.fit(x, y, batch_size=4, shuffle=False, verbose=0)
        model.train_on_batch(x[:4], y[:4])
        model.evaluate(x, y, batch_size=4, verbose=0)
        outside += model.traces() - before
    return inside, outside


@pytest.fixture(scope="module", params=[False, True], ids=["graph", "xla"])
def sessions(request, tmp_path_factory):
    """The same seeded model trained three ways (see :func:`_session`)."""
    tmp = tmp_path_factory.mktemp("reattach")
    models, traces = {}, {}
    for mode in (None, "kept"):
        models[mode] = _model(jit=request.param)
        traces[mode] = _session(models[mode], tmp, mode)
    return models, traces, tmp


def test_second_and_third_record_do_not_retrace_the_train_step(sessions):
    models, traces, _ = sessions
    inside, outside = traces["kept"]
    assert inside[0] >= 1 and inside[1:] == [0, 0]
    # Outside record() the model's own functions run as they would without dropspy: traced
    # as often (train_on_batch's first call traces its own step), never again per context.
    assert outside == traces[None][1]


def test_training_across_contexts_and_unrecorded_fits_is_bit_identical(sessions):
    models, _, _ = sessions
    _same_training_state(models[None], models["kept"])


def test_each_context_writes_every_site_and_step_to_its_own_file(sessions):
    _, _, tmp = sessions
    runs = [dropspy.load(tmp / f"kept{i}.h5") for i in range(3)]
    previous = None
    for run in runs:
        assert run.complete and set(run) == set(runs[0]) and len(run) >= 2
        assert sum(run.records_dropped.values()) == 0
        for site in run.values():
            # fit's 2 train steps from 0 in every file; the LSTM also draws (unapplied) masks
            # in evaluate's 2 batches, at step 2: the kept test function records too.
            want = [0, 1, 2, 2] if site.layer == "lstm" else [0, 1]
            assert site.steps.tolist() == want, site.name
        mask = run["out"].mask(0)
        if previous is not None:   # training went on: not the last context's masks again
            assert not np.array_equal(mask, previous)
        previous = mask


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_masks_of_the_second_context_are_exact_and_go_to_the_second_file(jit, tmp_path):
    model = make_probe(L.Dropout(0.5, name="drop"), jit=jit)
    x = planted((8, 6, 4), seed=4)
    zeros = np.zeros((8, 1), np.float32)
    with dropspy.record(model, tmp_path / "a.h5"):
        model.train_on_batch(x, zeros)
    traced = model._dropspy_kept.traced
    with dropspy.record(model, tmp_path / "b.h5"):
        logs = model.train_on_batch(x, zeros, return_dict=True)
        logs2 = model.train_on_batch(x, zeros, return_dict=True)
    assert model._dropspy_kept.traced == traced >= 1     # no new trace in the second context
    with dropspy.record(model, tmp_path / "c.h5"):
        # Another batch size: the kept function traces again, for the adapter of this context.
        logs3 = model.train_on_batch(x[:5], zeros[:5], return_dict=True)
    assert model._dropspy_kept.traced > traced
    site3 = dropspy.load(tmp_path / "c.h5")["drop"]
    assert site3.steps.tolist() == [0]
    assert_dropout_exact(np.asarray(logs3["x"]), np.asarray(logs3["y"]), site3.mask(0),
                         site3.scale)
    a, b = dropspy.load(tmp_path / "a.h5"), dropspy.load(tmp_path / "b.h5")
    assert len(a["drop"]) == 1 and b["drop"].steps.tolist() == [0, 1]
    site = b["drop"]
    assert_dropout_exact(np.asarray(logs["x"]), np.asarray(logs["y"]), site.mask(0), site.scale)
    assert_dropout_exact(np.asarray(logs2["x"]), np.asarray(logs2["y"]), site.mask(1),
                         site.scale)
    assert not np.array_equal(a["drop"].mask(0), site.mask(0))


def test_recompiling_between_contexts_drops_the_kept_function(tmp_path):
    x, y = _data()
    plain, model = _model(), _model()
    for m in (plain, model):
        m.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    with dropspy.record(model, tmp_path / "a.h5"):
        model.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    kept_before = model._dropspy_kept.compiled["train"]
    for m in (plain, model):   # another optimizer: the old function would train with Adam
        m.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    before = model.traces()
    with dropspy.record(model, tmp_path / "b.h5"):
        model.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    assert model.traces() > before
    assert model._dropspy_kept.compiled["train"] is not kept_before
    _same_training_state(plain, model)
    assert dropspy.load(tmp_path / "b.h5")["out"].steps.tolist() == [0, 1]


def test_a_session_selecting_other_sites_gets_a_fresh_trace_with_their_masks(tmp_path):
    x, y = _data()
    model = _model()
    with dropspy.record(model, tmp_path / "a.h5", sites=["out"]):
        model.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    assert set(dropspy.load(tmp_path / "a.h5")) == {"out"}
    before = model.traces()
    with dropspy.record(model, tmp_path / "b.h5"):
        model.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    assert model.traces() > before   # sd and lstm were left out of the first trace
    b = dropspy.load(tmp_path / "b.h5")
    assert {"out", "sd", "lstm/input/i"} <= set(b)
    assert all(site.steps.tolist() == [0, 1] for site in b.values())


def test_leaving_record_keeps_no_session_writer_or_adapter_alive(tmp_path):
    x, y = _data()
    model = _model()
    rec = dropspy.record(model, tmp_path / "a.h5")
    with rec:
        model.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    refs = [weakref.ref(o) for o in (rec.adapter, rec.session, rec.writer)]
    del rec
    gc.collect()
    assert [r() for r in refs] == [None, None, None]
    assert model._dropspy_kept.current() is None
    with dropspy.record(model, tmp_path / "b.h5"):   # the kept function, a new file
        model.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    assert dropspy.load(tmp_path / "b.h5")["out"].steps.tolist() == [0, 1]


def test_steps_per_execution_2_records_every_inner_step_of_each_context_without_retrace(
        tmp_path):
    x, y = _data()
    plain, model = _model(spe=2, rnn=False), _model(spe=2, rnn=False)
    for m in (plain, model):   # 4 steps of 2 samples: 2 executions of 2 inner steps
        m.fit(x, y, batch_size=2, shuffle=False, verbose=0)
    traces, masks = [], []
    for i in range(2):
        before = model.traces()
        with dropspy.record(model, tmp_path / f"{i}.h5"):
            model.fit(x, y, batch_size=2, shuffle=False, verbose=0)
        plain.fit(x, y, batch_size=2, shuffle=False, verbose=0)
        traces.append(model.traces() - before)
        run = dropspy.load(tmp_path / f"{i}.h5")
        assert set(run) == {"sd", "out"} and sum(run.records_dropped.values()) == 0
        assert all(site.steps.tolist() == [0, 1, 2, 3] for site in run.values())
        masks.append(run["out"].mask(0))
    assert traces[0] >= 1 and traces[1] == 0
    assert not np.array_equal(masks[0], masks[1])
    _same_training_state(plain, model)


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_monte_carlo_predict_in_a_second_context_is_exact_with_no_new_trace(jit, tmp_path):
    class MCDropout(L.Dropout):
        def call(self, inputs, training=None):
            return super().call(inputs, training=True)

    inp = keras.Input((16,))
    model = keras.Model(inp, MCDropout(0.5, name="mc")(inp))
    model.compile(optimizer="sgd", loss="mse", jit_compile=jit)
    x = planted((6, 16), seed=2)
    with dropspy.record(model, tmp_path / "a.h5"):
        model.predict(x, batch_size=3, verbose=0)
    kept = model._dropspy_kept
    traced, function = kept.traced, kept.compiled["predict"]
    model.predict(x, batch_size=3, verbose=0)          # the model's own function between
    with dropspy.record(model, tmp_path / "b.h5"):
        y = model.predict(x, batch_size=3, verbose=0)
    assert kept.traced == traced and kept.compiled["predict"] is function
    site = dropspy.load(tmp_path / "b.h5")["mc"]
    assert len(site) == 2 and site.applied.all()
    for i in range(2):
        assert_dropout_exact(x[3 * i:3 * i + 3], y[3 * i:3 * i + 3], site.mask(i), site.scale)
