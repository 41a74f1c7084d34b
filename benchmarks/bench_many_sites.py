"""Benchmark: reading a run with many sites (issue 18, class 8: scale as an attack).

Writes a run with ``--sites`` sites of two small records each (the writer's chunk sizes cut
down, as a killed-run test does, so that 10,000 sites take ~100 MB instead of ~1 GB), then
times, each in a fresh process: ``dropspy.load()`` plus one site's masks (``open``), and
``dropspy inspect FILE --json`` (``inspect``, every site analysed).

With ``--compare DIR`` each measurement alternates between this tree and the dropspy at DIR
(another checkout), round by round, and reports the median of the paired ratios: on a shared
machine only ratios taken side by side mean anything.

Usage::

    python benchmarks/bench_many_sites.py --sites 2000 --rounds 3
    python benchmarks/bench_many_sites.py --sites 10000 --rounds 2 --compare /path/to/old

Not a test: it takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WRITE = """
import sys
import numpy as np
import dropspy.writer as writer
writer._BITS_CHUNK, writer._INDEX_CHUNK_ROWS = 256, 8
from dropspy.records import Record, SiteInfo
n = int(sys.argv[2])
w = writer.RunWriter(sys.argv[1], {"framework": "bench"})
for k in range(n):
    w.declare_site(SiteInfo(f"block{k}/drop", f"block{k}", "Dropout", "output",
                            ("batch", "feature"), 0.3))
rng = np.random.default_rng(0)
for step in range(2):
    w.submit([Record(f"block{k}/drop", step, 0, True, (4, 6), noise=rng.random((4, 6)) > 0.3)
              for k in range(n)])
w.close()
"""

OPEN = """
import sys, dropspy
with dropspy.load(sys.argv[1]) as run:
    site = run[run.sites[len(run.sites) // 2]]
    masks = [site.mask(i) for i in range(len(site))]
"""


def _env(tree: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(tree))


def _timed(args: list[str], tree: Path) -> tuple[float, float]:
    """Wall and CPU seconds (user + system, the child's own children included)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    # Run from a neutral directory: ``python -c``/``-m`` put the working directory first on
    # sys.path, which would import this checkout's dropspy whatever PYTHONPATH says.
    out = subprocess.run(args, env=_env(tree), capture_output=True, text=True,
                         cwd=tempfile.gettempdir())
    elapsed = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode not in (0, 1):
        raise SystemExit(f"{args[1:3]} failed ({out.returncode}): {out.stderr[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sites", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--file", type=Path, help="an existing run to read (nothing is written)")
    p.add_argument("--compare", type=Path, help="another dropspy checkout, measured alternately")
    p.add_argument("--out", type=Path, default=Path("bench_many_sites.json"))
    a = p.parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    path = a.file or Path(tmp.name) / "many.h5"
    if a.file is None:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", WRITE, str(path), str(a.sites)], env=_env(ROOT),
                       check=True)
        print(f"wrote {a.sites} sites ({path.stat().st_size >> 20} MiB) in "
              f"{time.perf_counter() - t:.1f} s")
    trees = {"this": ROOT} | ({"other": a.compare.resolve()} if a.compare else {})
    cmds = {"open": [sys.executable, "-c", OPEN, str(path)],
            "inspect": [sys.executable, "-m", "dropspy", "inspect", str(path), "--json"]}
    times: dict[str, dict[str, list[tuple[float, float]]]] = {
        c: {t: [] for t in trees} for c in cmds}
    for r in range(a.rounds):
        for c, args in cmds.items():
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for t in order:
                times[c][t].append(_timed(args, trees[t]))
    result: dict[str, object] = {"sites": a.sites, "rounds": a.rounds,
                                 "load_average": os.getloadavg()[0]}
    for c in cmds:
        row: dict[str, float] = {}
        line = f"{c:8s}"
        for t, v in times[c].items():
            row[f"{t}_wall_s"] = statistics.median(w for w, _ in v)
            row[f"{t}_cpu_s"] = statistics.median(u for _, u in v)
            line += f"  {t}: wall {row[f'{t}_wall_s']:6.2f} s, CPU {row[f'{t}_cpu_s']:6.2f} s"
        if "other" in trees:
            for i, kind in enumerate(("wall", "cpu")):
                ratio = statistics.median(x[i] / y[i] for x, y in zip(times[c]["this"],
                                                                      times[c]["other"]))
                row[f"{kind}_ratio_this_over_other"] = ratio
                line += f"  {kind} ratio {ratio:.3f}"
        result[c] = row
        print(line)
    a.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
