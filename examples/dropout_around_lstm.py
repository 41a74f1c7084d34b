"""Dropout before or after an LSTM: what is the difference? Answered with recorded masks.

The usual answer to that question (for an input of shape (batch, steps, features) and
``LSTM(10)``) makes six claims. This script builds each configuration as a small Keras model,
trains it for a few steps on generated data while dropspy records every dropout mask, and
prints, claim by claim, what the recorded masks show and whether the claim holds:

1. Plain ``Dropout`` has no privileged axis: different features for each step and each sample.
2. ``noise_shape=(1, steps, 1)`` drops time steps; ``(1, 1, features)`` drops features;
   ``(None, 1, 1)`` drops whole samples.
3. ``SpatialDropout1D`` drops the same features at every time step, differently per sample.
   (3': a second answer says it drops entire time steps instead.)
4. ``Dropout`` after ``LSTM(10)`` (output (None, 10)) drops features per sample, as in a
   dense network.
5. ``LSTM(dropout=...)`` draws 4 different masks, one for the input of each gate.
   (5': the input mask is the same at every time step of a sequence.)
6. ``recurrent_dropout`` draws 4 masks applied to the state at each step of the recurrence.
   (6': read as "a new mask at each time step".)

No verdict is written in this file: each comes from ``dropspy.analysis.analyze_run`` on the
run file just recorded, so on another Keras/TensorFlow version (``TF_USE_LEGACY_KERAS=1`` for
Keras 2) the same script prints that version's truth.

Run:
    python examples/dropout_around_lstm.py [--out DIR] [--small] [--backend jax]

``--backend tensorflow|jax|torch`` picks Keras 3's backend (it sets ``KERAS_BACKEND`` before
Keras is imported); the verdicts are the same on all three.

It writes one run file per configuration, ``verdicts.json`` and PNG pictures into ``--out``
(default ``out/dropout_around_lstm``); look at any run with ``dropspy inspect <file>``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

STARTED = time.perf_counter()
# TensorFlow's own C++ log lines (oneDNN, CUDA probing) are not dropspy's: hide what can be
# hidden (a few lines printed before TensorFlow reads this setting still show).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
BACKENDS = ("tensorflow", "jax", "torch")


def _backend_from_argv() -> str:
    """``--backend`` read before Keras is imported: Keras fixes its backend at import."""
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):
        if arg.startswith("--backend="):
            return arg.split("=", 1)[1]
        if arg == "--backend" and i + 1 < len(argv):
            return argv[i + 1]
    return os.environ.get("KERAS_BACKEND", "tensorflow")


BACKEND = _backend_from_argv()
if BACKEND in BACKENDS:
    os.environ["KERAS_BACKEND"] = BACKEND
if BACKEND == "torch":
    import torch  # noqa: F401  (torch before tensorflow in one process)

import numpy as np

import dropspy
from dropspy.analysis import RunAnalysis, analyze_run

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _evidence import (
    Verdict,
    axes_verdict,
    draw_overview,
    gate_masks_verdict,
    mask_panels,
    over_time_verdict,
    parse_args,
    print_table,
    sites_of,
    write_verdicts,
)

if BACKEND == "tensorflow":
    import tensorflow as tf

    # tf.keras is Keras 3 by default and tf_keras (Keras 2) under TF_USE_LEGACY_KERAS=1.
    keras = tf.keras
else:
    import keras
L = keras.layers

STEPS, FEATURES, UNITS, RATE = 20, 8, 10, 0.5


def configurations() -> dict[str, Callable[[], list]]:
    """Each configuration of the question: the layers between the input and ``Dense(1)``.

    Factories, so that each model's layers (and their seed generators) are made after the
    global seed is set: every run is then reproducible on its own.
    """
    return {
        "dropout_before_lstm": lambda: [L.Dropout(RATE, name="dropout"),
                                        L.LSTM(UNITS, name="lstm")],
        "noise_shape_steps": lambda: [L.Dropout(RATE, noise_shape=(1, STEPS, 1), name="dropout"),
                                      L.LSTM(UNITS, name="lstm")],
        "noise_shape_features": lambda: [L.Dropout(RATE, noise_shape=(1, 1, FEATURES),
                                                   name="dropout"), L.LSTM(UNITS, name="lstm")],
        "noise_shape_samples": lambda: [L.Dropout(RATE, noise_shape=(None, 1, 1), name="dropout"),
                                        L.LSTM(UNITS, name="lstm")],
        "spatial_dropout1d": lambda: [L.SpatialDropout1D(RATE, name="spatial_dropout1d"),
                                      L.LSTM(UNITS, name="lstm")],
        "dropout_after_lstm": lambda: [L.LSTM(UNITS, name="lstm"), L.Dropout(RATE, name="dropout")],
        "lstm_dropout": lambda: [L.LSTM(UNITS, dropout=RATE, name="lstm")],
        "lstm_recurrent_dropout": lambda: [L.LSTM(UNITS, recurrent_dropout=RATE, name="lstm")],
        "lstm_both": lambda: [L.LSTM(UNITS, dropout=RATE, recurrent_dropout=RATE, name="lstm")],
    }


LABELS = {  # picture row labels: claim number and configuration
    "dropout_before_lstm": "1  Dropout -> LSTM",
    "noise_shape_steps": f"2a Dropout(noise_shape\n=(1, {STEPS}, 1))",
    "noise_shape_features": f"2b Dropout(noise_shape\n=(1, 1, {FEATURES}))",
    "noise_shape_samples": "2c Dropout(noise_shape\n=(None, 1, 1))",
    "spatial_dropout1d": "3  SpatialDropout1D",
    "dropout_after_lstm": "4  LSTM -> Dropout",
    "lstm_dropout": "5  LSTM(dropout)",
    "lstm_recurrent_dropout": "6  LSTM(recurrent_dropout)",
    "lstm_both": "5, 6  LSTM(dropout,\nrecurrent_dropout)",
}


def record_all(out, samples: int, batch: int) -> dict[str, str]:
    """Train every configuration for one epoch while recording; return name -> run file."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, STEPS, FEATURES)).astype("float32")
    y = rng.normal(size=(samples, 1)).astype("float32")
    files = {}
    for name, layers in configurations().items():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((STEPS, FEATURES)), *layers(), L.Dense(1)],
                                 name=name)
        model.compile(optimizer="adam", loss="mse")
        path = out / f"{name}.h5"
        with dropspy.record(model, path):
            model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
        files[name] = path
    return files


def judge(files: dict[str, str], an: dict[str, RunAnalysis]) -> list[Verdict]:
    """Every claim, judged on the analysis of the run file that answers it."""
    runs = {name: dropspy.load(path) for name, path in files.items()}
    f = {name: os.path.basename(str(path)) for name, path in files.items()}
    v = [
        axes_verdict("1", "Dropout before LSTM: no privileged axis (sample, step and "
                     "feature dropped independently)", f["dropout_before_lstm"],
                     an["dropout_before_lstm"], "dropout", shared=()),
        axes_verdict("2a", "noise_shape=(1, steps, 1) drops time steps", f["noise_shape_steps"],
                     an["noise_shape_steps"], "dropout", shared=("batch", "feature")),
        axes_verdict("2b", "noise_shape=(1, 1, features) drops features",
                     f["noise_shape_features"], an["noise_shape_features"], "dropout",
                     shared=("batch", "time")),
        axes_verdict("2c", "noise_shape=(None, 1, 1) drops whole samples",
                     f["noise_shape_samples"], an["noise_shape_samples"], "dropout",
                     shared=("time", "feature")),
        axes_verdict("3", "SpatialDropout1D drops the same features at every step, "
                     "differently per sample", f["spatial_dropout1d"], an["spatial_dropout1d"],
                     "spatial_dropout1d", shared=("time",)),
        axes_verdict("3'", "SpatialDropout1D drops entire time steps", f["spatial_dropout1d"],
                     an["spatial_dropout1d"], "spatial_dropout1d", shared=("feature",)),
        axes_verdict("4", "Dropout after LSTM(10) (None, 10): per sample and feature, as "
                     "in a dense net", f["dropout_after_lstm"], an["dropout_after_lstm"],
                     "dropout", shared=()),
    ]
    for name, label in (("lstm_dropout", "LSTM(dropout)"),
                        ("lstm_both", "LSTM(dropout, recurrent_dropout)")):
        v.append(gate_masks_verdict("5", f"{label}: 4 different input masks, one per gate",
                                    f[name], runs[name], an[name], "lstm", "input", want=4))
    # Where Keras 3 (one mask before the time loop) and Keras 2 (tf_keras: a mask over the
    # whole (batch, time, feature) input) part ways; judged from the time axis verdict.
    v.append(over_time_verdict("5'", "LSTM(dropout): the same input mask at every time step",
                               f["lstm_dropout"], an["lstm_dropout"], "lstm", "input",
                               want="constant"))
    for name, label in (("lstm_recurrent_dropout", "LSTM(recurrent_dropout)"),
                        ("lstm_both", "LSTM(dropout, recurrent_dropout)")):
        v.append(gate_masks_verdict("6", f"{label}: 4 masks on the state, applied at each "
                                    "step of the recurrence", f[name], runs[name], an[name],
                                    "lstm", "recurrent", want=4, steps=STEPS))
    v.append(over_time_verdict("6'", "recurrent_dropout: a new mask at each time step",
                               f["lstm_recurrent_dropout"], an["lstm_recurrent_dropout"],
                               "lstm", "recurrent", want="resampled"))
    for run in runs.values():
        run.close()
    return v


def pictures(out, files: dict[str, str], an: dict[str, RunAnalysis],
             details: bool = True) -> list:
    """An overview PNG (feature down, time across) and, with ``details``, one PNG per site."""
    from dropspy.plot import find_record, plot_site

    rows = []
    for name, path in files.items():
        analysis = an[name]
        with dropspy.load(path) as run:
            for role in ("output", "input", "recurrent"):
                found = [s for s in sites_of(analysis, "dropout", role)
                         + sites_of(analysis, "spatial_dropout1d", role)
                         + sites_of(analysis, "lstm", role) if s.applied_records]
                if not found:
                    continue
                label = LABELS[name] + ("" if role == "output" else f"\n{role} mask")
                if len(found) == 1:
                    site = run[found[0].site]
                    panels = mask_panels(site.axes, site.mask(find_record(site)))
                    if found[0].gates is not None and found[0].gates.verdict == "identical":
                        label += "\n(one for all gates)"
                else:  # one sample, the gates side by side
                    label += "s, sample 0"
                    gates = [run[s.site] for s in found]
                    panels = [(f"gate {g.gate}", *rest) for g in gates
                              for _, *rest in mask_panels(g.axes, g.mask(find_record(g)),
                                                          samples=1)]
                rows.append((label, panels))
                if details:
                    plot_site(run, found[0].site, out / f"{name}.{role}.png")
    title = (f"Dropout masks recorded by dropspy at the first training step, Keras "
             f"{_version()}: white = kept, black = dropped")
    return [draw_overview(rows, out / "overview.png", title)]


def _version() -> str:
    if getattr(keras, "__name__", "").startswith("tf_keras"):  # Keras 2 through tf.keras
        import tf_keras

        return tf_keras.__version__
    return keras.__version__


def _engine() -> tuple[str, str]:
    """The backend with its version, and the device kind it trains on."""
    if BACKEND == "jax":
        import jax

        return f"JAX {jax.__version__}", jax.devices()[0].platform.upper()
    if BACKEND == "torch":
        import torch

        return f"torch {torch.__version__}", "GPU" if torch.cuda.is_available() else "CPU"
    return (f"TensorFlow {tf.__version__}",
            "GPU" if tf.config.list_physical_devices("GPU") else "CPU")


def main() -> int:
    args = parse_args(__doc__.splitlines()[0], "dropout_around_lstm", backends=BACKENDS)
    samples, batch = (64, 16) if args.small else (256, 32)
    version = _version()
    engine, device = _engine()
    print(f"Dropout before or after an LSTM? Masks recorded by dropspy on Keras {version} "
          f"({engine}, {device}).")
    print(f"Input (batch={batch}, steps={STEPS}, features={FEATURES}), LSTM({UNITS}), rate "
          f"{RATE}, {samples // batch} training steps per configuration.\n", flush=True)
    files = record_all(args.out, samples, batch)
    analyses = {}
    for name, path in files.items():
        with dropspy.load(path) as run:
            analyses[name] = analyze_run(run)
    verdicts = judge(files, analyses)
    print_table(verdicts)
    write_verdicts(args.out, verdicts, {"framework": "keras", "keras_version": version,
                                        "backend": BACKEND, "engine": engine,
                                        "steps": STEPS, "features": FEATURES, "batch": batch,
                                        "training_steps": samples // batch})
    if not args.no_pictures:
        pictures(args.out, files, analyses, details=not args.small)
    print(f"\nRun files, verdicts.json and pictures: {args.out}  "
          f"({time.perf_counter() - STARTED:.0f} s)")
    print(f"Look closer: dropspy inspect {args.out / 'spatial_dropout1d.h5'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
