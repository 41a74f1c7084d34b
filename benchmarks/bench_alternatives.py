"""Benchmark: dropspy against what users reach for instead, on the same reference models.

- **Keras**: TensorFlow's debugger dump, ``tf.debugging.experimental.enable_dump_debug_info(
  dump_root, tensor_debug_mode="FULL_TENSOR")``, which writes every tensor of every op (the
  masks among them, as anonymous tensors). Compared per training step through ``model.fit``
  with no dropspy and with ``dropspy.record`` (every mask, every step), interleaved in one
  process. The dump is enabled for the debugger's block only, and its model's train function is
  retraced inside the block (the first step, which is not timed), so the other variants never
  run instrumented. Bytes per step: the dump directory's size / the block's steps.
- **PyTorch**: TorchLens (``tl.trace``), which logs one forward pass and keeps every
  activation in memory (the outputs of the dropout ops, not their masks). Compared per forward
  pass (training mode, autograd on, as in training) with a plain forward and with a forward
  under ``dropspy.record``. TorchLens restores torch's functions after each trace
  (``unwrap_when_done``), so the other variants run unwrapped torch. Bytes: TorchLens'
  ``saved_activation_memory`` (in memory; it writes nothing to disk).

A tool that is not installed is reported as such and skipped.

Usage::

    python benchmarks/bench_alternatives.py               # a few minutes
    python benchmarks/bench_alternatives.py --framework keras --rounds 5
    python benchmarks/bench_alternatives.py --smoke

Writes ``bench_alternatives.json`` (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
from bench_overhead import _drain, storage_of


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _rotate(names: list[str], r: int) -> list[str]:
    k = r % len(names)
    return names[k:] + names[:k]


def _summary(times: dict[str, list[float]], per: int) -> dict[str, Any]:
    base = times["baseline"]
    return {v: {"ms_median": C.quantile([t / per * 1e3 for t in ts], 0.5),
                "ratio": C.ratio_summary([t / b for t, b in zip(ts, base)]),
                "block_seconds": ts}
            for v, ts in times.items()}


def bench_keras(rounds: int, steps: int, tmp: Path, log: Callable[[str], None]) -> dict[str, Any]:
    import keras
    import tensorflow as tf

    import dropspy

    class Clock(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.ends: list[float] = []

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.ends.append(time.perf_counter())

    x, y = C.keras_data(steps)
    names = ["baseline", "dropspy", "tf_debugger_full_tensor"]
    models = {v: C.keras_model(seed=0) for v in names}
    spy = dropspy.record(models["dropspy"], tmp / "keras_dropspy.h5")
    spy.__enter__()
    dump_bytes: list[float] = []
    try:
        for v in ("baseline", "dropspy"):
            models[v].fit(x[:2 * C.BATCH], y[:2 * C.BATCH], batch_size=C.BATCH, epochs=1,
                          verbose=0)

        def fit_block(v: str) -> float:
            clock = Clock()
            models[v].fit(x, y, batch_size=C.BATCH, epochs=1, shuffle=False, verbose=0,
                          callbacks=[clock])
            t = time.perf_counter()
            if v == "dropspy":
                _drain(spy)
            return clock.ends[-1] - clock.ends[0] + (time.perf_counter() - t)

        def debugger_block(r: int) -> float:
            dump = tmp / f"tfdbg_{r}"
            model = models["tf_debugger_full_tensor"]
            tf.debugging.experimental.enable_dump_debug_info(
                str(dump), tensor_debug_mode="FULL_TENSOR", circular_buffer_size=-1)
            try:
                model.train_function = None   # retrace, instrumented (first step: untimed)
                seconds = fit_block("tf_debugger_full_tensor")
            finally:
                tf.debugging.experimental.disable_dump_debug_info()
                model.train_function = None
            dump_bytes.append(_dir_bytes(dump) / steps)
            shutil.rmtree(dump, ignore_errors=True)
            return seconds

        times: dict[str, list[float]] = {v: [] for v in names}
        for r in range(rounds):
            for v in _rotate(names, r):
                times[v].append(debugger_block(r) if v == names[2] else fit_block(v))
            log(f"  keras round {r + 1}/{rounds}: " + ", ".join(
                f"{v} {times[v][-1] / (steps - 1) * 1e3:.0f} ms/step" for v in names))
        training_steps = spy.adapter._step
    finally:
        spy.__exit__(None, None, None)
    storage = storage_of(tmp / "keras_dropspy.h5")
    out = _summary(times, steps - 1)
    out["baseline"]["bytes_per_step"] = 0
    out["dropspy"]["bytes_per_step"] = storage["file_bytes"] / max(training_steps, 1)
    out["dropspy"]["stores"] = "every dropout mask, named by site, bit-packed at noise shape"
    out["tf_debugger_full_tensor"]["bytes_per_step"] = C.quantile(dump_bytes, 0.5)
    out["tf_debugger_full_tensor"]["stores"] = (
        "every tensor of every op; the masks only as anonymous boolean/float tensors")
    return {"tool": "tf.debugging.experimental.enable_dump_debug_info (FULL_TENSOR)",
            "unit": "training step through model.fit", "timed_steps_per_block": steps - 1,
            "rounds": rounds, "variants": out}


def bench_torch(rounds: int, tmp: Path, log: Callable[[str], None]) -> dict[str, Any]:

    import dropspy

    if importlib.util.find_spec("torchlens") is None:
        return {"tool": "torchlens",
                "skipped": "torchlens is not installed (pip install torchlens)"}
    import torchlens as tl

    names = ["baseline", "dropspy", "torchlens"]
    models = {v: C.torch_model(seed=0) for v in names}
    tokens = C.torch_data(1)[0][0]
    capture = tl.options.CaptureOptions(unwrap_when_done=True)
    saved: list[float] = []
    spy = dropspy.record(models["dropspy"], tmp / "torch_dropspy.h5")
    spy.__enter__()
    try:
        def forward(v: str) -> float:
            t = time.perf_counter()
            if v == "torchlens":
                trace = tl.trace(models[v], tokens, capture=capture)
                seconds = time.perf_counter() - t
                saved.append(_quantity_bytes(trace.saved_activation_memory))
                del trace
                return seconds
            models[v](tokens)
            if v == "dropspy":
                _drain(spy)
            return time.perf_counter() - t

        for v in names:   # first calls: TorchLens discovers and wraps torch's functions
            forward(v)
        times: dict[str, list[float]] = {v: [] for v in names}
        for r in range(rounds):
            for v in _rotate(names, r):
                times[v].append(forward(v))
        log(f"  torch: {rounds} rounds: " + ", ".join(
            f"{v} {C.quantile(times[v], 0.5) * 1e3:.0f} ms" for v in names))
        forwards = rounds + 1
    finally:
        spy.__exit__(None, None, None)
    storage = storage_of(tmp / "torch_dropspy.h5")
    out = _summary(times, 1)
    out["baseline"]["bytes_per_step"] = 0
    out["dropspy"]["bytes_per_step"] = storage["file_bytes"] / forwards
    out["dropspy"]["stores"] = "every dropout mask, named by site, bit-packed at noise shape"
    out["torchlens"]["bytes_per_step"] = C.quantile(saved, 0.5)
    out["torchlens"]["stores"] = ("every activation in memory (dropout outputs, not masks); "
                                  "nothing on disk")
    return {"tool": "torchlens.trace", "unit": "forward pass (training mode, autograd on)",
            "rounds": rounds, "variants": out}


def _quantity_bytes(q: Any) -> float:
    """Bytes from TorchLens' memory quantity (a number, or an object that knows its bytes)."""
    for attr in ("bytes", "value", "num_bytes"):
        v = getattr(q, attr, None)
        if isinstance(v, (int, float)):
            return float(v)
    try:
        return float(q)
    except (TypeError, ValueError):
        text = str(q).split()
        units = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 1024, "MiB": 2**20, "GiB": 2**30}
        return float(text[0]) * units.get(text[1], float("nan")) if len(text) == 2 else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--framework", choices=("keras", "torch", "both"), default="both")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds (default: keras 3, torch 10)")
    ap.add_argument("--steps", type=int, default=None,
                    help="Keras training steps per block, the first untimed (default 4)")
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads for torch and TensorFlow (default: the frameworks')")
    ap.add_argument("--smoke", action="store_true", help="tiny run: 1 round of 2 steps")
    ap.add_argument("--out", type=Path, default=Path("bench_alternatives.json"))
    ap.add_argument("--dir", type=Path, default=None, help="where dumps and runs go (default temp)")
    args = ap.parse_args(argv)
    steps = args.steps or (2 if args.smoke else 4)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    frameworks = ["keras", "torch"] if args.framework == "both" else [args.framework]
    import torch  # before tensorflow, always

    if args.threads:
        torch.set_num_threads(args.threads)
    if "keras" in frameworks:
        import tensorflow as tf

        if args.threads:
            tf.config.threading.set_intra_op_parallelism_threads(args.threads)
            tf.config.threading.set_inter_op_parallelism_threads(args.threads)
        import keras  # noqa: F401

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    result: dict[str, Any] = {"benchmark": "alternatives", "smoke": args.smoke,
                              "machine": C.machine(),
                              "threads": args.threads or "framework default",
                              "load_average_at_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        if "keras" in frameworks:
            result["keras"] = bench_keras(args.rounds or (1 if args.smoke else 3), steps,
                                          Path(tmp), log)
        if "torch" in frameworks:
            result["torch"] = bench_torch(args.rounds or (2 if args.smoke else 10), Path(tmp), log)
    result["machine"] = C.machine()   # now with torchlens' version, if it was imported
    result["load_average_at_end"] = os.getloadavg()
    C.write_json(args.out, result)
    rows = []
    for fw in frameworks:
        r = result[fw]
        if "skipped" in r:
            rows.append([fw, r["tool"], "skipped: " + r["skipped"], "", "", ""])
            continue
        for v, s in r["variants"].items():
            q = s["ratio"]
            rows.append([fw, v, r["unit"], s["ms_median"],
                         f"{q['median']:.2f} ({q['p25']:.2f}-{q['p75']:.2f})",
                         s["bytes_per_step"]])
    C.print_table(["framework", "variant", "per", "ms (median)", "ratio (p25-p75)",
                   "bytes per step"], rows)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
