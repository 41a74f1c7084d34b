"""dropspy's step overhead on Keras 3's three backends, steps_per_execution=4, 2 replicas
(TF MirroredStrategy) and 2 devices (JAX keras.distribution.DataParallel).

The model is issue 14's: ``Input(40, 32) -> SpatialDropout1D(0.2) -> LSTM(32, dropout=0.2,
recurrent_dropout=0.2) -> Dropout(0.2) -> Dense(1)``, batch 64, Adam, ``model.fit``. Each
backend runs in a child process (Keras fixes its backend at import). In each round the same
number of steps is fitted without and with recording (one ``record()`` context open across the
rounds, so a round measures the steady state), and the ratio of the two times is one paired
ratio; the table shows their median and quartiles. A ``record()`` entered on a model whose
train function exists rebuilds (retraces) it: the first fitted steps' extra time is reported
as ``attach_s``.

The JAX ``dataparallel`` case runs over 2 host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=2``, set for its child process only).

``--reattach`` measures instead what entering ``record()`` costs the first, second and third
time on one model whose train function exists (each context: enter, one ``fit``, exit; its
time minus the same model's plain ``fit`` just before), median over ``--rounds`` fresh models:
the first context traces the recording functions, later ones reuse them (``kept.py``).

Run:
    python benchmarks/bench_keras_backends.py [--rounds 7] [--steps 10] [--smoke]
        [--only jax:fit,jax:dataparallel]
    python benchmarks/bench_keras_backends.py --reattach [--rounds 3] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import ROOT, machine, print_table, ratio_summary, write_json

SEQ, FEATURES, BATCH = 40, 32, 64


def _timed_fit(steps: int) -> Any:
    """``fit(model) -> seconds``: one epoch of ``steps`` batches of the same fixed data."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps * BATCH, SEQ, FEATURES)).astype("float32")
    y = rng.normal(size=(steps * BATCH, 1)).astype("float32")

    def fit(model: Any) -> float:
        t0 = time.perf_counter()
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        return time.perf_counter() - t0
    return fit


def _reattach(rounds: int, steps: int, workdir: str, jit: bool) -> dict:
    """The cost of the 1st, 2nd and 3rd record() context on one model (see module doc)."""
    if os.environ.get("KERAS_BACKEND") == "torch":
        import torch  # noqa: F401  (torch before tensorflow)
    import statistics

    import keras

    import dropspy

    backend = keras.backend.backend()
    fit = _timed_fit(steps)

    costs: list[list[float]] = [[], [], []]
    plains: list[float] = []
    for r in range(rounds):
        keras.utils.set_random_seed(r)
        model = keras.Sequential([
            keras.Input((SEQ, FEATURES)), keras.layers.SpatialDropout1D(0.2),
            keras.layers.LSTM(32, dropout=0.2, recurrent_dropout=0.2),
            keras.layers.Dropout(0.2), keras.layers.Dense(1)])
        model.compile(optimizer="adam", loss="mse", jit_compile=jit)
        fit(model)                 # the model's own train function exists
        plain = fit(model)
        for i in range(3):
            t0 = time.perf_counter()
            with dropspy.record(model, os.path.join(workdir, f"re_{backend}_{r}_{i}.h5")):
                fit(model)
            costs[i].append(time.perf_counter() - t0 - plain)
            plains.append(plain)
            plain = fit(model)     # un-recorded steps between, and the next baseline
    xla = jit and backend == "tensorflow"
    return {"backend": backend, "variant": "reattach-xla" if xla else "reattach",
            "steps": steps, "rounds": rounds,
            "first_s": statistics.median(costs[0]), "second_s": statistics.median(costs[1]),
            "third_s": statistics.median(costs[2]), "plain_fit_s": statistics.median(plains),
            "costs_s": costs}


def _child(variant: str, rounds: int, steps: int, workdir: str) -> dict:
    if variant.startswith("reattach"):
        return _reattach(rounds, steps, workdir, jit=variant.endswith("xla")
                         or os.environ.get("KERAS_BACKEND") == "jax")
    if os.environ.get("KERAS_BACKEND") == "torch":
        import torch  # noqa: F401  (torch before tensorflow)
    if variant == "mirrored":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras

    import dropspy

    backend = keras.backend.backend()
    if variant == "dataparallel":   # set before the models are built: their variables follow
        keras.distribution.set_distribution(keras.distribution.DataParallel())
    spe = 4 if variant == "spe4" else 1

    def build(seed: int) -> keras.Model:
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([
            keras.Input((SEQ, FEATURES)), keras.layers.SpatialDropout1D(0.2),
            keras.layers.LSTM(32, dropout=0.2, recurrent_dropout=0.2),
            keras.layers.Dropout(0.2), keras.layers.Dense(1)])
        model.compile(optimizer="adam", loss="mse", steps_per_execution=spe,
                      jit_compile=True if backend == "jax" else False)
        return model

    scope = None
    if variant == "mirrored":
        import tensorflow as tf

        scope = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope
    fit = _timed_fit(steps)

    if scope is not None:
        with scope():
            plain, recorded = build(0), build(0)
    else:
        plain, recorded = build(0), build(0)
    fit(plain)
    first_plain = fit(plain)   # warm: its train function exists
    fit(recorded)              # the recorded model's train function exists before record()
    ratios, t_plain, t_rec = [], [], []
    with dropspy.record(recorded, os.path.join(workdir, f"{backend}_{variant}.h5"), every=1):
        attach = fit(recorded) - first_plain    # rebuild/retrace + one round of steps
        for _ in range(rounds):
            a = fit(plain)
            b = fit(recorded)
            t_plain.append(a)
            t_rec.append(b)
            ratios.append(b / a)
    return {"backend": backend, "variant": variant, "steps": steps,
            "ms_per_step": 1000 * sorted(t_plain)[len(t_plain) // 2] / steps,
            "ratio": ratio_summary(ratios), "attach_s": attach}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="1 round of 2 steps")
    parser.add_argument("--reattach", action="store_true",
                        help="cost of the 1st/2nd/3rd record() context on one model")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench_keras_backends.json")
    parser.add_argument("--dir", type=Path, default=None, help="folder for the run files")
    parser.add_argument("--only", default=None,
                        help="comma-separated backend:variant cases, e.g. jax:dataparallel")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    rounds, steps = (1, 2) if args.smoke else (args.rounds, args.steps)
    if args.child:
        result = _child(args.child[0], rounds, steps, args.child[1])
        print("BENCH-RESULT " + json.dumps(result))
        return 0
    cases = [("tensorflow", "fit"), ("jax", "fit"), ("torch", "fit"), ("tensorflow", "spe4"),
             ("jax", "spe4"), ("tensorflow", "mirrored"), ("jax", "dataparallel")]
    if args.reattach:
        cases = [("tensorflow", "reattach"), ("tensorflow", "reattach-xla"), ("jax", "reattach"),
                 ("torch", "reattach")]
    if args.only:
        wanted = {tuple(c.split(":", 1)) for c in args.only.split(",")}
        cases = [c for c in cases if c in wanted]
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="dropspy_bench_"))
    results = []
    for backend, variant in cases:
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3",
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        if variant == "dataparallel":   # read by XLA when jax starts in the child
            env["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""),
                                         "--xla_force_host_platform_device_count=2"]).strip()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--rounds", str(rounds),
               "--steps", str(steps), "--child", variant, str(workdir)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH-RESULT ")]
        if proc.returncode != 0 or not line:
            results.append({"backend": backend, "variant": variant,
                            "error": proc.stderr[-500:]})
            continue
        results.append(json.loads(line[-1][len("BENCH-RESULT "):]))
    if args.reattach:
        print_table(["backend", "variant", "plain fit s", "1st record() s", "2nd s", "3rd s"],
                    [[r["backend"], r["variant"], "error", "", "", ""] if "error" in r else
                     [r["backend"], r["variant"], r["plain_fit_s"], r["first_s"], r["second_s"],
                      r["third_s"]] for r in results])
        write_json(args.out.with_name("bench_keras_reattach.json"),
                   {"machine": machine(), "rounds": rounds, "steps": steps, "results": results})
        return 0 if all("error" not in r for r in results) else 1
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["backend"], r["variant"], "error", "", "", ""])
            continue
        q = r["ratio"]
        rows.append([r["backend"], r["variant"], r["ms_per_step"], q["median"],
                     f"{q['p25']:.3f}-{q['p75']:.3f}", r["attach_s"]])
    print_table(["backend", "variant", "ms/step (plain)", "ratio", "p25-p75", "attach_s"], rows)
    write_json(args.out, {"machine": machine(), "rounds": rounds, "steps": steps,
                          "results": results})
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
