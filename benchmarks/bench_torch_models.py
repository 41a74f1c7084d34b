"""Benchmark: what recording costs per training step on real torch model code.

Workloads (``tests/_torch_models.py``; transformers is a test/benchmark dependency only):

- ``reference``: the issue-7 reference model (``_common.torch_model``), batch 64 x 40;
- ``transformer_encoder``: an ``nn.TransformerEncoder`` LM, 2 layers, d=64, batch 16 x 32;
- ``gpt2_eager`` / ``gpt2_sdpa``: GPT-2 from a transformers config, 2 layers, n_embd=64,
  ``attn_implementation`` eager and sdpa, batch 16 x 32;
- ``awd_lstm``: an AWD-style 3-layer LSTM LM with locked, embedding and weight dropout.

Variants, each with its own copy of the model (same seed) and its recording open for the whole
benchmark: ``baseline`` (no dropspy), ``every_step`` (every mask of every step) and
``nothing_sampled`` (``record(steps=[])``: attached, nothing sampled). A round runs one training
step of every variant, in an order rotated each round, so the machine's mood hits all alike;
the ratio of a round is the variant's step time over the same round's baseline step time (wall
and process CPU time), and the table shows the median of those paired ratios.

Cost per dropout call: the median paired difference (every_step - baseline) of a round, divided
by the records one step writes (one record = one dropout call at one site).

Usage::

    python benchmarks/bench_torch_models.py --rounds 200
    python benchmarks/bench_torch_models.py --smoke

Writes ``bench_torch_models.json`` (``--out``). Not a test: never compare numbers from different
processes on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import _common as C

VARIANTS: dict[str, dict[str, Any] | None] = {
    "baseline": None,
    "every_step": {"every": 1},
    "nothing_sampled": {"steps": []},
}
TARGETS = {"every_step": 1.05, "nothing_sampled": 1.01}


def _workloads() -> dict[str, tuple[Callable[[int], Any], Callable[[int], list], Callable]]:
    import _torch_models as M

    def ref_data(n: int) -> list:
        return C.torch_data(n)

    out: dict[str, Any] = {"reference": (lambda seed: C.torch_model(seed), ref_data,
                                         C.torch_train_step)}
    for name, make in M.WORKLOADS.items():
        out[name] = (make, M.lm_data, M.lm_step)
    return out


def _drain(recording: Any) -> None:
    if recording is None:
        return
    q = recording.writer._queue
    while not q.empty():
        time.sleep(0.0002)


def bench_one(name: str, make: Callable[[int], Any], data_fn: Callable[[int], list],
              step_fn: Callable, rounds: int, tmp: Path,
              log: Callable[[str], None]) -> dict[str, Any]:
    import torch

    import dropspy

    data = data_fn(8)
    models = {v: make(0) for v in VARIANTS}
    opts = {v: torch.optim.Adam(models[v].parameters(), lr=1e-3) for v in VARIANTS}
    recs: dict[str, Any] = {}
    for v, o in VARIANTS.items():
        if o is not None:
            recs[v] = dropspy.record(models[v], tmp / f"{name}_{v}.h5", **o)
            recs[v].__enter__()
    wall: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    try:
        for v in VARIANTS:  # warm up: first calls, site declarations, allocator
            for tokens, targets in data[:2]:
                step_fn(models[v], opts[v], tokens, targets)
        names = list(VARIANTS)
        for r in range(rounds):
            k = r % len(names)
            tokens, targets = data[r % len(data)]
            for v in names[k:] + names[:k]:
                t, c = time.perf_counter(), time.process_time()
                step_fn(models[v], opts[v], tokens, targets)
                _drain(recs.get(v))
                wall[v].append(time.perf_counter() - t)
                cpu[v].append(time.process_time() - c)
        steps = recs["every_step"].adapter._step
    finally:
        for v in list(recs):
            recs.pop(v).__exit__(None, None, None)
    run = dropspy.load(tmp / f"{name}_every_step.h5")
    try:
        records = sum(len(run[s]) for s in run.sites)
        sites = len(run.sites)
    finally:
        run.close()
    calls = records / steps if steps else float("nan")
    result: dict[str, Any] = {"rounds": rounds, "sites": sites, "calls_per_step": calls,
                              "variants": {}}
    base_w, base_c = wall["baseline"], cpu["baseline"]
    for v in VARIANTS:
        ratios = [a / b for a, b in zip(wall[v], base_w)]
        cratios = [a / b for a, b in zip(cpu[v], base_c) if b > 0]
        diff_us = [(a - b) * 1e6 for a, b in zip(wall[v], base_w)]
        cdiff_us = [(a - b) * 1e6 for a, b in zip(cpu[v], base_c)]
        entry = {
            "ms_per_step_median": statistics.median(wall[v]) * 1e3,
            "ratio": C.ratio_summary(ratios),
            "cpu_ratio": C.ratio_summary(cratios),
            "target": TARGETS.get(v),
        }
        if v == "every_step" and calls:
            entry["us_per_call"] = statistics.median(diff_us) / calls
            entry["cpu_us_per_call"] = statistics.median(cdiff_us) / calls
        if entry["target"] is not None:
            entry["meets_target"] = entry["ratio"]["median"] <= entry["target"]
        result["variants"][v] = entry
    log(f"  {name}: every_step {result['variants']['every_step']['ratio']['median']:.3f}x, "
        f"nothing_sampled {result['variants']['nothing_sampled']['ratio']['median']:.3f}x, "
        f"{calls:.0f} calls/step")
    return result


def print_results(result: dict[str, Any]) -> None:
    rows = []
    for name, r in result["models"].items():
        base = r["variants"]["baseline"]
        ev, ns = r["variants"]["every_step"], r["variants"]["nothing_sampled"]
        rows.append([name, f"{base['ms_per_step_median']:.2f}", f"{r['calls_per_step']:.0f}",
                     f"{ev['ratio']['median']:.3f} ({ev['ratio']['p25']:.3f}-"
                     f"{ev['ratio']['p75']:.3f})",
                     f"{ev['cpu_ratio']['median']:.3f}",
                     f"{ev.get('us_per_call', float('nan')):.0f}",
                     f"{ns['ratio']['median']:.3f} ({ns['ratio']['p25']:.3f}-"
                     f"{ns['ratio']['p75']:.3f})",
                     f"{ns['cpu_ratio']['median']:.3f}"])
    m = result["machine"]
    print(f"\ntorch models ({m['date_utc']}, {m['cpu']}, {m['cpus']} CPUs, torch "
          f"{m.get('torch')}, threads {result['threads']})")
    C.print_table(["model", "base ms/step", "calls/step", "every_step (p25-p75)", "cpu",
                   "us/call", "nothing_sampled (p25-p75)", "cpu"], rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--models", default=None, help="comma-separated subset of the workloads")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: steadier on a shared machine)")
    ap.add_argument("--smoke", action="store_true", help="a few rounds: checks it works")
    ap.add_argument("--out", type=Path, default=Path("bench_torch_models.json"))
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rounds = 3 if args.smoke else args.rounds

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    workloads = _workloads()
    chosen = args.models.split(",") if args.models else list(workloads)
    result: dict[str, Any] = {"benchmark": "torch_models", "smoke": args.smoke,
                              "machine": C.machine(), "targets": TARGETS,
                              "threads": args.threads, "load_average_at_start": os.getloadavg(),
                              "models": {}}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for name in chosen:
            make, data_fn, step_fn = workloads[name]
            result["models"][name] = bench_one(name, make, data_fn, step_fn, rounds, Path(tmp),
                                               log)
    result["load_average_at_end"] = os.getloadavg()
    C.write_json(args.out, result)
    print_results(result)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
