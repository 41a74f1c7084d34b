"""Benchmark: how fast ``dropspy inspect`` reads a large run, and how much memory it needs.

Writes a synthetic run file with at least ``--size`` bytes of packed masks (default 1 GiB),
then runs ``python -m dropspy inspect RUN --json`` in a child process and measures its wall
time, CPU time, throughput (packed mask MB per second, per wall and per CPU second) and peak
RSS. Two workloads, each with its target (issue 15): ``large`` (512 KiB records) >= 300 MB/s,
``small`` (256-byte LSTM gate masks, 4.2 million records per GiB) >= 150 MB/s, both with peak
RSS < 200 MiB whatever the file size: the analysis is bounded by bytes, not by records.

The run mixes what real runs hold: most bytes in an elementwise site (the common case), a
time-shared site whose noise is stored at noise shape, four LSTM gate sites, and a site whose
axis sharing is only observable by reading every element (noise copied along time), the
analysis' slowest path.

Usage::

    python benchmarks/bench_inspect.py                 # both layouts, 1 GiB each
    python benchmarks/bench_inspect.py --size 4GiB --out results.json
    python benchmarks/bench_inspect.py --small         # smoke run, a few MiB
    python benchmarks/bench_inspect.py --layout small --size 32MiB   # 256-byte records only

The machine's load average is stored with the results: on a shared machine, compare only
numbers taken under similar load, and read the CPU-time throughput (what one core does).

Not a test: it takes minutes and needs a few GiB of disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dropspy.records import Record, SiteInfo
from dropspy.writer import RunWriter

#: Targets per layout: packed MB per second (wall) and peak RSS in MiB.
TARGETS = {"large": {"mb_per_s": 300, "peak_rss_mib": 200},
           "small": {"mb_per_s": 150, "peak_rss_mib": 200}}

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20,
          "gib": 1 << 30}
AXES3 = ("batch", "time", "feature")


def parse_size(text: str) -> int:
    """'1GiB', '512MiB', '2e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if m is None or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size like 1GiB or 500MB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _bits(rng: np.random.Generator, nbits: int) -> np.ndarray:
    """Packed Bernoulli(0.5) keep-noise (random bytes are exactly that)."""
    return np.frombuffer(rng.bytes((nbits + 7) // 8), dtype=np.uint8)


def write_run(path: Path, size: int, seed: int = 0, layout: str = "large") -> dict:
    """Write the synthetic run; return what was written.

    ``large``: 512 KiB records (elementwise bulk) plus smaller time-shared, copied and gate
    sites. ``small``: only LSTM gate masks of 256 bytes each, the per-record-overhead case.
    """
    rng = np.random.default_rng(seed)
    big_shape = (64, 128, 512)                    # 4 Mi elements = 512 KiB packed per record
    big_bytes = int(np.prod(big_shape)) // 8
    gates = [SiteInfo(f"lstm/input/{g}", "lstm", "LSTM", "input", AXES3, 0.5, gate=g)
             for g in "ifco"]
    sites = gates if layout == "small" else [
        SiteInfo("dense/dropout", "dense/dropout", "Dropout", "output", AXES3, 0.5),
        SiteInfo("spatial", "spatial", "SpatialDropout1D", "output", AXES3, 0.5),
        SiteInfo("copied", "copied", "Dropout", "output", AXES3, 0.5),
    ] + gates
    per_step = (4 * 256 if layout == "small"
                else big_bytes + 64 * 512 // 8 + 64 * 32 * 256 // 8 + 4 * 64 * 256 // 8)
    steps = max(2, -(-size // per_step))
    total = 0
    n_records = 0
    t0 = time.perf_counter()
    with RunWriter(path, {"framework": "synthetic"}) as w:
        for s in sites:
            w.declare_site(s)
        for step in range(steps):
            recs = []
            if layout == "small":
                for g in "ifco":
                    recs.append(Record(f"lstm/input/{g}", step, 0, True, (32, 20, 64),
                                       packed=_bits(rng, 32 * 64), noise_shape=(32, 1, 64)))
            else:
                recs.append(Record("dense/dropout", step, 0, True, big_shape,
                                   packed=_bits(rng, 1 << 22), noise_shape=big_shape))
                recs.append(Record("spatial", step, 0, True, (64, 128, 512),
                                   packed=_bits(rng, 64 * 512), noise_shape=(64, 1, 512)))
                copied = np.unpackbits(_bits(rng, 64 * 256)).view(bool).reshape(64, 1, 256)
                recs.append(Record("copied", step, 0, True, (64, 32, 256),
                                   noise=np.broadcast_to(copied, (64, 32, 256))))
                for g in "ifco":
                    recs.append(Record(f"lstm/input/{g}", step, 0, True, (64, 128, 256),
                                       packed=_bits(rng, 64 * 256), noise_shape=(64, 1, 256)))
            total += per_step
            n_records += len(recs)
            w.submit(recs)
    return {"packed_bytes": total, "records": n_records, "steps": steps,
            "write_seconds": time.perf_counter() - t0, "file_bytes": path.stat().st_size}


_CHILD = """
import runpy, sys
sys.argv = ["dropspy", "inspect", sys.argv[1], "--json"]
code = 0
try:
    runpy.run_module("dropspy", run_name="__main__")
except SystemExit as exc:
    code = exc.code or 0
finally:
    # VmHWM is this process's own peak RSS (ru_maxrss would also count the parent's pages
    # from before exec).
    with open("/proc/self/status") as f:
        hwm = [line.split()[1] for line in f if line.startswith("VmHWM")]
    sys.stderr.write(f"\\nVMHWM_KIB {hwm[0] if hwm else -1}\\n")
sys.exit(code)
"""


def measure_inspect(path: Path) -> dict:
    """Run ``dropspy inspect --json`` in a child process; wall time, CPU time, peak RSS."""
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True,
                         text=True, env=env)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(f"inspect failed ({out.returncode}): {out.stderr.strip()}")
    hwm = re.search(r"VMHWM_KIB (-?\d+)", out.stderr)
    peak = int(hwm.group(1)) / 1024.0 if hwm and int(hwm.group(1)) > 0 else after.ru_maxrss / 1024.0
    report = json.loads(out.stdout)
    return {
        "seconds": seconds,
        "cpu_seconds": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "peak_rss_mib": peak,
        "patterns": {s["site"]: s["pattern"] for s in report["sites"]},
    }


def run_layout(layout: str, size: int, tmpdir: Path | None, keep: bool) -> dict:
    """Write one layout's run, inspect it, and return the measured result."""
    with tempfile.TemporaryDirectory(dir=tmpdir) as tmp:
        path = Path(tmp) / f"bench_run_{layout}.h5"
        print(f"[{layout}] writing {size / 2**20:.0f} MiB of packed masks to {path} ...",
              file=sys.stderr)
        written = write_run(path, size, layout=layout)
        print(f"  {written['records']} records, {written['file_bytes'] / 2**20:.0f} MiB on "
              f"disk, {written['write_seconds']:.1f} s", file=sys.stderr)
        print(f"[{layout}] running dropspy inspect --json ...", file=sys.stderr)
        load_before = os.getloadavg()
        measured = measure_inspect(path)
        if keep:
            kept = Path.cwd() / path.name
            path.replace(kept)
            print(f"kept {kept}", file=sys.stderr)
    mb_s = written["packed_bytes"] / 1e6 / measured["seconds"]
    mb_cpu_s = written["packed_bytes"] / 1e6 / max(measured["cpu_seconds"], 1e-9)
    target = TARGETS[layout]
    return {
        "benchmark": "inspect",
        "layout": layout,
        "packed_bytes": written["packed_bytes"],
        "packed_mib": written["packed_bytes"] / 2**20,
        "file_bytes": written["file_bytes"],
        "records": written["records"],
        "steps": written["steps"],
        "write_seconds": written["write_seconds"],
        "inspect_seconds": measured["seconds"],
        "inspect_cpu_seconds": measured["cpu_seconds"],
        "mb_per_s": mb_s,
        "mb_per_cpu_s": mb_cpu_s,
        "peak_rss_mib": measured["peak_rss_mib"],
        "targets": target,
        "meets_targets": mb_s >= target["mb_per_s"]
        and measured["peak_rss_mib"] < target["peak_rss_mib"],
        "meets_targets_per_cpu_s": mb_cpu_s >= target["mb_per_s"]
        and measured["peak_rss_mib"] < target["peak_rss_mib"],
        "patterns": measured["patterns"],
        "cache": "warm (the file was just written; the page cache holds it)",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "machine": {"python": platform.python_version(), "numpy": np.__version__,
                    "cpus": os.cpu_count(), "platform": platform.platform()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=1 << 30,
                    help="packed mask bytes to write per layout (default 1GiB)")
    ap.add_argument("--small", action="store_true", help="smoke run: 16MiB per layout")
    ap.add_argument("--layout", choices=("large", "small", "both"), default="both",
                    help="large records, 256-byte LSTM gate masks, or both (default)")
    ap.add_argument("--out", type=Path, default=Path("bench_inspect.json"),
                    help="where to write the results JSON")
    ap.add_argument("--dir", type=Path, default=None,
                    help="directory for the run files (default: temp)")
    ap.add_argument("--keep", action="store_true", help="keep the run files")
    args = ap.parse_args(argv)
    size = 16 << 20 if args.small else args.size
    layouts = ("large", "small") if args.layout == "both" else (args.layout,)
    results = [run_layout(layout, size, args.dir, args.keep) for layout in layouts]
    args.out.write_text(json.dumps(results, indent=2))
    for r in results:
        print(json.dumps({k: r[k] for k in ("layout", "packed_mib", "records", "inspect_seconds",
                                            "inspect_cpu_seconds", "mb_per_s", "mb_per_cpu_s",
                                            "peak_rss_mib", "meets_targets",
                                            "meets_targets_per_cpu_s")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
