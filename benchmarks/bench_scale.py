"""Benchmark: what recording costs in distributed (DDP, 2 ranks on gloo) and compiled training.

Model: ``Linear(512, 1024) -> ReLU -> Dropout(0.1) -> Linear(1024, 1024) -> ReLU ->
Dropout(0.1) -> Linear(1024, 10)``, batch 128, cross entropy, SGD, CPU.

- ``ddp``: two processes (one per rank), gloo on 127.0.0.1. Each rank holds two DDP copies of
  the model (same seed): ``plain`` and ``recorded`` (inside ``dropspy.record``, open for the
  whole benchmark, one file per rank). A round runs one step of each, in an order that
  alternates every round; the round's ratio is recorded / plain step time. Each rank reports
  the median of its paired ratios.
- ``compiled``: one process, ``torch.compile`` (inductor) of each copy; steps interleaved the
  same way. The first step of each (compile included) is reported apart: compile time with
  and without dropspy's pass.

Usage::

    python benchmarks/bench_scale.py                    # both parts, a few minutes
    python benchmarks/bench_scale.py --part ddp --rounds 100
    python benchmarks/bench_scale.py --smoke            # a tiny run that checks it works

Writes ``bench_scale.json`` (``--out``) and prints a table. Not a test: numbers from a shared
machine are paired ratios within one process, never compared across processes.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

BATCH_SCALE = 128
WIDTH = 1024
IN = 512


def _model(torch: Any) -> Any:
    nn = torch.nn
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, WIDTH), nn.ReLU(), nn.Dropout(0.1), nn.Linear(WIDTH, WIDTH),
                         nn.ReLU(), nn.Dropout(0.1), nn.Linear(WIDTH, 10)).train()


def _step(torch: Any, model: Any, opt: Any, x: Any, y: Any) -> float:
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return time.perf_counter() - t0


def _paired(torch: Any, pair: dict[str, tuple[Any, Any]], rounds: int, rank: int = 0,
            wait: Any = None, plain_times: list[float] | None = None) -> list[float]:
    g = torch.Generator().manual_seed(10 + rank)
    ratios = []
    for r in range(rounds):
        x, y = torch.randn(BATCH_SCALE, IN, generator=g), torch.randint(0, 10, (BATCH_SCALE,),
                                                                         generator=g)
        times = {}
        for name in (("plain", "recorded") if r % 2 == 0 else ("recorded", "plain")):
            model, opt = pair[name]
            times[name] = _step(torch, model, opt, x, y)
            if name == "recorded" and wait is not None:
                wait()
        ratios.append(times["recorded"] / times["plain"])
        if plain_times is not None:
            plain_times.append(times["plain"])
    return ratios


def _drain(writer: Any) -> None:
    """Wait until the writer thread took every submitted step (its work is charged here)."""
    while not writer._queue.empty():
        time.sleep(0.0002)


def _ddp_rank(rank: int, port: int, rounds: int, warmup: int, out: str, threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    sys.path.insert(0, str(C.ROOT))
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import dropspy

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        pair = {}
        for name in ("plain", "recorded"):
            model = DDP(_model(torch))
            pair[name] = (model, torch.optim.SGD(model.parameters(), lr=0.01))
        with dropspy.record(pair["recorded"][0], os.path.join(out, "ddp.h5")) as rec:
            writer = rec.writer
            _paired(torch, pair, warmup, rank)
            plain: list[float] = []
            ratios = _paired(torch, pair, rounds, rank, wait=lambda: _drain(writer),
                             plain_times=plain)
        C.write_json(Path(out) / f"ddp.rank{rank}.json", {"ratios": ratios, "plain": plain})
    finally:
        dist.destroy_process_group()


def bench_ddp(rounds: int, warmup: int, threads: int, work: Path) -> dict[str, Any]:
    """Two ranks; each returns its paired ratios."""
    import json

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_ddp_rank, args=(r, port, rounds, warmup, str(work), threads))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise SystemExit(f"a DDP rank failed: exit codes {[p.exitcode for p in procs]}")
    out = {}
    for r in range(2):
        got = json.loads((work / f"ddp.rank{r}.json").read_text())
        out[f"rank{r}"] = {**C.ratio_summary(got["ratios"]),
                           "plain_step_ms": 1e3 * statistics.median(got["plain"])}
    return out


def bench_compiled(rounds: int, warmup: int, threads: int, work: Path) -> dict[str, Any]:
    import torch

    import dropspy

    torch.set_num_threads(threads)
    pair, first = {}, {}
    x, y = torch.randn(BATCH_SCALE, IN), torch.randint(0, 10, (BATCH_SCALE,))
    rec = None
    for name in ("plain", "recorded"):
        net = _model(torch)
        model = torch.compile(net)
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        if name == "recorded":
            rec = dropspy.record(model, work / "compiled.h5")
            rec.__enter__()
        first[name] = _step(torch, model, opt, x, y)  # compile (forward and backward) included
        pair[name] = (model, opt)
    try:
        writer = rec.writer
        _paired(torch, pair, warmup)
        plain: list[float] = []
        ratios = _paired(torch, pair, rounds, wait=lambda: _drain(writer), plain_times=plain)
    finally:
        rec.__exit__(None, None, None)
    return {"step": {**C.ratio_summary(ratios), "plain_step_ms": 1e3 * statistics.median(plain)},
            "first_step_s": first,
            "first_step_ratio": first["recorded"] / first["plain"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["ddp", "compiled", "both"], default="both")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--smoke", action="store_true", help="a few rounds, to check it runs")
    ap.add_argument("--out", type=Path, default=Path("bench_scale.json"))
    ap.add_argument("--dir", type=Path, default=None, help="where run files go (temp dir)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.rounds, a.warmup = 4, 1
    import torch  # noqa: F401  (machine() reports its version)

    result: dict[str, Any] = {"benchmark": "scale", "smoke": a.smoke, "rounds": a.rounds,
                              "threads": a.threads}
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        work = Path(tmp)
        if a.part in ("ddp", "both"):
            result["ddp"] = bench_ddp(a.rounds, a.warmup, a.threads, work)
        if a.part in ("compiled", "both"):
            result["compiled"] = bench_compiled(a.rounds, a.warmup, a.threads, work)
    result["machine"] = C.machine()
    C.write_json(a.out, result)
    rows = []
    for r in ("rank0", "rank1"):
        if "ddp" in result:
            s = result["ddp"][r]
            rows.append([f"DDP 2 ranks, gloo ({r})", s["median"], s["p25"], s["p75"], s["n"],
                         s["plain_step_ms"]])
    if "compiled" in result:
        s = result["compiled"]["step"]
        rows.append(["torch.compile (inductor)", s["median"], s["p25"], s["p75"], s["n"],
                     s["plain_step_ms"]])
        # The second compile reuses the first's inductor caches: not a fair compile-time ratio.
        rows.append(["torch.compile first step (compile)", result["compiled"]["first_step_ratio"],
                     float("nan"), float("nan"), 1,
                     1e3 * result["compiled"]["first_step_s"]["plain"]])
    C.print_table(["variant", "recorded / plain", "p25", "p75", "rounds", "plain ms"], rows)


if __name__ == "__main__":
    main()
