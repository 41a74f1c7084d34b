"""Benchmark: what a run file costs on disk, per training step and per mask element.

Records every mask of ``--steps`` training steps of each reference model (see ``_common.py``)
and measures the closed run file: bytes on disk per step (whole file, and the mask datasets
alone), bits per sampled (noise) mask element and per applied mask element, per model and per
site. Broadcast masks (``SpatialDropout1D``, ``Dropout1d``, RNN masks shared over time) must
cost bits per *noise* element: the per-site table shows noise vs applied elements.

No timing here (``bench_overhead.py`` measures time, ``bench_writer.py`` the writer alone).

Usage::

    python benchmarks/bench_storage.py                 # 200 steps per model
    python benchmarks/bench_storage.py --framework torch --steps 1000
    python benchmarks/bench_storage.py --smoke

Writes ``bench_storage.json`` (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
from bench_overhead import storage_of


def record_keras(steps: int, path: Path) -> int:
    import dropspy

    model = C.keras_model(seed=0)
    x, y = C.keras_data(steps)
    with dropspy.record(model, path) as rec:
        model.fit(x, y, batch_size=C.BATCH, epochs=1, shuffle=False, verbose=0)
        return rec.adapter._step


def record_torch(steps: int, path: Path) -> int:
    import torch

    import dropspy

    model = C.torch_model(seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = C.torch_data(steps)
    with dropspy.record(model, path):
        for tokens, targets in data:
            C.torch_train_step(model, opt, tokens, targets)
    return steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--framework", choices=("keras", "torch", "both"), default="both")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 200)")
    ap.add_argument("--smoke", action="store_true", help="tiny run: 5 steps")
    ap.add_argument("--out", type=Path, default=Path("bench_storage.json"))
    ap.add_argument("--dir", type=Path, default=None, help="where the run files go (default temp)")
    args = ap.parse_args(argv)
    steps = args.steps or (5 if args.smoke else 200)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    frameworks = ["keras", "torch"] if args.framework == "both" else [args.framework]
    import torch  # before tensorflow, always

    # Nothing is timed here: one thread is far quicker than two on a loaded machine.
    torch.set_num_threads(1)

    if "keras" in frameworks:
        import keras  # noqa: F401
    result: dict[str, Any] = {"benchmark": "storage", "smoke": args.smoke, "steps": steps,
                              "machine": C.machine()}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for fw in frameworks:
            path = Path(tmp) / f"{fw}.h5"
            n = (record_keras if fw == "keras" else record_torch)(steps, path)
            result[fw] = storage_of(path, n)
    C.write_json(args.out, result)
    rows = []
    for fw in frameworks:
        s = result[fw]
        rows.append([fw, s["steps_recorded"], s["records"], s["bytes_per_step"],
                     s["mask_bytes_per_step"], s["bits_per_noise_element_file"],
                     s["bits_per_noise_element_masks"], s["bits_per_applied_element_file"]])
    C.print_table(["framework", "steps", "records", "bytes/step (file)", "bytes/step (masks)",
                   "bits/noise el (file)", "bits/noise el (masks)", "bits/applied el (file)"],
                  rows)
    rows = []
    for fw in frameworks:
        for name, site in result[fw]["sites"].items():
            if site["records"]:
                rows.append([fw, name, site["records"], site["noise_elements"] // site["records"],
                             site["applied_elements"] // site["records"],
                             8 * site.get("bits_bytes", 0) / max(site["noise_elements"], 1)])
    print()
    C.print_table(["framework", "site", "records", "noise el/record", "applied el/record",
                   "bits/noise el (masks)"], rows)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
