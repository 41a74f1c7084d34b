"""Benchmark: the run-file writer alone, from bool noise to file (issue 2).

Feeds ``RunWriter`` one step of records at a time, as an adapter does, and measures:

- **throughput**: mask elements per second from bool noise arrays to a closed file (the clock
  runs from the first ``submit`` to the end of ``close()``, so packing, compression, HDF5
  appends and the final flush all count), and the time ``submit`` itself takes on the training
  thread per step;
- **bits per element on disk** for full-entropy masks (keep probability 0.5: the packed bits
  cannot be compressed, so this measures the format's overhead; target <= 1.05), for rate-0.2
  masks (entropy 0.72 bits), and for broadcast masks (``SpatialDropout1D``-style noise
  ``(B, 1, F)`` applied to ``(B, T, F)``), which must cost bits per *noise* element, not per
  applied element.

Inputs are drawn before the clock starts (a pool of distinct arrays, reused), so the random
number generator is not measured.

Usage::

    python benchmarks/bench_writer.py              # ~512 Mi elements per case, under a minute
    python benchmarks/bench_writer.py --elements 2e9
    python benchmarks/bench_writer.py --smoke

Writes ``bench_writer.json`` (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
import h5py
import numpy as np

from dropspy.records import Record, SiteInfo
from dropspy.writer import RunWriter

AXES = ("batch", "time", "feature")
SITES_PER_STEP = 4
TARGET_BITS = 1.05


def _case(name: str, applied: tuple[int, ...], noise: tuple[int, ...], keep: float,
          packed_input: bool = False) -> dict[str, Any]:
    return {"name": name, "applied": applied, "noise": noise, "keep": keep,
            "packed_input": packed_input}


CASES = [
    _case("full_entropy", (64, 40, 256), (64, 40, 256), 0.5),
    _case("full_entropy_prepacked", (64, 40, 256), (64, 40, 256), 0.5, packed_input=True),
    _case("rate_0.2", (64, 40, 256), (64, 40, 256), 0.8),
    _case("broadcast_time", (64, 40, 256), (64, 1, 256), 0.5),
]


def run_case(case: dict[str, Any], elements: int, path: Path) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    nshape = case["noise"]
    per_record = int(np.prod(nshape))
    steps = max(2, elements // (per_record * SITES_PER_STEP))
    pool = [rng.random(nshape) < case["keep"] for _ in range(16)]
    packed_pool = [np.packbits(a.ravel()) for a in pool] if case["packed_input"] else None
    sites = [SiteInfo(f"site{k}", f"site{k}", "Dropout", "output", AXES, 1 - case["keep"])
             for k in range(SITES_PER_STEP)]
    submit_s = 0.0
    t0 = time.perf_counter()
    w = RunWriter(path, {"framework": "synthetic"})
    for s in sites:
        w.declare_site(s)
    for step in range(steps):
        recs = []
        for k in range(SITES_PER_STEP):
            j = (step * SITES_PER_STEP + k) % len(pool)
            if packed_pool is not None:
                recs.append(Record(f"site{k}", step, 0, True, case["applied"],
                                   packed=packed_pool[j], noise_shape=nshape))
            else:
                recs.append(Record(f"site{k}", step, 0, True, case["applied"], noise=pool[j]))
        a = time.perf_counter()
        w.submit(recs)
        submit_s += time.perf_counter() - a
    w.close()
    seconds = time.perf_counter() - t0
    n_noise = steps * SITES_PER_STEP * per_record
    n_applied = steps * SITES_PER_STEP * int(np.prod(case["applied"]))
    mask_bytes = 0
    with h5py.File(path, "r") as f:
        for key in f["sites"]:
            mask_bytes += f["sites"][key]["bits"].id.get_storage_size()
    file_bytes = path.stat().st_size
    return {
        "case": case["name"],
        "noise_shape": list(nshape),
        "applied_shape": list(case["applied"]),
        "keep_probability": case["keep"],
        "input": "packed uint8" if case["packed_input"] else "bool noise",
        "steps": steps,
        "records": steps * SITES_PER_STEP,
        "noise_elements": n_noise,
        "seconds": seconds,
        "elements_per_s": n_noise / seconds,
        "packed_mb_per_s": n_noise / 8 / 1e6 / seconds,
        "submit_us_per_step": submit_s / steps * 1e6,
        "file_bytes": file_bytes,
        "mask_dataset_bytes": mask_bytes,
        "bits_per_noise_element_file": 8 * file_bytes / n_noise,
        "bits_per_noise_element_masks": 8 * mask_bytes / n_noise,
        "bits_per_applied_element_file": 8 * file_bytes / n_applied,
        "entropy_bits_per_element": _entropy(case["keep"]),
    }


def _entropy(p: float) -> float:
    return float(-(p * np.log2(p) + (1 - p) * np.log2(1 - p)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--elements", type=float, default=512 * 2**20,
                    help="noise elements per case (default 512Mi)")
    ap.add_argument("--smoke", action="store_true", help="tiny run: 4Mi elements per case")
    ap.add_argument("--out", type=Path, default=Path("bench_writer.json"))
    ap.add_argument("--dir", type=Path, default=None, help="where the run files go (default temp)")
    args = ap.parse_args(argv)
    elements = 4 * 2**20 if args.smoke else int(args.elements)
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for case in CASES:
            r = run_case(case, elements, Path(tmp) / f"{case['name']}.h5")
            print(f"  {case['name']}: {r['elements_per_s'] / 1e6:.0f} M elements/s",
                  file=sys.stderr)
            results.append(r)
    full = next(r for r in results if r["case"] == "full_entropy")
    result = {
        "benchmark": "writer",
        "smoke": args.smoke,
        "machine": C.machine(),
        "sites_per_step": SITES_PER_STEP,
        "cases": results,
        "target_bits_per_element_full_entropy": TARGET_BITS,
        "meets_target": full["bits_per_noise_element_file"] <= TARGET_BITS,
    }
    C.write_json(args.out, result)
    C.print_table(
        ["case", "input", "M el/s", "MB/s packed", "submit us/step", "bits/noise el (file)",
         "bits/noise el (masks)", "bits/applied el", "entropy"],
        [[r["case"], r["input"], r["elements_per_s"] / 1e6, r["packed_mb_per_s"],
          r["submit_us_per_step"], f"{r['bits_per_noise_element_file']:.4f}",
          f"{r['bits_per_noise_element_masks']:.4f}", f"{r['bits_per_applied_element_file']:.4f}",
          f"{r['entropy_bits_per_element']:.3f}"] for r in results])
    print(f"\nfull-entropy bits/element {full['bits_per_noise_element_file']:.4f} "
          f"(target <= {TARGET_BITS}): {'met' if result['meets_target'] else 'NOT met'}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
