"""Benchmark: what recording costs per training step, and what the run file costs on disk.

Trains the two reference models of issue 7 (see ``_common.py``) on CPU under four variants,
interleaved in one process so machine noise hits all of them alike:

- ``baseline``: no dropspy;
- ``every_step``: ``dropspy.record`` writing every mask of every step;
- ``every_10``: ``record(..., every=10)``;
- ``nothing_sampled``: ``record(..., steps=[])``, attached, nothing sampled.

Each variant has its own copy of the model (same seed, same weights), and its recording stays
open for the whole benchmark, so the train function is traced once per variant, not per block.
A round runs one block per variant, in an order rotated every round. Keras blocks are short
``model.fit`` calls (``--steps``, default 6); a block's time runs from its first batch end to
its last (a callback), so the per-call cost of ``fit`` and the first step are left out alike for
every variant. Torch blocks are single training steps (``--steps 1``), so neighbouring steps of
the four variants share the machine's mood. Process CPU time of each block is measured too
(a second, steadier ratio when other jobs load the machine; the targets are judged on wall
time). Each block's time includes waiting until the writer thread has taken in what the block
submitted (queue empty), so writer work is charged to the
variant that caused it. The ratio of a round is block time / the same round's baseline block
time; the table shows the median of those paired ratios and their quartiles.

Storage: after the rounds the recordings are closed and the ``every_step`` run file is measured:
bytes on disk per recorded step, and bits per sampled (noise) mask element, for the whole file
and for the mask datasets alone.

Usage::

    python benchmarks/bench_overhead.py                  # both frameworks, a few minutes
    python benchmarks/bench_overhead.py --framework torch --rounds 20 --steps 30
    python benchmarks/bench_overhead.py --smoke          # a tiny run that checks it works

Writes ``bench_overhead.json`` (``--out``) and prints a table. Not a test: never compare numbers
from different processes on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

VARIANTS: dict[str, dict[str, Any] | None] = {
    "baseline": None,
    "every_step": {"every": 1},
    "every_10": {"every": 10},
    "nothing_sampled": {"steps": []},
}
TARGETS = {
    "keras": {"every_step": 1.05, "every_10": 1.02, "nothing_sampled": 1.01},
    "torch": {"every_step": 1.08, "every_10": 1.02, "nothing_sampled": 1.01},
}


def _drain(recording: Any) -> None:
    """Wait until the writer thread has taken every submitted step off its queue."""
    if recording is None:
        return
    q = recording.writer._queue
    while not q.empty():
        time.sleep(0.0002)


def _order(round_index: int) -> list[str]:
    names = list(VARIANTS)
    k = round_index % len(names)
    return names[k:] + names[:k]


def _interleave(
    blocks: dict[str, Callable[[], tuple[float, float]]], rounds: int, log: Callable[[str], None]
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Run the blocks in rotated order; (wall seconds, CPU seconds) per variant and round."""
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpus: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        for v in _order(r):
            wall, cpu = blocks[v]()
            times[v].append(wall)
            cpus[v].append(cpu)
        if (r + 1) % max(1, rounds // 10) == 0 or r + 1 == rounds:
            log(f"  round {r + 1}/{rounds}: " + ", ".join(
                f"{v} {times[v][-1] * 1e3:.0f} ms" for v in VARIANTS))
    return times, cpus


def _summarize(framework: str, times: dict[str, list[float]], cpus: dict[str, list[float]],
               timed_steps: int) -> dict[str, Any]:
    base = times["baseline"]
    out: dict[str, Any] = {}
    for v, ts in times.items():
        ratios = [t / b for t, b in zip(ts, base)]
        cpu_ratios = [c / b for c, b in zip(cpus[v], cpus["baseline"]) if b > 0]
        per_step = [t / timed_steps * 1e3 for t in ts]
        target = TARGETS[framework].get(v)
        summary = C.ratio_summary(ratios)
        out[v] = {
            "ms_per_step_median": C.quantile(per_step, 0.5),
            "ms_per_step_p25": C.quantile(per_step, 0.25),
            "ms_per_step_p75": C.quantile(per_step, 0.75),
            "ratio": summary,
            "target": target,
            "meets_target": None if target is None else summary["median"] <= target,
            "block_seconds": ts,
            # Process CPU time (all threads: training, framework pools, dropspy's writer) of
            # the same blocks: steadier than wall time when other jobs share the machine.
            "cpu_ms_per_step_median": C.quantile([c / timed_steps * 1e3 for c in cpus[v]], 0.5),
            "cpu_ratio": C.ratio_summary(cpu_ratios),
            "block_cpu_seconds": cpus[v],
        }
    return out


def storage_of(path: Path, steps_recorded: int | None = None) -> dict[str, Any]:
    """Bytes on disk per recorded step and bits per mask element of one run file."""
    import h5py
    import numpy as np

    import dropspy

    file_bytes = path.stat().st_size
    run = dropspy.load(path)
    try:
        noise_el = applied_el = records = 0
        steps: set[int] = set()
        per_site: dict[str, dict[str, Any]] = {}
        for name in run.sites:
            s = run[name]
            n_noise = int(np.prod(s.noise_shapes, axis=1)[s.applied].sum()) if len(s) else 0
            n_applied = int(np.prod(s.shapes, axis=1)[s.applied].sum()) if len(s) else 0
            noise_el += n_noise
            applied_el += n_applied
            records += len(s)
            steps.update(int(x) for x in s.steps)
            per_site[name] = {"records": len(s), "noise_elements": n_noise,
                              "applied_elements": n_applied, "rate": s.rate,
                              "opaque": s.opaque}
    finally:
        run.close()
    mask_bytes = index_bytes = 0
    with h5py.File(path, "r") as f:
        for key in f["sites"]:
            g = f["sites"][key]
            for name, d in g.items():
                size = d.id.get_storage_size()
                if name == "bits":
                    mask_bytes += size
                    name_attr = g.attrs["name"]
                    if isinstance(name_attr, bytes):
                        name_attr = name_attr.decode()
                    if name_attr in per_site:
                        per_site[name_attr]["bits_bytes"] = size
                else:
                    index_bytes += size
    n_steps = steps_recorded if steps_recorded is not None else len(steps)
    return {
        "file_bytes": file_bytes,
        "mask_dataset_bytes": mask_bytes,
        "index_dataset_bytes": index_bytes,
        "steps_recorded": n_steps,
        "records": records,
        "noise_elements": noise_el,
        "applied_elements": applied_el,
        "bytes_per_step": file_bytes / n_steps if n_steps else float("nan"),
        "mask_bytes_per_step": mask_bytes / n_steps if n_steps else float("nan"),
        "bits_per_noise_element_file": 8 * file_bytes / noise_el if noise_el else float("nan"),
        "bits_per_noise_element_masks": 8 * mask_bytes / noise_el if noise_el else float("nan"),
        "bits_per_applied_element_file": (8 * file_bytes / applied_el if applied_el
                                          else float("nan")),
        "sites": per_site,
    }


# -- Keras ----------------------------------------------------------------------------------


def bench_keras(rounds: int, steps: int, tmp: Path, log: Callable[[str], None]) -> dict[str, Any]:
    import keras

    import dropspy

    class Clock(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.ends: list[float] = []

            self.cpu: list[float] = []

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.ends.append(time.perf_counter())
            self.cpu.append(time.process_time())

    x, y = C.keras_data(steps)
    models = {v: C.keras_model(seed=0) for v in VARIANTS}
    recs: dict[str, Any] = {}
    for v, opts in VARIANTS.items():
        if opts is not None:
            recs[v] = dropspy.record(models[v], tmp / f"keras_{v}.h5", **opts)
            recs[v].__enter__()
    try:
        t0 = time.perf_counter()
        for v in VARIANTS:   # trace each variant's train function once, outside the timing
            models[v].fit(x[:2 * C.BATCH], y[:2 * C.BATCH], batch_size=C.BATCH, epochs=1,
                          shuffle=False, verbose=0)
        log(f"  keras: traced 4 train functions in {time.perf_counter() - t0:.1f} s")

        def block(v: str) -> Callable[[], tuple[float, float]]:
            def run() -> tuple[float, float]:
                clock = Clock()
                models[v].fit(x, y, batch_size=C.BATCH, epochs=1, shuffle=False, verbose=0,
                              callbacks=[clock])
                t, c = time.perf_counter(), time.process_time()
                _drain(recs.get(v))
                return (clock.ends[-1] - clock.ends[0] + (time.perf_counter() - t),
                        clock.cpu[-1] - clock.cpu[0] + (time.process_time() - c))
            return run

        times, cpus = _interleave({v: block(v) for v in VARIANTS}, rounds, log)
        steps_seen = {v: recs[v].adapter._step for v in recs}
    finally:
        for v in list(recs):
            recs.pop(v).__exit__(None, None, None)
    result = {
        "model": "Input(40,32) > Dropout(.2) > LSTM(64, dropout=.2, recurrent_dropout=.2, "
                 "return_sequences) > SpatialDropout1D(.2) > LSTM(32, dropout=.2) > "
                 "Dropout(.2) > Dense(1); batch 64; Adam; model.fit",
        "timed_steps_per_block": steps - 1,
        "rounds": rounds,
        "variants": _summarize("keras", times, cpus, steps - 1),
        "storage": {},
    }
    for v in ("every_step", "every_10", "nothing_sampled"):
        result["storage"][v] = storage_of(tmp / f"keras_{v}.h5")
        result["storage"][v]["training_steps"] = steps_seen[v]
    return result


# -- torch ----------------------------------------------------------------------------------


def bench_torch(rounds: int, steps: int, tmp: Path, log: Callable[[str], None]) -> dict[str, Any]:
    import torch

    import dropspy

    data = C.torch_data(16)
    models = {v: C.torch_model(seed=0) for v in VARIANTS}
    opts_ = {v: torch.optim.Adam(models[v].parameters(), lr=1e-3) for v in VARIANTS}
    recs: dict[str, Any] = {}
    for v, opts in VARIANTS.items():
        if opts is not None:
            recs[v] = dropspy.record(models[v], tmp / f"torch_{v}.h5", **opts)
            recs[v].__enter__()
    try:
        for v in VARIANTS:
            for tokens, targets in data[:2]:
                C.torch_train_step(models[v], opts_[v], tokens, targets)

        def block(v: str) -> Callable[[], tuple[float, float]]:
            batches = iter(())

            def run() -> tuple[float, float]:
                nonlocal batches
                model, opt = models[v], opts_[v]
                t, c = time.perf_counter(), time.process_time()
                for _ in range(steps):
                    tokens, targets = next(batches, (None, None))
                    if tokens is None:
                        batches = iter(data)
                        tokens, targets = next(batches)
                    C.torch_train_step(model, opt, tokens, targets)
                _drain(recs.get(v))
                return time.perf_counter() - t, time.process_time() - c
            return run

        times, cpus = _interleave({v: block(v) for v in VARIANTS}, rounds, log)
        steps_seen = {v: recs[v].adapter._step for v in recs}
    finally:
        for v in list(recs):
            recs.pop(v).__exit__(None, None, None)
    result = {
        "model": "Embedding(1000,32) > Dropout(.2) > LSTM(32,64) > Dropout1d(.2) on "
                 "(batch, channels, time) > LSTM(64,32, num_layers=2, dropout=.2) > "
                 "Dropout(.2) > Linear(32,1000); batch 64, sequence 40; Adam; plain loop",
        "timed_steps_per_block": steps,
        "rounds": rounds,
        "torch_threads": torch.get_num_threads(),
        "variants": _summarize("torch", times, cpus, steps),
        "storage": {},
    }
    for v in ("every_step", "every_10", "nothing_sampled"):
        result["storage"][v] = storage_of(tmp / f"torch_{v}.h5")
        result["storage"][v]["training_steps"] = steps_seen[v]
    return result


# -- main -----------------------------------------------------------------------------------


def print_results(result: dict[str, Any]) -> None:
    rows = []
    for fw in ("keras", "torch"):
        r = result.get(fw)
        if not r:
            continue
        for v, s in r["variants"].items():
            q = s["ratio"]
            cq = s["cpu_ratio"]
            rows.append([fw, v, s["ms_per_step_median"],
                         "1" if v == "baseline" else f"{q['median']:.3f}",
                         "" if v == "baseline" else f"{q['p25']:.3f}-{q['p75']:.3f}",
                         "" if v == "baseline"
                         else f"{cq['median']:.3f} ({cq['p25']:.3f}-{cq['p75']:.3f})",
                         "" if s["target"] is None else f"<= {s['target']}",
                         "" if s["meets_target"] is None
                         else ("yes" if s["meets_target"] else "NO")])
    print(f"\nstep overhead ({result['machine']['date_utc']}, {result['machine']['cpu']}, "
          f"{result['machine']['cpus']} CPUs)")
    C.print_table(["framework", "variant", "ms/step", "ratio (median)", "ratio p25-p75",
                   "CPU-time ratio (p25-p75)", "target", "met"], rows)
    rows = []
    for fw in ("keras", "torch"):
        r = result.get(fw)
        if not r:
            continue
        s = r["storage"]["every_step"]
        rows.append([fw, s["steps_recorded"], s["bytes_per_step"], s["mask_bytes_per_step"],
                     s["bits_per_noise_element_masks"], s["bits_per_noise_element_file"],
                     s["bits_per_applied_element_file"]])
    print("\nstorage (every_step run file)")
    C.print_table(["framework", "steps", "bytes/step (file)", "bytes/step (masks)",
                   "bits/noise el. (masks)", "bits/noise el. (file)", "bits/applied el. (file)"],
                  rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--framework", choices=("keras", "torch", "both"), default="both")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds (default: keras 40, torch 300)")
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps per block (default: keras 6, the first untimed; torch 1)")
    ap.add_argument("--smoke", action="store_true", help="tiny run: a few rounds of a few steps")
    ap.add_argument("--out", type=Path, default=Path("bench_overhead.json"))
    ap.add_argument("--dir", type=Path, default=None, help="where the run files go (default temp)")
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads for torch and TensorFlow (default: the frameworks' "
                         "own, i.e. all cores); 1 is far steadier on a loaded machine")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        plan = {"keras": (args.rounds or 2, args.steps or 3),
                "torch": (args.rounds or 3, args.steps or 1)}
    else:
        plan = {"keras": (args.rounds or 40, args.steps or 6),
                "torch": (args.rounds or 300, args.steps or 1)}
    if plan["keras"][1] < 2:
        ap.error("--steps must be at least 2 for keras (a block's first step is not timed)")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

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
    result: dict[str, Any] = {"benchmark": "overhead", "smoke": args.smoke,
                              "command": " ".join([Path(sys.argv[0]).name]
                                                  + (argv or sys.argv[1:])),
                              "machine": C.machine(), "targets": TARGETS,
                              "threads": args.threads or "framework default",
                              "load_average_at_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for fw in frameworks:
            rounds, steps = plan[fw]
            log(f"{fw}: {rounds} rounds x {len(VARIANTS)} variants x {steps} steps")
            fn = bench_keras if fw == "keras" else bench_torch
            result[fw] = fn(rounds, steps, Path(tmp), log)
    result["load_average_at_end"] = os.getloadavg()
    C.write_json(args.out, result)
    print_results(result)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
